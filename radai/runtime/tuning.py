"""The batch size at which a model runs fastest on its runner, measured when it loads.

A bigger batch is not always faster: on a GPU throughput rises until the device is full and then flattens; on
a CPU it often peaks at 2 or 4 windows and falls after (cache, threads). The card's `runtime.max_batch` (and the
memory budget, radai.runtime.memory) is the ceiling; this picks, below it, the smallest batch whose windows per
second are within `tolerance` of the best measured (a smaller batch: less waiting for it to fill, less memory).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from radai.ports import DeviceRunner, ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tuned:
    batch: int
    rates: dict[int, float]  # windows per second at each batch size tried (best pass)


def candidates(cap: int) -> list[int]:
    """1, 2, 4, ... up to `cap`, and `cap` itself."""
    sizes, n = [], 1
    while n < cap:
        sizes.append(n)
        n *= 2
    return [*sizes, cap]


def tune_batch(
    runner: ModelRunner,
    channels: int,
    window: tuple[int, ...],
    cap: int,
    *,
    rounds: int = 3,
    tolerance: float = 0.05,
    clock: Callable[[], float] = time.perf_counter,
) -> Tuned:
    """Time the runner on zero windows at each candidate size (one warm-up, then `rounds` interleaved passes;
    tensors on the runner's device where it takes them) and pick the batch."""
    if cap < 1 or rounds < 1 or not 0.0 <= tolerance < 1.0:
        raise ValueError(f"need cap >= 1, rounds >= 1, 0 <= tolerance < 1 (got {cap}, {rounds}, {tolerance})")
    sizes = candidates(cap)
    on_device = isinstance(runner, DeviceRunner) and runner.device.startswith("cuda")

    def run(n: int) -> None:
        if on_device and isinstance(runner, DeviceRunner):
            runner.run_tensor(torch.zeros((n, channels, *window), device=runner.device))
        else:
            runner.run(np.zeros((n, channels, *window), dtype=np.float32))

    for n in sizes:
        run(n)
    best: dict[int, float] = {}
    for _ in range(rounds):
        for n in sizes:
            start = clock()
            run(n)
            elapsed = clock() - start
            best[n] = min(best.get(n, elapsed), elapsed)
    rates = {n: n / max(best[n], 1e-9) for n in sizes}
    top = max(rates.values())
    batch = min(n for n in sizes if rates[n] >= (1.0 - tolerance) * top)
    return Tuned(batch, rates)


def tuned_batch(runner: ModelRunner, channels: int, window: tuple[int, ...], cap: int, name: str) -> int:
    """`tune_batch`'s choice, logged with the rates it measured."""
    tuned = tune_batch(runner, channels, window, cap)
    rates = ", ".join(f"{n}: {rate:.1f}/s" for n, rate in tuned.rates.items())
    log.info(
        "model %s: batch %d (of at most %d) runs fastest; windows per second %s",
        name,
        tuned.batch,
        cap,
        rates,
    )
    return tuned.batch
