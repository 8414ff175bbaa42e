"""Assemble a regular 3-D volume from the instances of one DICOM series: single-frame images, or
Enhanced multi-frame images split into their frames (geometry per frame, see `radai.imaging.multiframe`).

Geometry is checked before any pixel is decoded, so a series that is not a volume is refused cheaply,
with a one-line reason (`NotAVolumeError`). Tolerances: slice positions may deviate from a uniform grid
by at most max(0.01 mm, 1 % of the slice step); slice origins may drift within the image plane by at
most max(0.01 mm, 1 % of the smallest pixel spacing); orientation cosines must agree within 1e-4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_rescale
from pydicom.pixels.utils import pixel_array

from radai.errors import NotAVolumeError
from radai.imaging.multiframe import (
    Frame,
    Plane,
    check_one_stack,
    decode_frames,
    frames,
    is_multiframe,
    number_of_frames,
    plane_from,
)

MIN_SLICES = 3  # two slices cannot show a uniform spacing (and are usually a localiser pair)
ABS_TOL_MM = 0.01
REL_TOL = 0.01
ORIENTATION_TOL = 1e-4
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GEOMETRY_TAGS = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")
_PLANE_TAGS = _GEOMETRY_TAGS[:3]  # in functional groups for multi-frame images
_OTHER_TAGS = ("PixelData",)


@dataclass(frozen=True, eq=False)
class Volume:
    """A scalar volume on a regular grid; treat the arrays as read-only."""

    array: NDArray[np.float32]  # (X=columns, Y=rows, Z=slices), after the modality LUT (HU for CT)
    affine: NDArray[np.float64]  # 4x4, voxel (i, j, k) -> RAS mm (nibabel / MONAI convention)
    sop_instance_uids: tuple[str, ...]  # source instance of slice k ("" where the instance has none)
    # 1-based frame number of slice k within its instance; None when every source is a single-frame image
    frame_numbers: tuple[int, ...] | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        sx, sy, sz = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(sx), float(sy), float(sz)

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0


@dataclass(frozen=True)
class _Slice:
    """One 2-D image of the volume: its plane, its instance (index into the input) and frame."""

    plane: Plane
    source: int
    frame: int | None = None  # 1-based frame number in a multi-frame instance
    rescale: tuple[float, float] = (1.0, 0.0)  # (slope, intercept) of a frame; single frames use their own


def _slices(datasets: Sequence[Dataset]) -> list[_Slice]:
    out: list[_Slice] = []
    all_frames: list[Frame] = []
    for i, ds in enumerate(datasets):
        if is_multiframe(ds):
            found = frames(ds)
            all_frames.extend(found)
            out.extend(_Slice(f.plane, i, f.number, (f.slope, f.intercept)) for f in found)
        else:
            out.append(_Slice(plane_from(ds, (int(ds.Rows), int(ds.Columns))), i))
    check_one_stack(all_frames)
    return out


def _check_instances(datasets: Sequence[Dataset]) -> None:
    n = len(datasets)
    slices = sum(number_of_frames(ds) for ds in datasets)
    if slices < MIN_SLICES:
        raise NotAVolumeError(f"too few slices: {slices} (a volume needs at least {MIN_SLICES})")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise NotAVolumeError(f"mixed series: instances belong to {len(series)} different series")
    single = [ds for ds in datasets if not is_multiframe(ds)]  # multi-frame geometry: functional groups
    for keyword in (*_GEOMETRY_TAGS, *_OTHER_TAGS):
        subset = single if keyword in _PLANE_TAGS else datasets
        missing = sum(1 for ds in subset if keyword not in ds or ds[keyword].is_empty)
        if missing:
            what = "geometry tag " if keyword in _GEOMETRY_TAGS else ""
            raise NotAVolumeError(f"missing {what}{keyword} in {missing} of {n} instances")
    samples = {int(ds.get("SamplesPerPixel", 1)) for ds in datasets}
    if samples != {1}:
        raise NotAVolumeError(f"not a greyscale image (SamplesPerPixel={sorted(samples)})")


def _check_planes(planes: Sequence[Plane]) -> NDArray[np.float64]:
    """Same orientation and matrix for every slice; return the unit slice normal (LPS)."""
    first = planes[0]
    if any(
        not (
            np.allclose(p.row, first.row, atol=ORIENTATION_TOL)
            and np.allclose(p.col, first.col, atol=ORIENTATION_TOL)
        )
        for p in planes
    ):
        distinct = {tuple(np.round(np.concatenate([p.row, p.col]), 4)) for p in planes}
        raise NotAVolumeError(f"mixed orientations: {len(distinct)} distinct ImageOrientationPatient values")
    sizes = sorted({p.size for p in planes})
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sizes)
        raise NotAVolumeError(f"mixed rows/columns: {shown}")
    spacings = np.array([p.pixel_spacing for p in planes])
    if not np.allclose(spacings, spacings[0], rtol=1e-4, atol=1e-6):
        shown = ", ".join(f"{a:g}x{b:g}" for a, b in sorted({(a, b) for a, b in spacings.tolist()}))
        raise NotAVolumeError(f"mixed pixel spacing: {shown} mm")
    row, col = first.row, first.col
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(float(row @ col)) > 1e-3
    ):
        raise NotAVolumeError("malformed ImageOrientationPatient: cosines are not orthonormal")
    normal = np.cross(row, col)
    return np.asarray(normal / np.linalg.norm(normal), dtype=np.float64)


def _check_stack(positions: NDArray[np.float64], normal: NDArray[np.float64], pixel: float) -> None:
    """positions: (n, 3) LPS, sorted along `normal`. Refuse duplicates, gaps, irregular steps and tilt."""
    n = len(positions)
    dist = positions @ normal
    steps = np.diff(dist)
    if np.any(steps < ABS_TOL_MM):
        distinct = 1 + int(np.count_nonzero(steps >= ABS_TOL_MM))
        raise NotAVolumeError(f"duplicate slice positions: {n} instances at {distinct} distinct positions")
    step = (dist[-1] - dist[0]) / (n - 1)
    tol = max(ABS_TOL_MM, REL_TOL * step)
    residual = dist - (dist[0] + step * np.arange(n))
    if np.max(np.abs(residual)) > tol:
        raise NotAVolumeError(
            f"non-uniform slice spacing (gaps or irregular): steps from {steps.min():.3f} to "
            f"{steps.max():.3f} mm, tolerance {tol:.3f} mm"
        )
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    if np.max(drift) > max(ABS_TOL_MM, REL_TOL * pixel):
        worst = int(np.argmax(drift))
        angle = math.degrees(math.atan2(float(drift[worst]), float(dist[worst] - dist[0])))
        raise NotAVolumeError(
            f"gantry tilt or sheared stack: slices step {angle:.1f} degrees off the slice normal"
        )


def _pixels(ds: Dataset) -> NDArray[np.float32]:
    try:
        raw = pixel_array(ds)
    except Exception as exc:  # decoder plugins raise assorted types; translate at this boundary
        detail = " ".join(str(exc).split())[:200]
        raise NotAVolumeError(f"pixel data could not be decoded: {type(exc).__name__}: {detail}") from exc
    if raw.ndim != 2:
        raise NotAVolumeError(f"pixel data has shape {raw.shape}, expected one greyscale frame")
    return np.asarray(apply_rescale(raw, ds), dtype=np.float32)


def build_volume(datasets: Sequence[Dataset]) -> Volume:
    """Sort the slices along their normal, check the geometry, decode once and apply the rescale."""
    _check_instances(datasets)
    slices = _slices(datasets)
    planes = [s.plane for s in slices]
    normal = _check_planes(planes)
    order = np.argsort([float(p.position @ normal) for p in planes], kind="stable")
    positions = np.array([planes[i].position for i in order])
    first = planes[0]
    _check_stack(positions, normal, min(first.pixel_spacing))

    rows, cols = first.size
    # (Z, Y, X) in C order is written one contiguous slice at a time; its transpose is the (X, Y, Z) view.
    zyx = np.empty((len(order), rows, cols), dtype=np.float32)
    decoded: dict[int, NDArray[Any]] = {}  # multi-frame instances are decoded once, all frames together
    for k, i in enumerate(order):
        piece = slices[i]
        ds = datasets[piece.source]
        if piece.frame is None:
            zyx[k] = _pixels(ds)
            continue
        if piece.source not in decoded:
            decoded[piece.source] = decode_frames(ds)
        slope, intercept = piece.rescale
        zyx[k] = decoded[piece.source][piece.frame - 1].astype(np.float64) * slope + intercept

    lps = np.eye(4)
    lps[:3, 0] = first.row * first.pixel_spacing[1]
    lps[:3, 1] = first.col * first.pixel_spacing[0]
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(order) - 1)
    lps[:3, 3] = positions[0]
    ordered = [slices[i] for i in order]
    multi = any(s.frame is not None for s in ordered)
    return Volume(
        array=zyx.transpose(2, 1, 0),
        affine=_LPS_TO_RAS @ lps,
        sop_instance_uids=tuple(str(datasets[s.source].get("SOPInstanceUID", "")) for s in ordered),
        frame_numbers=tuple(s.frame or 1 for s in ordered) if multi else None,
    )
