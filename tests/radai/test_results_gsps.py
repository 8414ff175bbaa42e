"""GSPS with segment outlines: real CT slices, outlines checked against the mask, dciodvfy and DCMTK."""

from __future__ import annotations

import dataclasses
import datetime
import io
import shutil
import subprocess
from functools import cache
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom import Dataset
from scipy import ndimage
from scipy.spatial import cKDTree

from radai.errors import EncodingError
from radai.results.gsps import GspsRequest, build_gsps, outlines
from radai.results.validate import dciodvfy_errors
from tests.radai.results_fixtures import ALGORITHM, BODY, BONE, SPECS, ct_source, threshold_labels, to_bytes

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")

GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


def gsps_request(**changes: object) -> GspsRequest:
    fields: dict[str, object] = {
        "source": ct_source(),
        "labels": threshold_labels(),
        "segments": SPECS,
        "algorithm": ALGORITHM,
        "created": datetime.datetime(2026, 1, 2, 3, 4, 5),
    }
    fields.update(changes)
    return GspsRequest(**fields)  # type: ignore[arg-type]


@cache
def _standard_bytes() -> bytes:
    return to_bytes(build_gsps(gsps_request()))


def standard_gsps() -> Dataset:
    return pydicom.dcmread(io.BytesIO(_standard_bytes()))


def signed_area(outline: NDArray[np.float64]) -> float:
    """Shoelace area; positive for clockwise on screen (y down)."""
    x, y = outline[:-1, 0], outline[:-1, 1]
    return float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) / 2)


def test_outlines_of_a_square_with_a_hole_follow_pixel_edges() -> None:
    mask = np.zeros((8, 9), dtype=bool)
    mask[1:7, 2:8] = True
    mask[3:5, 4:6] = False
    outer, hole = sorted(outlines(mask), key=signed_area, reverse=True)
    np.testing.assert_array_equal(outer, [[2, 1], [8, 1], [8, 7], [2, 7], [2, 1]])
    assert signed_area(outer) == 36
    assert sorted(map(tuple, hole[:-1].tolist())) == [(4, 3), (4, 5), (6, 3), (6, 5)]
    assert signed_area(hole) == -4
    assert outlines(np.zeros((4, 4), dtype=bool)) == []


def test_outlines_keep_the_area_of_a_real_mask_and_bound_the_point_count() -> None:
    plane = threshold_labels()[:, :, 5].T
    for spec in (BODY, BONE):
        mask = plane == spec.value
        found = outlines(mask, max_points=32)
        assert all(len(o) <= 32 and np.array_equal(o[0], o[-1]) for o in found)
        exact = outlines(mask, max_points=10_000)
        assert sum(signed_area(o) for o in exact) == pytest.approx(mask.sum(), rel=0.02)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_gsps_passes_dciodvfy_without_errors() -> None:
    assert dciodvfy_errors(standard_gsps()) == []


def test_gsps_references_the_whole_source_series_in_the_same_study() -> None:
    source = ct_source()
    gsps = standard_gsps()
    assert gsps.SOPClassUID == GSPS_CLASS
    assert gsps.Modality == "PR"
    assert gsps.StudyInstanceUID == source[0].StudyInstanceUID
    assert gsps.PatientID == source[0].PatientID
    assert gsps.SeriesDescription == f"AI GSPS {ALGORITHM.name} (not verified)"
    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedImageSequence] == [
        ds.SOPInstanceUID for ds in source
    ]
    (voi,) = gsps.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (40.0, 400.0)
    assert gsps.PresentationCreationDate == "20260102"


def test_gsps_has_one_layer_per_present_segment_in_its_colour() -> None:
    layers = {layer.GraphicLayer: layer for layer in standard_gsps().GraphicLayerSequence}
    assert set(layers) == {"AI_SEGMENT_1", "AI_SEGMENT_3", "AI_NOTICE"}  # fat (2) is absent
    for spec in (BODY, BONE):
        layer = layers[f"AI_SEGMENT_{spec.value}"]
        assert layer.GraphicLayerDescription == spec.name
        lab = tuple(layer.GraphicLayerRecommendedDisplayCIELabValue)
        assert np.allclose(hd.color.CIELabColor.from_dicom_value(lab).to_rgb(), spec.color, atol=1)


def test_gsps_outlines_lie_on_the_mask_boundary_of_the_slice_they_reference() -> None:
    source, labels = ct_source(), threshold_labels()
    index = {ds.SOPInstanceUID: k for ds, k in zip(source, range(len(source)), strict=True)}
    seen: set[tuple[int, int]] = set()
    for annotation in standard_gsps().GraphicAnnotationSequence:
        if annotation.GraphicLayer == "AI_NOTICE":
            continue
        value = int(annotation.GraphicLayer.rsplit("_", 1)[1])
        (reference,) = annotation.ReferencedImageSequence
        k = index[reference.ReferencedSOPInstanceUID]
        seen.add((k, value))
        plane = labels[:, :, k].T
        mask = plane == value
        edge_r, edge_c = np.nonzero(mask & ~ndimage.binary_erosion(mask, border_value=0))
        tree = cKDTree(np.stack([edge_c + 0.5, edge_r + 0.5], axis=1))  # pixel centres, (x, y)
        for graphic in annotation.GraphicObjectSequence:
            assert (graphic.GraphicType, graphic.GraphicAnnotationUnits) == ("POLYLINE", "PIXEL")
            points = np.asarray(graphic.GraphicData, dtype=float).reshape(-1, 2)
            assert np.array_equal(points[0], points[-1])
            assert tree.query(points)[0].max() <= 1.5
    expected = {(k, v) for k in range(labels.shape[2]) for v in (1, 3) if (labels[:, :, k] == v).any()}
    assert seen == expected


def test_gsps_shows_the_ai_notice_on_every_image() -> None:
    (notice,) = [a for a in standard_gsps().GraphicAnnotationSequence if a.GraphicLayer == "AI_NOTICE"]
    assert len(notice.ReferencedImageSequence) == len(ct_source())
    (text,) = notice.TextObjectSequence
    assert text.UnformattedTextValue.startswith("AI OUTPUT - NOT VERIFIED")
    assert text.BoundingBoxAnnotationUnits == "DISPLAY"


@pytest.mark.skipif(shutil.which("dcmp2pgm") is None, reason="dcmp2pgm (DCMTK) is not installed")
def test_dcmtk_applies_the_gsps_to_a_source_image(tmp_path: Path) -> None:
    source = ct_source()
    (tmp_path / "pr.dcm").write_bytes(_standard_bytes())
    source[4].save_as(tmp_path / "image.dcm", enforce_file_format=True)
    done = subprocess.run(
        ["dcmp2pgm", "-v", "-p", "pr.dcm", "image.dcm", "out.pgm"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    assert "Presentation Label: AI_OUTLINES" in log
    assert "window center=40 width=400" in log
    assert "Graphic Layer #1 [AI_SEGMENT_1]" in log and "[AI_SEGMENT_3]" in log
    assert "type=polyline" in log
    assert (tmp_path / "out.pgm").stat().st_size > 512 * 512


def test_gsps_uids_are_the_same_on_retry_and_change_with_model_version() -> None:
    again = build_gsps(gsps_request())
    first = standard_gsps()
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (first.SOPInstanceUID, first.SeriesInstanceUID)
    newer = build_gsps(gsps_request(algorithm=dataclasses.replace(ALGORITHM, version="2")))
    assert newer.SOPInstanceUID != first.SOPInstanceUID
    assert newer.SeriesInstanceUID != first.SeriesInstanceUID


def test_gsps_refuses_an_empty_label_map() -> None:
    with pytest.raises(EncodingError, match="no segment found"):
        build_gsps(gsps_request(labels=np.zeros((512, 512, 10), dtype=np.uint8)))


def test_gsps_builds_for_a_source_missing_type_2_patient_attributes() -> None:
    source = ct_source()
    for ds in source:
        del ds.PatientBirthDate, ds.PatientSex
    gsps = build_gsps(gsps_request(source=source))
    assert (gsps.PatientBirthDate, gsps.PatientSex) == ("", "")
    assert "PatientBirthDate" not in source[0]  # the caller's datasets are untouched


def test_source_with_an_empty_specific_character_set_gets_its_gsps() -> None:
    source = ct_source()
    for ds in source:
        ds.SpecificCharacterSet = ""  # present and empty: the default repertoire (seen from GE scanners)

    gsps = build_gsps(
        GspsRequest(source=source, labels=threshold_labels(), segments=SPECS, algorithm=ALGORITHM)
    )

    assert gsps.Modality == "PR"
