"""The `triton` backend against a KServe v2 server on 127.0.0.1 (tests/radai/triton_stub.py: Triton itself
cannot be installed here), backed by ONNX Runtime on the model zoo's real ONNX files."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper

from radai.errors import InferenceError, InferenceTimeoutError, OutOfMemoryError
from radai.runtime import RUNTIME_OPTIONS, available_backends, create_runner
from radai.runtime.onnx import OnnxRunner

pytest.importorskip("tritonclient.http")

from radai.runtime.triton import TritonRunner
from tests.radai.triton_stub import StubModel, TritonStub

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "model_zoo"
ATOL = 1e-5
# What Triton's ONNX Runtime backend answers when the GPU is full (replayed: a CPU test cannot cause it).
TRITON_OOM = (
    "onnx runtime error 6: Non-zero status code returned while running Conv node. Name:'Conv_0' "
    "Status Message: Failed to allocate memory for requested buffer of size 536870912"
)


def int_input_model(path: Path) -> Path:
    """A 5-D model whose input is INT64: not something radai can feed."""
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)
    graph = helper.make_graph(
        [node],
        "cast",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["n", 1, "X", "Y", "Z"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, "X", "Y", "Z"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonStub]:
    ints = int_input_model(tmp_path_factory.mktemp("int") / "model.onnx")
    ct = ZOO / "ct_body_classical" / "model.onnx"
    models = {
        "ct-body-classical": StubModel(ct),
        "brain-tissue": StubModel(ZOO / "brain_tissue" / "model.onnx"),
        "int-input": StubModel(ints),
        "ct-oom": StubModel(ct, error=TRITON_OOM),
        "ct-hung": StubModel(ct, delay_s=2.0),
    }
    with TritonStub(models) as server:
        yield server


def package_input(name: str) -> NDArray[np.float32]:
    return np.asarray(np.load(ZOO / name / "reference" / "input.npy"), dtype=np.float32)


def onnx_scores(name: str, x: NDArray[np.float32]) -> NDArray[np.float32]:
    runner = OnnxRunner(ZOO / name / "model.onnx", device="cpu", intra_op_threads=1)
    try:
        return runner.run(x)
    finally:
        runner.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("package", "model", "channels"),
    [("ct_body_classical", "ct-body-classical", 4), ("brain_tissue", "brain-tissue", 3)],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_triton_gives_the_onnx_backends_scores_on_the_reference_input(
    stub: TritonStub, package: str, model: str, channels: int, batch: int
) -> None:
    x = package_input(package)
    rng = np.random.default_rng(batch)
    # Batch 3: the reference patch and two perturbed copies, so a mix-up of batch items shows.
    x = np.concatenate([x] + [x + rng.normal(0, 0.1, x.shape).astype(np.float32) for _ in range(batch - 1)])
    runner = TritonRunner(f"http://{stub.url}", model, output_channels=channels)
    try:
        got = runner.run(x)
    finally:
        runner.close()
    expected = onnx_scores(package, x)
    assert got.dtype == np.float32
    assert got.shape == expected.shape == (batch, channels, *x.shape[2:])
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_create_runner_reaches_the_triton_model_named_by_the_card_id_or_the_options(stub: TritonStub) -> None:
    RUNTIME_OPTIONS.triton_url = stub.url
    try:
        runner = create_runner("triton", ZOO / "brain_tissue" / "model.onnx", output_channels=3)
        x = package_input("brain_tissue")
        np.testing.assert_allclose(runner.run(x), onnx_scores("brain_tissue", x), rtol=0, atol=ATOL)
        runner.close()
        RUNTIME_OPTIONS.triton_models = {"brain-tissue": "ct-body-classical"}
        with pytest.raises(InferenceError, match="has 4 output channels, the card says 3"):
            create_runner("triton", ZOO / "brain_tissue" / "model.onnx", output_channels=3)
        RUNTIME_OPTIONS.triton_models = {"brain-tissue": "brain-tissue/2"}  # the stub has version 1 only
        with pytest.raises(InferenceError, match="'brain-tissue' version 2"):
            create_runner("triton", ZOO / "brain_tissue" / "model.onnx", output_channels=3)
    finally:
        RUNTIME_OPTIONS.triton_url = None
        RUNTIME_OPTIONS.triton_models = {}


def test_create_runner_without_a_triton_url_fails_at_creation() -> None:
    with pytest.raises(InferenceError, match="triton_url"):
        create_runner("triton", ZOO / "brain_tissue" / "model.onnx", output_channels=3)


def test_concurrent_runs_from_several_threads_each_get_their_own_scores(stub: TritonStub) -> None:
    base = package_input("ct_body_classical")
    inputs = [base * (1.0 + 0.05 * i) for i in range(8)]
    runner = TritonRunner(stub.url, "ct-body-classical", output_channels=4)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(runner.run, inputs))
    finally:
        runner.close()
    for x, got in zip(inputs, results, strict=True):
        np.testing.assert_allclose(got, onnx_scores("ct_body_classical", x), rtol=0, atol=ATOL)


def test_unreachable_server_fails_at_construction_naming_the_url() -> None:
    url = f"127.0.0.1:{free_port()}"
    with pytest.raises(InferenceError, match=f"Triton server at {url} is unreachable"):
        TritonRunner(url, "ct-body-classical", output_channels=4)


def test_unknown_model_fails_at_construction(stub: TritonStub) -> None:
    with pytest.raises(InferenceError, match="unknown model: 'no-such-model'") as caught:
        TritonRunner(stub.url, "no-such-model", output_channels=4)
    assert "\n" not in str(caught.value)


def test_unknown_model_version_fails_at_construction(stub: TritonStub) -> None:
    with pytest.raises(InferenceError, match="version 7"):
        TritonRunner(stub.url, "ct-body-classical", "7", output_channels=4)


def test_wrong_channel_count_fails_at_construction(stub: TritonStub) -> None:
    with pytest.raises(InferenceError, match="has 4 output channels, the card says 3"):
        TritonRunner(stub.url, "ct-body-classical", output_channels=3)


def test_non_float_input_fails_at_construction(stub: TritonStub) -> None:
    with pytest.raises(InferenceError, match="datatype INT64, radai needs FP32 or FP16"):
        TritonRunner(stub.url, "int-input", output_channels=None)


def test_unknown_tensor_name_fails_at_construction(stub: TritonStub) -> None:
    with pytest.raises(InferenceError, match=r"no output 'probabilities' .*it has: scores"):
        TritonRunner(stub.url, "ct-body-classical", output_channels=4, output_name="probabilities")


def test_failing_inference_raises_inference_error_on_one_line(stub: TritonStub) -> None:
    runner = TritonRunner(stub.url, "ct-body-classical", output_channels=4)
    try:
        with pytest.raises(InferenceError, match="Triton failed on 'ct-body-classical'") as caught:
            runner.run(np.zeros((1, 2, 8, 8, 8), np.float32))  # the model takes one channel
        assert type(caught.value) is InferenceError
        assert "\n" not in str(caught.value)
        ok = runner.run(package_input("ct_body_classical"))  # the runner keeps serving
        assert ok.shape == (1, 4, 64, 64, 8)
    finally:
        runner.close()


def test_server_side_out_of_memory_raises_out_of_memory_error(stub: TritonStub) -> None:
    runner = TritonRunner(stub.url, "ct-oom", output_channels=4)
    try:
        with pytest.raises(OutOfMemoryError, match="Failed to allocate memory"):
            runner.run(package_input("ct_body_classical"))
    finally:
        runner.close()


def test_hung_server_times_out(stub: TritonStub) -> None:
    runner = TritonRunner(stub.url, "ct-hung", output_channels=4, timeout_s=0.3)
    try:
        with pytest.raises(InferenceTimeoutError, match=r"no answer within 0\.3 s"):
            runner.run(package_input("ct_body_classical"))
    finally:
        runner.close()


def test_run_after_close_raises_inference_error(stub: TritonStub) -> None:
    runner = TritonRunner(stub.url, "ct-body-classical", output_channels=4)
    runner.close()
    with pytest.raises(InferenceError, match="closed"):
        runner.run(package_input("ct_body_classical"))


def test_triton_is_listed_as_available_only_where_tritonclient_is_installed(tmp_path: Path) -> None:
    assert "triton" in available_backends()
    # A second interpreter whose site-packages lacks tritonclient: every other entry linked in, no site.
    site = Path(importlib.util.find_spec("tritonclient").origin).parents[1]  # type: ignore[arg-type,union-attr]
    view = tmp_path / "site"
    view.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith("tritonclient"):
            (view / entry.name).symlink_to(entry)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(view)])}
    code = "from radai.runtime import available_backends as a; print(','.join(a()))"
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    listed = out.stdout.strip().split(",")
    assert "triton" not in listed
    assert "onnx" in listed
