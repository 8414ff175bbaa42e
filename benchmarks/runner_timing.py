"""Timing a model runner: busy spans, the raw-throughput sweep, the machine's load while a benchmark runs.

Used by benchmarks.throughput; any benchmark that needs "how busy was the device" or "what can the runtime do
at its best batch size" can take them as they are.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from radai.ports import DeviceRunner, ModelRunner

Array = NDArray[np.float32]


class BusyRunner:
    """A ModelRunner wrapper recording when the real runner was executing (for the busy fraction)."""

    def __init__(self, inner: ModelRunner) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self.spans: list[tuple[float, float, int]] = []  # (start, end, patches)

    def run(self, batch: Array) -> Array:
        start = time.perf_counter()
        out = self.inner.run(batch)
        end = time.perf_counter()
        with self._lock:
            self.spans.append((start, end, int(batch.shape[0])))
        return out

    @property
    def device(self) -> str:
        """The inner runner's device (radai.ports.DeviceRunner), `cpu` for runners that take no tensors."""
        return self.inner.device if isinstance(self.inner, DeviceRunner) else "cpu"

    def run_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.inner, DeviceRunner):
            raise TypeError(f"{type(self.inner).__name__} takes no tensors")
        start = time.perf_counter()
        out = self.inner.run_tensor(batch)  # returns once the scores are complete on the device
        end = time.perf_counter()
        with self._lock:
            self.spans.append((start, end, int(batch.shape[0])))
        return out

    def close(self) -> None:
        self.inner.close()

    def take(self) -> list[tuple[float, float, int]]:
        with self._lock:
            spans, self.spans = self.spans, []
        return spans


def busy_fraction(spans: Sequence[tuple[float, float, int]], t0: float, t1: float) -> float:
    """Share of [t0, t1] covered by the union of the spans."""
    covered, reach = 0.0, t0
    for start, end, _ in sorted(spans):
        start, end = max(start, reach), min(end, t1)
        if end > start:
            covered += end - start
            reach = end
    return covered / (t1 - t0) if t1 > t0 else 0.0


def limit_sweep(
    runner: BusyRunner, patch: int, batches: Sequence[int], rounds: int, device: str | None = None
) -> dict[int, list[float]]:
    """Raw runner seconds per call on random patches for each batch size: a warm-up, then `rounds` passes
    over every batch size (interleaved, so a burst of load from elsewhere does not hit one size only). With
    `device`, the patches lie there already and go through `run_tensor` (what the device path feeds it)."""
    rng = np.random.default_rng(2)
    xs = {b: rng.random((b, 1, patch, patch, patch), dtype=np.float32) for b in batches}
    tensors = {b: torch.from_numpy(x).to(device) for b, x in xs.items()} if device is not None else {}

    def run(b: int) -> None:
        if device is None:
            runner.run(xs[b])
        else:
            runner.run_tensor(tensors[b])

    for b in batches:
        run(b)
    times: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(rounds):
        for b in batches:
            t = time.perf_counter()
            run(b)
            times[b].append(time.perf_counter() - t)
    return times


def limit_rows(before: dict[int, list[float]], after: dict[int, list[float]]) -> list[dict[str, float]]:
    """Per batch size: patches/s of the best pass (the limit the brief asks for) and of the median pass (the
    typical rate on a shared machine), over the passes of both sweeps."""
    rows = []
    for b in before:
        both = before[b] + after[b]
        rows.append(
            {
                "batch": b,
                "best_patches_per_s": round(b / min(both), 2),
                "median_patches_per_s": round(b / statistics.median(both), 2),
                "best_before": round(b / min(before[b]), 2),
                "best_after": round(b / min(after[b]), 2),
            }
        )
    return rows


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation, as numpy)."""
    return float(np.percentile(np.asarray(values), q))


class LoadSampler:
    """Samples the 1-minute load average every few seconds on a daemon thread while the benchmark runs."""

    def __init__(self, every_s: float = 5.0) -> None:
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), name="loadavg", daemon=True)
        self._thread.start()

    def _loop(self, every_s: float) -> None:
        while True:
            self._samples.append(os.getloadavg()[0])
            if self._stop.wait(every_s):
                return

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"mean": round(statistics.fmean(self._samples), 2), "max": round(max(self._samples), 2)}
