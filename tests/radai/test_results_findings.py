"""Detection findings SR (TID 1500 / TID 1411 with SCOORD3D): round trip on a real CT through pydicom,
highdicom, dciodvfy and the validation gate."""

from __future__ import annotations

import datetime
import shutil
from functools import cache

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from radai.errors import EncodingError
from radai.results import NOT_VERIFIED_TEXT, Algorithm, CodedConcept, dciodvfy_errors, problems
from radai.results.findings import (
    NO_FINDINGS_TEXT,
    DetectionFinding,
    FindingsRequest,
    build_findings_sr,
    ellipsoid_in_box,
)
from tests.radai.results_fixtures import ALGORITHM, ct_source, reread

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")

CREATED = datetime.datetime(2026, 3, 4, 5, 6, 7)
NODULE = CodedConcept("SCT", "27925004", "Nodule")
MASS = CodedConcept("SCT", "4147007", "Mass")
_needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed")


def _origin() -> np.ndarray:
    return np.asarray(ct_source()[4].ImagePositionPatient, dtype=np.float64)


def _point(offset: tuple[float, float, float]) -> tuple[float, float, float]:
    x, y, z = _origin() + offset
    return (float(x), float(y), float(z))


def findings() -> list[DetectionFinding]:
    """A point finding and a boxed one (10 x 20 x 8 mm box, so the y axis is the major axis)."""
    return [
        DetectionFinding("Lung nodule 1", NODULE, _point((100.5, 120.25, 0.0)), None, 0.87),
        DetectionFinding(
            "Liver mass 1",
            MASS,
            _point((150.0, 150.0, 4.0)),
            (_point((145.0, 140.0, 0.0)), _point((155.0, 160.0, 8.0))),
            0.42,
            size_mm=21.5,
        ),
    ]


def request(**changes: object) -> FindingsRequest:
    fields: dict[str, object] = {
        "source": ct_source(),
        "findings": findings(),
        "algorithm": ALGORITHM,
        "created": CREATED,
    }
    fields.update(changes)
    return FindingsRequest(**fields)  # type: ignore[arg-type]


@cache
def _standard() -> Dataset:
    return reread(build_findings_sr(request()))


def standard_report() -> hd.sr.MeasurementReport:
    content = hd.sr.Comprehensive3DSR.from_dataset(_standard()).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def groups() -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    return list(standard_report().get_volumetric_roi_measurement_groups())


def _texts(sr: Dataset) -> list[str]:
    return [str(ds.value) for ds in sr.iterall() if ds.keyword == "TextValue"]


def _measurement(
    group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations, name: Code
) -> hd.sr.Measurement:
    (found,) = group.get_measurements(name=name)
    return found


@_needs_dciodvfy
def test_findings_sr_passes_dciodvfy_without_errors() -> None:
    assert dciodvfy_errors(build_findings_sr(request())) == []


def test_findings_sr_and_no_findings_report_pass_the_validation_gate() -> None:
    source = ct_source()
    full = build_findings_sr(request(source=source))
    empty = build_findings_sr(request(source=source, findings=[]))
    assert problems([full, empty], source) == []


def test_each_finding_is_a_volumetric_group_with_its_label_type_and_tracking_uid() -> None:
    found = groups()
    assert [g.tracking_identifier for g in found] == ["Lung nodule 1", "Liver mass 1"]
    assert [g.finding_type for g in found] == [NODULE.to_code(), MASS.to_code()]
    uids = [str(g.tracking_uid) for g in found]
    assert len(set(uids)) == 2 and all(uid.startswith("2.25.") for uid in uids)
    assert all(g.reference_type == codes.DCM.VolumeSurface for g in found)


def test_point_finding_is_a_scoord3d_point_at_its_centre_in_the_source_frame_of_reference() -> None:
    surface = groups()[0].roi
    assert isinstance(surface, hd.sr.VolumeSurface)
    assert surface.graphic_type == hd.sr.GraphicTypeValues3D.POINT
    np.testing.assert_allclose(surface.graphic_data, [findings()[0].center_mm], atol=1e-4)
    assert surface.frame_of_reference_uid == str(ct_source()[0].FrameOfReferenceUID)
    series = surface.source_series_for_segmentation
    assert series is not None and series.value == str(ct_source()[0].SeriesInstanceUID)


def test_boxed_finding_is_the_ellipsoid_inscribed_in_its_box_major_axis_first() -> None:
    surface = groups()[1].roi
    assert isinstance(surface, hd.sr.VolumeSurface)
    assert surface.graphic_type == hd.sr.GraphicTypeValues3D.ELLIPSOID
    assert surface.frame_of_reference_uid == str(ct_source()[0].FrameOfReferenceUID)
    centre = _origin() + np.array([150.0, 150.0, 4.0])
    expected = [centre + d for d in ((0, -10, 0), (0, 10, 0), (-5, 0, 0), (5, 0, 0), (0, 0, -4), (0, 0, 4))]
    np.testing.assert_allclose(surface.graphic_data, expected, atol=1e-4)


def test_ellipsoid_axes_are_ordered_longest_first() -> None:
    points = ellipsoid_in_box(((0.0, 0.0, 0.0), (2.0, 6.0, 4.0)))
    lengths = [float(np.linalg.norm(points[i + 1] - points[i])) for i in (0, 2, 4)]
    assert lengths == [6.0, 4.0, 2.0]


def test_probability_is_certainty_of_finding_in_percent_and_size_a_maximum_diameter_in_mm() -> None:
    point, boxed = groups()
    certainty = _measurement(point, codes.DCM.CertaintyOfFinding)
    assert certainty.value == pytest.approx(87.0)
    assert certainty.unit == codes.UCUM.Percent
    assert _measurement(boxed, codes.DCM.CertaintyOfFinding).value == pytest.approx(42.0)
    diameter = _measurement(boxed, codes.SCT.Diameter)
    assert diameter.value == pytest.approx(21.5)
    assert diameter.unit == codes.UCUM.Millimeter
    assert diameter.derivation == codes.SCT.Maximum
    assert point.get_measurements(name=codes.SCT.Diameter) == []


def test_findings_sr_identifies_the_model_on_measurements_and_as_device_observer() -> None:
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
    assert (attributes.name, attributes.model_name) == (ALGORITHM.model_id, ALGORITHM.version)


def test_findings_sr_is_complete_unverified_and_says_so() -> None:
    sr = _standard()
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert "VerifyingObserverSequence" not in sr
    assert NOT_VERIFIED_TEXT in _texts(sr)
    assert NO_FINDINGS_TEXT not in _texts(sr)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.SeriesDescription == f"AI findings {ALGORITHM.name} (not verified)"
    assert sr.SeriesNumber == 905


def test_findings_sr_stays_in_the_study_with_deterministic_uids() -> None:
    source = ct_source()
    first, second = build_findings_sr(request()), build_findings_sr(request())
    assert first.StudyInstanceUID == source[0].StudyInstanceUID
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.SeriesInstanceUID != source[0].SeriesInstanceUID
    other = build_findings_sr(request(algorithm=Algorithm("lung-ct", "2.0.0", "Lung nodules")))
    assert other.SOPInstanceUID != first.SOPInstanceUID
    again = hd.sr.Comprehensive3DSR.from_dataset(reread(second)).content
    assert isinstance(again, hd.sr.MeasurementReport)
    again_uids = [g.tracking_uid for g in again.get_volumetric_roi_measurement_groups()]
    assert again_uids == [g.tracking_uid for g in groups()]


def test_no_findings_report_says_so_and_has_no_measurement_group() -> None:
    sr = reread(build_findings_sr(request(findings=[])))
    texts = _texts(sr)
    assert NO_FINDINGS_TEXT in texts and NOT_VERIFIED_TEXT in texts
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    content = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(content, hd.sr.MeasurementReport)
    assert content.get_volumetric_roi_measurement_groups() == []
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in sr.ContentSequence]
    assert codes.DCM.ImagingMeasurements.value not in names
    assert codes.DCM.ImageLibrary.value in names


@pytest.mark.parametrize("probability", [-0.01, 1.01, float("nan")])
def test_probability_outside_zero_to_one_is_refused(probability: float) -> None:
    with pytest.raises(EncodingError, match="probability"):
        DetectionFinding("Lung nodule 1", NODULE, (0.0, 0.0, 0.0), None, probability)


def test_box_not_enclosing_the_centre_or_flat_is_refused() -> None:
    with pytest.raises(EncodingError, match="outside its box"):
        DetectionFinding("A", NODULE, (20.0, 0.0, 0.0), ((0.0, 0.0, 0.0), (10.0, 10.0, 10.0)), 0.5)
    with pytest.raises(EncodingError, match="min < max"):
        DetectionFinding("A", NODULE, (5.0, 5.0, 0.0), ((0.0, 0.0, 0.0), (10.0, 10.0, 0.0)), 0.5)


def test_source_without_frame_of_reference_is_refused() -> None:
    source = ct_source()
    for ds in source:
        del ds.FrameOfReferenceUID
    with pytest.raises(EncodingError, match="Frame of Reference"):
        build_findings_sr(request(source=source))


def test_duplicate_labels_and_empty_source_are_refused() -> None:
    with pytest.raises(EncodingError, match="unique"):
        build_findings_sr(request(findings=[findings()[0], findings()[0]]))
    with pytest.raises(EncodingError, match="headers"):
        build_findings_sr(request(source=[]))
