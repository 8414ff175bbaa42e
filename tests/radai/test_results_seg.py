"""DICOM SEG encoder: round trip through pydicom and highdicom on a real CT, validated by dciodvfy."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.sr.codedict import codes

from radai.errors import EncodingError
from radai.results import Algorithm, build_seg, dciodvfy_errors, derived_uid, segment_numbers
from tests.radai.results_fixtures import (
    ALGORITHM,
    BODY,
    BONE,
    ct_source,
    reread,
    seg_request,
    standard_seg,
    threshold_labels,
)

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")

UID_RE = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


def test_derived_uid_is_deterministic_valid_and_keeps_part_boundaries() -> None:
    uid = derived_uid("1.2.3", "4.5", "model", "1.0", "seg", "series")
    assert uid == derived_uid("1.2.3", "4.5", "model", "1.0", "seg", "series")
    assert UID_RE.match(uid) and len(uid) <= 64
    assert derived_uid("ab", "c") != derived_uid("a", "bc")
    assert derived_uid("1.2.3", "4.5", "model", "1.1", "seg", "series") != uid


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_seg_passes_dciodvfy_without_errors() -> None:
    assert dciodvfy_errors(standard_seg()) == []


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_errors_reports_a_seg_missing_a_required_attribute() -> None:
    broken = standard_seg()
    del broken.SegmentSequence
    errors = dciodvfy_errors(broken)
    assert errors and all(line.startswith("Error") for line in errors)
    assert any("<SegmentSequence>" in line for line in errors)


def test_dciodvfy_errors_is_none_when_dciodvfy_is_not_installed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert dciodvfy_errors(standard_seg()) is None


def test_seg_keeps_study_and_frame_of_reference_and_references_source_series() -> None:
    source = ct_source()
    seg = hd.seg.Segmentation.from_dataset(standard_seg())
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source[0].SeriesInstanceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in source
    }


def test_seg_has_one_segment_per_present_label_numbered_in_value_order() -> None:
    seg = hd.seg.Segmentation.from_dataset(standard_seg())
    # Label 2 (fat) is in the specs but not in the map: no segment; 1 -> 1, 3 -> 2.
    assert segment_numbers(seg) == {BODY.value: 1, BONE.value: 2}
    assert seg.number_of_segments == 2
    for number, spec in ((1, BODY), (2, BONE)):
        description = seg.get_segment_description(number)
        assert description.segment_label == spec.name
        assert description.segmented_property_category.value == spec.category.value
        assert description.segmented_property_type.value == spec.type.value
        assert description.segmented_property_type.scheme_designator == spec.type.scheme
        assert description.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = description.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == ALGORITHM.model_id
        assert algorithm.AlgorithmVersion == ALGORITHM.version
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == codes.DCM.ArtificialIntelligence.value
        rgb = hd.color.CIELabColor.from_dicom_value(tuple(description.RecommendedDisplayCIELabValue)).to_rgb()
        assert np.allclose(rgb, spec.color, atol=1)


def test_seg_mask_read_back_equals_input_per_source_instance() -> None:
    source = ct_source()
    labels = threshold_labels()
    seg = hd.seg.Segmentation.from_dataset(standard_seg())
    read = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source], combine_segments=True
    )  # (Z, rows, columns), values are segment numbers
    expected = np.zeros(labels.shape, dtype=np.uint8)
    expected[labels == BODY.value] = 1
    expected[labels == BONE.value] = 2
    assert read.shape == (len(source), source[0].Rows, source[0].Columns)
    for k in range(len(source)):
        np.testing.assert_array_equal(read[k], expected[:, :, k].T)


def test_seg_header_names_radai_model_and_warns_it_is_not_verified() -> None:
    seg = standard_seg()
    assert seg.Modality == "SEG"
    assert seg.Manufacturer == "radai"
    assert seg.ManufacturerModelName == ALGORITHM.model_id
    assert seg.SoftwareVersions == ALGORITHM.version
    assert seg.SeriesDescription == f"AI SEG {ALGORITHM.name} (not verified)"
    assert seg.SeriesNumber == 901
    assert seg.SegmentationType == "BINARY"


def test_seg_uids_are_the_same_on_retry_and_change_with_model_version() -> None:
    first = standard_seg()
    again = reread(build_seg(seg_request()))
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (first.SeriesInstanceUID, first.SOPInstanceUID)
    source = ct_source()[0]
    assert first.SeriesInstanceUID == derived_uid(
        source.StudyInstanceUID, source.SeriesInstanceUID, "body-ct", "1.0.0", "seg", "series"
    )
    newer = build_seg(seg_request(algorithm=Algorithm("body-ct", "1.0.1", ALGORITHM.name)))
    assert newer.SeriesInstanceUID != first.SeriesInstanceUID
    assert newer.SOPInstanceUID != first.SOPInstanceUID
    assert UID_RE.match(newer.SOPInstanceUID)


def test_seg_omits_frames_where_a_segment_is_empty() -> None:
    labels = threshold_labels()
    labels[:, :, 0][labels[:, :, 0] == BONE.value] = BODY.value  # no bone on the first slice
    seg = build_seg(seg_request(labels=labels))
    assert seg.NumberOfFrames == 10 + 9


def test_build_seg_raises_encoding_error_when_no_label_is_present() -> None:
    empty = np.zeros_like(threshold_labels())
    with pytest.raises(EncodingError, match="no segment found"):
        build_seg(seg_request(labels=empty))


def test_build_seg_rejects_label_map_that_does_not_match_the_source() -> None:
    too_few_slices = np.ascontiguousarray(threshold_labels()[:, :, :5])
    with pytest.raises(EncodingError, match="does not match source"):
        build_seg(seg_request(labels=too_few_slices))


def test_build_seg_rejects_label_value_without_segment_spec() -> None:
    labels = threshold_labels()
    labels[0, 0, 0] = 7
    with pytest.raises(EncodingError, match=r"\[7\]"):
        build_seg(seg_request(labels=labels))


def test_build_seg_refuses_a_series_without_frame_of_reference() -> None:
    source = ct_source()
    for ds in source:
        del ds.FrameOfReferenceUID
    with pytest.raises(EncodingError, match="no FrameOfReferenceUID; a SEG of several planes needs one"):
        build_seg(seg_request(source=source))


def test_build_seg_fills_absent_type_2_patient_attributes_without_changing_the_source() -> None:
    source = ct_source()
    del source[0].PatientSex, source[0].AccessionNumber
    seg = reread(build_seg(seg_request(source=source)))
    assert seg.PatientSex == "" and seg.AccessionNumber == ""
    assert "PatientSex" not in source[0] and "AccessionNumber" not in source[0]


def test_labelmap_seg_holds_one_frame_per_slice_with_segment_numbers_as_pixels() -> None:
    source = ct_source()
    labels = threshold_labels()
    labels[:, :, 0] = 0  # an empty slice: omitted by default
    ds = reread(build_seg(seg_request(labels=labels, labelmap=True, uid_parts=("labelmap",))))

    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    assert ds.SegmentationType == "LABELMAP" and ds.NumberOfFrames == len(source) - 1
    seg = hd.seg.Segmentation.from_dataset(ds)
    read = seg.get_pixels_by_source_instance(
        [d.SOPInstanceUID for d in source[1:]], combine_segments=True, skip_overlap_checks=True
    )
    expected = np.zeros(labels.shape, dtype=np.uint8)
    expected[labels == BODY.value] = 1
    expected[labels == BONE.value] = 2
    for k in range(1, len(source)):
        np.testing.assert_array_equal(read[k - 1], expected[:, :, k].T)
    assert segment_numbers(ds) == {BODY.value: 1, BONE.value: 2}


def test_keeping_empty_frames_gives_every_slice_a_frame_for_every_segment() -> None:
    labels = threshold_labels()
    labels[:, :, 0][labels[:, :, 0] == BONE.value] = BODY.value  # no bone on the first slice
    seg = build_seg(seg_request(labels=labels, keep_empty=True, uid_parts=("keep-empty",)))
    assert seg.NumberOfFrames == 10 * 2


def test_seg_variants_are_distinct_objects_with_their_own_uids() -> None:
    default = standard_seg()
    labelmap = build_seg(seg_request(labelmap=True, uid_parts=("labelmap",)))
    assert labelmap.SeriesInstanceUID != default.SeriesInstanceUID
    assert labelmap.SOPInstanceUID != default.SOPInstanceUID
