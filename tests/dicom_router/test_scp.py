"""StoreSCP against real DCMTK peers and raw pynetdicom C-STOREs on loopback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from dicom_router.scp import StoreSCP
from dicom_router.spool import Spool
from dicom_router.statuses import Status
from tests.dicom_router.conftest import RunningScp
from tests.dicom_router.peers import (
    CT_SERIES,
    EDGE,
    dataset_bytes,
    dataset_offset,
    dcm_files,
    echoscu,
    raw_part10,
    raw_store_association,
    storescu,
)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _send_raw(port: int, sop_class: str, file: Path) -> int:
    with raw_store_association(port, sop_class) as assoc:
        response = assoc.send_c_store(file)
    return int(response.Status)


def test_echoscu_succeeds(running_scp: RunningScp) -> None:
    result = echoscu(running_scp.port)
    assert result.returncode == 0, result.stderr


def test_port_zero_binds_a_real_port(running_scp: RunningScp) -> None:
    assert running_scp.port > 0


def test_storescu_ct_series_lands_in_spool_with_identical_content(running_scp: RunningScp) -> None:
    files = dcm_files(CT_SERIES)
    assert len(files) == 41

    result = storescu(running_scp.port, files)

    assert result.returncode == 0, result.stderr
    assert len(running_scp.headers) == 41
    assert {p.name for p in running_scp.spool.pending()} == {h.path.name for h in running_scp.headers}
    by_uid = {h.sop_instance_uid: h for h in running_scp.headers}
    for source in files:
        original = pydicom.dcmread(source)
        spooled = pydicom.dcmread(by_uid[original.SOPInstanceUID].path)
        # DCMTK re-encodes undefined-length sequences on the wire, so compare element values, not bytes.
        assert spooled == original
        assert spooled.PixelData == original.PixelData
    header = running_scp.headers[0]
    assert header.modality == "CT"
    assert header.calling_ae == "MODALITY"
    assert header.sop_class_uid == CTImageStorage
    assert len({h.series_uid for h in running_scp.headers}) == 1


def test_spooled_file_holds_exactly_the_bytes_sent(running_scp: RunningScp) -> None:
    for source in dcm_files(CT_SERIES)[:3]:
        status = _send_raw(running_scp.port, CTImageStorage, source)  # sent verbatim, not re-encoded
        assert status == Status.SUCCESS
        original = source.read_bytes()
        spooled = running_scp.headers[-1].path.read_bytes()
        assert spooled[dataset_offset(spooled) :] == original[dataset_offset(original) :]


@pytest.mark.parametrize(
    ("folder", "option"),
    [
        ("compressed_j2k", "-xv"),
        ("compressed_jpeg", "-xs"),
        ("compressed_jpegls", "-xt"),
        ("compressed_rle", "-xr"),
    ],
)
def test_storescu_compressed_transfer_syntaxes_are_accepted(
    running_scp: RunningScp, folder: str, option: str
) -> None:
    files = dcm_files(EDGE / "generic" / folder / "001")
    expected_syntax = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID

    result = storescu(running_scp.port, files, option)

    assert result.returncode == 0, result.stderr
    assert len(running_scp.headers) == len(files) == 4
    stored = pydicom.dcmread(running_scp.headers[0].path, stop_before_pixels=True)
    assert stored.file_meta.TransferSyntaxUID == expected_syntax  # kept as sent, not transcoded


def test_storescu_enhanced_multiframe_mr_is_accepted_with_frames_and_orientation(
    running_scp: RunningScp,
) -> None:
    files = dcm_files(EDGE / "philips_enhanced" / "anatomical" / "001")

    result = storescu(running_scp.port, files)

    assert result.returncode == 0, result.stderr
    (header,) = running_scp.headers
    assert header.number_of_frames == 8
    assert header.image_orientation is not None


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
def test_store_returns_cannot_understand_for_garbage_after_file_meta(
    running_scp: RunningScp, tmp_path: Path
) -> None:
    garbage = bytes(range(7, 250)) * 8
    bad = _write(tmp_path / "bad.dcm", raw_part10(CTImageStorage, "1.2.3.4", garbage))

    status = _send_raw(running_scp.port, CTImageStorage, bad)

    assert 0xC000 <= status <= 0xCFFF
    assert running_scp.spool.pending() == []
    assert running_scp.headers == []
    # The server still serves: a valid store on a new association succeeds.
    result = storescu(running_scp.port, dcm_files(CT_SERIES)[:1])
    assert result.returncode == 0, result.stderr
    assert len(running_scp.headers) == 1


def test_store_returns_cannot_understand_for_missing_series_uid(
    running_scp: RunningScp, tmp_path: Path
) -> None:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    file = _write(tmp_path / "noseries.dcm", raw_part10(CTImageStorage, "1.2.3.4.5", dataset_bytes(ds)))

    assert _send_raw(running_scp.port, CTImageStorage, file) == Status.CANNOT_UNDERSTAND
    assert running_scp.spool.pending() == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_store_refuses_a_sop_instance_uid_that_would_escape_the_spool(
    running_scp: RunningScp, tmp_path: Path
) -> None:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.1"
    ds.add_new(0x00080018, "UI", "../../escaped")  # SOPInstanceUID, bypassing pydicom's setter checks
    file = _write(tmp_path / "escape.dcm", raw_part10(CTImageStorage, "1.2.3.4.1.1", dataset_bytes(ds)))

    status = _send_raw(running_scp.port, CTImageStorage, file)

    assert status == Status.CANNOT_UNDERSTAND
    assert running_scp.spool.pending() == []
    assert not list(tmp_path.rglob("escaped*"))


def test_store_returns_dataset_does_not_match_sop_class_when_request_and_data_disagree(
    running_scp: RunningScp, tmp_path: Path
) -> None:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage  # the C-STORE request says CT
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.1"
    ds.Rows = ds.Columns = ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.PixelData = b"\0\0"
    file = _write(tmp_path / "mismatch.dcm", raw_part10(CTImageStorage, "1.2.3.4.5", dataset_bytes(ds)))

    assert _send_raw(running_scp.port, CTImageStorage, file) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert running_scp.spool.pending() == []


def test_store_returns_out_of_resources_when_the_spool_cannot_be_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")
    got: list[object] = []
    scp = StoreSCP("RADAI", "127.0.0.1", 0, spool, got.append)
    scp.start()
    try:
        shutil.rmtree(spool.root)  # every write now fails with an OSError, as on a lost or full volume
        status = _send_raw(scp.port, CTImageStorage, dcm_files(CT_SERIES)[0])
        assert status == Status.OUT_OF_RESOURCES
        assert got == []
        assert "spool write failed" in caplog.text
        sop_uid = pydicom.dcmread(dcm_files(CT_SERIES)[0], stop_before_pixels=True).SOPInstanceUID
        assert sop_uid not in caplog.text
    finally:
        scp.stop()


def test_store_returns_processing_failure_when_the_callback_raises(tmp_path: Path) -> None:
    def refuse(_: object) -> None:
        raise RuntimeError("queue closed")

    scp = StoreSCP("RADAI", "127.0.0.1", 0, Spool(tmp_path / "spool"), refuse)
    scp.start()
    try:
        status = _send_raw(scp.port, CTImageStorage, dcm_files(CT_SERIES)[0])
        assert status == Status.PROCESSING_FAILURE
        assert echoscu(scp.port).returncode == 0  # still serving
    finally:
        scp.stop()


def test_resent_instance_replaces_the_spooled_file(running_scp: RunningScp) -> None:
    files = dcm_files(CT_SERIES)[:2]

    assert storescu(running_scp.port, files).returncode == 0
    assert storescu(running_scp.port, files).returncode == 0

    assert len(running_scp.spool.pending()) == 2
    assert len(running_scp.headers) == 4  # every C-STORE is reported; the assembler de-duplicates


def test_stop_releases_the_port(tmp_path: Path) -> None:
    scp = StoreSCP("RADAI", "127.0.0.1", 0, Spool(tmp_path / "spool"), lambda _: None)
    scp.start()
    port = scp.port
    scp.stop()

    assert echoscu(port).returncode != 0
