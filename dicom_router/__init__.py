"""dicom_router: the DICOM edge of radai, usable on its own as a router.

Storage SCP into a durable spool, study assembly (complete on association release, quiet period as the
fallback), declarative series selection, SCU delivery with retries, and named DIMSE statuses. Depends on
pydicom, pynetdicom and the standard library only (never on ``radai``).
"""

from dicom_router.assembler import Assembler, Series, Study, orientation_label
from dicom_router.headers import InstanceHeader, read_header
from dicom_router.receiver import Receiver
from dicom_router.scp import StoreSCP
from dicom_router.scu import DeliveryFailed, Destination, send_datasets
from dicom_router.selection import SeriesRule, select_series
from dicom_router.spool import Spool
from dicom_router.statuses import Status
from dicom_router.uids import is_valid_uid

__all__ = [
    "Assembler",
    "DeliveryFailed",
    "Destination",
    "InstanceHeader",
    "Receiver",
    "Series",
    "SeriesRule",
    "Spool",
    "Status",
    "StoreSCP",
    "Study",
    "is_valid_uid",
    "orientation_label",
    "read_header",
    "select_series",
    "send_datasets",
]
