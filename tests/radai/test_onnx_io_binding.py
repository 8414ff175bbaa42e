"""OnnxRunner.run_tensor: torch tensors through ONNX Runtime's I/O binding give the scores `run` gives."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from radai.errors import InferenceError
from radai.runtime.onnx import OnnxRunner

CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available()


def conv_model(path: Path, hide_channels: bool = False, dtype: int = TensorProto.FLOAT) -> Path:
    """A 3-D Conv, 1 -> 2 channels with a 3x3x3 kernel (padded, so the output is the input's size); batch and
    spatial axes dynamic. With `hide_channels` a Reshape to (n, -1, X, Y, Z) follows, so that neither the graph
    nor onnxruntime's shape inference knows the output channel count."""
    rng = np.random.default_rng(7)
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    inits = [
        numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3, 3)).astype(np_dtype), "w"),
        numpy_helper.from_array(np.array([0.25, -0.5], dtype=np_dtype), "b"),
    ]
    conv_out = "c" if hide_channels else "y"
    nodes = [helper.make_node("Conv", ["x", "w", "b"], [conv_out], kernel_shape=[3, 3, 3], pads=[1] * 6)]
    if hide_channels:
        inits += [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "two"),
            numpy_helper.from_array(np.array([5], dtype=np.int64), "five"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one"),
        ]
        nodes += [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
            helper.make_node("Slice", ["shape", "two", "five"], ["spatial"]),
            helper.make_node("Concat", ["batch", "minus_one", "spatial"], ["target"], axis=0),
            helper.make_node("Reshape", ["c", "target"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "conv3d",
        [helper.make_tensor_value_info("x", dtype, ["n", 1, "X", "Y", "Z"])],
        [helper.make_tensor_value_info("y", dtype, ["n", "k" if hide_channels else 2, "X", "Y", "Z"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    file = path / f"conv_{hide_channels}_{dtype}.onnx"
    onnx.save(model, str(file))
    return file


def batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 1, 6, 5, 4), dtype=np.float32))


@pytest.fixture
def runner(tmp_path: Path) -> OnnxRunner:
    return OnnxRunner(conv_model(tmp_path), device="cpu")


@pytest.mark.parametrize("n", [1, 3])
def test_run_tensor_gives_the_scores_of_run_as_float32_on_the_cpu(runner: OnnxRunner, n: int) -> None:
    x = batch(n)
    y = runner.run_tensor(x)
    assert y.dtype == torch.float32
    assert y.device == torch.device("cpu")
    assert tuple(y.shape) == (n, 2, 6, 5, 4)
    np.testing.assert_allclose(y.numpy(), runner.run(x.numpy()), atol=1e-5)


def test_the_runner_says_it_computes_on_the_cpu(runner: OnnxRunner) -> None:
    assert runner.device == "cpu"


def test_run_tensor_accepts_a_non_contiguous_batch(runner: OnnxRunner) -> None:
    x = batch(2).permute(0, 1, 4, 3, 2)  # a (2, 1, 4, 5, 6) view with permuted strides
    assert not x.is_contiguous()
    np.testing.assert_allclose(runner.run_tensor(x).numpy(), runner.run(x.contiguous().numpy()), atol=1e-5)


def test_run_tensor_accepts_a_float64_batch(runner: OnnxRunner) -> None:
    x = batch(2)
    y = runner.run_tensor(x.double())
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), runner.run(x.numpy()), atol=1e-5)


def test_without_a_known_channel_count_onnxruntime_allocates_the_output(tmp_path: Path) -> None:
    runner = OnnxRunner(conv_model(tmp_path, hide_channels=True), device="cpu")
    assert not isinstance(runner.output_shape[1], int)
    x = batch(3)
    y = runner.run_tensor(x)
    assert y.dtype == torch.float32
    assert tuple(y.shape) == (3, 2, 6, 5, 4)
    np.testing.assert_allclose(y.numpy(), runner.run(x.numpy()), atol=1e-5)


def test_a_symbolic_output_channel_axis_is_preallocated_from_the_card_count(tmp_path: Path) -> None:
    runner = OnnxRunner(conv_model(tmp_path, hide_channels=True), device="cpu", output_channels=2)
    x = batch(2)
    np.testing.assert_allclose(runner.run_tensor(x).numpy(), runner.run(x.numpy()), atol=1e-5)


def test_a_model_whose_output_is_smaller_than_its_input_lets_onnxruntime_allocate(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2, 2], strides=[2, 2, 2])],
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 6, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, 3, 2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "pool.onnx"))
    runner = OnnxRunner(tmp_path / "pool.onnx", device="cpu")
    x = torch.rand((2, 1, 6, 4, 4))
    y = runner.run_tensor(x)
    assert tuple(y.shape) == (2, 1, 3, 2, 2)
    np.testing.assert_allclose(y.numpy(), runner.run(x.numpy()), atol=1e-5)


def test_a_float16_model_takes_float32_tensors_and_returns_float32(tmp_path: Path) -> None:
    runner = OnnxRunner(conv_model(tmp_path, dtype=TensorProto.FLOAT16), device="cpu")
    x = batch(2)
    y = runner.run_tensor(x)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), runner.run(x.numpy()), atol=1e-5)


def test_run_tensor_on_a_closed_runner_raises_inference_error(runner: OnnxRunner) -> None:
    runner.close()
    with pytest.raises(InferenceError, match="closed"):
        runner.run_tensor(batch(1))


def test_a_batch_with_the_wrong_channel_count_raises_inference_error(runner: OnnxRunner) -> None:
    wrong = torch.zeros((1, 3, 6, 5, 4))
    with pytest.raises(InferenceError, match="onnxruntime failed"):
        runner.run_tensor(wrong)


def test_two_threads_running_tensors_at_once_both_get_their_own_scores(runner: OnnxRunner) -> None:
    inputs = [batch(2, seed=1), batch(3, seed=2)]
    expected = [runner.run(x.numpy()) for x in inputs]
    results: list[list[torch.Tensor]] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            start.wait()
            results[i].extend(runner.run_tensor(inputs[i]) for _ in range(20))
        except BaseException as exc:  # surfaced to the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for i in range(2):
        assert len(results[i]) == 20
        for y in results[i]:
            np.testing.assert_allclose(y.numpy(), expected[i], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs onnxruntime's CUDAExecutionProvider and a CUDA device")
def test_run_tensor_on_a_cuda_tensor_gives_the_scores_of_run_on_the_device(tmp_path: Path) -> None:
    runner = OnnxRunner(conv_model(tmp_path), device="cuda:0")
    assert runner.device == "cuda:0"
    x = batch(3)
    y = runner.run_tensor(x.to("cuda:0") * 1.0)  # produced by a kernel still queued on torch's stream
    assert y.device == torch.device("cuda:0")
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.cpu().numpy(), runner.run(x.numpy()), atol=1e-4)
