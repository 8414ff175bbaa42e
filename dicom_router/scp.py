"""Storage SCP: C-ECHO and C-STORE into the durable spool, answering every C-STORE with a named status.

The C-STORE handler parses only the header (no pixel decoding), writes the raw bytes to the spool
(fsync), hands an :class:`InstanceHeader` to a callback that must only enqueue, and returns within
milliseconds. pynetdicom runs one thread per association; the handler never raises.

The SCP also remembers, per association, the Study Instance UIDs it stored successfully. When the peer
releases the association normally (A-RELEASE, pynetdicom's EVT_RELEASED) it reports them to an optional
``on_association_released`` callback: the sender says it is done, the main completion signal. A study
that another association still open has stored instances of is left out (that one's release reports it).
An aborted or dropped association reports nothing (the sender may retry) and is only logged.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
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
from pynetdicom.association import Association
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

#: ``on_association_released(calling_ae, study_uids)``: called on the association's thread after a normal
#: release, with the studies of the instances stored successfully on it; must only enqueue.
ReleaseCallback = Callable[[str, frozenset[str]], None]


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
        on_association_released: ReleaseCallback | None = None,
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
        self._on_released = on_association_released
        # Association -> Study UIDs stored on it. Weak keys: an association that ends without a release or
        # abort event (e.g. its DUL thread died) leaves no entry behind.
        self._studies: weakref.WeakKeyDictionary[Association, set[str]] = weakref.WeakKeyDictionary()
        self._studies_lock = threading.Lock()

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
            # The SCP never releases on its own (pynetdicom's network_timeout_response stays "A-ABORT"), so
            # every EVT_RELEASED here is a release requested by the peer.
            handlers: list[EventHandlerType] = [
                (evt.EVT_C_STORE, self._handle_store),
                (evt.EVT_RELEASED, self._handle_released),
                (evt.EVT_ABORTED, self._handle_aborted),
            ]
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

    def _handle_released(self, event: Event) -> None:
        """EVT_RELEASED handler: report the association's studies; never raises."""
        with self._studies_lock:
            own = self._studies.pop(event.assoc, set())
            others = [uids for assoc, uids in self._studies.items() if assoc.is_alive()] if own else []
        still_open: set[str] = set().union(*others)
        study_uids = frozenset(own - still_open)
        if self._on_released is None or not study_uids:
            return
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            self._on_released(calling_ae, study_uids)
        except Exception:
            log.exception("association from %s released: release callback failed", calling_ae)

    def _handle_aborted(self, event: Event) -> None:
        """EVT_ABORTED handler (A-ABORT either way, or the connection dropped): no completion signal."""
        study_uids = self._forget(event.assoc)
        requestor = event.assoc.requestor
        address = requestor.address_info.address if requestor.address_info is not None else "?"
        log.warning(
            "association from %s (%s) aborted after storing instances of %d studies; "
            "waiting for a retry or the quiet period",
            str(requestor.ae_title).strip(),
            address,
            len(study_uids),
        )

    def _remember(self, assoc: Association, study_uid: str) -> None:
        with self._studies_lock:
            self._studies.setdefault(assoc, set()).add(study_uid)

    def _forget(self, assoc: Association) -> frozenset[str]:
        with self._studies_lock:
            return frozenset(self._studies.pop(assoc, ()))

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
        self._remember(event.assoc, header.study_uid)
        return Status.SUCCESS
