"""prepare / to_source_grid: model space and back on small synthetic volumes and the brainchop T1."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pytest
from numpy.typing import NDArray

from radai.errors import InferenceError
from radai.imaging.resample import prepare, to_source_grid
from radai.imaging.volume import Volume
from radai.models.manifest import InputSpec

nib: Any = nibabel  # partial annotations: untyped for mypy --strict
ROOT = Path(__file__).resolve().parents[2]
T1 = ROOT.parent / "shared" / "models" / "brainchop" / "t1_crop.nii.gz"

CENTRE_RAS = np.array([12.0, -30.0, 40.0])
RADIUS_MM = 14.0


def _spec(orientation: str, spacing: tuple[float, float, float], intensity: dict[str, object]) -> InputSpec:
    return InputSpec.model_validate(
        {
            "name": "image",
            "spacing": spacing,
            "orientation": orientation,
            "intensity": intensity,
            "patch_size": (64, 64, 64),
        }
    )


def _ct_like_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> NDArray[np.float64]:
    """Axial LPS stack (columns to patient left, rows to posterior) turned 10 degrees about S, as RAS."""
    a = math.radians(10.0)
    rot = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    lps_axes = rot @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ lps_axes
    centre_voxel = (np.array(shape) - 1) / 2.0
    affine[:3, 3] = CENTRE_RAS + np.array([3.0, -2.0, 1.5]) - affine[:3, :3] @ centre_voxel
    return affine


def _sphere(shape: tuple[int, int, int], affine: NDArray[np.float64]) -> NDArray[np.float32]:
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(np.float64)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return np.asarray(np.linalg.norm(world - CENTRE_RAS, axis=-1) <= RADIUS_MM, dtype=np.float32)


@pytest.fixture(scope="module")
def sphere_volume() -> Volume:
    shape, spacing = (64, 56, 18), (0.7, 0.75, 2.5)
    affine = _ct_like_affine(shape, spacing)
    return Volume(
        array=_sphere(shape, affine), affine=affine, sop_instance_uids=tuple(str(k) for k in range(18))
    )


IDENTITY_RANGE = {"kind": "range", "a_min": 0.0, "a_max": 1.0}


def test_prepared_image_has_card_orientation_and_spacing(sphere_volume: Volume) -> None:
    prepared = prepare(sphere_volume, _spec("LIA", (1.2, 1.2, 1.2), IDENTITY_RANGE))
    assert nib.aff2axcodes(prepared.affine) == ("L", "I", "A")
    np.testing.assert_allclose(np.linalg.norm(prepared.affine[:3, :3], axis=0), [1.2, 1.2, 1.2], atol=1e-6)
    assert prepared.image.dtype == np.float32
    assert prepared.image.ndim == 4
    assert prepared.image.shape[0] == 1
    assert prepared.source_shape == sphere_volume.array.shape
    np.testing.assert_array_equal(prepared.source_affine, sphere_volume.affine)
    # the model grid covers the source extent: volumes in mm agree within one model voxel layer
    source_mm3 = np.prod(sphere_volume.array.shape) * sphere_volume.voxel_volume_ml * 1000
    model_mm3 = np.prod(prepared.image.shape[1:]) * 1.2**3
    assert abs(model_mm3 - source_mm3) / source_mm3 < 0.15


def test_sphere_stays_at_its_patient_position_in_model_space(sphere_volume: Volume) -> None:
    prepared = prepare(sphere_volume, _spec("LIA", (1.2, 1.2, 1.2), IDENTITY_RANGE))
    weights = prepared.image[0]
    ijk = np.argwhere(weights > 0.5).astype(np.float64)
    centroid = ijk.mean(axis=0) @ prepared.affine[:3, :3].T + prepared.affine[:3, 3]
    np.testing.assert_allclose(centroid, CENTRE_RAS, atol=0.5)
    sphere_ml = 4.0 / 3.0 * math.pi * RADIUS_MM**3 / 1000.0
    assert np.count_nonzero(weights > 0.5) * 1.2**3 / 1000.0 == pytest.approx(sphere_ml, rel=0.05)


@pytest.mark.parametrize(("orientation", "spacing"), [("LIA", (1.2, 1.2, 1.2)), ("RAS", (1.5, 1.0, 2.0))])
def test_one_hot_scores_survive_the_round_trip_to_model_space_and_back(
    sphere_volume: Volume, orientation: str, spacing: tuple[float, float, float]
) -> None:
    prepared = prepare(sphere_volume, _spec(orientation, spacing, IDENTITY_RANGE))
    label_in_model = prepared.image[0]
    scores = np.stack([1.0 - label_in_model, label_in_model]).astype(np.float32)
    back = to_source_grid(scores, prepared)
    assert back.shape == (2, *sphere_volume.array.shape)
    assert back.dtype == np.float32
    predicted = np.argmax(back, axis=0) == 1
    truth = sphere_volume.array > 0.5
    dice = 2 * np.count_nonzero(predicted & truth) / (np.count_nonzero(predicted) + np.count_nonzero(truth))
    assert dice > 0.97


def test_card_space_differing_only_by_axis_order_maps_back_exactly() -> None:
    rng = np.random.default_rng(11)
    values = rng.random((10, 12, 14), dtype=np.float32)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # axial LPS stack at 1 mm, as a 1 mm MR series arrives
    affine[:3, 3] = [60.0, 80.0, -20.0]
    volume = Volume(array=values, affine=affine, sop_instance_uids=())
    prepared = prepare(volume, _spec("LIA", (1.0, 1.0, 1.0), IDENTITY_RANGE))
    assert prepared.image.shape == (1, 10, 14, 12)
    np.testing.assert_array_equal(prepared.image[0], values.transpose(0, 2, 1)[:, ::-1, ::-1])
    back = to_source_grid(prepared.image, prepared)
    np.testing.assert_array_equal(back[0], values)


def test_range_norm_maps_and_clips_like_scale_intensity_range() -> None:
    values = np.linspace(-1500.0, 2500.0, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    volume = Volume(array=values, affine=np.eye(4), sop_instance_uids=())
    norm = {"kind": "range", "a_min": -1000.0, "a_max": 1000.0, "b_min": -1.0, "b_max": 1.0, "clip": True}
    prepared = prepare(volume, _spec("RAS", (1.0, 1.0, 1.0), norm))
    expected = np.clip((values + 1000.0) / 2000.0 * 2.0 - 1.0, -1.0, 1.0)
    np.testing.assert_allclose(prepared.image[0], expected, atol=1e-5)


@pytest.mark.parametrize("to_uint8_first", [True, False])
def test_quantile_norm_matches_brainchop_formula(to_uint8_first: bool) -> None:
    rng = np.random.default_rng(3)
    values = rng.gamma(2.0, 300.0, size=(12, 10, 9)).astype(np.float32) + 50.0
    volume = Volume(array=values, affine=np.eye(4), sop_instance_uids=())
    norm = {"kind": "quantile", "lower": 0.05, "upper": 0.95, "to_uint8_first": to_uint8_first}
    prepared = prepare(volume, _spec("RAS", (1.0, 1.0, 1.0), norm))
    x = values.astype(np.float64)
    if to_uint8_first:
        x = (x - x.min()) / (x.max() - x.min()) * 255.0
    lo, hi = np.percentile(x, [5.0, 95.0])
    expected = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    np.testing.assert_allclose(prepared.image[0], expected, atol=1e-4)


def test_scores_of_the_wrong_shape_are_refused(sphere_volume: Volume) -> None:
    prepared = prepare(sphere_volume, _spec("RAS", (2.0, 2.0, 2.0), IDENTITY_RANGE))
    wrong = np.zeros((2, 3, 3, 3), dtype=np.float32)
    with pytest.raises(InferenceError, match="do not match the model space"):
        to_source_grid(wrong, prepared)


@pytest.mark.skipif(not T1.is_file(), reason="../shared brainchop data not present")
def test_brain_card_space_on_the_conformed_t1_keeps_its_grid() -> None:
    image = nib.load(T1)
    volume = Volume(
        array=np.asarray(image.dataobj, dtype=np.float32), affine=image.affine, sop_instance_uids=()
    )
    norm = {"kind": "quantile", "lower": 0.05, "upper": 0.95, "to_uint8_first": True}
    prepared = prepare(volume, _spec("LIA", (1.0, 1.0, 1.0), norm))
    assert prepared.image.shape == (1, 256, 256, 256)
    np.testing.assert_allclose(prepared.affine, image.affine, atol=1e-4)
    assert prepared.image.min() == 0.0
    assert prepared.image.max() == 1.0
    assert np.mean(prepared.image == 0.0) > 0.03
    scores = np.zeros((3, 256, 256, 256), dtype=np.float32)
    scores[2] = prepared.image[0]
    back = to_source_grid(scores, prepared)
    assert back.shape == (3, 256, 256, 256)
    np.testing.assert_allclose(back[2], prepared.image[0], atol=1e-5)
