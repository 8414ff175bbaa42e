"""The device path: a job's volume is prepared, windowed and blended as torch tensors where the model runs, and
the scheduler pools tensor patches (and numpy patches of host-path jobs) into one batch.

On this CPU the path runs with tensors on "cpu" (forced with `device_path=True`): every step is the same code a
GPU runs, so the answers are compared against the host path here; the CUDA cases are marked and skipped
without CUDA.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from radai.catalog import Lane
from radai.domain import Priority
from radai.errors import InferenceError
from radai.imaging.resample import prepare, scores_to_source_grid, to_source_grid
from radai.imaging.volume import Volume
from radai.models.manifest import ModelCard, OutputSpec, load_card
from radai.pipeline import infer_labels
from radai.ports import DeviceInferer, DeviceRunner
from radai.postprocess import tensor_labels, to_labels
from radai.runtime.fake import FakeRunner
from radai.runtime.onnx import OnnxRunner
from radai.runtime.torch_backend import TorchRunner
from radai.scheduling.inferer import sliding_window, sliding_window_tensor
from radai.scheduling.loop import Scheduler
from tests.radai.together import together

ROOT = Path(__file__).resolve().parents[2]
CT_CLASSICAL = ROOT / "model_zoo" / "ct_body_classical"
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def started(scheduler: Scheduler) -> Scheduler:
    scheduler.start()
    return scheduler


def patches(n: int, value: float, size: int = 4) -> NDArray[np.float32]:
    rng = np.random.default_rng(int(value * 1000) % 2**32)
    out = rng.random((n, 1, size, size, size), dtype=np.float32)
    out[:, :, 0, 0, 0] = value
    return out


def one_tensor_call(fake: FakeRunner, max_batch: int, x: NDArray[np.float32]) -> torch.Tensor:
    """`x` scored as one tensor call through a device-path scheduler on `fake`."""
    scheduler = started(Scheduler("m", fake, max_batch, 0.0, device_path=True))
    try:
        return scheduler.infer_tensor("job", torch.from_numpy(x))
    finally:
        scheduler.stop()


def ct_like_volume() -> Volume:
    """A trunk-like CT: air outside, soft tissue body, two aerated lungs and a bony spine, HU, tilted axes."""
    shape = (96, 80, 30)
    spacing = (1.4, 1.4, 4.0)
    a = math.radians(7.0)
    rot = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag(spacing)
    affine[:3, 3] = [40.0, 30.0, -60.0]
    i, j, _ = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[((i - 48) / 44) ** 2 + ((j - 40) / 36) ** 2 <= 1] = 40.0
    for centre in (30, 66):
        hu[((i - centre) / 12) ** 2 + ((j - 38) / 14) ** 2 <= 1] = -850.0
    hu[((i - 48) / 5) ** 2 + ((j - 64) / 5) ** 2 <= 1] = 900.0
    noise = np.random.default_rng(3).normal(0.0, 15.0, shape).astype(np.float32)
    return Volume(array=hu + noise, affine=affine, sop_instance_uids=tuple(str(k) for k in range(shape[2])))


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return load_card(CT_CLASSICAL)


# -- scheduler -------------------------------------------------------------------------------------------


def test_the_device_path_is_taken_by_default_only_on_cuda_runners() -> None:
    fake = FakeRunner()
    assert isinstance(fake, DeviceRunner)
    host = started(Scheduler("m", fake, 4, 0.0))
    forced = started(Scheduler("m", FakeRunner(), 4, 0.0, device_path=True))
    try:
        assert host.job_device() is None
        assert forced.job_device() == "cpu"
        assert isinstance(forced, DeviceInferer)
    finally:
        host.stop()
        forced.stop()


def test_device_path_needs_runners_that_take_tensors() -> None:
    class HostOnly:
        def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
            return batch

        def close(self) -> None:
            return None

    with pytest.raises(ValueError, match="runners that take tensors"):
        Scheduler("m", HostOnly(), 4, 0.0, device_path=True)
    assert Scheduler("m", HostOnly(), 4, 0.0).job_device() is None


def test_tensor_patches_come_back_as_tensors_with_the_runner_scores() -> None:
    fake = FakeRunner(3)
    x = patches(6, 0.7)
    out = one_tensor_call(fake, 4, x)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), fake.expected(x))
    assert fake.tensor_calls == len(fake.calls) == 2  # batches of 4 + 2, all through run_tensor


def test_host_and_device_jobs_share_a_batch_and_each_gets_its_own_kind_back() -> None:
    fake = FakeRunner(2, delay_s=0.05)
    scheduler = started(Scheduler("m", fake, 8, 0.2, device_path=True))
    a, b = patches(3, 0.2), patches(3, 0.9)

    def job(i: int) -> object:
        return scheduler.infer("host", a) if i == 0 else scheduler.infer_tensor("device", torch.from_numpy(b))

    try:
        host_out, device_out = together(2, job, timeout_s=10)
    finally:
        scheduler.stop()
    assert fake.calls == [6]  # one batch with both jobs' patches
    assert isinstance(host_out, np.ndarray)
    assert isinstance(device_out, torch.Tensor)
    np.testing.assert_array_equal(host_out, fake.expected(a))
    np.testing.assert_array_equal(device_out.numpy(), fake.expected(b))


def test_non_finite_scores_fail_only_that_tensor_job() -> None:
    fake = FakeRunner(2, delay_s=0.05)
    scheduler = started(Scheduler("m", fake, 8, 0.2, device_path=True))
    bad = patches(2, 0.5)
    bad[1, 0, 1, 1, 1] = np.nan
    good = patches(2, 0.3)

    def job(i: int) -> object:
        name, x = ("bad", bad) if i == 0 else ("good", good)
        try:
            return scheduler.infer_tensor(name, torch.from_numpy(x))
        except InferenceError as exc:
            return exc

    try:
        bad_out, good_out = together(2, job, timeout_s=10)
    finally:
        scheduler.stop()
    assert isinstance(bad_out, InferenceError)
    assert "non-finite" in str(bad_out)
    assert isinstance(good_out, torch.Tensor)
    np.testing.assert_array_equal(good_out.numpy(), fake.expected(good))


def test_out_of_memory_on_a_tensor_batch_splits_it_and_every_row_comes_back() -> None:
    fake = FakeRunner(2, memory_patches=2)
    x = patches(8, 0.6)
    out = one_tensor_call(fake, 8, x)
    np.testing.assert_array_equal(out.numpy(), fake.expected(x))
    assert fake.calls[0] == 8
    assert sum(n for n in fake.calls if n <= 2) == 8  # the rows ran in the batches that fit


def test_a_lane_forwards_the_device_and_tensor_calls_in_its_priority() -> None:
    fake = FakeRunner(2)
    scheduler = started(Scheduler("m", fake, 4, 0.0, device_path=True))
    try:
        lane = Lane(scheduler, Priority.STAT)
        assert lane.job_device() == "cpu"
        x = patches(2, 0.4)
        np.testing.assert_array_equal(lane.infer_tensor("j", torch.from_numpy(x)).numpy(), fake.expected(x))
    finally:
        scheduler.stop()
    host_lane = Lane(Scheduler("m", FakeRunner(), 4, 0.0), Priority.ROUTINE)
    assert host_lane.job_device() is None


# -- steps on tensors against the host steps ---------------------------------------------------------------


def test_sliding_window_on_a_tensor_blends_as_on_the_host(card: ModelCard) -> None:
    fake = FakeRunner(4)
    rng = np.random.default_rng(5)
    image = rng.random((1, 300, 270, 40), dtype=np.float32)
    host = sliding_window(image, card.input, fake.run, sw_batch_size=4)
    device = sliding_window_tensor(torch.from_numpy(image), card.input, fake.run_tensor, sw_batch_size=4)
    assert device.shape == host.shape
    np.testing.assert_allclose(device.numpy(), host, atol=1e-6)


def test_tensor_labels_match_host_labels_for_argmax_thresholds_and_components() -> None:
    rng = np.random.default_rng(7)
    scores = rng.normal(0.0, 2.0, (3, 20, 18, 9)).astype(np.float32)
    specs = [
        OutputSpec.model_validate({"name": "s", "channels": 3, "postprocess": "argmax"}),
        OutputSpec.model_validate(
            {
                "name": "s",
                "channels": 3,
                "postprocess": {"kind": "threshold", "threshold": 0.8, "activation": "sigmoid"},
                "components": {"min_voxels": 4},
            }
        ),
    ]
    for spec in specs:
        np.testing.assert_array_equal(tensor_labels(torch.from_numpy(scores), spec), to_labels(scores, spec))


def test_prepare_and_back_on_tensors_match_the_host_arrays(card: ModelCard) -> None:
    volume = ct_like_volume()
    prepared = prepare(volume, card.input, "cpu")
    assert isinstance(prepared.data, torch.Tensor)
    scores = np.random.default_rng(2).random((4, *prepared.shape[1:]), dtype=np.float32)
    on_tensor = scores_to_source_grid(torch.from_numpy(scores), prepared)
    np.testing.assert_allclose(on_tensor.numpy(), to_source_grid(scores, prepared), atol=1e-6)
    assert on_tensor.shape == (4, *volume.array.shape)


def test_a_job_on_the_device_path_gets_the_host_path_labels(card: ModelCard) -> None:
    """The real ct-body-classical graph, on PyTorch (device path) and on ONNX Runtime (host path)."""
    volume = ct_like_volume()
    weights = CT_CLASSICAL / card.runtime.file
    on_device = started(Scheduler(card.id, TorchRunner(weights, device="cpu"), 4, 0.0, device_path=True))
    on_host = started(Scheduler(card.id, OnnxRunner(weights, device="cpu"), 4, 0.0))
    try:
        device_labels = infer_labels(volume, card, on_device, "device-job")
        host_labels = infer_labels(volume, card, on_host, "host-job")
    finally:
        on_device.stop()
        on_host.stop()
    assert set(np.unique(host_labels)) >= {0, 1, 2, 3}  # the volume has air, body, lung and bone
    agreement = float(np.mean(device_labels == host_labels))
    assert agreement >= 0.999, f"labels agree on {agreement:.5f} of voxels"


# -- CUDA --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_a_torch_runner_takes_the_device_path_and_gives_the_host_path_labels(card: ModelCard) -> None:
    volume = ct_like_volume()
    weights = CT_CLASSICAL / card.runtime.file
    runner = TorchRunner(weights, device="cuda")
    on_device = started(Scheduler(card.id, runner, 4, 0.0))
    on_host = started(Scheduler(card.id, OnnxRunner(weights, device="cpu"), 4, 0.0))
    try:
        assert on_device.job_device() == "cuda:0"
        device_labels = infer_labels(volume, card, on_device, "device-job")
        host_labels = infer_labels(volume, card, on_host, "host-job")
    finally:
        on_device.stop()
        on_host.stop()
    agreement = float(np.mean(device_labels == host_labels))
    assert agreement >= 0.999, f"labels agree on {agreement:.5f} of voxels"


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_run_tensor_reads_and_answers_on_the_device(card: ModelCard) -> None:
    runner = TorchRunner(CT_CLASSICAL / card.runtime.file, device="cuda", cuda_graphs=True)
    x = np.random.default_rng(1).random((3, 1, 64, 64, 24), dtype=np.float32)
    expected = runner.run(x)
    for _ in range(2):  # the second call replays the captured graph
        got = runner.run_tensor(torch.from_numpy(x).cuda() * 1.0)
        assert got.device.type == "cuda"
        np.testing.assert_allclose(got.cpu().numpy(), expected, atol=1e-5)


def test_with_several_devices_jobs_are_spread_over_them_in_turn() -> None:
    first, second = FakeRunner(), FakeRunner()
    second.device = "cuda:1"  # a label only: these jobs are never run
    scheduler = Scheduler("m", [first, second], 4, 0.0, device_path=True)
    lane = Lane(scheduler, Priority.ROUTINE)
    picked = []
    for _ in range(4):
        assert isinstance(lane, DeviceInferer) and isinstance(scheduler, DeviceInferer)  # checks pick nothing
        picked.append(lane.job_device())
    assert picked == ["cpu", "cuda:1", "cpu", "cuda:1"]
    assert scheduler.devices == ("cpu", "cuda:1")


def test_on_the_device_path_a_stat_job_waits_only_for_the_running_batch() -> None:
    """Two batches in flight, but the second is formed only when the runner is free: the STAT patches that
    arrived while the first ran go before the routine ones that arrived earlier."""
    order: list[tuple[str, ...]] = []
    fake = FakeRunner(2, delay_s=0.5)
    scheduler = started(
        Scheduler(
            "m", fake, 2, 0.0, in_flight=2, device_path=True, on_batch=lambda r: order.append(r.job_ids)
        )
    )

    def job(name: str, priority: Priority) -> threading.Thread:
        x = torch.from_numpy(patches(2, 0.4))
        thread = threading.Thread(target=scheduler.infer_tensor, args=(name, x, priority))
        thread.start()
        return thread

    try:
        threads = [job("first", Priority.ROUTINE)]
        wait_for(lambda: fake.calls == [2])  # the first batch is running
        threads.append(job("routine", Priority.ROUTINE))
        time.sleep(0.05)
        threads.append(job("stat", Priority.STAT))
        for thread in threads:
            thread.join(10)
    finally:
        scheduler.stop()
    assert order == [("first",), ("stat",), ("routine",)]


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_cuda_runners_take_the_device_path_unless_it_is_switched_off() -> None:
    runner = FakeRunner()
    runner.device = "cuda:0"  # a label only: no job runs
    assert Scheduler("m", runner, 4, 0.0).job_device() == "cuda:0"
    assert Scheduler("m", runner, 4, 0.0, device_path=False).job_device() is None
