"""Real peers for the dicom_router tests: DCMTK tools on loopback and a raw pynetdicom sender."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
DICOM = SHARED / "data" / "dicom"
CT_SERIES = DICOM / "ct_abdomen_crlm" / "CRLM-CT-1004" / "image"
EDGE = DICOM / "edgecases"
PHANTOM_STUDY = DICOM / "ct_head_tilt_and_phantom" / "Philips_phantom" / "S21570"
TILTED_SERIES = DICOM / "ct_head_tilt_and_phantom" / "Philips_phantom" / "S21610" / "S2010"

# Tuned DCMTK per DESIGN.md: without TCP_NODELAY Nagle's algorithm makes DCMTK ~30x slower.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
MAX_PDU = "131072"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free a moment ago (for tools that cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def image_files(folder: Path) -> list[Path]:
    """The instance files of a Philips-style folder (I10, I20, ...), skipping DIRFILE/DICOMDIR."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith("I"))


def dcm_files(folder: Path) -> list[Path]:
    """Sorted *.dcm files of a folder."""
    return sorted(folder.glob("*.dcm"))


def echoscu(port: int, called_ae: str = "RADAI") -> subprocess.CompletedProcess[str]:
    """Run DCMTK echoscu against the port."""
    return subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", called_ae, LOOPBACK, str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def storescu(
    port: int, files: Sequence[Path], *options: str, called_ae: str = "RADAI", calling_ae: str = "MODALITY"
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK storescu (one association) sending ``files``; ``options`` e.g. '-xv' for JPEG 2000."""
    args = ["storescu", "-aet", calling_ae, "-aec", called_ae, "--max-pdu", MAX_PDU, *options]
    return subprocess.run(
        [*args, LOOPBACK, str(port), *map(str, files)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclass
class DcmtkStoreScp:
    """A running DCMTK storescp writing every received instance into ``folder``."""

    port: int
    folder: Path
    ae_title: str

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


@contextmanager
def dcmtk_storescp(folder: Path, *options: str, ae_title: str = "PACS") -> Iterator[DcmtkStoreScp]:
    """Start `storescp -od folder` (no --fork) on a free port; always terminated on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    peer = DcmtkStoreScp(port=free_port(), folder=folder, ae_title=ae_title)
    args = ["storescp", "-aet", ae_title, "--max-pdu", MAX_PDU, "-od", str(folder), *options, str(peer.port)]
    proc = subprocess.Popen(args, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not _accepts_connections(peer.port):
            if proc.poll() is not None:
                raise RuntimeError(f"storescp exited early: {proc.stderr.read() if proc.stderr else b''!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("storescp did not start listening")
            time.sleep(0.05)
        yield peer
    finally:
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _accepts_connections(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) == 0


def dataset_bytes(ds: Dataset) -> bytes:
    """Encode a data set (no file meta) as Explicit VR Little Endian without value validation."""
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    write_dataset(buf, ds)
    return buf.getvalue()


def raw_part10(sop_class: str, sop_instance: str, body: bytes) -> bytes:
    """A Part 10 file: preamble, valid file meta for the SOP class and instance, then ``body`` verbatim."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buf.getvalue() + body


def dataset_offset(part10: bytes) -> int:
    """Byte offset of the data set in a Part 10 file (after the group-length-prefixed file meta)."""
    if part10[128:132] != b"DICM" or part10[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a Part 10 file with a File Meta group length")
    group_length = int.from_bytes(part10[140:144], "little")
    return 144 + group_length


@contextmanager
def raw_store_association(port: int, sop_class: str, called_ae: str = "RADAI") -> Iterator[Association]:
    """An association whose send_c_store(path) sends the file's data set bytes without decoding them."""
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = ae.associate(LOOPBACK, port, ae_title=called_ae)
    try:
        if not assoc.is_established:
            raise RuntimeError("association with the SCP failed")
        yield assoc
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
