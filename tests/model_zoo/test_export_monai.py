"""MONAI -> ONNX export: a symbolic batch axis that really takes other batch sizes, parity, checkpoints.

Small networks (32^3 patches, few features) keep this file fast; figures at realistic sizes are in
model_zoo/README.md.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from numpy.typing import NDArray

from model_zoo.export_monai import (
    ExportError,
    ExportSpec,
    ParityReport,
    build_network,
    export,
    main,
)

SMALL: dict[str, dict[str, Any]] = {
    "segresnet": {"features": (8,), "patch": (32, 32, 32)},
    "unet": {"features": (4, 8, 16), "patch": (32, 32, 32)},
    # MONAI's FPN and heads are 256 channels wide whatever the backbone: a smaller patch keeps it fast.
    "retinanet": {"features": (8, 16, 32, 64), "backbone_depth": 10, "patch": (16, 16, 16)},
}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spec(arch: str, out: Path, **kw: Any) -> ExportSpec:
    return ExportSpec(arch=arch, out=out, trials=1, **{**SMALL[arch], **kw})


def _ort(path: Path, x: NDArray[np.float32]) -> list[NDArray[np.float32]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, {session.get_inputs()[0].name: x})]


def _torch(spec: ExportSpec, x: NDArray[np.float32]) -> list[NDArray[np.float32]]:
    """The same network export() builds: same seed, same architecture."""
    torch.manual_seed(spec.seed)
    built = build_network(spec)
    with torch.no_grad():
        out = built.module(torch.from_numpy(x))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("arch", ["segresnet", "unet", "retinanet"])
def test_export_has_symbolic_batch_and_matches_pytorch_at_batch_1_and_3(arch: str, tmp_path: Path) -> None:
    spec = _spec(arch, tmp_path / f"{arch}.onnx")
    report = export(spec)

    assert report.passed and report.max_rel <= 1e-4
    assert [c.input_shape[0] for c in report.cases] == [1, 2, 1]
    assert report.cases[2].input_shape[2:] != spec.patch  # a second spatial size was checked
    graph = onnx.load(str(spec.out))
    onnx.checker.check_model(graph)
    for value in [*graph.graph.input, *graph.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    expected_outputs = (
        ["logits"]
        if arch != "retinanet"
        else [
            *(f"classification_{i}" for i in range(3)),
            *(f"box_regression_{i}" for i in range(3)),
        ]
    )
    assert [o.name for o in graph.graph.output] == expected_outputs
    rng = np.random.default_rng(7)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 1, *spec.patch), dtype=np.float32)
        got, want = _ort(spec.out, x), _torch(spec, x)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.shape[0] == batch
            assert np.max(np.abs(g - w)) <= 1e-4 * np.max(np.abs(w))


def test_retinanet_maps_have_anchor_times_class_and_box_channels(tmp_path: Path) -> None:
    spec = _spec("retinanet", tmp_path / "r.onnx", out_channels=3, num_anchors=2, conv1_stride=(2, 2, 1))
    report = export(spec)
    shapes = {o.name: o.shape for o in report.cases[0].outputs}
    # levels: layer1 (1/4 of the patch after conv1 stride 2, 2, 1 and max-pool), layer2 (1/8), max-pool (1/16)
    assert shapes["classification_0"] == (1, 2 * 3, 4, 4, 8)  # anchors x classes
    assert shapes["box_regression_0"] == (1, 2 * 6, 4, 4, 8)  # anchors x (3-D centre + size)
    assert shapes["classification_2"] == (1, 6, 1, 1, 2)


def test_checkpoint_weights_are_the_ones_exported(tmp_path: Path) -> None:
    trained = _spec("unet", tmp_path / "unused.onnx", seed=123)
    torch.manual_seed(123)
    net = build_network(trained).inner
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    ckpt = tmp_path / "state_dict.pt"
    torch.save(net.state_dict(), ckpt)

    spec = _spec("unet", tmp_path / "unet.onnx", checkpoint=ckpt)  # seed 0: other random weights
    export(spec)

    x = np.random.default_rng(1).standard_normal((2, 1, 32, 32, 32), dtype=np.float32)
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(x)).numpy()
    (got,) = _ort(spec.out, x)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    (random_weights,) = _torch(replace(spec, checkpoint=None), x)
    assert np.max(np.abs(random_weights - want)) > 1e-2 * np.max(np.abs(want))


def test_checkpoint_for_another_network_is_refused_naming_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    other = build_network(_spec("segresnet", tmp_path / "x.onnx")).inner
    ckpt = tmp_path / "segresnet.pt"
    torch.save(other.state_dict(), ckpt)
    with pytest.raises(ExportError, match=r"does not fit the network.*missing keys"):
        export(_spec("unet", tmp_path / "unet.onnx", checkpoint=ckpt))
    assert not (tmp_path / "unet.onnx").exists()


class _Payload:
    """Pickled with a reduce that would create a file if it were ever unpickled by a full unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def test_checkpoint_with_code_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _Payload(marker)}, ckpt)
    with pytest.raises(ExportError, match="not a loadable state dict"):
        export(_spec("unet", tmp_path / "unet.onnx", checkpoint=ckpt))
    assert not marker.exists()


def test_tolerance_below_the_measured_error_fails_and_leaves_no_file(tmp_path: Path, capsys: Any) -> None:
    report: ParityReport = export(_spec("unet", tmp_path / "first.onnx"))
    assert report.max_rel > 0
    out = tmp_path / "strict.onnx"
    argv = ["unet", "--out", str(out), "--patch", "32", "--features", "4,8,16", "--trials", "1"]
    code = main([*argv, "--max-rel-error", f"{report.max_rel / 2:.3e}"])
    assert code == 1
    assert not out.exists() and not list(tmp_path.glob("strict*"))
    assert "parity check failed" in capsys.readouterr().err
    assert main(argv) == 0 and out.is_file()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"max_rel_error": 0.0}, "tolerance must be a positive number"),
        ({"patch": (32, 32, 30)}, "multiple of"),
        ({"arch": "vnet"}, "unknown architecture"),
    ],
)
def test_bad_requests_are_refused_before_export(tmp_path: Path, kw: dict[str, Any], message: str) -> None:
    spec = _spec("unet", tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=message):
        export(replace(spec, **kw))
    assert not (tmp_path / "m.onnx").exists()
