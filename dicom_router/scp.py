"""Storage SCP: C-ECHO and C-STORE into the durable spool, answering every C-STORE with a named status.

The C-STORE handler parses only the header (no pixel decoding), writes the raw bytes to the spool
(fsync), hands an :class:`InstanceHeader` to a callback that must only enqueue, and returns within
milliseconds. pynetdicom runs one thread per association; the handler never raises.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRColorImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from dicom_router.headers import InstanceHeader, header_from_encoded
from dicom_router.spool import Spool
from dicom_router.statuses import Status
from dicom_router.uids import uid_fingerprint

# pynetdicom's INFO/DEBUG output can include patient attributes: keep it at WARNING unless the operator
# deliberately lowers it.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

log = logging.getLogger(__name__)

#: Storage SOP classes accepted by default: CT, MR, their enhanced and legacy-converted forms, and every
#: Secondary Capture flavour.
STORAGE_SOP_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    EnhancedMRColorImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    SecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

#: Largest PDU we announce; matches the tuned DCMTK peers (``--max-pdu 131072``).
MAX_PDU_SIZE = 131072


class StoreSCP:
    """A pynetdicom Application Entity serving C-ECHO and C-STORE into a :class:`Spool`."""

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        spool: Spool,
        on_instance: Callable[[InstanceHeader], None],
        clock: Callable[[], float] = time.time,
        sop_classes: Sequence[str] = STORAGE_SOP_CLASSES,
    ) -> None:
        self._ae_title = ae_title
        self._host = host
        self._requested_port = port
        self._spool = spool
        self._on_instance = on_instance
        self._clock = clock
        self._sop_classes = tuple(sop_classes)
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    @property
    def ae_title(self) -> str:
        """Our AE title."""
        return self._ae_title

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when constructed with port 0); RuntimeError before start."""
        if self._server is None:
            raise RuntimeError("StoreSCP is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in background threads; returns at once. Idempotent."""
        with self._lock:
            if self._server is not None:
                return
            ae = AE(ae_title=self._ae_title)
            ae.maximum_pdu_size = MAX_PDU_SIZE
            ae.add_supported_context(VERIFICATION_SOP_CLASS)
            for sop_class in self._sop_classes:
                ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
            handlers: list[EventHandlerType] = [(evt.EVT_C_STORE, self._handle_store)]
            self._server = ae.start_server(
                (self._host, self._requested_port), block=False, evt_handlers=handlers
            )
            self._ae = ae
            log.info("DICOM SCP %s listening on %s:%d", self._ae_title, self._host, self.port)

    def stop(self) -> None:
        """Stop accepting, close open associations and release the port. Idempotent."""
        with self._lock:
            server, ae = self._server, self._ae
            self._server = self._ae = None
        if server is not None:
            server.shutdown()
        if ae is not None:
            ae.shutdown()

    def _handle_store(self, event: Event) -> int:
        """EVT_C_STORE handler: never raises, always answers with a deliberate status."""
        try:
            return int(self._store(event))
        except Exception:  # last resort: a bug must not crash the association thread
            log.exception("C-STORE failed unexpectedly; answering PROCESSING_FAILURE")
            return int(Status.PROCESSING_FAILURE)

    def _store(self, event: Event) -> Status:
        received_at = self._clock()
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            encoded = event.encoded_dataset(include_meta=True)
            header = header_from_encoded(encoded, Path(), calling_ae, received_at)
        except ValueError as exc:
            log.warning("C-STORE from %s refused, cannot understand data set: %s", calling_ae, exc)
            return Status.CANNOT_UNDERSTAND
        request = cast(C_STORE, event.request)
        tag = uid_fingerprint(header.sop_instance_uid)
        if str(request.AffectedSOPClassUID) != header.sop_class_uid:
            log.warning("C-STORE from %s refused, SOP class mismatch (instance %s)", calling_ae, tag)
            return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        if str(request.AffectedSOPInstanceUID) != header.sop_instance_uid:
            log.warning("C-STORE from %s refused, SOP instance UID mismatch (instance %s)", calling_ae, tag)
            return Status.CANNOT_UNDERSTAND
        try:
            path = self._spool.store(header.sop_instance_uid, encoded)
        except OSError as exc:
            # strerror only: the full message would name the file, i.e. the raw SOP Instance UID.
            log.error(
                "C-STORE from %s refused, spool write failed: %s (instance %s)", calling_ae, exc.strerror, tag
            )
            return Status.OUT_OF_RESOURCES
        try:
            self._on_instance(dataclasses.replace(header, path=path))
        except Exception:
            log.exception("C-STORE from %s: instance callback failed (instance %s)", calling_ae, tag)
            return Status.PROCESSING_FAILURE
        return Status.SUCCESS
