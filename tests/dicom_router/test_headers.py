"""Reading instance headers from real files, without pixels and without patient attributes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydicom
import pytest

from dicom_router.headers import InstanceHeader, header_from_encoded, read_header
from tests.dicom_router.peers import CT_SERIES, DICOM, EDGE, PHANTOM_STUDY, dcm_files, image_files


def test_read_header_of_a_ct_slice(tmp_path: Path) -> None:
    source = dcm_files(CT_SERIES)[0]
    ds = pydicom.dcmread(source, stop_before_pixels=True)

    header = read_header(source, " MODALITY ", 12.5)

    assert header.path == source
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert header.study_uid == ds.StudyInstanceUID
    assert header.series_uid == ds.SeriesInstanceUID
    assert header.modality == "CT"
    assert header.series_description == "CT CH/AB/PEL"
    assert header.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert header.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert header.number_of_frames == 1
    assert header.calling_ae == "MODALITY"
    assert header.received_at == 12.5


def test_header_carries_no_patient_attributes() -> None:
    names = {f.name for f in dataclasses.fields(InstanceHeader)}
    assert not {n for n in names if "patient" in n or "name" in n or "birth" in n}


def test_enhanced_mr_orientation_comes_from_the_functional_groups() -> None:
    siemens = read_header(dcm_files(EDGE / "siemens_multiframe" / "anatomical" / "001")[0], "X", 0.0)
    philips = read_header(dcm_files(EDGE / "philips_enhanced" / "anatomical" / "001")[0], "X", 0.0)

    assert siemens.number_of_frames == 8
    assert siemens.image_orientation is not None and len(siemens.image_orientation) == 6
    assert philips.number_of_frames == 8
    # Philips keeps the orientation in the per-frame group only.
    assert philips.image_orientation == (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def test_secondary_capture_without_orientation_reads_as_none() -> None:
    summary = PHANTOM_STUDY / "S4010" / "I40"  # Philips exam summary page: no ImageOrientationPatient

    header = read_header(summary, "X", 0.0)

    assert header.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
    assert header.image_orientation is None
    assert "PATIENT_INFO" in header.image_type


def test_read_header_raises_value_error_for_a_non_dicom_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM" * 20)

    with pytest.raises(ValueError):
        read_header(junk, "X", 0.0)


def test_read_header_raises_value_error_for_a_dicomdir_without_uids() -> None:
    with pytest.raises(ValueError):
        read_header(PHANTOM_STUDY / "DIRFILE", "X", 0.0)


def test_read_header_raises_value_error_when_uids_are_empty() -> None:
    source = sorted((DICOM / "ct_abdomen_j2k_nouids" / "dicom").iterdir())[0]

    with pytest.raises(ValueError, match="UID"):
        read_header(source, "X", 0.0)


@pytest.mark.parametrize("cut", [0, 100, 200, 400])
def test_header_from_truncated_bytes_raises_value_error(cut: int) -> None:
    data = dcm_files(CT_SERIES)[0].read_bytes()

    with pytest.raises(ValueError):
        header_from_encoded(data[:cut], Path(), "X", 0.0)


def test_header_from_encoded_matches_read_header() -> None:
    source = dcm_files(CT_SERIES)[3]

    assert header_from_encoded(source.read_bytes(), source, "X", 1.0) == read_header(source, "X", 1.0)


def test_phantom_study_files_share_one_study() -> None:
    headers = [
        read_header(p, "X", 0.0) for folder in ("S2010", "S1000") for p in image_files(PHANTOM_STUDY / folder)
    ]

    assert len({h.study_uid for h in headers}) == 1
    assert len({h.series_uid for h in headers}) == 2
