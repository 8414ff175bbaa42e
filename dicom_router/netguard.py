"""Transport guards for the storage SCP that pynetdicom 3 lacks.

pynetdicom reads a whole PDU into memory once it has its 6-byte header, whatever length the header
claims (its ``maximum_pdu_size`` is only announced), reads it from an accepted socket with no timeout (a
peer that trickles bytes holds its threads forever), runs the TLS handshake on the accepting thread (one
silent TLS client blocks every other connection), and starts a thread for every TCP connection. This
module fixes those at the socket layer, with pynetdicom's own classes:

* :class:`GuardedServer` (a ``ThreadedAssociationServer``) refuses TCP connections above
  ``max_connections`` and defers the TLS handshake to the association's thread;
* :class:`GuardedSocket` (an ``AssociationSocket``) gives every PDU read ``read_timeout_s`` from its
  first byte, performs the TLS handshake under the same deadline, and answers a PDU longer than allowed
  with an A-ABORT before reading its body.

:func:`inflated_size_exceeds` bounds the inflation of Deflated Explicit VR Little Endian data sets.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
#: Cap for every PDU but P-DATA-TF (an A-ASSOCIATE-RQ with 128 contexts of many syntaxes is ~100 KB).
MAX_CONTROL_PDU = 1 << 20
#: A-ABORT PDU: source 0x02 (service provider), reason 0x06 (invalid PDU parameter value), PS3.8 9.3.8.
_ABORT_INVALID_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])
_CHUNK = 65536
#: Largest data set one C-STORE may carry (as received): big multi-frame objects (tomosynthesis, whole-slide
#: tiles) reach a few GiB, and pynetdicom buffers the whole message in memory.
DEFAULT_MAX_MESSAGE_BYTES = 4 << 30
#: Longest an association may stay open: a day, so that a peer trickling small PDUs, each within the read
#: timeout, cannot hold a slot for ever.
DEFAULT_MAX_ASSOCIATION_S = 24 * 3600.0


@dataclass(frozen=True)
class TransportLimits:
    """Per-connection limits: the largest P-DATA-TF PDU accepted (what we announce), how long one PDU
    (or the TLS handshake) may take to arrive, how many TCP connections may be open at once, the largest
    DIMSE message (a data set as received, before any inflation; pynetdicom holds it in memory) and how
    long one association may last in all."""

    max_pdu_size: int
    read_timeout_s: float
    max_connections: int
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_association_s: float = DEFAULT_MAX_ASSOCIATION_S

    def __post_init__(self) -> None:
        if self.max_pdu_size < 4096:
            raise ValueError("max_pdu_size must be at least 4096 bytes")
        if self.read_timeout_s <= 0:
            raise ValueError("read timeout must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.max_message_bytes < self.max_pdu_size:
            raise ValueError("max_message_bytes must be at least max_pdu_size")
        if self.max_association_s <= 0:
            raise ValueError("max_association_s must be positive")

    def allows(self, pdu_type: int, length: int) -> bool:
        """True when a PDU of this type and length may be read."""
        return length <= (self.max_pdu_size if pdu_type == P_DATA_TF else MAX_CONTROL_PDU)


def peer_ip(assoc: Association) -> str:
    """The peer's IP address as text ('?' when unknown)."""
    info = assoc.requestor.address_info if assoc.is_acceptor else assoc.acceptor.address_info
    return str(info.address) if info is not None else "?"


class GuardedSocket(AssociationSocket):
    """An AssociationSocket whose reads are bounded in time and size (see the module docstring).

    Instances are made by :class:`GuardedHandler` re-classing the socket pynetdicom built (its
    constructor queues the transport-connection event, so a second instance cannot be built)."""

    _limits: TransportLimits
    _header_next: bool = True
    _refuse_body: bool = False
    _handshaken: bool = False
    _body_is_pdata: bool = False
    _message_bytes: int = 0
    _deadline: float = 0.0

    def guard(self, limits: TransportLimits) -> None:
        """Start enforcing ``limits``; also gives sends a timeout (pynetdicom leaves accepted sockets
        blocking forever)."""
        self._limits = limits
        self._header_next, self._refuse_body = True, False
        self._message_bytes, self._deadline = 0, time.monotonic() + limits.max_association_s
        self._handshaken = not isinstance(self.socket, ssl.SSLSocket)
        if self.socket is not None:
            self.socket.settimeout(limits.read_timeout_s)

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` within the read timeout; a too-long PDU header is answered with A-ABORT and
        the following body read returns nothing (pynetdicom then treats the connection as closed)."""
        if self._refuse_body:
            self._refuse_body = False
            return bytearray()
        sock = self.socket
        if sock is None:
            return bytearray()
        deadline = time.monotonic() + self._limits.read_timeout_s
        try:
            if not self._handshaken:
                self._handshake(cast(ssl.SSLSocket, sock), deadline)
            data = self._read(sock, nr_bytes, deadline)
        finally:
            self._restore_timeout()
        if self._header_next and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if time.monotonic() > self._deadline:
                self._abort(f"kept its association open longer than {self._limits.max_association_s:.0f} s")
                return bytearray()  # pynetdicom treats a short header as the connection closing
            if not self._limits.allows(pdu_type, length):
                self._abort(f"sent a PDU of type 0x{pdu_type:02X} claiming {length} bytes, over the limit")
                self._refuse_body = True
                return data
            self._header_next = length == 0
            self._body_is_pdata = pdu_type == P_DATA_TF
        elif not self._header_next:
            self._header_next = True
            if self._body_is_pdata and self._over_message_limit(data):
                self._abort(f"sent a data set over {self._limits.max_message_bytes} bytes")
                return bytearray()  # a short body: pynetdicom treats the connection as closed
        return data

    def _over_message_limit(self, body: bytearray) -> bool:
        """Add the data-set fragments of a P-DATA-TF body (PS3.8 9.3.5.1) to the current message's size;
        True once it is over the limit. A last fragment ends the message."""
        offset = 0
        while offset + 6 <= len(body):
            item_length = int.from_bytes(body[offset : offset + 4], "big")
            control = body[offset + 5]
            if not control & 0x01:  # data set, not command
                self._message_bytes += max(0, item_length - 2)
                if self._message_bytes > self._limits.max_message_bytes:
                    return True
                if control & 0x02:
                    self._message_bytes = 0
            offset += 4 + item_length
        return False

    def _restore_timeout(self) -> None:
        """Back to the plain timeout (sends use it too); the socket may have been closed meanwhile."""
        try:
            if self.socket is not None:
                self.socket.settimeout(self._limits.read_timeout_s)
        except OSError:
            pass

    def _read(self, sock: socket.socket, nr_bytes: int, deadline: float) -> bytearray:
        data = bytearray()
        while len(data) < nr_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("peer %s too slow: PDU not received in time, connection dropped", self._ip())
                raise TimeoutError("PDU read timed out")
            sock.settimeout(remaining)
            chunk = sock.recv(min(_CHUNK, nr_bytes - len(data)))
            if not chunk:
                break
            data += chunk
        return data

    def _handshake(self, sock: ssl.SSLSocket, deadline: float) -> None:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.warning("TLS handshake with %s failed (%s); connection refused", self._ip(), reason)
            raise
        self._handshaken = True

    def _abort(self, why: str) -> None:
        log.warning("peer %s %s; association aborted", self._ip(), why)
        try:
            if self.socket is not None:
                self.socket.sendall(_ABORT_INVALID_PARAMETER)
                self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _ip(self) -> str:
        return peer_ip(self.assoc)


class GuardedHandler(RequestHandler):
    """pynetdicom's request handler, with the association's socket turned into a GuardedSocket."""

    server: GuardedServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if sock is not None:
            sock.__class__ = GuardedSocket
            cast(GuardedSocket, sock).guard(self.server.limits)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """A ThreadedAssociationServer with a connection cap and the TLS handshake off the accept thread.

    Built by ``AE.make_server(..., server_class=GuardedServer, limits=...)``; not registered with the AE,
    so stop it with :meth:`shutdown` (``AE.shutdown`` does not see it)."""

    def __init__(
        self,
        ae: ApplicationEntity,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[EventHandlerType] | None = None,
        *,
        limits: TransportLimits,
    ) -> None:
        self.limits = limits
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers, GuardedHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept; wrap for TLS without handshaking (that happens on the association's thread)."""
        sock = cast(socket.socket, self.socket)
        client, address = sock.accept()
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse (close) a connection when ``max_connections`` are already open."""
        open_now = sum(1 for assoc in self.ae.active_associations if assoc.is_acceptor)
        if open_now < self.limits.max_connections:
            return True
        host = client_address[0] if isinstance(client_address, tuple) else client_address
        log.warning("connection from %s refused: %d connections already open", host, open_now)
        return False

    def shutdown(self) -> None:
        """Stop serving and close the listening socket."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def inflated_size_exceeds(deflated: bytes | memoryview, cap: int) -> bool:
    """True when raw-deflate data (PS3.5 A.5) inflates to more than ``cap`` bytes.

    Inflates in bounded chunks and discards them, so a deflate bomb costs CPU time, never memory.
    Raises zlib.error when the data is not a valid deflate stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pending: bytes | memoryview = deflated
    while pending:
        total += len(inflater.decompress(pending, _CHUNK * 16))
        if total > cap:
            return True
        pending = inflater.unconsumed_tail
    total += len(inflater.flush())
    return total > cap
