"""Decoding of dense detection maps (`CentersPost`) into findings, and matching of findings.

A `centers` detector returns, per volume, C centre-heatmap logits (label values 1..C) and 3 box-size
channels in mm along the model axes. `decode_centers` turns them into boxes: sigmoid, local maxima over a
`peak_window` cube at or above `score_threshold`, the size read at the peak, per-class greedy non-maximum
suppression, the `max_findings` best. Pure numpy + scipy.ndimage: no runtime, no DICOM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from radai.models.manifest import CentersPost

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class Detection:
    """One finding in model space (voxel coordinates of the resampled, reoriented volume)."""

    value: int  # label value 1..C
    score: float  # sigmoid probability of the centre heatmap at the peak
    center: Vec3  # model-space voxel coordinates (X', Y', Z')
    size: Vec3  # box size in model-space voxels


def _sigmoid(x: NDArray[np.float32]) -> NDArray[np.float64]:
    # tanh form: exact sigmoid without overflow warnings for large negative logits
    return 0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))


def iou_3d(
    a_center: Sequence[float], a_size: Sequence[float], b_center: Sequence[float], b_size: Sequence[float]
) -> float:
    """Intersection over union of two axis-aligned boxes given by centre and size (same units)."""
    ac, asz, bc, bsz = (np.asarray(v, dtype=np.float64) for v in (a_center, a_size, b_center, b_size))
    lo = np.maximum(ac - asz / 2, bc - bsz / 2)
    hi = np.minimum(ac + asz / 2, bc + bsz / 2)
    inter = float(np.prod(np.clip(hi - lo, 0.0, None)))
    union = float(np.prod(asz) + np.prod(bsz)) - inter
    return inter / union if union > 0 else 0.0


def _peaks(
    prob: NDArray[np.float64], window: int, threshold: float
) -> list[tuple[Vec3, tuple[int, int, int]]]:
    """Local maxima at or above `threshold`: (centre, voxel to read the size at) per peak.

    Voxels equal to the maximum of their window form plateaus; each 26-connected plateau is one peak at its
    centroid (sizes read at the plateau voxel nearest to it), so a flat top does not yield duplicates.
    """
    local_max = ndimage.maximum_filter(prob, size=window, mode="constant", cval=-np.inf)
    mask = (prob >= local_max) & (prob >= threshold)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    out: list[tuple[Vec3, tuple[int, int, int]]] = []
    for sl_index, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        members = np.argwhere(labels[sl] == sl_index) + np.array([s.start for s in sl])
        centroid = members.mean(axis=0)
        nearest = members[int(np.argmin(np.sum((members - centroid) ** 2, axis=1)))]
        c = (float(centroid[0]), float(centroid[1]), float(centroid[2]))
        out.append((c, (int(nearest[0]), int(nearest[1]), int(nearest[2]))))
    return out


def _nms(found: list[Detection], iou_threshold: float) -> list[Detection]:
    """Greedy: keep the most probable, drop those overlapping a kept one by IoU > threshold."""
    kept: list[Detection] = []
    for det in sorted(found, key=lambda d: (-d.score, d.center)):
        if all(iou_3d(det.center, det.size, k.center, k.size) <= iou_threshold for k in kept):
            kept.append(det)
    return kept


def decode_centers(maps: NDArray[np.float32], spec: CentersPost, spacing: Vec3) -> list[Detection]:
    """(C+3, X, Y, Z) stitched maps of one volume -> findings, most probable first.

    `spacing`: model-space voxel size in mm along X', Y', Z' (converts the size channels to voxels).
    """
    if maps.ndim != 4 or maps.shape[0] < 4:
        raise ValueError(f"maps must be (C+3, X, Y, Z) with C >= 1, got shape {maps.shape}")
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be three positive sizes in mm, got {spacing}")
    n_classes = maps.shape[0] - 3
    size_mm = maps[n_classes:]
    found: list[Detection] = []
    for c in range(n_classes):
        prob = _sigmoid(maps[c])
        detections = []
        for center, at in _peaks(prob, spec.peak_window, spec.score_threshold):
            vox = np.maximum(size_mm[(slice(None), *at)].astype(np.float64) / np.asarray(spacing), 1.0)
            detections.append(
                Detection(
                    value=c + 1,
                    score=float(prob[at]),
                    center=center,
                    size=(float(vox[0]), float(vox[1]), float(vox[2])),
                )
            )
        found.extend(_nms(detections, spec.nms_iou))
    found.sort(key=lambda d: (-d.score, d.value, d.center))
    return found[: spec.max_findings]


def match_findings(a: Sequence[Vec3], b: Sequence[Vec3], max_distance: float) -> list[tuple[int, int]]:
    """One-to-one pairs (index in a, index in b) of points within `max_distance` (mm), greedily closest
    first (ties by index); returned sorted by the index in a."""
    if not a or not b:
        return []
    pa = np.asarray(a, dtype=np.float64).reshape(-1, 3)
    pb = np.asarray(b, dtype=np.float64).reshape(-1, 3)
    dist = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=2)
    ii, jj = np.nonzero(dist <= max_distance)
    order = np.lexsort((jj, ii, dist[ii, jj]))
    used_a: set[int] = set()
    used_b: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for k in order:
        i, j = int(ii[k]), int(jj[k])
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return sorted(pairs)
