"""Who may talk to the DICOM edge and how: the sender allow-list and TLS contexts (TLS 1.2 or later)."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE title not recognised
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE title not recognised
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), limit exceeded


@dataclass(frozen=True)
class AllowedPeer:
    """A sender that may associate: its calling AE title and the IP address or network (CIDR) it comes from.

    AE titles compare exactly (case-sensitive, surrounding spaces ignored, as PS3.8 pads them)."""

    ae_title: str
    network: str
    _net: IpNetwork = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        title = self.ae_title.strip()
        if not title or len(title) > 16 or "\\" in title or not title.isascii():
            raise ValueError("AE title must be 1-16 ASCII characters without backslash")
        try:
            net = ipaddress.ip_network(self.network.strip(), strict=False)
        except ValueError as exc:
            raise ValueError(f"not an IP address or network: {self.network!r}") from exc
        object.__setattr__(self, "_net", net)

    def matches(self, calling_ae: str, address: str) -> bool:
        """True for this AE title coming from an address inside the network."""
        ip = _ip(address)
        return ip is not None and calling_ae.strip() == self.ae_title.strip() and ip in self._net


def is_allowed(allowed: Sequence[AllowedPeer] | None, calling_ae: str, address: str) -> bool:
    """True when ``allowed`` is None (everyone) or one of its entries matches the pair."""
    return allowed is None or any(peer.matches(calling_ae, address) for peer in allowed)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address as an IP, an IPv4-mapped IPv6 address (a dual-stack listener) as its IPv4 form."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class TlsSettings:
    """Certificate, key and CA for DICOM TLS.

    Server side: ``cert_file``/``key_file`` are the server's; ``require_client_cert`` demands a client
    certificate signed by ``ca_file``. Client side: ``cert_file``/``key_file`` are presented to the server,
    whose certificate is verified against ``ca_file`` (the system CAs when None), with its host name or IP
    checked when ``check_hostname``."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """An SSLContext for the SCP: TLS 1.2+, our certificate, client certificates verified when required.

    Raises OSError/ssl.SSLError when a file is missing or does not match."""
    if tls.cert_file is None or tls.key_file is None:
        raise ValueError("a TLS server needs cert_file and key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """An SSLContext for the SCU: TLS 1.2+, the server verified against ``ca_file``, our certificate shown."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert_file is not None and tls.key_file is not None:  # mutual TLS: show our certificate
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx
