"""Faults of the model runtime, with the fake backend: out of memory splits the batch and retries, a hung
inference times out, and in each case other jobs are unaffected and the worker keeps serving."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from radai.errors import InferenceError, InferenceTimeoutError
from radai.metrics import REGISTRY
from radai.runtime.fake import FakeRunner
from radai.scheduling.loop import Scheduler
from tests.radai.test_scheduling_loop import JOIN_S, Job, patches, wait_until


def test_out_of_memory_splits_the_batch_retries_and_caps_later_batches() -> None:
    runner = FakeRunner(2, memory_patches=2)
    scheduler = Scheduler("oom-model", runner, max_batch=8, max_wait_s=0.05)
    scheduler.start()

    def limit() -> float | None:
        return REGISTRY.get_sample_value("radai_scheduler_batch_limit", {"model": "oom-model"})

    assert limit() == 8
    try:
        a = Job(scheduler, "a", patches(8, 1))
        a.start()
        a.finish()
        assert a.error is None and a.result is not None
        np.testing.assert_array_equal(a.result, runner.expected(patches(8, 1)))
        assert runner.calls == [8, 4, 2, 2, 4, 2, 2]
        runner.calls.clear()
        b = Job(scheduler, "b", patches(6, 2))
        b.start()
        b.finish()
        assert b.error is None and max(runner.calls) <= 2  # later batches stay within what fitted
        assert scheduler.max_batch == 2 and limit() == 2  # operators see the cap
    finally:
        scheduler.stop(timeout_s=1.0)


def test_a_single_patch_that_does_not_fit_fails_its_job_with_the_reason() -> None:
    runner = FakeRunner(2, memory_patches=0)
    scheduler = Scheduler("m", runner, max_batch=4, max_wait_s=0.01)
    scheduler.start()
    try:
        job = Job(scheduler, "a", patches(1, 1))
        job.start()
        job.finish()
        assert isinstance(job.error, InferenceError) and "do not fit in device memory" in str(job.error)
    finally:
        scheduler.stop(timeout_s=1.0)


def test_a_hung_inference_times_out_fails_only_its_job_and_the_worker_serves_the_next() -> None:
    runner = FakeRunner(2, hang_on=0.777)
    scheduler = Scheduler("m", runner, max_batch=2, max_wait_s=0.0, timeout_s=0.5)
    scheduler.start()
    try:
        hung = patches(2, 1)
        hung[0, 0, 0, 0, 0] = 0.777
        a = Job(scheduler, "a", hung)
        a.start()
        wait_until(lambda: len(runner.calls) == 1)  # a's batch is on the "device"
        b = Job(scheduler, "b", patches(2, 2))
        b.start()
        a.finish()
        b.finish()
        assert isinstance(a.error, InferenceError) and "did not return within 0.5 s" in str(a.error)
        assert isinstance(a.error.__cause__, InferenceTimeoutError)
        assert b.error is None and b.result is not None
        np.testing.assert_array_equal(b.result, runner.expected(patches(2, 2)))
    finally:
        runner.release()
        scheduler.stop(timeout_s=1.0)


@pytest.mark.parametrize("workers", [3])
def test_concurrent_jobs_all_resolve_while_batches_run_out_of_memory(workers: int) -> None:
    runner = FakeRunner(2, memory_patches=3, delay_s=0.001)
    scheduler = Scheduler("m", runner, max_batch=8, max_wait_s=0.02)
    scheduler.start()
    try:
        jobs = [Job(scheduler, f"j{i}", patches(5, i)) for i in range(workers)]
        for job in jobs:
            job.start()
        deadline = time.monotonic() + JOIN_S
        for job in jobs:
            job.join(max(deadline - time.monotonic(), 0.1))
        for i, job in enumerate(jobs):
            assert job.error is None, job.error
            np.testing.assert_array_equal(job.result, runner.expected(patches(5, i)))
        assert threading.active_count() < 50
    finally:
        scheduler.stop(timeout_s=1.0)


class CountingRunner(FakeRunner):
    """Counts how many batches are inside `run` at once, holding each until the gate opens."""

    def __init__(self) -> None:
        super().__init__(2)
        self.inside = 0
        self.most = 0
        self.gate = threading.Event()
        self._count = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
        with self._count:
            self.inside += 1
            self.most = max(self.most, self.inside)
        self.gate.wait(JOIN_S)
        try:
            return super().run(batch)
        finally:
            with self._count:
                self.inside -= 1


@pytest.mark.parametrize(("in_flight", "expected"), [(1, 1), (2, 2)])
def test_batches_in_flight_run_at_once_and_every_call_still_gets_its_rows(
    in_flight: int, expected: int
) -> None:
    runner = CountingRunner()
    scheduler = Scheduler("m", runner, max_batch=2, max_wait_s=0.0, in_flight=in_flight)
    scheduler.start()
    try:
        job = Job(scheduler, "a", patches(6, 3))
        job.start()
        wait_until(lambda: runner.inside == expected)
        time.sleep(0.05)  # a third batch would have entered by now if the limit were wrong
        assert runner.inside == expected
        runner.gate.set()
        job.finish()
        assert job.error is None and runner.most == expected
        np.testing.assert_array_equal(job.result, runner.expected(patches(6, 3)))
    finally:
        runner.gate.set()
        scheduler.stop(timeout_s=1.0)


def test_several_runners_one_per_device_share_one_queue_and_all_serve_it() -> None:
    gpus = [CountingRunner(), CountingRunner()]
    scheduler = Scheduler("m", gpus, max_batch=2, max_wait_s=0.0)
    scheduler.start()
    try:
        job = Job(scheduler, "a", patches(8, 4))
        job.start()
        wait_until(lambda: gpus[0].inside == 1 and gpus[1].inside == 1)  # a batch on each device at once
        for gpu in gpus:
            gpu.gate.set()
        job.finish()
        assert job.error is None
        np.testing.assert_array_equal(job.result, gpus[0].expected(patches(8, 4)))
        assert len(gpus[0].calls) + len(gpus[1].calls) == 4 and gpus[0].calls and gpus[1].calls
    finally:
        for gpu in gpus:
            gpu.gate.set()
        scheduler.stop(timeout_s=1.0)
