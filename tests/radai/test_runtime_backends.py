"""Backend conformance: one ONNX model through every available runtime backend gives one answer.

Reference: ONNX Runtime on the CPU. Tolerance on float32 backends: max |a - b| <= 1e-4 * max |reference|
(onnx2torch and onnxruntime pick different convolution kernels, so bit equality is not expected). fp16 backends
are held to the class decision instead: argmax equal on >= 99% of voxels. CUDA cases are marked `gpu` and
skipped without CUDA.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from radai.errors import InferenceError, OutOfMemoryError
from radai.runtime import available_backends, create_runner, known_backends, onnx2torch_import
from radai.runtime.onnx import OnnxRunner
from radai.runtime.torch_backend import TorchRunner, available_devices

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "model_zoo"
RTOL_FP32 = 1e-4  # of max |reference|
ARGMAX_AGREEMENT_FP16 = 0.99

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@dataclass(frozen=True)
class Backend:
    """A way to run a model: backend name plus the options that change the numbers."""

    label: str
    make: Callable[[Path], Any]
    fp16: bool = False


BACKENDS = [
    pytest.param(Backend("torch-cpu", lambda p: create_runner("torch", p, device="cpu")), id="torch-cpu"),
    pytest.param(
        Backend("torch-cuda", lambda p: TorchRunner(p, device="cuda")),
        id="torch-cuda",
        marks=[gpu, needs_cuda],
    ),
    pytest.param(
        Backend("torch-cuda-graphs", lambda p: TorchRunner(p, device="cuda", cuda_graphs=True)),
        id="torch-cuda-graphs",
        marks=[gpu, needs_cuda],
    ),
    pytest.param(
        Backend("torch-cuda-fp16", lambda p: TorchRunner(p, device="cuda", precision="fp16"), fp16=True),
        id="torch-cuda-fp16",
        marks=[gpu, needs_cuda],
    ),
]


def reference(model: Path, x: NDArray[np.float32]) -> NDArray[np.float32]:
    runner = OnnxRunner(model, device="cpu", intra_op_threads=1)
    try:
        return runner.run(x)
    finally:
        runner.close()


def check_conforms(backend: Backend, model: Path, inputs: list[NDArray[np.float32]]) -> None:
    runner = backend.make(model)
    try:
        for x in inputs:
            expected = reference(model, x)
            got = runner.run(x)
            assert got.dtype == np.float32
            assert got.shape == expected.shape
            if backend.fp16:
                agreement = float(np.mean(got.argmax(axis=1) == expected.argmax(axis=1)))
                assert agreement >= ARGMAX_AGREEMENT_FP16, (
                    f"{backend.label}: argmax agrees on {agreement:.4f}"
                )
            else:
                scale = float(np.abs(expected).max())
                worst = float(np.abs(got - expected).max())
                assert worst <= RTOL_FP32 * scale, (
                    f"{backend.label}: max abs diff {worst:.3g} (scale {scale:.3g})"
                )
            np.testing.assert_array_equal(runner.run(x), got)  # replays (CUDA graphs) give the same answer
    finally:
        runner.close()


def package_input(name: str) -> NDArray[np.float32]:
    return np.asarray(np.load(ZOO / name / "reference" / "input.npy"), dtype=np.float32)


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-weight MONAI UNet exported with a symbolic batch axis."""
    from monai.networks.nets.unet import UNet

    from model_zoo.onnx_parity import export_onnx

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2)).eval()
    path = tmp_path_factory.mktemp("unet") / "unet.onnx"
    export_onnx(net, torch.zeros(1, 1, 16, 16, 16), path, ["scores"])
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_brain_tissue_meshnet_gives_onnxruntime_scores_on_its_reference_input(backend: Backend) -> None:
    check_conforms(backend, ZOO / "brain_tissue" / "model.onnx", [package_input("brain_tissue")])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ct_body_classical_graph_gives_onnxruntime_scores_on_its_reference_input(backend: Backend) -> None:
    check_conforms(backend, ZOO / "ct_body_classical" / "model.onnx", [package_input("ct_body_classical")])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_monai_unet_gives_onnxruntime_scores_at_batch_1_and_3(
    backend: Backend, unet_onnx: Path
) -> None:
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((n, 1, 16, 16, 16), dtype=np.float32) for n in (1, 3)]
    check_conforms(backend, unet_onnx, inputs)


def tiny_model(tmp_path: Path, node: onnx.NodeProto, inits: list[onnx.TensorProto] | None = None) -> Path:
    """One node from `x` (n, 1, X, Y, Z) to `y` of the same shape."""
    graph = helper.make_graph(
        [node],
        node.op_type.lower(),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "X", "Y", "Z"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, "X", "Y", "Z"])],
        inits or [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"{node.op_type.lower()}.onnx"
    onnx.save(model, str(path))
    return path


def test_cumsum_without_a_reverse_attribute_sums_forward(tmp_path: Path) -> None:
    axis = numpy_helper.from_array(np.array(2, dtype=np.int64), "axis")
    path = tiny_model(tmp_path, helper.make_node("CumSum", ["x", "axis"], ["y"]), [axis])
    x = np.random.default_rng(1).random((2, 1, 5, 3, 2), dtype=np.float32)
    y = TorchRunner(path, device="cpu").run(x)
    np.testing.assert_allclose(y, np.cumsum(x, axis=2), rtol=1e-6)


def test_an_op_onnx2torch_cannot_convert_is_refused_at_construction(tmp_path: Path) -> None:
    path = tiny_model(tmp_path, helper.make_node("Hardmax", ["x"], ["y"], axis=1))
    with pytest.raises(
        InferenceError, match=r"cannot convert ONNX model hardmax\.onnx to PyTorch: .*Hardmax"
    ):
        create_runner("torch", path, device="cpu")


def test_torchvision_ops_are_refused_at_construction_where_torchvision_does_not_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx2torch_import, "_converter", None)  # import onnx2torch afresh, then restored
    monkeypatch.setitem(sys.modules, "torchvision", None)  # what `import torchvision` sees if absent
    rois = numpy_helper.from_array(np.zeros((1, 4), dtype=np.float32), "rois")
    index = numpy_helper.from_array(np.zeros(1, dtype=np.int64), "index")
    node = helper.make_node("RoiAlign", ["x", "rois", "index"], ["y"], output_height=1, output_width=1)
    graph = helper.make_graph(
        [node],
        "roialign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "X", "Y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 1])],
        [rois, index],
    )
    path = tmp_path / "roialign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(InferenceError, match="uses RoiAlign, which the torch backend runs with torchvision"):
        TorchRunner(path, device="cpu")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", "tpu"])
def test_unknown_devices_are_refused_at_construction(device: str) -> None:
    with pytest.raises(InferenceError, match="is not one of auto, cpu, cuda, cuda:N"):
        TorchRunner(ZOO / "brain_tissue" / "model.onnx", device=device)


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_cuda_requested_on_a_machine_without_cuda_is_refused_at_construction() -> None:
    with pytest.raises(InferenceError, match="sees no CUDA device; use device 'cpu'"):
        create_runner("torch", ZOO / "brain_tissue" / "model.onnx", device="cuda")
    assert available_devices() == ["cpu"]
    assert TorchRunner(ZOO / "brain_tissue" / "model.onnx").device == "cpu"  # auto


@gpu
@needs_cuda
def test_a_cuda_index_beyond_the_devices_present_is_refused_and_auto_picks_cuda() -> None:
    count = torch.cuda.device_count()
    with pytest.raises(InferenceError, match=f"torch sees {count} CUDA device"):
        TorchRunner(ZOO / "brain_tissue" / "model.onnx", device=f"cuda:{count}")
    assert TorchRunner(ZOO / "brain_tissue" / "model.onnx").device == "cuda:0"


def test_precision_is_checked_at_construction() -> None:
    model = ZOO / "brain_tissue" / "model.onnx"
    with pytest.raises(InferenceError, match="precision 'int8' is not one of fp32, fp16"):
        TorchRunner(model, device="cpu", precision="int8")
    if not CUDA:
        with pytest.raises(InferenceError, match="'fp16' needs a CUDA device"):
            TorchRunner(model, device="auto", precision="fp16")


def test_output_channels_that_disagree_with_the_card_fail_at_construction() -> None:
    with pytest.raises(InferenceError, match="has 3 output channels, the card says 2"):
        create_runner("torch", ZOO / "brain_tissue" / "model.onnx", output_channels=2, device="cpu")


def test_missing_or_corrupt_model_files_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match="not found"):
        TorchRunner(tmp_path / "absent.onnx", device="cpu")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf at all")
    with pytest.raises(InferenceError, match=r"cannot load ONNX model corrupt\.onnx"):
        TorchRunner(corrupt, device="cpu")


def test_torch_backend_is_registered_and_reported_missing_without_onnx2torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "torch" in known_backends()
    assert "torch" in available_backends()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx2torch" else real(name, *a)
    )
    assert "torch" not in available_backends()
    assert "onnx" in available_backends()


def test_a_runtime_failure_becomes_inference_error_and_close_stops_runs() -> None:
    runner = TorchRunner(ZOO / "brain_tissue" / "model.onnx", device="cpu")
    with pytest.raises(InferenceError, match=r"torch failed on brain_tissue/model\.onnx"):
        runner.run(np.zeros((1, 2, 4, 4, 4), dtype=np.float32))  # 2 input channels, the model takes 1
    runner.close()
    with pytest.raises(InferenceError, match="closed"):
        runner.run(np.zeros((1, 1, 4, 4, 4), dtype=np.float32))


def test_cuda_out_of_memory_becomes_out_of_memory_error() -> None:
    runner = TorchRunner(ZOO / "brain_tissue" / "model.onnx", device="cpu")

    def exhausted(x: Any) -> Any:  # stands in for a GPU without room for the batch
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    runner._module = exhausted
    with pytest.raises(OutOfMemoryError, match="torch ran out of memory on cpu"):
        runner.run(np.zeros((4, 1, 8, 8, 8), dtype=np.float32))


def test_concurrent_runs_each_get_their_own_answer() -> None:
    runner = TorchRunner(ZOO / "brain_tissue" / "model.onnx", device="cpu")
    rng = np.random.default_rng(2)
    inputs = [rng.random((1, 1, 12, 12, 12), dtype=np.float32) for _ in range(4)]
    expected = [runner.run(x) for x in inputs]
    results: dict[int, NDArray[np.float32]] = {}

    def work(i: int) -> None:
        results[i] = runner.run(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(results[i], want)
