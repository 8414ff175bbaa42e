"""The card's output section: argmax, per-class thresholds, connected components, the restriction to another
model's mask; and the schema rules for detection cards, whole-volume inputs and consumed models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from radai.models.manifest import ComponentsSpec, ModelCard, OutputSpec, ThresholdPost
from radai.postprocess import clean_components, restrict, threshold_labels, to_labels
from radai.scheduling.inferer import window_size
from tests.radai.model_packages import card

ROOT = Path(__file__).resolve().parents[2]


def test_short_form_argmax_is_read_as_its_long_form() -> None:
    spec = OutputSpec.model_validate({"name": "s", "channels": 3, "postprocess": "argmax"})
    assert spec.postprocess.kind == "argmax"


def test_thresholds_label_the_most_probable_class_above_its_threshold() -> None:
    scores = np.zeros((3, 4, 1, 1), dtype=np.float32)
    scores[1] = [[[3.0]], [[-3.0]], [[1.0]], [[0.0]]]  # sigmoid: 0.95, 0.05, 0.73, 0.5
    scores[2] = [[[-3.0]], [[-3.0]], [[2.0]], [[-1.0]]]  # 0.05, 0.05, 0.88, 0.27
    labels = threshold_labels(scores, ThresholdPost(kind="threshold", threshold=0.6))
    assert labels[:, 0, 0].tolist() == [1, 0, 2, 0]


def test_components_drop_small_islands_or_keep_only_the_largest() -> None:
    labels = np.zeros((10, 10, 3), dtype=np.uint8)
    labels[0:5, 0:5, :] = 1  # 75 voxels
    labels[8:10, 8:10, 0] = 1  # 4 voxels
    labels[7, 0, 0] = 2  # 1 voxel of another label
    small = clean_components(labels, ComponentsSpec(min_voxels=5))
    assert int((small == 1).sum()) == 75 and int((small == 2).sum()) == 0
    largest = clean_components(labels, ComponentsSpec(largest_only=True))
    assert int((largest == 1).sum()) == 75 and int((largest == 2).sum()) == 1


def test_to_labels_applies_argmax_then_components() -> None:
    scores = np.zeros((2, 6, 6, 1), dtype=np.float32)
    scores[1, 0:3, 0:3] = 1.0
    scores[1, 5, 5] = 1.0
    spec = OutputSpec.model_validate(
        {"name": "s", "channels": 2, "postprocess": "argmax", "components": {"min_voxels": 2}}
    )
    assert int(to_labels(scores, spec).sum()) == 9


def test_restrict_keeps_labels_inside_the_mask_only() -> None:
    labels = np.array([[[1], [2], [1]]], dtype=np.uint8)
    mask = np.array([[[True], [False], [True]]])
    assert restrict(labels, mask)[0, :, 0].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="differs"):
        restrict(labels, mask[:, :2])


def detection_card(**changes: Any) -> dict[str, Any]:
    c = card("lesions", "1.0.0", ["body"], "0" * 64)
    c["task"] = "detection"
    c["output"] = {"name": "maps", "channels": 4, "postprocess": {"kind": "centers", "score_threshold": 0.4}}
    c.update(changes)
    return c


def test_a_detection_card_needs_centers_and_one_heatmap_per_label_plus_three_sizes() -> None:
    assert ModelCard.model_validate(detection_card()).output.postprocess.kind == "centers"
    with pytest.raises(ValidationError, match="3 sizes"):
        ModelCard.model_validate(
            detection_card(output={"name": "m", "channels": 5, "postprocess": {"kind": "centers"}})
        )
    with pytest.raises(ValidationError, match="detection models use `centers`"):
        ModelCard.model_validate(detection_card(output={"name": "m", "channels": 4, "postprocess": "argmax"}))
    with pytest.raises(ValidationError, match="peak_window must be odd"):
        ModelCard.model_validate(
            detection_card(
                output={"name": "m", "channels": 4, "postprocess": {"kind": "centers", "peak_window": 4}}
            )
        )


def test_a_model_cannot_consume_its_own_output() -> None:
    c = card("loop", "1.0.0", ["body"], "0" * 64, consumes={"model": "loop", "labels": [1]})
    with pytest.raises(ValidationError, match="cannot consume its own output"):
        ModelCard.model_validate(c)


def test_a_whole_volume_input_is_padded_up_to_the_size_divisor() -> None:
    c = card("whole", "1.0.0", ["body"], "0" * 64)
    c["input"].update({"patch_size": "whole", "size_divisor": 16})
    spec = ModelCard.model_validate(c).input
    assert window_size((100, 64, 33), spec) == (112, 64, 48)
    fixed = ModelCard.model_validate(card("p", "1.0.0", ["body"], "0" * 64)).input
    assert window_size((100, 64, 33), fixed) == (64, 64, 16)


@pytest.mark.parametrize("package", sorted(p.parent.name for p in (ROOT / "model_zoo").glob("*/model.yaml")))
def test_every_bundled_card_still_validates(package: str) -> None:
    raw = yaml.safe_load((ROOT / "model_zoo" / package / "model.yaml").read_text())
    assert ModelCard.model_validate(raw).not_for_clinical_use is True
