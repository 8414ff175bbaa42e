"""Runtime backends: ONNX Runtime on tiny models built here, the fake runner, the registry."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from radai.errors import InferenceError
from radai.runtime import available_backends, create_runner, known_backends
from radai.runtime.fake import FakeRunner
from radai.runtime.onnx import OnnxRunner, TensorrtOptions, choose_providers

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = np.array([2.0, -1.0], dtype=np.float32).reshape(2, 1, 1, 1, 1)
BIAS = np.array([0.0, 0.5], dtype=np.float32)


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8  # readable by every supported onnxruntime
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_model(path: Path) -> Path:
    """1 -> 2 channels, 1x1x1 kernel: y0 = 2x, y1 = 0.5 - x; batch and spatial axes dynamic."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "X", "Y", "Z"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "X", "Y", "Z"])],
        [numpy_helper.from_array(WEIGHTS, "w"), numpy_helper.from_array(BIAS, "b")],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path / "conv.onnx")


def fp16_identity_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 1, 2, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 1, 2, 2, 2])],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path / "id16.onnx")


def test_onnx_runner_computes_the_model_on_cpu_and_returns_float32(tmp_path: Path) -> None:
    runner = create_runner("onnx", conv_model(tmp_path), output_channels=2, device="cpu")
    x = np.random.default_rng(0).random((3, 1, 4, 5, 6), dtype=np.float32)
    y = runner.run(x)
    assert y.dtype == np.float32
    assert y.shape == (3, 2, 4, 5, 6)
    np.testing.assert_allclose(y[:, 0], 2.0 * x[:, 0], rtol=1e-6)
    np.testing.assert_allclose(y[:, 1], 0.5 - x[:, 0], rtol=1e-6, atol=1e-7)
    runner.close()


def test_onnx_runner_reads_names_and_shapes_from_the_session(tmp_path: Path) -> None:
    runner = OnnxRunner(conv_model(tmp_path), device="cpu")
    assert (runner.input_name, runner.output_name) == ("x", "y")
    assert runner.output_shape[1] == 2
    assert runner.providers == ["CPUExecutionProvider"]


def test_onnx_runner_feeds_float16_models_and_still_returns_float32(tmp_path: Path) -> None:
    runner = OnnxRunner(fp16_identity_model(tmp_path), device="cpu")
    x = np.full((2, 1, 2, 2, 2), 0.25, dtype=np.float32)
    y = runner.run(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x)


def test_output_channels_that_disagree_with_the_card_fail_at_creation(tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match="2 output channels, the card says 5"):
        create_runner("onnx", conv_model(tmp_path), output_channels=5, device="cpu")


def test_a_runtime_failure_becomes_inference_error(tmp_path: Path) -> None:
    runner = OnnxRunner(conv_model(tmp_path), device="cpu")
    with pytest.raises(InferenceError, match="onnxruntime failed"):
        runner.run(np.zeros((1, 3, 2, 2, 2), dtype=np.float32))  # 3 input channels, model takes 1


def test_run_after_close_raises_inference_error(tmp_path: Path) -> None:
    runner = OnnxRunner(conv_model(tmp_path), device="cpu")
    runner.close()
    with pytest.raises(InferenceError, match="closed"):
        runner.run(np.zeros((1, 1, 2, 2, 2), dtype=np.float32))


def test_missing_or_corrupt_model_files_fail_at_creation(tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match="not found"):
        create_runner("onnx", tmp_path / "absent.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf at all")
    with pytest.raises(InferenceError, match=r"cannot load ONNX model corrupt\.onnx"):
        create_runner("onnx", corrupt, device="cpu")


def test_missing_onnxruntime_fails_at_creation_not_mid_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = conv_model(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when absent
    with pytest.raises(InferenceError, match="needs the onnxruntime package"):
        create_runner("onnx", path)


def test_unknown_backend_error_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(
        InferenceError,
        match=r"unknown runtime backend 'openvino' \(known: fake, onnx, tensorrt, torch, triton\)",
    ):
        create_runner("openvino", tmp_path / "m.onnx")


def test_available_backends_lists_installed_ones() -> None:
    assert known_backends() == ["fake", "onnx", "tensorrt", "torch", "triton"]
    assert available_backends() == [
        "fake",
        "onnx",
        "tensorrt",
        "torch",
        "triton",
    ]  # onnxruntime is a dependency


def test_fake_backend_needs_no_model_file_and_is_deterministic(tmp_path: Path) -> None:
    runner = create_runner("fake", tmp_path / "unused", output_channels=3)
    x = np.array([0.1, 0.5, 0.9, np.nan], dtype=np.float32).reshape(1, 1, 4, 1, 1)
    y = runner.run(x)
    assert y.shape == (1, 3, 4, 1, 1)
    assert y[0, :, :3, 0, 0].argmax(axis=0).tolist() == [0, 1, 2]
    assert np.isnan(y[0, :, 3]).all()
    np.testing.assert_array_equal(runner.run(x), y)


def test_fake_runner_logs_calls_and_raises_on_its_poison_value() -> None:
    runner = FakeRunner(2, poison=7.0)
    runner.run(np.zeros((3, 1, 2, 2, 2), dtype=np.float32))
    with pytest.raises(RuntimeError, match="poisoned"):
        runner.run(np.full((1, 1, 2, 2, 2), 7.0, dtype=np.float32))
    assert runner.calls == [3, 1]


def test_providers_put_cuda_first_only_when_offered_and_allowed() -> None:
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(both, "auto") == [
        ("CUDAExecutionProvider", {"device_id": 0}),
        "CPUExecutionProvider",
    ]
    assert choose_providers(both, "cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert choose_providers(both, "cpu") == ["CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider"], "auto") == ["CPUExecutionProvider"]


def test_cuda_requested_without_a_cuda_provider_is_refused() -> None:
    with pytest.raises(InferenceError, match="install onnxruntime-gpu"):
        choose_providers(["CPUExecutionProvider"], "cuda")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", ""])
def test_unknown_device_strings_are_refused(device: str) -> None:
    with pytest.raises(InferenceError, match="is not one of"):
        choose_providers(["CPUExecutionProvider"], device)


def test_tensorrt_goes_first_with_its_engine_cache_and_fp16_option(tmp_path: Path) -> None:
    offered = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = choose_providers(offered, "cuda:1", TensorrtOptions(tmp_path / "engines", fp16=True))
    name, options = providers[0]  # type: ignore[misc]
    assert name == "TensorrtExecutionProvider"
    assert options["trt_engine_cache_enable"] is True and options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_path"] == str(tmp_path / "engines") and options["device_id"] == 1
    assert providers[1:] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]


def test_the_tensorrt_backend_is_refused_at_creation_without_its_provider(tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match="needs onnxruntime-gpu with TensorrtExecutionProvider"):
        choose_providers(["CPUExecutionProvider"], "auto", TensorrtOptions(tmp_path))
    with pytest.raises(InferenceError, match="backend 'tensorrt' needs onnxruntime-gpu"):
        create_runner("tensorrt", ROOT / "model_zoo" / "ct_body_classical" / "model.onnx", output_channels=4)
