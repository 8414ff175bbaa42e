"""Independent numpy/scipy.ndimage implementation of the classical CT body/lung/bone algorithm.

It mirrors the ONNX graph built by `model_zoo.ct_classical` step by step, but with scipy's binary
morphology instead of pooling tricks, so that the two can check each other in tests. Border rule shared
with the ONNX graph: voxels outside the array never erode a mask and never dilate into it (ONNX MaxPool
ignores its pads), hence `border_value=1` for erosions here.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from model_zoo.ct_classical import DEFAULT_PARAMS, CtParams

BACKGROUND, BODY, LUNG, BONE = 0, 1, 2, 3

BoolArray = NDArray[np.bool_]


def _box(size: tuple[int, int, int]) -> BoolArray:
    return np.ones(size, dtype=bool)


def _erode(mask: BoolArray, size: tuple[int, int, int]) -> BoolArray:
    out: BoolArray = ndimage.binary_erosion(mask, structure=_box(size), border_value=1)
    return out


def _dilate(mask: BoolArray, size: tuple[int, int, int]) -> BoolArray:
    out: BoolArray = ndimage.binary_dilation(mask, structure=_box(size), border_value=0)
    return out


def _fill_between(mask: BoolArray, axis: int) -> BoolArray:
    """True where `mask` holds somewhere at or before, and at or after, along `axis`."""
    before = np.logical_or.accumulate(mask, axis=axis)
    after = np.flip(np.logical_or.accumulate(np.flip(mask, axis=axis), axis=axis), axis=axis)
    out: BoolArray = before & after
    return out


def reference_masks(volume: NDArray[np.floating], params: CtParams = DEFAULT_PARAMS) -> dict[str, BoolArray]:
    """Body (filled), lung and bone masks of one normalised (X, Y, Z) volume; X, Y in-plane."""
    if volume.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {volume.shape}")
    hu = volume.astype(np.float64) * (params.hu_max - params.hu_min) + params.hu_min
    tissue = hu > params.tissue_hu
    body = _dilate(_erode(tissue, params.body_open), params.body_open)
    filled = _fill_between(body, 0) & _fill_between(body, 1)
    inner = _erode(filled, params.wall_erode)
    candidate = (hu < params.lung_hu) & inner
    window = np.ones(params.lung_seed)
    mean_hu = ndimage.correlate(hu, window, mode="constant") / ndimage.correlate(
        np.ones_like(hu), window, mode="constant"
    )
    seed = _erode(candidate, params.lung_seed) & (mean_hu > params.seed_min_mean_hu)
    six = ndimage.generate_binary_structure(3, 1)
    if params.lung_grow_steps > 0 and seed.any():
        lung = ndimage.binary_dilation(
            seed, structure=six, iterations=params.lung_grow_steps, mask=candidate, border_value=0
        )
    else:
        lung = seed
    lung = _erode(_dilate(lung, params.lung_close), params.lung_close) & filled
    bone_raw = (hu > params.bone_hu) & filled
    neighbours = ndimage.correlate(bone_raw.astype(np.int32), np.ones((3, 3, 3), np.int32), mode="constant")
    bone = bone_raw & (neighbours >= params.bone_min_neighbours)
    bone = _erode(_dilate(bone, params.bone_close), params.bone_close) & filled & ~lung
    return {"body": filled, "lung": lung, "bone": bone}


def reference_labels(volume: NDArray[np.floating], params: CtParams = DEFAULT_PARAMS) -> NDArray[np.uint8]:
    """Label map (0 background, 1 body, 2 lung, 3 bone) of one normalised (X, Y, Z) volume."""
    masks = reference_masks(volume, params)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[masks["body"]] = BODY
    labels[masks["lung"]] = LUNG
    labels[masks["bone"]] = BONE
    return labels
