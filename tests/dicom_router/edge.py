"""Helpers for the DICOM-edge security and limit tests: a configured StoreSCP, TLS DCMTK tools, raw peers."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dicom_router.headers import InstanceHeader
from dicom_router.scp import StoreSCP
from dicom_router.spool import Spool
from tests.dicom_router.certs import KeyPair
from tests.dicom_router.conftest import RunningScp
from tests.dicom_router.peers import DCMTK_ENV, LOOPBACK, MAX_PDU


@contextmanager
def serving(folder: Path, on_instance: Any = None, **options: Any) -> Iterator[RunningScp]:
    """A StoreSCP ('RADAI' on a free loopback port) with the given keyword options; stopped on exit."""
    spool = Spool(folder / "spool")
    headers: list[InstanceHeader] = []

    def record(header: InstanceHeader) -> None:
        if on_instance is not None:
            on_instance(header)
        headers.append(header)

    scp = StoreSCP("RADAI", LOOPBACK, 0, spool, record, **options)
    scp.start()
    try:
        yield RunningScp(scp=scp, spool=spool, headers=headers)
    finally:
        scp.stop()


def tls_args(pair: KeyPair, ca: Path) -> list[str]:
    """DCMTK options for TLS with this key pair, trusting ``ca`` (the default profile is TLS 1.2+)."""
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(ca)]


def dcmtk(tool: str, port: int, *options: str, files: Sequence[Path] = (), calling_ae: str = "MODALITY",
          called_ae: str = "RADAI") -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run a DCMTK SCU (echoscu, storescu) against the loopback port."""
    args = [tool, "-aet", calling_ae, "-aec", called_ae, "--max-pdu", MAX_PDU, *options, LOOPBACK, str(port)]
    return subprocess.run(
        [*args, *map(str, files)], env=DCMTK_ENV, capture_output=True, text=True, timeout=120
    )


def association_answer(port: int, calling_ae: str = "MODALITY", called_ae: str = "RADAI") -> tuple[int, ...]:
    """Request a Verification association with pynetdicom: () when accepted (then released), else the
    A-ASSOCIATE-RJ (result, source, diagnostic)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 30
    try:
        assoc = ae.associate(LOOPBACK, port, ae_title=called_ae)
        if assoc.is_established:
            assoc.release()
            return ()
        primitive = assoc.acceptor.primitive
        if not assoc.is_rejected or not isinstance(primitive, A_ASSOCIATE):
            return (-1,)
        return (int(primitive.result or 0), int(primitive.result_source or 0), int(primitive.diagnostic or 0))
    finally:
        ae.shutdown()


def closed_by_peer(sock: socket.socket, timeout: float = 30.0) -> bytes | None:
    """Read until the peer closes; the bytes it sent before closing, or None if it stayed open."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        return None
    except OSError:
        pass  # reset by the peer: closed
    return data
