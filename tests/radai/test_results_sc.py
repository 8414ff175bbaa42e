"""Secondary Capture with the overlay burned in: real CT slices, pixels checked, validated by dciodvfy."""

from __future__ import annotations

import dataclasses
import datetime
import io
import shutil
from functools import cache

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom import Dataset
from scipy import ndimage

from radai.errors import EncodingError
from radai.results.sc import AI_BANNER, ALPHA, ScRequest, banner_height, build_sc, display_window
from radai.results.validate import dciodvfy_errors
from tests.radai.results_fixtures import (
    ALGORITHM,
    BODY,
    BONE,
    SPECS,
    ct_hu,
    ct_source,
    reread,
    threshold_labels,
    to_bytes,
)

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")

CREATED = datetime.datetime(2026, 1, 2, 3, 4, 5)


def sc_request(**changes: object) -> ScRequest:
    fields: dict[str, object] = {
        "source": ct_source(),
        "labels": threshold_labels(),
        "segments": SPECS,
        "algorithm": ALGORITHM,
        "created": CREATED,
    }
    fields.update(changes)
    return ScRequest(**fields)  # type: ignore[arg-type]


@cache
def _standard_bytes() -> tuple[bytes, ...]:
    return tuple(to_bytes(ds) for ds in build_sc(sc_request()))


def standard_sc() -> list[Dataset]:
    """The SC series of :func:`sc_request`, built once and read back as a receiver would."""
    return [pydicom.dcmread(io.BytesIO(data)) for data in _standard_bytes()]


def windowed(hu: NDArray[np.float64], center: float = 40.0, width: float = 400.0) -> NDArray[np.float64]:
    """Expected gray value of a CT plane under a linear window, computed independently."""
    return np.round(np.clip((hu - (center - width / 2)) / width, 0, 1) * 255)


def _below_banner(shape: tuple[int, ...]) -> NDArray[np.bool_]:
    rows = np.arange(shape[0])[:, None] >= banner_height(shape[0], shape[1])
    return np.broadcast_to(rows, shape[:2])


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_every_sc_image_passes_dciodvfy_without_errors() -> None:
    for ds in standard_sc():
        assert dciodvfy_errors(ds) == []


def test_sc_images_reference_their_source_slice_in_the_same_study_and_patient() -> None:
    source = ct_source()
    images = standard_sc()
    assert len(images) == len(source)  # every fixture slice has body voxels
    for ds in images:
        k = int(ds.InstanceNumber) - 1
        (reference,) = ds.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source[k].SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source[k].SOPClassUID
        assert ds.StudyInstanceUID == source[k].StudyInstanceUID
        assert ds.SeriesInstanceUID != source[k].SeriesInstanceUID
        for keyword in ("PatientID", "PatientName", "PatientSex", "PatientAge", "PatientIdentityRemoved"):
            assert ds[keyword].value == source[k][keyword].value
        assert ds.PixelSpacing == source[k].PixelSpacing
    assert len({ds.SeriesInstanceUID for ds in images}) == 1
    assert len({ds.SOPInstanceUID for ds in images}) == len(images)


def test_sc_header_says_derived_burned_in_ai_output() -> None:
    for ds in standard_sc():
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.Modality == "OT"  # never CT/MR: a PACS rule that forwards CT to radai must not loop
        assert ds.BurnedInAnnotation == "YES"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == f"AI SC {ALGORITHM.name} (not verified)"
        assert ds.SeriesNumber == 903
        assert ds.Manufacturer == "radai"
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
        assert (ds.SeriesDate, ds.ContentDate, ds.DateOfSecondaryCapture) == ("20260102",) * 3
    image = hd.Image.from_dataset(standard_sc()[0])
    assert image.get_frame(1).shape == (512, 512, 3)


def test_segments_are_tinted_in_their_colour_with_a_brighter_outline_and_background_stays_grey() -> None:
    hu, labels = ct_hu(), threshold_labels()
    for ds in standard_sc()[::3]:
        k = int(ds.InstanceNumber) - 1
        rgb = ds.pixel_array.astype(np.float64)
        gray, plane = windowed(hu[:, :, k].T), labels[:, :, k].T
        below = _below_banner(plane.shape)
        for spec in (BODY, BONE):
            mask = plane == spec.value
            color = np.asarray(spec.color, dtype=np.float64)
            interior = ndimage.binary_erosion(mask, iterations=2) & below
            expected = (1 - ALPHA) * gray[interior][:, None] + ALPHA * color
            assert interior.sum() > 20
            assert np.abs(rgb[interior] - expected).max() <= 1
            edge = mask & ~ndimage.binary_erosion(mask, border_value=0) & below
            assert np.abs(rgb[edge] - (color + (255 - color) / 2)).max() <= 1
        far = ~ndimage.binary_dilation(plane != 0, iterations=3) & below
        assert far.sum() > 10_000
        assert np.array_equal(rgb[far][:, 0], rgb[far][:, 1])
        assert np.array_equal(rgb[far][:, 1], rgb[far][:, 2])
        assert np.abs(rgb[far][:, 0] - gray[far]).max() <= 1


def test_banner_labels_every_image_as_ai_output_with_segment_names() -> None:
    title = f"{AI_BANNER} - {ALGORITHM.name} {ALGORITHM.version}"
    assert title.startswith("AI OUTPUT - NOT VERIFIED - ")
    for ds in standard_sc():
        rgb = ds.pixel_array.astype(int)
        banner = rgb[: banner_height(ds.Rows, ds.Columns)]
        yellow = (banner[..., 0] > 200) & (banner[..., 1] > 150) & (banner[..., 2] < 100)
        assert yellow.sum() > 200  # the notice text
        assert np.all(banner[:, -4:] == 0)  # black strip behind it
        bright = banner[banner.max(axis=-1) > 100]
        for spec in (BODY, BONE):  # legend: each present segment's name in its (anti-aliased) colour
            color = np.asarray(spec.color) / np.linalg.norm(spec.color)
            cosine = bright @ color / np.linalg.norm(bright, axis=-1)
            assert (cosine > 0.9999).sum() > 10


def test_banner_text_depends_on_the_model_name() -> None:
    renamed = dataclasses.replace(ALGORITHM, name="Another model with a much longer name")
    first = build_sc(sc_request(slices="segmented"))[0]
    second = build_sc(sc_request(algorithm=renamed))[0]
    height = banner_height(first.Rows, first.Columns)
    assert not np.array_equal(first.pixel_array[:height], second.pixel_array[:height])
    assert np.array_equal(first.pixel_array[height:], second.pixel_array[height:])


def test_segmented_mode_skips_empty_slices_and_all_mode_keeps_them() -> None:
    labels = threshold_labels()
    labels[:, :, :3] = 0
    segmented = build_sc(sc_request(labels=labels))
    everything = build_sc(sc_request(labels=labels, slices="all"))
    assert [int(ds.InstanceNumber) for ds in segmented] == list(range(4, 11))
    assert [int(ds.InstanceNumber) for ds in everything] == list(range(1, 11))
    empty_slice = everything[0].pixel_array
    below = _below_banner(empty_slice.shape)
    assert np.array_equal(empty_slice[..., 0][below], empty_slice[..., 2][below])  # no tint at all
    assert {ds.SOPInstanceUID for ds in segmented} <= {ds.SOPInstanceUID for ds in everything}


def test_sc_uids_are_the_same_on_retry_and_change_with_model_version() -> None:
    first = [reread(ds) for ds in build_sc(sc_request())]
    again = standard_sc()
    assert [ds.SOPInstanceUID for ds in first] == [ds.SOPInstanceUID for ds in again]
    assert first[0].SeriesInstanceUID == again[0].SeriesInstanceUID
    newer = build_sc(sc_request(algorithm=dataclasses.replace(ALGORITHM, version="1.0.1")))
    assert newer[0].SeriesInstanceUID != first[0].SeriesInstanceUID
    assert not {ds.SOPInstanceUID for ds in newer} & {ds.SOPInstanceUID for ds in first}


def test_ct_without_window_uses_soft_tissue_and_other_modalities_use_percentiles() -> None:
    source = ct_source()
    for ds in source:
        ds.WindowCenter, ds.WindowWidth = 300, 1500
    assert (display_window(source).center, display_window(source).width) == (300.0, 1500.0)
    for ds in source:
        del ds.WindowCenter, ds.WindowWidth
    assert (display_window(source).center, display_window(source).width) == (40.0, 400.0)
    for ds in source:
        ds.Modality = "MR"
    low, high = np.percentile(ct_hu()[::4, ::4, :], (1, 99))
    window = display_window(source)
    assert window.center == pytest.approx((low + high) / 2)
    assert window.width == pytest.approx(high - low)


def test_source_window_is_applied_to_the_burned_in_image() -> None:
    source = ct_source()
    for ds in source:
        ds.WindowCenter, ds.WindowWidth = 300, 1500
    (image,) = build_sc(sc_request(source=source, slices="all"))[:1]
    plane = threshold_labels()[:, :, 0].T
    far = ~ndimage.binary_dilation(plane != 0, iterations=3) & _below_banner(plane.shape)
    expected = windowed(ct_hu()[:, :, 0].T, 300, 1500)
    assert np.abs(image.pixel_array[..., 0][far] - expected[far]).max() <= 1


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((512, 512, 10), dtype=np.uint8), "no segment found"),
        (np.full((512, 512, 10), 7, dtype=np.uint8), "no segment spec"),
        (np.zeros((512, 512, 9), dtype=np.uint8), "does not match source"),
    ],
)
def test_sc_refuses_empty_or_inconsistent_label_maps(labels: NDArray[np.uint8], message: str) -> None:
    with pytest.raises(EncodingError, match=message):
        build_sc(sc_request(labels=labels))


def test_source_with_an_empty_specific_character_set_gets_its_sc() -> None:
    source = ct_source()
    for ds in source:
        ds.SpecificCharacterSet = ""  # present and empty: the default repertoire (seen from GE scanners)

    images = build_sc(sc_request(source=source))

    assert images and all(str(ds.get("SpecificCharacterSet", "")) in ("", "ISO_IR 100") for ds in images)
