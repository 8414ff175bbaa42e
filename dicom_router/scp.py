"""Storage SCP: C-ECHO and C-STORE into the durable spool, answering every C-STORE with a named status.

The C-STORE handler parses only the header (no pixel decoding), writes the raw bytes to the spool
(fsync), hands an :class:`InstanceHeader` to a callback that must only enqueue, and returns within
milliseconds. pynetdicom runs one thread per association; the handler never raises.

The SCP also remembers, per association, the Study Instance UIDs it stored successfully. When the peer
releases the association normally (A-RELEASE, pynetdicom's EVT_RELEASED) it reports them to an optional
``on_association_released`` callback: the sender says it is done, the main completion signal. A study
that another association still open has stored instances of is left out (that one's release reports it).
An aborted or dropped association reports nothing (the sender may retry) and is only logged.

Edge security and limits (see :mod:`dicom_router.security` and :mod:`dicom_router.netguard`): the called
AE title and an optional allow-list of (calling AE, IP network) are checked on A-ASSOCIATE-RQ; at most
``max_associations`` associations are admitted at once (more get A-ASSOCIATE-RJ "local limit exceeded";
connections still negotiating do not count, so trickling peers cannot take the slots) and at most
``max_connections`` TCP connections are open; optional TLS 1.2+; ACSE/DIMSE/network timeouts; PDUs over
``max_pdu_size`` are aborted before buffering; a deflated data set that inflates beyond
``max_inflated_bytes`` is answered 0xA700 OUT_OF_RESOURCES (the configured cap is a local resource limit,
so a bigger cap would accept it).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
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
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dicom_router.events import Peer, ScpObserver, notify_association, notify_stored
from dicom_router.headers import InstanceHeader, header_from_encoded
from dicom_router.netguard import (
    DEFAULT_MAX_ASSOCIATION_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    GuardedServer,
    TransportLimits,
    inflated_size_exceeds,
    peer_ip,
)
from dicom_router.security import (
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_LOCAL_LIMIT,
    AllowedPeer,
    TlsSettings,
    is_allowed,
    server_context,
)
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
    DeflatedExplicitVRLittleEndian,
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

#: Largest PDU we announce and accept; matches the tuned DCMTK peers (``--max-pdu 131072``).
MAX_PDU_SIZE = 131072
DEFAULT_MAX_ASSOCIATIONS = 16
DEFAULT_ACSE_TIMEOUT_S = 30.0
DEFAULT_DIMSE_TIMEOUT_S = 60.0
DEFAULT_NETWORK_TIMEOUT_S = 60.0
#: Largest inflated size of a Deflated Explicit VR Little Endian data set (deflate-bomb guard).
DEFAULT_MAX_INFLATED_BYTES = 2 << 30

#: ``on_association_released(calling_ae, study_uids)``: called on the association's thread after a normal
#: release, with the studies of the instances stored successfully on it; must only enqueue.
ReleaseCallback = Callable[[str, frozenset[str]], None]


@dataclasses.dataclass(frozen=True)
class ScpOptions:
    """Security and limits of a StoreSCP, as one value (the keyword arguments of StoreSCP)."""

    allowed: Sequence[AllowedPeer] | None = None
    require_called_ae: bool = True
    tls: TlsSettings | None = None
    max_associations: int = DEFAULT_MAX_ASSOCIATIONS
    max_connections: int | None = None
    acse_timeout_s: float = DEFAULT_ACSE_TIMEOUT_S
    dimse_timeout_s: float = DEFAULT_DIMSE_TIMEOUT_S
    network_timeout_s: float = DEFAULT_NETWORK_TIMEOUT_S
    max_pdu_size: int = MAX_PDU_SIZE
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_association_s: float = DEFAULT_MAX_ASSOCIATION_S
    observer: ScpObserver | None = None

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class StoreSCP:
    """A pynetdicom Application Entity serving C-ECHO and C-STORE into a :class:`Spool`.

    Keyword-only options (all optional): ``allowed`` (None: any sender), ``require_called_ae``,
    ``tls``, ``max_associations``, ``max_connections`` (default 4 x max_associations), the timeouts
    in seconds (``network_timeout_s`` is also the idle timeout of an association and the time one PDU may
    take to arrive), ``max_pdu_size``, ``max_inflated_bytes``, ``max_message_bytes`` (largest data set as
    received), ``max_association_s`` (longest association) and ``observer`` (told of every association
    accepted or rejected and every C-STORE answered: see :mod:`dicom_router.events`). Invalid values raise
    ValueError."""

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
        *,
        allowed: Sequence[AllowedPeer] | None = None,
        require_called_ae: bool = True,
        tls: TlsSettings | None = None,
        max_associations: int = DEFAULT_MAX_ASSOCIATIONS,
        max_connections: int | None = None,
        acse_timeout_s: float = DEFAULT_ACSE_TIMEOUT_S,
        dimse_timeout_s: float = DEFAULT_DIMSE_TIMEOUT_S,
        network_timeout_s: float = DEFAULT_NETWORK_TIMEOUT_S,
        max_pdu_size: int = MAX_PDU_SIZE,
        max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_association_s: float = DEFAULT_MAX_ASSOCIATION_S,
        observer: ScpObserver | None = None,
    ) -> None:
        if max_associations < 1:
            raise ValueError("max_associations must be at least 1")
        if min(acse_timeout_s, dimse_timeout_s, network_timeout_s) <= 0:
            raise ValueError("timeouts must be positive")
        if max_inflated_bytes < 1:
            raise ValueError("max_inflated_bytes must be positive")
        self._limits = TransportLimits(
            max_pdu_size=max_pdu_size,
            read_timeout_s=network_timeout_s,
            max_connections=max_connections if max_connections is not None else 4 * max_associations,
            max_message_bytes=max_message_bytes,
            max_association_s=max_association_s,
        )
        self._allowed = None if allowed is None else tuple(allowed)
        self._require_called_ae = require_called_ae
        self._tls = tls
        self._max_associations = max_associations
        self._timeouts = (acse_timeout_s, dimse_timeout_s, network_timeout_s)
        self._max_inflated = max_inflated_bytes
        # Associations admitted past A-ASSOCIATE-RQ; a finished one's thread is no longer alive.
        self._admitted: weakref.WeakSet[Association] = weakref.WeakSet()
        self._admit_lock = threading.Lock()
        self._ae_title = ae_title
        self._host = host
        self._requested_port = port
        self._spool = spool
        self._on_instance = on_instance
        self._clock = clock
        self._sop_classes = tuple(sop_classes)
        self._ae: AE | None = None
        self._server: GuardedServer | None = None
        self._lock = threading.Lock()
        self._on_released = on_association_released
        # Association -> Study UIDs stored on it. Weak keys: an association that ends without a release or
        # abort event (e.g. its DUL thread died) leaves no entry behind.
        self._studies: weakref.WeakKeyDictionary[Association, set[str]] = weakref.WeakKeyDictionary()
        self._studies_lock = threading.Lock()
        self._observer = observer

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
            ae.maximum_pdu_size = self._limits.max_pdu_size
            ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = self._timeouts
            ae.require_called_aet = self._require_called_ae
            # Our own admission check (EVT_REQUESTED) counts admitted associations; pynetdicom's counts
            # every open connection, which the connection cap already bounds.
            ae.maximum_associations = self._limits.max_connections + 1
            ae.add_supported_context(VERIFICATION_SOP_CLASS)
            for sop_class in self._sop_classes:
                ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
            # The SCP never releases on its own (pynetdicom's network_timeout_response stays "A-ABORT"), so
            # every EVT_RELEASED here is a release requested by the peer.
            handlers: list[EventHandlerType] = [
                (evt.EVT_REQUESTED, self._handle_requested),
                (evt.EVT_REJECTED, self._handle_rejected),
                (evt.EVT_ACCEPTED, self._handle_accepted),
                (evt.EVT_C_STORE, self._handle_store),
                (evt.EVT_RELEASED, self._handle_released),
                (evt.EVT_ABORTED, self._handle_aborted),
            ]
            ssl_context = None if self._tls is None else server_context(self._tls)
            server = cast(
                GuardedServer,
                ae.make_server(
                    (self._host, self._requested_port),
                    ssl_context=ssl_context,
                    evt_handlers=handlers,
                    server_class=GuardedServer,
                    limits=self._limits,
                ),
            )
            threading.Thread(target=server.serve_forever, name="dicom-router-scp", daemon=True).start()
            self._server, self._ae = server, ae
            log.info(
                "DICOM SCP %s listening on %s:%d%s",
                self._ae_title,
                self._host,
                self.port,
                " (TLS)" if ssl_context is not None else "",
            )

    def stop(self) -> None:
        """Stop accepting, close open associations and release the port. Idempotent."""
        with self._lock:
            server, ae = self._server, self._ae
            self._server = self._ae = None
        if server is not None:
            server.shutdown()
        if ae is not None:
            ae.shutdown()

    def _handle_requested(self, event: Event) -> None:
        """EVT_REQUESTED handler: reject an unknown called AE, a sender off the allow-list, or one over
        the association limit (A-ASSOCIATE-RJ), with a warning naming calling AE and IP (no PHI)."""
        assoc = event.assoc
        request = cast(A_ASSOCIATE, assoc.requestor.primitive)
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        ip = peer_ip(assoc)
        try:
            refusal = self._refusal(assoc, calling, called, ip)
        except Exception:  # fail closed: pynetdicom would log a handler error and accept
            log.exception("admission check failed")
            # transient, service-user, no reason given
            refusal = (0x02, 0x01, 0x01), "admission check failed", "admission_error"
        if refusal is None:
            return
        rejection, why, reason = refusal
        log.warning("association from %s (%s) to %s rejected: %s", calling, ip, called, why)
        notify_association(self._observer, Peer(calling, ip), False, reason)
        assoc.acse.send_reject(*rejection)
        assoc.kill()  # as pynetdicom does after its own rejections: waits until the A-ASSOCIATE-RJ is out

    def _refusal(
        self, assoc: Association, calling: str, called: str, ip: str
    ) -> tuple[tuple[int, int, int], str, str] | None:
        """None to admit, else (A-ASSOCIATE-RJ result/source/diagnostic, log text, bounded reason)."""
        if self._require_called_ae and called != self._ae_title.strip():
            return REJECT_CALLED_AE, "called AE title not recognised", "called_ae"
        if not is_allowed(self._allowed, calling, ip):
            return REJECT_CALLING_AE, "calling AE title not recognised (not on the allow-list)", "not_allowed"
        if not self._admit(assoc):
            limit = f"local limit exceeded ({self._max_associations} associations)"
            return REJECT_LOCAL_LIMIT, limit, "limit"
        return None

    def _admit(self, assoc: Association) -> bool:
        with self._admit_lock:
            live = sum(1 for other in self._admitted if other is not assoc and other.is_alive())
            if live >= self._max_associations:
                return False
            self._admitted.add(assoc)
            return True

    def _handle_rejected(self, event: Event) -> None:
        """EVT_REJECTED handler: log pynetdicom's own rejections (ours are logged when made)."""
        primitive = event.assoc.acceptor.primitive
        request = cast(A_ASSOCIATE, event.assoc.requestor.primitive)
        log.warning(
            "association from %s (%s) rejected by the DICOM stack (result %s, source %s, reason %s)",
            str(request.calling_ae_title).strip(),
            peer_ip(event.assoc),
            getattr(primitive, "result", "?"),
            getattr(primitive, "result_source", "?"),
            getattr(primitive, "diagnostic", "?"),
        )
        notify_association(self._observer, _peer(event), False, "dicom_stack")

    def _handle_accepted(self, event: Event) -> None:
        """EVT_ACCEPTED handler: tell the observer."""
        notify_association(self._observer, _peer(event), True, "none")

    def _handle_store(self, event: Event) -> int:
        """EVT_C_STORE handler: never raises, always answers with a deliberate status."""
        try:
            status = self._store(event)
        except Exception:  # last resort: a bug must not crash the association thread
            log.exception("C-STORE failed unexpectedly; answering PROCESSING_FAILURE")
            status = Status.PROCESSING_FAILURE
        if self._observer is not None:
            notify_stored(self._observer, _peer(event), status.name.lower(), _received_size(event))
        return int(status)

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
        address = peer_ip(event.assoc)
        if not str(
            requestor.ae_title
        ).strip():  # dropped before any A-ASSOCIATE-RQ (e.g. failed TLS, timeout)
            log.info("connection from %s closed before an association was requested", address)
            return
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
        refusal = self._deflate_refusal(event, calling_ae)
        if refusal is not None:
            return refusal
        try:
            encoded = _part10(event, calling_ae)
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

    def _deflate_refusal(self, event: Event, calling_ae: str) -> Status | None:
        """For a deflated data set, a refusal when it is not valid deflate or inflates over the cap."""
        if event.context.transfer_syntax != DeflatedExplicitVRLittleEndian:
            return None
        raw = cast(BytesIO, cast(C_STORE, event.request).DataSet).getbuffer()
        try:
            too_big = inflated_size_exceeds(raw, self._max_inflated)
        except zlib.error:
            log.warning("C-STORE from %s refused: deflated data set is not valid deflate", calling_ae)
            return Status.CANNOT_UNDERSTAND
        finally:
            raw.release()
        if too_big:
            log.warning(
                "C-STORE from %s refused: deflated data set inflates beyond %d bytes",
                calling_ae,
                self._max_inflated,
            )
            return Status.OUT_OF_RESOURCES
        return None


def _peer(event: Event) -> Peer:
    return Peer(str(event.assoc.requestor.ae_title).strip(), peer_ip(event.assoc))


def _received_size(event: Event) -> int:
    """Bytes of the data set as received (before any inflation), 0 when there is none."""
    dataset = getattr(event.request, "DataSet", None)
    if not isinstance(dataset, BytesIO):
        return 0
    with dataset.getbuffer() as view:
        return view.nbytes


def _part10(event: Event, calling_ae: str) -> bytes:
    """The received data set as Part 10 bytes, as ``Event.encoded_dataset`` builds them, with the sender's
    AE title in the file meta (Source Application Entity Title): recovery after a restart reads it back."""
    meta = event.file_meta
    if 0 < len(calling_ae) <= 16 and all(" " <= c <= "~" and c != "\\" for c in calling_ae):  # AE VR
        meta.SourceApplicationEntityTitle = calling_ae
    stream = cast(BytesIO, cast(C_STORE, event.request).DataSet).getvalue()
    return b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta), stream))
