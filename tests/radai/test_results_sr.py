"""SR TID 1500 encoder: round trip through pydicom and highdicom on a real CT, validated by dciodvfy."""

from __future__ import annotations

import datetime
import io
import shutil
from functools import cache

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes

from radai.errors import EncodingError
from radai.results import (
    NOT_VERIFIED_TEXT,
    Algorithm,
    SegmentMeasurement,
    SrRequest,
    build_sr,
    dciodvfy_errors,
    measure_means,
    measure_volumes,
    segment_numbers,
)
from tests.radai.results_fixtures import (
    ALGORITHM,
    SPECS,
    ct_hu,
    ct_source,
    reread,
    standard_seg,
    threshold_labels,
    to_bytes,
)

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")

CREATED = datetime.datetime(2024, 5, 17, 9, 30, 0)


def voxel_volume_ml(source: list[Dataset]) -> float:
    rows_mm, columns_mm = (float(v) for v in source[0].PixelSpacing)
    positions = np.array([ds.ImagePositionPatient for ds in source], dtype=float)
    slice_mm = float(np.linalg.norm(positions[1] - positions[0]))
    return rows_mm * columns_mm * slice_mm / 1000.0


def measurements() -> list[SegmentMeasurement]:
    labels = threshold_labels()
    volumes = measure_volumes(labels, voxel_volume_ml(ct_source()))
    means = measure_means(labels, ct_hu())
    numbers = segment_numbers(standard_seg())
    by_value = {spec.value: spec for spec in SPECS}
    return [
        SegmentMeasurement(
            segment_number=numbers[value],
            name=by_value[value].name,
            type=by_value[value].type,
            volume_ml=volumes[value],
            mean_value=means[value],
        )
        for value in sorted(numbers)
    ]


def sr_request(**changes: object) -> SrRequest:
    fields: dict[str, object] = {
        "seg": standard_seg(),
        "source": ct_source(),
        "measurements": measurements(),
        "algorithm": ALGORITHM,
        "created": CREATED,
    }
    fields.update(changes)
    return SrRequest(**fields)  # type: ignore[arg-type]


@cache
def _standard_sr_bytes() -> bytes:
    return to_bytes(build_sr(sr_request()))


def standard_sr() -> hd.sr.Comprehensive3DSR:
    """The SR of :func:`sr_request`, written, read back with pydicom and parsed by highdicom."""
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(_standard_sr_bytes())))


def standard_report() -> hd.sr.MeasurementReport:
    content = standard_sr().content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def referenced_number(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> int:
    reference = group.referenced_segment
    assert reference is not None
    numbers = reference.referenced_segment_numbers
    assert numbers is not None and len(numbers) == 1
    return int(numbers[0])


def test_measure_volumes_counts_voxels_of_each_label_exactly() -> None:
    labels = np.zeros((4, 5, 6), dtype=np.uint8)
    labels[0, :, :] = 2  # 30 voxels
    labels[1, 0, :3] = 5  # 3 voxels
    assert measure_volumes(labels, 0.25) == {2: 7.5, 5: 0.75}
    assert measure_volumes(labels, 0.25, background=2) == {0: 21.75, 5: 0.75}


def test_measure_volumes_rejects_non_positive_voxel_volume() -> None:
    with pytest.raises(EncodingError):
        measure_volumes(np.ones((2, 2, 2), dtype=np.uint8), 0.0)


def test_measure_means_averages_the_image_over_each_label() -> None:
    labels = np.array([[[0, 1], [1, 4]]], dtype=np.uint8)
    image = np.array([[[-1000.0, 10.0], [20.0, 400.0]]])
    assert measure_means(labels, image) == {1: 15.0, 4: 400.0}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_sr_passes_dciodvfy_without_errors() -> None:
    assert dciodvfy_errors(build_sr(sr_request())) == []


def test_sr_is_complete_unverified_and_says_so_in_its_content() -> None:
    sr = standard_sr()
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert "VerifyingObserverSequence" not in sr
    assert sr.SeriesDescription == f"AI SR {ALGORITHM.name} (not verified)"
    texts = hd.sr.utils.find_content_items(sr, name=codes.DCM.Comment, recursive=True)
    assert [item.TextValue for item in texts] == [NOT_VERIFIED_TEXT]


def test_sr_has_one_volumetric_group_per_segment_referencing_the_seg() -> None:
    seg = standard_seg()
    groups = standard_report().get_volumetric_roi_measurement_groups()
    expected = measurements()
    assert len(groups) == len(expected) == 2
    for group, measured in zip(groups, expected, strict=True):
        reference = group.referenced_segment
        assert reference is not None
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_segment_numbers == [measured.segment_number]
        source_series = reference.source_series_for_segmentation
        assert source_series is not None
        assert source_series.value == ct_source()[0].SeriesInstanceUID
        assert group.finding_type is not None
        assert group.finding_type.value == measured.type.value
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(measured.volume_ml, rel=1e-12)
        assert volume.unit.value == "ml"
        (mean,) = group.get_measurements(name=codes.DCM.AttenuationCoefficient)
        assert mean.value == pytest.approx(measured.mean_value, rel=1e-12)
        assert mean.unit == codes.UCUM.HounsfieldUnit


def test_sr_volumes_equal_the_voxel_counts_of_the_labels() -> None:
    labels = threshold_labels()
    voxel = voxel_volume_ml(ct_source())
    volumes = {
        referenced_number(group): group.get_measurements(name=codes.SCT.Volume)[0].value
        for group in standard_report().get_volumetric_roi_measurement_groups()
    }
    assert volumes[1] == pytest.approx(np.count_nonzero(labels == 1) * voxel, rel=1e-12)
    assert volumes[2] == pytest.approx(np.count_nonzero(labels == 3) * voxel, rel=1e-12)


def test_sr_tracks_each_finding_with_the_seg_segment_tracking_uid() -> None:
    seg = standard_seg()
    tracking = {int(item.SegmentNumber): item.TrackingUID for item in seg.SegmentSequence}
    for group in standard_report().get_volumetric_roi_measurement_groups():
        number = referenced_number(group)
        assert group.tracking_uid == tracking[number]


def test_sr_identifies_the_algorithm_on_every_measurement_and_the_device_observer() -> None:
    report = standard_report()
    for group in report.get_volumetric_roi_measurement_groups():
        for measurement in group.get_measurements():
            names = hd.sr.utils.find_content_items(measurement[0], name=codes.DCM.AlgorithmName)
            versions = hd.sr.utils.find_content_items(measurement[0], name=codes.DCM.AlgorithmVersion)
            assert [item.TextValue for item in names] == [ALGORITHM.model_id]
            assert [item.TextValue for item in versions] == [ALGORITHM.version]
    (observer,) = report.get_observer_contexts(observer_type=codes.cid270.Device)
    attributes = observer.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.name == ALGORITHM.model_id
    assert attributes.model_name == ALGORITHM.version
    assert attributes.manufacturer_name == "radai"


def test_sr_stays_in_the_study_with_deterministic_uids() -> None:
    sr = standard_sr()
    source = ct_source()
    assert sr.StudyInstanceUID == source[0].StudyInstanceUID
    assert sr.SeriesNumber == 902
    again = reread(build_sr(sr_request()))
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (sr.SeriesInstanceUID, sr.SOPInstanceUID)
    assert sr.SOPInstanceUID != standard_seg().SOPInstanceUID
    newer = build_sr(sr_request(algorithm=Algorithm("body-ct", "2.0.0", ALGORITHM.name)))
    assert newer.SOPInstanceUID != sr.SOPInstanceUID
    assert sr.ContentDate == "20240517"


def test_sr_lists_seg_and_source_images_as_evidence() -> None:
    sr = standard_sr()
    referenced = {
        instance.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert referenced == {standard_seg().SOPInstanceUID} | {ds.SOPInstanceUID for ds in ct_source()}


def test_build_sr_rejects_a_segment_number_the_seg_does_not_have() -> None:
    wrong = SegmentMeasurement(segment_number=9, name="x", type=SPECS[0].type, volume_ml=1.0)
    with pytest.raises(EncodingError, match="segment 9"):
        build_sr(sr_request(measurements=[wrong]))


def test_build_sr_rejects_an_empty_measurement_list() -> None:
    with pytest.raises(EncodingError):
        build_sr(sr_request(measurements=[]))


def test_each_finding_is_also_outlined_on_its_largest_slice_with_the_same_tracking_uid() -> None:
    import dataclasses

    from radai.pipeline import key_region

    source, labels = ct_source(), threshold_labels()
    numbers = segment_numbers(standard_seg())
    value_of = {number: value for value, number in numbers.items()}
    with_regions = [
        dataclasses.replace(m, key_region=key_region(labels, value_of[m.segment_number], source, None))
        for m in measurements()
    ]
    sr = hd.sr.Comprehensive3DSR.from_dataset(reread(build_sr(sr_request(measurements=with_regions))))
    report = sr.content
    volumetric = report.get_volumetric_roi_measurement_groups()
    planar = report.get_planar_roi_measurement_groups()

    assert len(planar) == len(volumetric) == len(with_regions)
    for group in planar:
        uid = group.tracking_uid
        (twin,) = [v for v in volumetric if v.tracking_uid == uid]
        value = value_of[referenced_number(twin)]
        region = group.roi
        assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        k = int(np.argmax((labels == value).sum(axis=(0, 1))))
        assert (
            region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == source[k].SOPInstanceUID
        )
        columns = np.nonzero((labels[:, :, k] == value).any(axis=1))[0]
        rows = np.nonzero((labels[:, :, k] == value).any(axis=0))[0]
        points = region.value
        assert points.min(axis=0).tolist() == [columns[0], rows[0]]
        assert points.max(axis=0).tolist() == [columns[-1] + 1, rows[-1] + 1]
