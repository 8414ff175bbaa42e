"""Small real model packages for registry tests: one-node-deep ONNX graphs that threshold CT intensities.

`threshold_package` writes a complete package (card, ONNX graph built with onnx.helper, reference input and
the ONNX Runtime output for it) that passes every registration check; tests then break one thing at a time.
Scores: channel 0 = (t - x) * 50, channel c = (x - t_c) * 50 for each label's threshold t_c, so the argmax
labels voxels above the thresholds. Intensities are normalised from [-1024, 3071] HU to [0, 1].
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from onnx import TensorProto, helper

HU_MIN, HU_MAX = -1024.0, 3071.0


def hu(value: float) -> float:
    """A Hounsfield value as the card's intensity normalisation maps it."""
    return (value - HU_MIN) / (HU_MAX - HU_MIN)


def threshold_graph(thresholds: list[float], *, channels: int | None = None, batch: int | str = "N") -> bytes:
    """(N, 1, X, Y, Z) -> (N, 1 + len(thresholds), X, Y, Z) scores; `channels` overrides the declared count."""
    k = len(thresholds) + 1
    t = np.array([thresholds[0], *thresholds], dtype=np.float32).reshape(1, k, 1, 1, 1)
    sign = np.array([-1.0] + [1.0] * (k - 1), dtype=np.float32).reshape(1, k, 1, 1, 1) * 50.0
    nodes = [
        helper.make_node("Sub", ["input", "t"], ["d"]),
        helper.make_node("Mul", ["d", "sign"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "threshold",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, "X", "Y", "Z"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, channels or k, "X", "Y", "Z"])],
        [onnx.numpy_helper.from_array(t, "t"), onnx.numpy_helper.from_array(sign, "sign")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


LABELS = {
    "body": ("Body", "87784001", "Soft tissue", (222, 184, 135)),
    "bone": ("Bone", "272673000", "Bone", (241, 214, 145)),
    "lung": ("Lung", "39607008", "Lung", (70, 140, 230)),
}


def card(model_id: str, version: str, labels: list[str], sha256: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "version": version,
        "name": f"Test threshold model {model_id} {version}",
        "task": "segmentation",
        "kind": "classical-algorithm",
        "modality": "CT",
        "body_part": "ABDOMEN",
        "series_selection": [{"modality": ["CT"], "min_slices": 10}],
        "input": {
            "name": "input",
            "channels": 1,
            "spacing": [4.0, 4.0, 5.0],
            "orientation": "LPS",
            "intensity": {"kind": "range", "a_min": HU_MIN, "a_max": HU_MAX, "b_min": 0.0, "b_max": 1.0},
            "patch_size": [64, 64, 16],
            "overlap": 0.0,
            "blend": "constant",
        },
        "output": {"name": "scores", "channels": len(labels) + 1, "postprocess": "argmax"},
        "labels": [
            {
                "value": i,
                "name": LABELS[name][0],
                "category": {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"},
                "type": {"scheme": "SCT", "value": LABELS[name][1], "meaning": LABELS[name][2]},
                "color": list(LABELS[name][3]),
            }
            for i, name in enumerate(labels, start=1)
        ],
        "runtime": {"backend": "onnx", "file": "model.onnx", "sha256": sha256, "max_batch": 2},
        "reference": {"input": "reference/input.npy", "output": "reference/output.npy", "atol": 1e-4},
        "intended_use": "Tests of the model registry only.",
        "not_for_clinical_use": True,
        "licence": "Apache-2.0",
        "provenance": "Written by tests/radai/model_packages.py",
        **extra,
    }


def threshold_package(
    folder: Path,
    model_id: str = "threshold",
    version: str = "1.0.0",
    thresholds_hu: tuple[float, ...] = (-200.0,),
    labels: tuple[str, ...] = ("body",),
    **extra: Any,
) -> Path:
    """Write a valid package into `folder` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx_bytes = threshold_graph([hu(v) for v in thresholds_hu])
    (folder / "model.onnx").write_bytes(onnx_bytes)
    (folder / "reference").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 0.5, size=(1, 1, 8, 8, 4)).astype(np.float32)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    y = session.run(None, {"input": x})[0]
    np.save(folder / "reference" / "input.npy", x)
    np.save(folder / "reference" / "output.npy", y)
    sha = hashlib.sha256(onnx_bytes).hexdigest()
    text = yaml.safe_dump(card(model_id, version, list(labels), sha, **extra), sort_keys=False)
    (folder / "model.yaml").write_text(text)
    return folder


def edit_card(folder: Path, **changes: Any) -> None:
    """Change top-level or dotted keys of a package's card (e.g. `**{"output.channels": 3}`)."""
    data = yaml.safe_load((folder / "model.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    (folder / "model.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def rehash(folder: Path) -> None:
    """Update the card's sha256 after the weights were changed on purpose."""
    edit_card(folder, **{"runtime.sha256": hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()})
