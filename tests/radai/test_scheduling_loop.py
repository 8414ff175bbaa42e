"""Scheduler with job threads and the fake runner (the GPU stand-in)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from numpy.typing import NDArray

from radai.errors import InferenceError
from radai.metrics import REGISTRY
from radai.models.manifest import InputSpec
from radai.runtime.fake import FakeRunner
from radai.scheduling.inferer import sliding_window
from radai.scheduling.loop import BatchRecord, Scheduler

PATCH = (1, 4, 4, 4)
JOIN_S = 10.0


def patches(n: int, seed: int) -> NDArray[np.float32]:
    return np.random.default_rng(seed).random((n, *PATCH), dtype=np.float32)


class Job(threading.Thread):
    """A job thread calling `infer` once and keeping the result or the exception."""

    def __init__(self, scheduler: Scheduler, job_id: str, data: NDArray[np.float32]) -> None:
        super().__init__(name=f"job-{job_id}", daemon=True)
        self.scheduler, self.job_id, self.data = scheduler, job_id, data
        self.result: NDArray[np.float32] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.scheduler.infer(self.job_id, self.data)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> Job:
        self.join(JOIN_S)
        if self.is_alive():
            raise AssertionError(f"{self.name} still waiting for its scores")
        return self


class GatedRunner(FakeRunner):
    """Blocks inside `run` until the test opens the gate (a batch held "on the GPU")."""

    def __init__(self) -> None:
        super().__init__(2)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        self.entered.set()
        self.gate.wait(JOIN_S)
        return super().run(batch)


class ShapeRunner(FakeRunner):
    """Returns scores whose spatial shape does not match the input."""

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        return np.zeros((batch.shape[0], 2, 1, 1, 1), dtype=np.float32)


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + JOIN_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


@pytest.fixture
def records() -> list[BatchRecord]:
    return []


@pytest.fixture
def make(records: list[BatchRecord]) -> Iterator[Callable[..., Scheduler]]:
    started: list[Scheduler] = []

    def factory(runner: FakeRunner, max_batch: int, max_wait_s: float, model: str = "m") -> Scheduler:
        scheduler = Scheduler(model, runner, max_batch, max_wait_s, on_batch=records.append)
        scheduler.start()
        started.append(scheduler)
        return scheduler

    yield factory
    for scheduler in started:
        scheduler.stop(timeout_s=1.0)


def test_concurrent_jobs_share_a_batch_and_each_gets_its_own_scores_in_order(
    make: Callable[..., Scheduler], records: list[BatchRecord]
) -> None:
    runner = FakeRunner(2)
    # The batch closes only when full (8), so it must hold the 4 patches of each job.
    scheduler = make(runner, max_batch=8, max_wait_s=60.0)
    a, b = patches(4, seed=1), patches(4, seed=2)
    jobs = [Job(scheduler, "A", a), Job(scheduler, "B", b)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.finish()
    assert jobs[0].error is None and jobs[1].error is None
    np.testing.assert_array_equal(jobs[0].result, runner.expected(a))
    np.testing.assert_array_equal(jobs[1].result, runner.expected(b))
    assert [(r.size, set(r.job_ids)) for r in records] == [(8, {"A", "B"})]
    assert runner.calls == [8]


def test_a_call_larger_than_max_batch_is_split_and_merged_back_in_order(
    make: Callable[..., Scheduler], records: list[BatchRecord]
) -> None:
    runner = FakeRunner(3)
    scheduler = make(runner, max_batch=4, max_wait_s=0.0)
    data = patches(10, seed=3)
    result = scheduler.infer("A", data)
    np.testing.assert_array_equal(result, runner.expected(data))
    assert sorted(r.size for r in records) == [2, 4, 4]
    assert all(r.job_ids == ("A",) and not r.failed for r in records)


def test_runner_failure_fails_that_batch_only_and_the_worker_keeps_serving(
    make: Callable[..., Scheduler], records: list[BatchRecord]
) -> None:
    runner = FakeRunner(2, poison=-1.0)
    scheduler = make(runner, max_batch=4, max_wait_s=0.0)
    bad = patches(4, seed=4)
    bad[2, 0, 0, 0, 0] = -1.0
    with pytest.raises(InferenceError, match="poisoned input"):
        scheduler.infer("A", bad)
    good = patches(4, seed=5)
    np.testing.assert_array_equal(scheduler.infer("B", good), runner.expected(good))
    assert [r.failed for r in records] == [True, False]


def test_runner_failure_fails_every_job_sharing_the_batch(make: Callable[..., Scheduler]) -> None:
    runner = FakeRunner(2, poison=-1.0)
    scheduler = make(runner, max_batch=4, max_wait_s=60.0)
    bad, good = patches(2, seed=6), patches(2, seed=7)
    bad[0, 0, 1, 1, 1] = -1.0
    jobs = [Job(scheduler, "A", bad), Job(scheduler, "B", good)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.finish()
    assert all(isinstance(job.error, InferenceError) for job in jobs)
    again = patches(4, seed=8)
    np.testing.assert_array_equal(scheduler.infer("C", again), runner.expected(again))


def test_non_finite_scores_fail_only_the_job_whose_patches_produced_them(
    make: Callable[..., Scheduler], records: list[BatchRecord]
) -> None:
    runner = FakeRunner(2)
    scheduler = make(runner, max_batch=4, max_wait_s=60.0)
    bad, good = patches(2, seed=9), patches(2, seed=10)
    bad[1, 0, 2, 2, 2] = np.nan
    jobs = [Job(scheduler, "A", bad), Job(scheduler, "B", good)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.finish()
    assert isinstance(jobs[0].error, InferenceError)
    assert "non-finite" in str(jobs[0].error)
    assert jobs[1].error is None
    np.testing.assert_array_equal(jobs[1].result, runner.expected(good))
    assert [set(r.job_ids) for r in records] == [{"A", "B"}]


def test_scores_of_the_wrong_shape_raise_inference_error(make: Callable[..., Scheduler]) -> None:
    scheduler = make(ShapeRunner(2), max_batch=2, max_wait_s=0.0)
    with pytest.raises(InferenceError, match="returned shape"):
        scheduler.infer("A", patches(2, seed=11))


def test_stop_fails_queued_calls_instead_of_leaving_them_waiting(make: Callable[..., Scheduler]) -> None:
    scheduler = make(FakeRunner(2), max_batch=100, max_wait_s=600.0)
    job = Job(scheduler, "A", patches(3, seed=12))
    job.start()
    wait_until(lambda: scheduler.depth == 3)
    scheduler.stop()
    job.finish()
    assert isinstance(job.error, InferenceError)
    assert "stopped" in str(job.error)
    assert scheduler.depth == 0
    with pytest.raises(InferenceError, match="not running"):
        scheduler.infer("B", patches(1, seed=13))


def test_stop_lets_the_running_batch_finish_and_fails_the_queued_one(make: Callable[..., Scheduler]) -> None:
    runner = GatedRunner()
    scheduler = make(runner, max_batch=2, max_wait_s=0.0)
    data = patches(2, seed=14)
    running = Job(scheduler, "A", data)
    running.start()
    assert runner.entered.wait(JOIN_S)
    queued = Job(scheduler, "B", patches(2, seed=15))
    queued.start()
    wait_until(lambda: scheduler.depth == 2)
    stopper = threading.Thread(target=scheduler.stop, daemon=True)
    stopper.start()
    queued.finish()
    assert isinstance(queued.error, InferenceError)
    runner.gate.set()
    running.finish()
    stopper.join(JOIN_S)
    assert running.error is None
    np.testing.assert_array_equal(running.result, runner.expected(data))


def test_stop_fails_a_batch_still_running_after_the_timeout(make: Callable[..., Scheduler]) -> None:
    runner = GatedRunner()
    scheduler = make(runner, max_batch=1, max_wait_s=0.0)
    job = Job(scheduler, "A", patches(1, seed=16))
    job.start()
    assert runner.entered.wait(JOIN_S)
    scheduler.stop(timeout_s=0.05)
    job.finish()
    runner.gate.set()
    assert isinstance(job.error, InferenceError)
    assert "while the batch was running" in str(job.error)


def test_cancel_fails_the_jobs_waiting_call_and_leaves_others_queued(make: Callable[..., Scheduler]) -> None:
    scheduler = make(FakeRunner(2), max_batch=100, max_wait_s=600.0)
    a = Job(scheduler, "A", patches(2, seed=17))
    b = Job(scheduler, "B", patches(3, seed=18))
    a.start()
    b.start()
    wait_until(lambda: scheduler.depth == 5)
    assert scheduler.cancel("A") == 2
    a.finish()
    assert isinstance(a.error, InferenceError)
    assert "cancelled" in str(a.error)
    assert scheduler.depth == 3
    scheduler.stop()
    b.finish()


def test_batches_update_the_scheduler_metrics(make: Callable[..., Scheduler]) -> None:
    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"model": "metrics-model"}) or 0.0

    before = sample("radai_scheduler_batch_size_count")
    scheduler = make(FakeRunner(2), max_batch=4, max_wait_s=0.0, model="metrics-model")
    scheduler.infer("A", patches(6, seed=19))
    assert sample("radai_scheduler_batch_size_count") - before == 2
    assert sample("radai_scheduler_batch_size_sum") >= 6
    assert sample("radai_scheduler_batch_jobs_count") >= 2
    assert sample("radai_scheduler_batch_seconds_count") >= 2
    assert sample("radai_scheduler_wait_seconds_count") >= 2
    assert sample("radai_scheduler_queue_depth") == 0


def test_a_failing_on_batch_callback_does_not_stop_the_worker() -> None:
    def explode(record: BatchRecord) -> None:
        raise RuntimeError("callback bug")

    runner = FakeRunner(2)
    scheduler = Scheduler("m", runner, max_batch=2, max_wait_s=0.0, on_batch=explode)
    scheduler.start()
    try:
        for seed in (20, 21):
            data = patches(2, seed=seed)
            np.testing.assert_array_equal(scheduler.infer("A", data), runner.expected(data))
    finally:
        scheduler.stop()


def test_infer_before_start_raises_instead_of_blocking() -> None:
    scheduler = Scheduler("m", FakeRunner(2), max_batch=2, max_wait_s=0.0)
    with pytest.raises(InferenceError, match="not running"):
        scheduler.infer("A", patches(1, seed=22))


# -- sliding window (MONAI) over any predictor, alone and through the scheduler ---------------------------


def input_spec(patch: tuple[int, int, int], overlap: float, blend: str) -> InputSpec:
    return InputSpec.model_validate(
        {
            "name": "image",
            "spacing": (1.0, 1.0, 1.0),
            "orientation": "RAS",
            "intensity": {"kind": "range", "a_min": 0.0, "a_max": 1.0},
            "patch_size": patch,
            "overlap": overlap,
            "blend": blend,
        }
    )


def grid_count(shape: tuple[int, ...], patch: tuple[int, int, int], overlap: float) -> int:
    """Windows per axis as MONAI lays them out: step int(patch * (1 - overlap)), last window flush."""
    count = 1
    for size, roi in zip(shape, patch, strict=True):
        step = max(int(roi * (1 - overlap)), 1)
        count *= 1 if size <= roi else -(-(size - roi) // step) + 1
    return count


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_sliding_window_reproduces_a_voxelwise_predictor_over_the_whole_volume(blend: str) -> None:
    runner = FakeRunner(2)
    image = np.random.default_rng(23).random((1, 20, 17, 5), dtype=np.float32)
    spec = input_spec((8, 8, 8), 0.25, blend)
    seen: list[int] = []

    def predict(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        assert batch.shape[1:] == (1, 8, 8, 8)
        seen.append(batch.shape[0])
        return runner.run(batch)

    scores = sliding_window(image, spec, predict, sw_batch_size=4)
    assert scores.shape == (2, 20, 17, 5)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores.argmax(axis=0), image[0] >= 0.5)
    assert sum(seen) == grid_count((20, 17, 5), (8, 8, 8), 0.25) == 9
    assert max(seen) <= 4


def test_concurrent_sliding_windows_through_the_scheduler_give_each_job_its_segmentation(
    make: Callable[..., Scheduler], records: list[BatchRecord]
) -> None:
    runner = FakeRunner(3)
    scheduler = make(runner, max_batch=4, max_wait_s=0.005)
    spec = input_spec((6, 6, 6), 0.5, "gaussian")
    images = {
        job: np.random.default_rng(i).random((1, 13, 11, 9), dtype=np.float32) for i, job in enumerate("AB")
    }
    results: dict[str, NDArray[np.float32]] = {}

    def job(job_id: str) -> None:
        results[job_id] = sliding_window(
            images[job_id], spec, lambda p: scheduler.infer(job_id, p), sw_batch_size=4
        )

    threads = [threading.Thread(target=job, args=(j,), daemon=True) for j in "AB"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_S * 3)
    assert sorted(results) == ["A", "B"]
    for job_id, image in images.items():
        expected = np.clip(np.floor(image[0] * 3), 0, 2)
        np.testing.assert_array_equal(results[job_id].argmax(axis=0), expected)
    assert sum(r.size for r in records) == 2 * grid_count((13, 11, 9), (6, 6, 6), 0.5)


def test_sliding_window_refuses_an_image_with_the_wrong_channel_count() -> None:
    spec = input_spec((4, 4, 4), 0.25, "constant")
    with pytest.raises(ValueError, match="image must be"):
        sliding_window(np.zeros((2, 8, 8, 8), np.float32), spec, FakeRunner(2).run, sw_batch_size=1)
