"""The batch a model is served at: the smallest that runs about as fast as the best, timed when it loads."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from radai.runtime.fake import FakeRunner
from radai.runtime.tuning import candidates, tune_batch
from tests.radai.host_parts import served_batch


class CostedRunner:
    """A runner whose every call costs `cost[n]` seconds on a fake clock (no sleeping)."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost = cost
        self.now = 0.0
        self.sizes: list[int] = []

    def clock(self) -> float:
        return self.now

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        n = int(batch.shape[0])
        self.sizes.append(n)
        self.now += self.cost[n]
        return np.zeros((n, 2, *batch.shape[2:]), dtype=np.float32)

    def close(self) -> None:
        return None


def test_candidates_double_up_to_the_cap_and_include_it() -> None:
    assert candidates(1) == [1]
    assert candidates(8) == [1, 2, 4, 8]
    assert candidates(6) == [1, 2, 4, 6]


def test_a_cpu_like_runner_that_peaks_at_two_is_served_at_two() -> None:
    runner = CostedRunner({1: 0.25, 2: 0.26, 4: 0.58, 8: 1.3})  # the full UNet on two CPU cores
    tuned = tune_batch(runner, 1, (8, 8, 8), 8, clock=runner.clock)
    assert tuned.batch == 2
    assert tuned.rates[2] == pytest.approx(2 / 0.26)
    assert sorted(set(runner.sizes)) == [1, 2, 4, 8]


def test_a_gpu_like_runner_that_flattens_gets_the_smallest_batch_near_the_best() -> None:
    runner = CostedRunner({1: 0.010, 2: 0.011, 4: 0.013, 8: 0.0205, 16: 0.040})
    # windows/s: 100, 182, 308, 390, 400: 8 is within 5% of 16, so 8
    assert tune_batch(runner, 1, (8, 8, 8), 16, clock=runner.clock).batch == 8


def test_the_best_pass_counts_so_one_slow_pass_does_not_decide() -> None:
    runner = CostedRunner({1: 0.1, 2: 0.1})
    runner.cost = {1: 0.1, 2: 0.5}  # the first (warm-up and) pass: batch 2 looks slow
    original = runner.run

    def settle(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        out = original(batch)
        if len(runner.sizes) >= 4:
            runner.cost = {1: 0.1, 2: 0.1}  # warmed up: batch 2 costs as little as batch 1
        return out

    runner.run = settle  # type: ignore[method-assign]
    assert tune_batch(runner, 1, (4, 4, 4), 2, rounds=3, clock=runner.clock).batch == 2


@pytest.mark.parametrize(("cap", "rounds", "tolerance"), [(0, 3, 0.05), (4, 0, 0.05), (4, 3, 1.0)])
def test_bad_tuning_arguments_are_refused(cap: int, rounds: int, tolerance: float) -> None:
    with pytest.raises(ValueError):
        tune_batch(FakeRunner(), 1, (4, 4, 4), cap, rounds=rounds, tolerance=tolerance)


class SleepingRunner(CostedRunner):
    """`CostedRunner` on the real clock: every call sleeps its cost."""

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        time.sleep(self.cost[int(batch.shape[0])])
        return super().run(batch)


def test_a_host_with_tuning_on_serves_the_faster_batch_and_auto_leaves_cpu_runners_alone(
    tmp_path: Path,
) -> None:
    two_is_slow = {1: 0.02, 2: 0.1}  # 50 windows/s at batch 1, 20 at batch 2

    def tuned(folder: str, tuning: str) -> int:
        return served_batch(
            tmp_path / folder, lambda: SleepingRunner(two_is_slow), "cpu", batch_tuning=tuning
        )

    assert tuned("on", "on") == 1
    assert tuned("auto", "auto") == 2  # a CPU runner: the card's batch
    assert tuned("off", "off") == 2
