"""`radai.detection`: decoding of centre heatmaps + size maps, 3-D IoU and finding matching."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from radai.detection import Detection, decode_centers, iou_3d, match_findings
from radai.models.manifest import CentersPost

SHAPE = (40, 36, 20)
SPACING = (2.0, 2.0, 4.0)
SPEC = CentersPost(kind="centers", score_threshold=0.5, nms_iou=0.1, max_findings=20, peak_window=3)


def _logit(p: NDArray[np.float64]) -> NDArray[np.float64]:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _maps(classes: int = 1) -> NDArray[np.float32]:
    maps = np.zeros((classes + 3, *SHAPE), dtype=np.float32)
    maps[:classes] = -10.0  # background: probability ~ 0
    return maps


def _add_peak(
    maps: NDArray[np.float32],
    center: tuple[int, int, int],
    peak: float,
    size_mm: tuple[float, float, float],
    channel: int = 0,
    sigma: float = 2.0,
) -> None:
    """A gaussian probability bump at `center` (max with what is there) and its box size around it."""
    grid = np.indices(SHAPE).astype(np.float64)
    d2 = sum((grid[i] - center[i]) ** 2 for i in range(3))
    bump = _logit(peak * np.exp(-d2 / (2 * sigma**2)))
    maps[channel] = np.maximum(maps[channel], bump.astype(np.float32))
    near = d2 <= 9
    classes = maps.shape[0] - 3
    for axis in range(3):
        maps[classes + axis][near] = size_mm[axis]


def test_single_gaussian_peak_gives_one_detection_at_its_centre_and_size() -> None:
    maps = _maps()
    _add_peak(maps, (12, 20, 9), 0.9, (10.0, 14.0, 12.0))
    found = decode_centers(maps, SPEC, SPACING)
    assert len(found) == 1
    det = found[0]
    assert det.value == 1
    assert det.center == (12.0, 20.0, 9.0)
    assert det.size == pytest.approx((5.0, 7.0, 3.0))
    assert det.score == pytest.approx(0.9, abs=1e-4)


def test_two_distant_peaks_give_two_detections_most_probable_first() -> None:
    maps = _maps()
    _add_peak(maps, (8, 8, 5), 0.7, (8.0, 8.0, 8.0))
    _add_peak(maps, (30, 28, 15), 0.95, (8.0, 8.0, 8.0))
    found = decode_centers(maps, SPEC, SPACING)
    assert [d.center for d in found] == [(30.0, 28.0, 15.0), (8.0, 8.0, 5.0)]
    assert found[0].score > found[1].score


def test_overlapping_peaks_are_suppressed_to_the_most_probable() -> None:
    maps = _maps()
    _add_peak(maps, (15, 15, 10), 0.8, (30.0, 30.0, 40.0), sigma=0.7)
    _add_peak(maps, (19, 15, 10), 0.9, (30.0, 30.0, 40.0), sigma=0.7)
    without_nms = decode_centers(maps, SPEC.model_copy(update={"nms_iou": 1.0}), SPACING)
    assert len(without_nms) == 2  # two genuine local maxima ...
    found = decode_centers(maps, SPEC, SPACING)
    assert [d.center for d in found] == [(19.0, 15.0, 10.0)]  # ... of which NMS keeps the better


def test_peak_below_threshold_gives_no_detection() -> None:
    maps = _maps()
    _add_peak(maps, (12, 12, 8), 0.45, (10.0, 10.0, 10.0))
    assert decode_centers(maps, SPEC, SPACING) == []
    assert len(decode_centers(maps, SPEC.model_copy(update={"score_threshold": 0.4}), SPACING)) == 1


def test_max_findings_keeps_the_most_probable() -> None:
    maps = _maps()
    centres = [(6, 6, 4), (6, 28, 4), (30, 6, 14), (30, 28, 14), (18, 18, 10)]
    for k, c in enumerate(centres):
        _add_peak(maps, c, 0.6 + 0.07 * k, (6.0, 6.0, 6.0))
    found = decode_centers(maps, SPEC.model_copy(update={"max_findings": 2}), SPACING)
    assert [d.center for d in found] == [(18.0, 18.0, 10.0), (30.0, 28.0, 14.0)]


def test_classes_are_decoded_and_suppressed_separately() -> None:
    maps = _maps(classes=2)
    _add_peak(maps, (15, 15, 10), 0.9, (20.0, 20.0, 20.0), channel=0)
    _add_peak(maps, (15, 15, 10), 0.8, (20.0, 20.0, 20.0), channel=1)
    found = decode_centers(maps, SPEC, SPACING)
    assert [(d.value, d.center) for d in found] == [(1, (15.0, 15.0, 10.0)), (2, (15.0, 15.0, 10.0))]


def test_plateau_peak_yields_one_detection_at_its_centre() -> None:
    maps = _maps()
    maps[0, 10:13, 20:22, 5:6] = 3.0  # a flat 3x2x1 top: every voxel equals its window's maximum
    maps[1:, 10:13, 20:22, 5:6] = 8.0
    found = decode_centers(maps, SPEC.model_copy(update={"nms_iou": 1.0}), SPACING)
    assert len(found) == 1
    assert found[0].center == (11.0, 20.5, 5.0)


def test_sizes_are_clipped_to_at_least_one_voxel() -> None:
    maps = _maps()
    _add_peak(maps, (12, 12, 8), 0.9, (-3.0, 0.5, 1.0))
    (det,) = decode_centers(maps, SPEC, SPACING)
    assert det.size == (1.0, 1.0, 1.0)


def test_maps_without_size_channels_are_refused() -> None:
    with pytest.raises(ValueError, match="C\\+3"):
        decode_centers(np.zeros((3, 4, 4, 4), dtype=np.float32), SPEC, SPACING)


def test_iou_of_identical_disjoint_and_half_overlapping_boxes() -> None:
    assert iou_3d((0, 0, 0), (2, 2, 2), (0, 0, 0), (2, 2, 2)) == pytest.approx(1.0)
    assert iou_3d((0, 0, 0), (2, 2, 2), (5, 0, 0), (2, 2, 2)) == 0.0
    assert iou_3d((0, 0, 0), (2, 2, 2), (1, 0, 0), (2, 2, 2)) == pytest.approx(4 / 12)


def test_match_findings_pairs_closest_first_one_to_one_within_distance() -> None:
    a = [(0.0, 0.0, 0.0), (10.0, 0.0, 0.0), (50.0, 0.0, 0.0)]
    b = [(9.0, 0.0, 0.0), (1.0, 0.0, 0.0), (100.0, 0.0, 0.0)]
    assert match_findings(a, b, max_distance=5.0) == [(0, 1), (1, 0)]
    # both a-points are near b[0]; the closer one wins it, the other finds nothing else within reach
    assert match_findings([(0.0, 0.0, 0.0), (3.0, 0.0, 0.0)], [(2.0, 0.0, 0.0)], 5.0) == [(1, 0)]
    assert match_findings([], b, 5.0) == []


def test_detection_is_a_frozen_value() -> None:
    det = Detection(value=1, score=0.9, center=(1.0, 2.0, 3.0), size=(4.0, 4.0, 4.0))
    with pytest.raises(AttributeError):
        det.score = 0.1  # type: ignore[misc]
