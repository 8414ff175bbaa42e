"""DICOM edge limits: association and connection caps, slow-loris peers, PDU size, deflate bombs."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association

from dicom_router.headers import InstanceHeader
from dicom_router.netguard import inflated_size_exceeds
from dicom_router.scp import StoreSCP
from dicom_router.spool import Spool
from dicom_router.statuses import Status
from tests.dicom_router.edge import closed_by_peer, dcmtk, serving
from tests.dicom_router.peers import CT_SERIES, DCMTK_ENV, LOOPBACK, MAX_PDU, dataset_offset, dcm_files

A_ABORT_INVALID_PDU_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])
VERIFICATION = "1.2.840.10008.1.1"


def _connect(port: int) -> socket.socket:
    return socket.create_connection((LOOPBACK, port), timeout=30)


def _wait_until(condition: object, limit: float = 30.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.05)
    return False


@contextmanager
def _association(
    port: int, contexts: list[tuple[str, str]], calling_ae: str = "MODALITY"
) -> Iterator[Association]:
    ae = AE(ae_title=calling_ae)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(LOOPBACK, port, ae_title="RADAI")
    try:
        assert assoc.is_established
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


# --- association and connection caps ---------------------------------------------------------------------


def test_twice_the_association_limit_of_senders_loses_nothing_and_rejects_the_excess(tmp_path: Path) -> None:
    files = dcm_files(CT_SERIES)[:10]
    gate = threading.Event()

    def hold(_: InstanceHeader) -> None:  # admitted senders keep their slots until the excess was answered
        gate.wait(60)

    with serving(tmp_path, on_instance=hold, max_associations=3) as running:
        senders = [
            subprocess.Popen(
                [
                    "storescu",
                    "-aet",
                    f"SENDER{i}",
                    "-aec",
                    "RADAI",
                    "--max-pdu",
                    MAX_PDU,
                    LOOPBACK,
                    str(running.port),
                    *map(str, files),
                ],
                env=DCMTK_ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(6)
        ]
        try:
            _wait_until(lambda: sum(p.poll() is not None for p in senders) >= 3, limit=60)
        finally:
            gate.set()
        outcomes = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in senders]

        accepted = [f"SENDER{i}" for i, (rc, _) in enumerate(outcomes) if rc == 0]
        rejected = [err for rc, err in outcomes if rc != 0]
        assert len(accepted) == 3 and len(rejected) == 3
        assert all("Local Limit Exceeded" in err for err in rejected), rejected
        per_sender = Counter(h.calling_ae for h in running.headers)
        assert per_sender == {ae: len(files) for ae in accepted}  # every acknowledged instance arrived
        spooled = {
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in running.spool.pending()
        }
        assert spooled == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}


def test_connections_over_the_cap_are_closed_until_slots_free_up(tmp_path: Path) -> None:
    with serving(tmp_path, max_associations=2, max_connections=3, acse_timeout_s=5) as running:
        silent = [_connect(running.port) for _ in range(3)]
        assert _wait_until(lambda: sum(a.is_acceptor for a in running.scp._ae.active_associations) == 3)  # type: ignore[union-attr]

        refused = dcmtk("echoscu", running.port)

        for sock in silent:
            sock.close()
        assert refused.returncode != 0
        assert _wait_until(lambda: dcmtk("echoscu", running.port).returncode == 0)


# --- slow-loris ------------------------------------------------------------------------------------------


def _trickle(sock: socket.socket, first: bytes, stop: threading.Event) -> None:
    """Send ``first``, then one more byte every 0.2 s, until the server drops us or the test ends."""
    try:
        sock.sendall(first)
        while not stop.wait(0.2):
            sock.sendall(b"\x00")
    except OSError:
        pass


def test_silent_and_trickling_peers_are_dropped_and_a_legitimate_sender_gets_through(tmp_path: Path) -> None:
    files = dcm_files(CT_SERIES)[:5]
    options = {"max_associations": 2, "max_connections": 12, "acse_timeout_s": 1.0, "network_timeout_s": 1.0}
    stop = threading.Event()
    with serving(tmp_path, **options) as running:
        silent = [_connect(running.port) for _ in range(3)]
        trickling = [_connect(running.port) for _ in range(4)]
        firsts = [b"\x01", b"\x01\x00\x00\x00\x01\x00", b"\x01\x00\x00\x00\x01\x00\x00\x01", b"\x04"]
        threads = [
            threading.Thread(target=_trickle, args=(sock, first, stop), daemon=True)
            for sock, first in zip(trickling, firsts, strict=True)
        ]
        for thread in threads:
            thread.start()
        try:
            result = dcmtk("storescu", running.port, files=files)

            assert result.returncode == 0, result.stderr
            assert len(running.headers) == len(files)
            for sock in silent + trickling:
                assert closed_by_peer(sock) is not None, "a slow peer kept its connection"
        finally:
            stop.set()
            for sock in silent + trickling:
                sock.close()
        assert dcmtk("echoscu", running.port).returncode == 0


def test_idle_association_is_aborted_after_the_network_timeout(tmp_path: Path) -> None:
    with (
        serving(tmp_path, network_timeout_s=1.0) as running,
        _association(running.port, [(VERIFICATION, "1.2.840.10008.1.2")], calling_ae="IDLER") as assoc,
    ):
        assert _wait_until(lambda: not assoc.is_established)
        assert assoc.is_aborted


# --- PDU size --------------------------------------------------------------------------------------------


def test_oversized_pdu_before_association_is_aborted_without_reading_it(tmp_path: Path) -> None:
    with serving(tmp_path) as running, _connect(running.port) as sock:
        sock.sendall(b"\x01\x00" + struct.pack(">L", 0x7FFF_FFFF) + b"\x00" * 1024)

        answer = closed_by_peer(sock)

        assert answer is not None and answer.startswith(A_ABORT_INVALID_PDU_PARAMETER)
        assert dcmtk("echoscu", running.port).returncode == 0


def test_p_data_pdu_longer_than_announced_aborts_the_association(tmp_path: Path) -> None:
    with serving(tmp_path, max_pdu_size=16384) as running:
        with _association(running.port, [(VERIFICATION, "1.2.840.10008.1.2")]) as assoc:
            assert assoc.acceptor.maximum_length == 16384
            raw = assoc.dul.socket.socket  # type: ignore[union-attr]
            assert raw is not None
            raw.sendall(b"\x04\x00" + struct.pack(">L", 16385) + b"\x00" * 4096)

            assert _wait_until(lambda: assoc.is_aborted)
        assert dcmtk("echoscu", running.port).returncode == 0


def test_data_set_over_the_message_cap_aborts_the_association_and_stores_nothing(tmp_path: Path) -> None:
    source = dcm_files(CT_SERIES)[0]
    big = pydicom.dcmread(source)
    big.private_block(0x0011, "RADAI TEST", create=True).add_new(0x00, "OB", b"\x01" * (1 << 20))
    big_path = tmp_path / "big.dcm"
    big.save_as(big_path, enforce_file_format=True)
    with serving(tmp_path, max_message_bytes=1 << 20) as running:
        refused = dcmtk("storescu", running.port, files=[big_path])

        assert refused.returncode != 0
        assert running.headers == [] and running.spool.pending() == []
        assert dcmtk("storescu", running.port, files=[source]).returncode == 0
        assert len(running.headers) == 1


def test_association_open_past_its_maximum_duration_is_aborted_at_its_next_pdu(tmp_path: Path) -> None:
    with (
        serving(tmp_path, max_association_s=1.0) as running,
        _association(running.port, [(VERIFICATION, "1.2.840.10008.1.2")], calling_ae="LINGERER") as assoc,
    ):
        assert int(assoc.send_c_echo().Status) == 0x0000  # within its time
        time.sleep(1.5)
        assoc.send_c_echo()

        assert _wait_until(lambda: assoc.is_aborted)
        assert dcmtk("echoscu", running.port).returncode == 0


# --- deflate bombs ---------------------------------------------------------------------------------------


def _deflated(source: Path, folder: Path, padding: int = 0) -> Path:
    """``source`` re-encoded as Deflated Explicit VR Little Endian, optionally with ``padding`` zero bytes
    in a private OB element (which deflates to almost nothing: a bomb)."""
    ds = pydicom.dcmread(source)
    if padding:
        block = ds.private_block(0x0011, "RADAI TEST", create=True)
        block.add_new(0x00, "OB", b"\x00" * padding)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    target = folder / f"{source.stem}-{padding}.dcm"
    ds.save_as(target, enforce_file_format=True)
    return target


def _store_deflated(port: int, path: Path) -> int:
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        with _association(port, [(CTImageStorage, DeflatedExplicitVRLittleEndian)]) as assoc:
            return int(assoc.send_c_store(path).Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def test_deflated_instance_under_the_cap_is_stored(tmp_path: Path) -> None:
    source = dcm_files(CT_SERIES)[0]
    with serving(tmp_path, max_inflated_bytes=4 << 20) as running:
        assert _store_deflated(running.port, _deflated(source, tmp_path)) == Status.SUCCESS
        assert pydicom.dcmread(running.headers[0].path).PixelData == pydicom.dcmread(source).PixelData


def test_deflate_bomb_is_refused_with_out_of_resources_and_the_scp_keeps_serving(tmp_path: Path) -> None:
    source = dcm_files(CT_SERIES)[0]
    bomb = _deflated(source, tmp_path, padding=64 << 20)
    assert bomb.stat().st_size < 1 << 20  # a small file on the wire ...
    with serving(tmp_path, max_inflated_bytes=4 << 20) as running:
        assert _store_deflated(running.port, bomb) == Status.OUT_OF_RESOURCES  # ... refused before inflating
        assert running.headers == [] and running.spool.pending() == []
        assert _store_deflated(running.port, _deflated(source, tmp_path)) == Status.SUCCESS


def test_invalid_deflate_stream_is_refused_as_cannot_understand(tmp_path: Path) -> None:
    good = _deflated(dcm_files(CT_SERIES)[0], tmp_path).read_bytes()
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(good[: dataset_offset(good)] + b"\xff" * 4096)
    with serving(tmp_path) as running:
        assert _store_deflated(running.port, broken) == Status.CANNOT_UNDERSTAND
        assert running.headers == []


def test_inflated_size_check_is_exact_at_the_cap() -> None:
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = squeezer.compress(b"\x00" * 5_000_000) + squeezer.flush()

    assert not inflated_size_exceeds(data, 5_000_000)
    assert inflated_size_exceeds(data, 4_999_999)
    with pytest.raises(zlib.error):
        inflated_size_exceeds(b"\xff" * 64, 1 << 20)


# --- settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"max_associations": 0},
        {"max_connections": 0},
        {"acse_timeout_s": 0.0},
        {"dimse_timeout_s": -1.0},
        {"network_timeout_s": 0.0},
        {"max_pdu_size": 1024},
        {"max_inflated_bytes": 0},
        {"max_message_bytes": 4096},
        {"max_association_s": 0.0},
    ],
)
def test_invalid_limits_are_refused(tmp_path: Path, options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        StoreSCP("RADAI", LOOPBACK, 0, Spool(tmp_path / "spool"), lambda _: None, **options)  # type: ignore[arg-type]
