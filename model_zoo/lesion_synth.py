"""Synthetic lesions inserted into real CT, for training and testing the demonstration lesion detector.

Two kinds, on the source voxel grid (so a modified series can be written back as DICOM):
- `hypodense`: an ellipsoid 25-60 HU darker than the soft tissue it replaces (e.g. a liver metastasis),
  placed where the smoothed image is soft tissue (0..180 HU) inside the body;
- `nodule`: a solid ellipsoid of -10..60 HU in aerated lung.
Edges are soft (tanh profile, 1.5 mm), slice thickness is modelled by averaging sub-slice samples, and the
lesion carries Gaussian noise with the standard deviation measured in the image's own soft tissue, slightly
correlated in-plane like reconstructed CT noise. Everything is a pure function of the volume and a seed.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from radai.imaging.volume import Volume

Kind = Literal["hypodense", "nodule"]
Vec3 = tuple[float, float, float]
SOFT_HU = (0.0, 180.0)  # smoothed HU range accepted as soft tissue for hypodense lesions
LUNG_HU = -500.0  # smoothed HU below this, inside the body, is aerated lung
EDGE_MM = 1.5
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS


@dataclass(frozen=True)
class Lesion:
    """Ground truth of one inserted lesion."""

    kind: Kind
    center_voxel: Vec3  # source voxel (i, j, k) of the Volume
    center_lps: Vec3  # DICOM patient coordinates, mm
    semi_axes_mm: Vec3  # ellipsoid semi-axes; the first two rotated by `angle` in the i-j plane
    angle: float  # radians
    size_mm: Vec3  # extent of the lesion's bounding box along the source axes i, j, k (mm)
    hu: float  # mean lesion density before noise

    @property
    def diameter_mm(self) -> float:
        return 2.0 * float(np.mean(self.semi_axes_mm))


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Per-volume masks used for placement; treat arrays as read-only."""

    body: NDArray[np.bool_]  # body with internal cavities filled
    soft: NDArray[np.bool_]
    lung: NDArray[np.bool_]
    noise_hu: float  # measured noise standard deviation in soft tissue


def load_series(directory: Path) -> list[Dataset]:
    """Every DICOM file below `directory` (sorted by name)."""
    return [pydicom.dcmread(p) for p in sorted(directory.rglob("*")) if p.is_file() and _is_dicom(p)]


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(132)[128:132] == b"DICM"


def _spacing(volume: Volume) -> NDArray[np.float64]:
    return np.asarray(volume.spacing, dtype=np.float64)


def analyse(volume: Volume) -> Anatomy:
    """Body mask (HU > -400, largest component, holes filled per slice), soft tissue, lung, noise level."""
    hu = volume.array
    sp = _spacing(volume)
    smooth = ndimage.gaussian_filter(hu, sigma=2.0 / sp)
    labels, n = ndimage.label(smooth > -400.0)
    if n == 0:
        raise ValueError("no body found (no voxel above -400 HU)")
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    body = labels == largest
    for k in range(body.shape[2]):
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    inner = ndimage.binary_erosion(body, iterations=max(1, round(5.0 / sp[0])))
    soft = inner & (smooth >= SOFT_HU[0]) & (smooth <= SOFT_HU[1])
    lung = inner & (smooth < LUNG_HU)
    return Anatomy(body=body, soft=soft, lung=lung, noise_hu=measure_noise(hu, soft))


def measure_noise(hu: NDArray[np.float32], mask: NDArray[np.bool_]) -> float:
    """Median local standard deviation over 5x5 in-plane windows in `mask` (homogeneous tissue dominates)."""
    x = hu.astype(np.float64)
    size = (5, 5, 1)
    mean = ndimage.uniform_filter(x, size=size)
    var = ndimage.uniform_filter(x * x, size=size) - mean * mean
    local = np.sqrt(np.clip(var[mask], 0.0, None) * 25.0 / 24.0)
    return float(np.median(local)) if local.size else 10.0


def _bbox_half_extent(semi: NDArray[np.float64], angle: float) -> NDArray[np.float64]:
    c, s = np.cos(angle), np.sin(angle)
    hx = np.sqrt((semi[0] * c) ** 2 + (semi[1] * s) ** 2)
    hy = np.sqrt((semi[0] * s) ** 2 + (semi[1] * c) ** 2)
    return np.array([hx, hy, semi[2]])


def _weights(
    shape: tuple[int, int, int],
    lo: NDArray[np.int64],
    center: NDArray[np.float64],
    semi: NDArray[np.float64],
    angle: float,
    sp: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Soft ellipsoid membership (0..1) on the voxels of a crop starting at `lo`, averaged across each
    voxel's extent along k (slice thickness = slice spacing)."""
    ii, jj = ((np.arange(lo[a], lo[a] + shape[a]) - center[a]) * sp[a] for a in (0, 1))
    c, s = np.cos(angle), np.sin(angle)
    u = ii[:, None] * c + jj[None, :] * s
    v = -ii[:, None] * s + jj[None, :] * c
    radial_xy = (u / semi[0]) ** 2 + (v / semi[1]) ** 2
    sub = max(1, int(np.ceil(sp[2] / 1.0)))
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    w = np.zeros(shape, dtype=np.float64)
    mean_r = float(np.mean(semi))
    for k in range(shape[2]):
        for off in offsets:
            z = (lo[2] + k + off - center[2]) * sp[2]
            d = np.sqrt(radial_xy + (z / semi[2]) ** 2)
            w[:, :, k] += 0.5 * (1.0 - np.tanh((d - 1.0) * mean_r / EDGE_MM))
    return w / len(offsets)


def _noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> NDArray[np.float64]:
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0.7, 0.7, 0.0))
    return np.asarray(n * (sigma / max(float(n.std()), 1e-6)), dtype=np.float64)


def _voxel_to_lps(volume: Volume, ijk: NDArray[np.float64]) -> Vec3:
    ras = volume.affine[:3, :3] @ ijk + volume.affine[:3, 3]
    lps = _LPS @ ras
    return float(lps[0]), float(lps[1]), float(lps[2])


def insert_lesions(
    volume: Volume,
    seed: int,
    count: int,
    *,
    diameter_mm: tuple[float, float] = (10.0, 30.0),
    nodule_fraction: float = 0.3,
    anatomy: Anatomy | None = None,
    max_tries: int = 400,
) -> tuple[Volume, tuple[Lesion, ...]]:
    """Insert up to `count` non-overlapping lesions; fewer where no valid place is found in `max_tries`."""
    rng = np.random.default_rng(seed)
    anat = anatomy if anatomy is not None else analyse(volume)
    sp = _spacing(volume)
    out = np.array(volume.array, dtype=np.float32, copy=True)
    shape = np.array(out.shape)
    placed: list[Lesion] = []
    candidates = {"nodule": np.flatnonzero(anat.lung), "hypodense": np.flatnonzero(anat.soft)}
    tries = 0
    while len(placed) < count and tries < max_tries:
        tries += 1
        kind: Kind = "nodule" if rng.random() < nodule_fraction else "hypodense"
        region = anat.lung if kind == "nodule" else anat.soft
        radius = rng.uniform(*diameter_mm) / 2.0
        semi = radius * rng.uniform(0.8, 1.2, size=3)
        angle = float(rng.uniform(0.0, np.pi))
        delta = float(rng.uniform(25.0, 60.0))
        level = float(rng.uniform(-10.0, 60.0))
        if candidates[kind].size == 0:
            continue
        flat = int(candidates[kind][rng.integers(candidates[kind].size)])
        center = np.array(np.unravel_index(flat, region.shape), dtype=np.float64)
        center += rng.uniform(-0.5, 0.5, size=3)
        half = _bbox_half_extent(semi, angle) + 2 * EDGE_MM
        lo = np.floor(center - half / sp).astype(np.int64)
        hi = np.ceil(center + half / sp).astype(np.int64) + 1
        if np.any(lo < 0) or np.any(hi > shape):
            continue
        if any(
            np.linalg.norm((center - np.array(p.center_voxel)) * sp) < radius + 0.5 * p.diameter_mm + 5.0
            for p in placed
        ):
            continue
        crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        w = _weights(out[crop].shape, lo, center, semi, angle, sp)
        inside = w > 0.05
        if float(np.mean(region[crop][inside])) < (0.9 if kind == "nodule" else 0.97):
            continue
        tissue = out[crop][w > 0.5]
        hu = float(np.median(tissue)) - delta if kind == "hypodense" else level
        lesion_hu = hu + _noise(w.shape, anat.noise_hu, rng)
        out[crop] = ((1.0 - w) * out[crop] + w * lesion_hu).astype(np.float32)
        size = 2.0 * _bbox_half_extent(semi, angle)
        placed.append(
            Lesion(
                kind=kind,
                center_voxel=(float(center[0]), float(center[1]), float(center[2])),
                center_lps=_voxel_to_lps(volume, center),
                semi_axes_mm=(float(semi[0]), float(semi[1]), float(semi[2])),
                angle=angle,
                size_mm=(float(size[0]), float(size[1]), float(size[2])),
                hu=hu,
            )
        )
    return dataclasses.replace(volume, array=out), tuple(placed)


def _slice_index(datasets: Sequence[Dataset]) -> list[int]:
    """Slice number k (as `build_volume` orders them: along the normal) of each single-frame dataset."""
    row, col = (np.asarray(datasets[0].ImageOrientationPatient[a : a + 3], dtype=np.float64) for a in (0, 3))
    normal = np.cross(row, col)
    dist = [float(np.asarray(ds.ImagePositionPatient, dtype=np.float64) @ normal) for ds in datasets]
    order = np.argsort(dist, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return [int(r) for r in rank]


def write_series(datasets: Sequence[Dataset], hu: NDArray[np.float32], out_dir: Path, tag: str) -> list[Path]:
    """Write `hu` (X, Y, Z, as from `build_volume(datasets)`) back as a new series of single-frame CT images.

    Headers are kept; pixel data is replaced (uncompressed, explicit VR little endian) with the original
    rescale; Series and SOP Instance UIDs are new but derived deterministically from the originals and `tag`
    (empty Study/Series UIDs, as in anonymised test data, get derived ones too).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    first = datasets[0]
    old_series = str(first.get("SeriesInstanceUID", "")) or "no-series-uid"
    series_uid = generate_uid(entropy_srcs=["radai-lesion-synth", old_series, tag])
    study_uid = str(first.get("StudyInstanceUID", "")) or generate_uid(entropy_srcs=[series_uid, "study"])
    paths: list[Path] = []
    for ds_in, k in zip(datasets, _slice_index(datasets), strict=True):
        ds = copy.deepcopy(ds_in)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        bits = int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        raw = np.clip(np.rint((hu[:, :, k].T.astype(np.float64) - intercept) / slope), lo, hi)
        ds.BitsAllocated = 16
        ds.PixelData = raw.astype(np.int16 if signed else np.uint16).tobytes()
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.SOPClassUID = str(ds.get("SOPClassUID", "")) or CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = study_uid
        ds.ImageComments = "radai demonstration: synthetic lesions inserted (not a real finding)"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
