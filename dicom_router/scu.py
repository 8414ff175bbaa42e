"""Storage SCU: deliver a batch of data sets to one destination over one association, with retries."""

from __future__ import annotations

import copy
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_router.security import TlsSettings, client_context
from dicom_router.statuses import describe, is_stored
from dicom_router.uids import uid_fingerprint

logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its debug output can carry PHI

log = logging.getLogger(__name__)

MAX_PDU_SIZE = 131072
_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives results (a PACS, a router, a viewer archive)."""

    name: str
    ae_title: str
    host: str
    port: int


class DeliveryFailed(Exception):
    """Some data sets could not be delivered after every retry; the message is one line."""


@dataclass(frozen=True)
class _Item:
    dataset: Dataset
    sop_class: str
    sop_instance: str
    transfer_syntax: UID


def send_datasets(
    datasets: Sequence[Dataset],
    dest: Destination,
    calling_ae: str = "RADAI",
    retries: int = 3,
    backoff_s: float = 1.0,
    *,
    timeout_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    tls: TlsSettings | None = None,
) -> None:
    """Send ``datasets`` to ``dest`` over one association per attempt.

    Each data set's SOP class is proposed with its own transfer syntax (uncompressed ones also with the
    other little-endian uncompressed syntaxes so the peer may choose). After an association failure or a
    non-success status the data sets not yet stored are retried, up to ``retries`` more attempts with
    exponential backoff starting at ``backoff_s``. Warning statuses (0xB0xx) count as stored.
    With ``tls`` the association runs over TLS 1.2+, the peer's certificate verified against
    ``tls.ca_file`` (and its host name or IP when ``tls.check_hostname``), our certificate presented.
    Raises DeliveryFailed with a one-line reason when anything is left over, ValueError for a data set
    without SOP Class/Instance UIDs, OSError/ssl.SSLError when the TLS files cannot be loaded.
    """
    remaining = [_item(ds) for ds in datasets]
    if not remaining:
        return
    tls_args = None if tls is None else (client_context(tls), dest.host)
    attempts = max(0, retries) + 1
    reason = ""
    for attempt in range(attempts):
        if attempt:
            sleep(backoff_s * (2 ** (attempt - 1)))
        remaining, reason = _attempt(remaining, dest, calling_ae, timeout_s, tls_args)
        if not remaining:
            return
        log.warning(
            "delivery to %s: attempt %d/%d left %d data set(s): %s",
            dest.name,
            attempt + 1,
            attempts,
            len(remaining),
            reason,
        )
    raise DeliveryFailed(
        f"{len(remaining)} of {len(datasets)} data set(s) not delivered to {dest.name} "
        f"({dest.ae_title}@{dest.host}:{dest.port}) after {attempts} attempt(s): {reason}"
    )


def _item(ds: Dataset) -> _Item:
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    if not sop_class or not sop_instance:
        raise ValueError("data set lacks SOPClassUID or SOPInstanceUID")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        # Built in memory without file meta: send as Explicit VR Little Endian, without touching the caller's
        # object (a shallow copy shares the elements).
        ds = copy.copy(ds)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        syntax = ExplicitVRLittleEndian
    return _Item(ds, sop_class, sop_instance, UID(str(syntax)))


def _contexts(items: Sequence[_Item]) -> list[tuple[str, list[str]]]:
    """One presentation context per (SOP class, compressed syntax); uncompressed share one per class."""
    wanted: dict[tuple[str, str], list[str]] = {}
    for item in items:
        ts = item.transfer_syntax
        if ts.is_compressed or not ts.is_little_endian:
            wanted.setdefault((item.sop_class, ts), [ts])
        else:
            syntaxes = wanted.setdefault((item.sop_class, "native"), [])
            for candidate in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                if candidate not in syntaxes:
                    syntaxes.append(candidate)
    if len(wanted) > _MAX_CONTEXTS:
        raise ValueError(f"batch needs {len(wanted)} presentation contexts, more than {_MAX_CONTEXTS}")
    return [(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]


def _attempt(
    items: list[_Item],
    dest: Destination,
    calling_ae: str,
    timeout_s: float,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> tuple[list[_Item], str]:
    """One association; returns the items not stored and the last failure reason."""
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = MAX_PDU_SIZE
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class, syntaxes in _contexts(items):
        ae.add_requested_context(sop_class, syntaxes)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except Exception as exc:  # pynetdicom rarely raises here, but a crash must become a retry
        return items, f"association failed: {type(exc).__name__}"
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        return items, f"association {what}"
    try:
        return _send_all(assoc, items)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _send_all(assoc: Association, items: list[_Item]) -> tuple[list[_Item], str]:
    left: list[_Item] = []
    reason = ""
    for index, item in enumerate(items):
        if not assoc.is_established:
            return left + items[index:], reason or "association lost"
        try:
            response = assoc.send_c_store(item.dataset)
        except (ValueError, AttributeError) as exc:  # no accepted context, or cannot encode
            left.append(item)
            reason = f"not sent ({exc.__class__.__name__}: {_first_line(exc)})"
            continue
        status = response.get("Status") if response else None
        if status is None:
            left.append(item)
            reason = "no response (association aborted or timed out)"
        elif not is_stored(int(status)):
            left.append(item)
            reason = f"status {describe(int(status))}"
            log.warning("C-STORE of %s refused: %s", uid_fingerprint(item.sop_instance), reason)
    return left, reason


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""
