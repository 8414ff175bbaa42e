"""Agreement between a shadow model version and the active version on the same series. Pure.

Segmentation: Dice per label, 2|A∩B| / (|A| + |B|), for every label of the active card (matched by value);
a label both versions leave empty agrees fully (1.0). Detection: findings matched one-to-one by centre
distance (radai.detection.match_findings); F1 = 2·matched / (active + shadow), 1.0 when both find nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from radai.detection import match_findings
from radai.models.manifest import ModelCard
from radai.results.findings import DetectionFinding

# Two findings are the same when their centres are this close (mm), unless both are smaller.
MATCH_DISTANCE_MM = 10.0


def dice_per_label(active: NDArray[np.uint8], shadow: NDArray[np.uint8], card: ModelCard) -> dict[str, float]:
    """{"dice:<label name>": Dice} for each label of the active version's card."""
    if active.shape != shadow.shape:
        raise ValueError(f"label maps differ in shape: {active.shape} vs {shadow.shape}")
    out: dict[str, float] = {}
    for label in card.labels:
        a, b = active == label.value, shadow == label.value
        total = int(a.sum()) + int(b.sum())
        out[f"dice:{label.name}"] = 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
    return out


def findings_agreement(
    active: Sequence[DetectionFinding],
    shadow: Sequence[DetectionFinding],
    max_distance_mm: float = MATCH_DISTANCE_MM,
) -> dict[str, float]:
    """Matched findings of the same label within ``max_distance_mm``: counts and F1."""
    matched = 0
    for label in {f.label for f in active} | {f.label for f in shadow}:
        a = [f.center_mm for f in active if f.label == label]
        b = [f.center_mm for f in shadow if f.label == label]
        matched += len(match_findings(a, b, max_distance_mm))
    total = len(active) + len(shadow)
    return {
        "f1": 1.0 if total == 0 else 2.0 * matched / total,
        "matched": float(matched),
        "active_only": float(len(active) - matched),
        "shadow_only": float(len(shadow) - matched),
    }
