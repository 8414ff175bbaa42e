"""A catalogue of malformed and hostile inputs for the storage SCP, with the answer each must get.

Each entry is a Part 10 file (preamble + file meta + data set bytes as they go on the wire). The runner
proposes the entry's SOP class and transfer syntax, sends the data set bytes verbatim (no re-encoding), and
records the answer: a named DIMSE status, or "context rejected" when the SOP class/transfer syntax is not
accepted at association negotiation. `python -m tests.dicom_router.hostile_catalogue` prints the table kept in
docs/dicom-input-catalogue.md; the test checks every live answer against that table.
"""

from __future__ import annotations

import importlib.util
import random
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config

from dicom_router.statuses import describe
from tests.dicom_router.peers import DICOM, LOOPBACK, ROOT, dataset_offset, raw_part10

DOC = ROOT / "docs" / "dicom-input-catalogue.md"
CT_FILE = DICOM / "ct_abdomen_crlm" / "CRLM-CT-1004" / "image" / "1-01.dcm"
REJECTED = "context rejected"


@dataclass(frozen=True)
class Entry:
    name: str
    group: str
    make: Callable[[], bytes]  # the Part 10 file


def _ct_parts() -> tuple[bytes, bytes]:
    raw = CT_FILE.read_bytes()
    off = dataset_offset(raw)
    return raw[:off], raw[off:]


def _with_dataset(body: bytes, sop_instance: str = "1.2.826.0.1.3680043.10.1.1") -> bytes:
    return raw_part10(CTImageStorage, sop_instance, body)


def _edited(edit: Callable[[pydicom.Dataset], None]) -> bytes:
    ds = pydicom.dcmread(CT_FILE)
    edit(ds)
    from tests.dicom_router.peers import dataset_bytes

    uid = str(ds.get("SOPInstanceUID", ""))
    # The C-STORE request carries the file meta's UID; the sender's library refuses one over 64 characters,
    # so only the data set carries those.
    return _with_dataset(dataset_bytes(ds), uid if 0 < len(uid) <= 64 else "1.2.826.0.1.3680043.10.1.2")


def _set(keyword: str, value: object) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        setattr(ds, keyword, value)

    return edit


def _delete(keyword: str) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        del ds[keyword]

    return edit


def _patch_length(tag: tuple[int, int], length: int) -> bytes:
    """The real CT data set with the 16- or 32-bit length of `tag` overwritten."""
    meta, body = _ct_parts()
    needle = struct.pack("<HH", *tag)
    at = body.index(needle)
    vr = body[at + 4 : at + 6]
    out = bytearray(body)
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
        out[at + 8 : at + 12] = struct.pack("<I", length)
    else:
        out[at + 6 : at + 8] = struct.pack("<H", min(length, 0xFFFF))
    return meta + bytes(out)


def _patch_vr(tag: tuple[int, int], vr: bytes) -> bytes:
    meta, body = _ct_parts()
    at = body.index(struct.pack("<HH", *tag))
    out = bytearray(body)
    out[at + 4 : at + 6] = vr
    return meta + bytes(out)


CAP_INFLATED = 64 << 20  # the catalogue's SCP runs with max_inflated_bytes at 64 MiB


def _deflated(padding: int) -> bytes:
    """The CT slice as Deflated Explicit VR Little Endian; `padding` zero bytes in a private OB element
    deflate to almost nothing, which makes a bomb."""
    ds = pydicom.dcmread(CT_FILE)
    if padding:
        ds.private_block(0x0011, "RADAI TEST", create=True).add_new(0x00, "OB", b"\0" * padding)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return bytes(buf.getvalue())


def _cut(part10: bytes) -> bytes:
    """The deflate stream cut short: it never reaches its end block."""
    off = dataset_offset(part10)
    return part10[: off + (len(part10) - off) * 6 // 10]


def _mutations() -> Iterator[Entry]:
    meta, body = _ct_parts()
    for pct in (0.1, 1, 3, 10, 25, 50, 75, 90, 99, 99.9):
        cut = int(len(body) * pct / 100)
        yield Entry(f"truncated at {pct}% of the data set", "truncated", lambda c=cut: meta + body[:c])
    for seed in range(20):
        size = random.Random(seed).choice((1, 7, 64, 512, 4096, 65536))
        yield Entry(
            f"random bytes, {size} B (seed {seed})",
            "random",
            lambda s=seed, n=size: _with_dataset(random.Random(s).randbytes(n)),
        )
    for tag, name in (
        ((0x0010, 0x0010), "PatientName"),
        ((0x0020, 0x000D), "StudyInstanceUID"),
        ((0x0028, 0x0010), "Rows"),
        ((0x7FE0, 0x0010), "PixelData"),
    ):
        for length in (0xFFF0, 0xFFFFFFF0):
            yield Entry(
                f"length of {name} set to 0x{length:X}", "length", lambda t=tag, n=length: _patch_length(t, n)
            )
    for tag, name in (
        ((0x0008, 0x0060), "Modality"),
        ((0x0020, 0x000E), "SeriesInstanceUID"),
        ((0x0028, 0x0011), "Columns"),
    ):
        for vr in (b"ZZ", b"\x00\x00", b"SQ"):
            yield Entry(f"VR of {name} set to {vr!r}", "bad VR", lambda t=tag, v=vr: _patch_vr(t, v))
    for uid in (
        "../../etc/passwd",
        "/tmp/evil",
        "1.2.3/../4",
        "..",
        "1.2.abc",
        "1..2",
        "01.2",
        ".1.2",
        "1.2.",
        "1" * 65,
        "1.2\x00.3",
        "1.2 3",
    ):
        yield Entry(f"SOPInstanceUID {uid!r}", "UID", lambda u=uid: _edited(_set("SOPInstanceUID", u)))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        yield Entry(f"{keyword} empty", "UID", lambda k=keyword: _edited(_set(k, "")))
        yield Entry(f"{keyword} missing", "UID", lambda k=keyword: _edited(_delete(k)))
    yield Entry("SOPClassUID missing", "UID", lambda: _edited(_delete("SOPClassUID")))
    yield Entry(
        "data set says MR, request says CT", "SOP class", lambda: _edited(_set("SOPClassUID", MRImageStorage))
    )
    for keyword, value in (
        ("Rows", 513),
        ("Columns", 1),
        ("BitsAllocated", 8),
        ("BitsAllocated", 32),
        ("NumberOfFrames", 2),
        ("SamplesPerPixel", 3),
        ("Rows", 0),
    ):
        yield Entry(
            f"{keyword} = {value} (pixel data length no longer matches)",
            "pixel data",
            lambda k=keyword, v=value: _edited(_set(k, v)),
        )
    yield Entry("PixelData missing", "pixel data", lambda: _edited(_delete("PixelData")))
    yield Entry(
        "PixelData cut to half",
        "pixel data",
        lambda: _edited(lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 2])),
    )
    yield Entry("deflated data set, valid", "deflate", lambda: _deflated(0))
    yield Entry(
        f"deflate bomb: inflates past the {CAP_INFLATED >> 20} MiB cap",
        "deflate",
        lambda: _deflated(4 * CAP_INFLATED),
    )
    yield Entry("deflated data set cut short", "deflate", lambda: _cut(_deflated(0)))
    yield Entry("the valid CT slice (control)", "control", lambda: CT_FILE.read_bytes())


def _files(group: str, folder: Path | None, pattern: str = "*.dcm") -> Iterator[Entry]:
    if folder is None or not folder.is_dir():
        return
    for path in sorted(folder.rglob(pattern)):
        try:
            meta = read_file_meta_info(path)
            if "MediaStorageSOPClassUID" not in meta or "TransferSyntaxUID" not in meta:
                continue
        except Exception:  # no usable file meta: not sendable as a Part 10 file, out of scope here
            continue
        yield Entry(str(path.relative_to(folder)), group, lambda p=path: _as_sent(p))


def _as_sent(path: Path) -> bytes:
    """The file as a sender puts it on the wire: the C-STORE request (here taken from the file meta) names
    the data set's own SOP Instance UID, as storescu and PACSs do."""
    raw = path.read_bytes()
    try:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).get("SOPInstanceUID", ""))
        meta = read_file_meta_info(path)
    except Exception:  # unparseable: send as it is
        return raw
    if not uid or uid == meta.MediaStorageSOPInstanceUID or len(uid) > 64:
        return raw
    meta.MediaStorageSOPInstanceUID = uid
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buf.getvalue() + raw[dataset_offset(raw) :]


def _package_folder(name: str, sub: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / sub


def catalogue() -> list[Entry]:
    return [
        *_mutations(),
        *_files("pydicom-data", _package_folder("data_store", "data")),
        *_files("pydicom test files", _package_folder("pydicom", "data/test_files")),
        *_files("shared edge cases", DICOM / "edgecases", "*"),
    ]


def send(port: int, part10: bytes, tmp: Path) -> str:
    """Send one Part 10 file's data set verbatim; the answer as text."""
    meta = read_file_meta_info(_write(tmp, part10))
    sop_class, syntax = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(sop_class, syntax)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate(LOOPBACK, port, ae_title="RADAI")
        if assoc.is_rejected:
            return "association rejected"
        if not assoc.is_established:  # the SCP accepted no presentation context: the requestor aborts
            return REJECTED
        try:
            accepted = [
                c
                for c in assoc.accepted_contexts
                if c.abstract_syntax == sop_class and c.transfer_syntax[0] == syntax
            ]
            if not accepted:
                return REJECTED
            status = assoc.send_c_store(tmp / "entry.dcm")
            return describe(int(status.Status)) if status else "no answer"
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        ae.shutdown()


def _write(tmp: Path, data: bytes) -> Path:
    path = tmp / "entry.dcm"
    path.write_bytes(data)
    return path


def run_all(port: int, tmp: Path) -> list[tuple[Entry, str, float]]:
    results = []
    for entry in catalogue():
        t0 = time.perf_counter()
        answer = send(port, entry.make(), tmp)
        results.append((entry, answer, time.perf_counter() - t0))
    return results


def markdown(results: list[tuple[Entry, str, float]]) -> str:
    lines = [
        "# What the storage SCP answers to malformed and hostile input",
        "",
        "Generated by `python -m tests.dicom_router.hostile_catalogue`; `tests/dicom_router/test_hostile_catalogue.py`",
        "sends every entry to a live SCP and checks each answer against this table, then that the next valid",
        "store still succeeds. `0xC000 CANNOT_UNDERSTAND` is the answer for data that cannot be parsed or",
        "validated (nothing is written); `context rejected` means the SOP class or transfer syntax was not",
        "accepted at association negotiation (radai accepts CT, MR, Enhanced CT/MR and Secondary Capture).",
        "",
        "| group | input | answer |",
        "|---|---|---|",
    ]
    lines += [f"| {e.group} | {e.name.replace('|', '/')!s} | {a} |" for e, a, _ in results]
    return "\n".join(lines) + "\n"


def documented() -> dict[tuple[str, str], str]:
    table: dict[tuple[str, str], str] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("group", "---"):
            table[(cells[0], cells[1])] = cells[2]
    return table


def _main() -> int:
    import tempfile

    from dicom_router.scp import StoreSCP
    from dicom_router.spool import Spool

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        scp = StoreSCP(
            "RADAI",
            LOOPBACK,
            0,
            Spool(tmp / "spool"),
            on_instance=lambda _h: None,
            max_inflated_bytes=CAP_INFLATED,
        )
        scp.start()
        try:
            sys.stdout.write(markdown(run_all(scp.port, tmp)))
        finally:
            scp.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
