"""A deterministic stand-in for a model on a GPU, for tests and demos without weights.

Scores are a one-hot of the input intensity (mean over input channels) quantised into `output_channels`
equal bins of [0, 1]: with two channels, class 1 where x >= 0.5. The function is voxel-wise, so sliding-window
stitching reproduces it exactly. Non-finite inputs give NaN scores, as a real network would.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from numpy.typing import NDArray

from radai.errors import OutOfMemoryError
from radai.runtime.memory import MemoryUse


class FakeRunner:
    """Implements radai.ports.DeviceRunner without a model file (on the CPU: `run_tensor` scores a tensor
    through `run` and answers on `device`)."""

    device = "cpu"

    def __init__(
        self,
        output_channels: int = 2,
        *,
        delay_s: float = 0.0,
        poison: float | None = None,
        memory_patches: int | None = None,
        hang_on: float | None = None,
        memory: MemoryUse | None = None,
    ) -> None:
        """`delay_s` sleeps in every run (a slow GPU); a batch containing the value `poison` raises; a batch
        of more than `memory_patches` patches raises OutOfMemoryError (a small GPU); a batch containing the
        value `hang_on` never returns until `release()` (a hung device); `memory` is what `memory_use` reports
        (a GPU that measured the model)."""
        if output_channels < 1:
            raise ValueError(f"output_channels must be >= 1, got {output_channels}")
        self.output_channels = output_channels
        self.delay_s = delay_s
        self.poison = poison
        self.memory_patches = memory_patches
        self.hang_on = hang_on
        self.memory = memory
        self._released = threading.Event()
        self.calls: list[int] = []  # batch size of every run, in call order
        self.tensor_calls = 0  # how many of them came through run_tensor
        self.closed = False
        self._lock = threading.Lock()

    def expected(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """The scores `run` returns for `batch` (the reference for tests)."""
        x = np.asarray(batch, dtype=np.float32).mean(axis=1)
        finite = np.isfinite(x)
        k = self.output_channels
        labels = np.clip(np.floor(np.where(finite, x, 0.0) * k), 0, k - 1).astype(np.int64)
        scores = (labels[:, None] == np.arange(k).reshape((1, k) + (1,) * (x.ndim - 1))).astype(np.float32)
        return np.where(finite[:, None], scores, np.float32(np.nan)).astype(np.float32)

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        if self.closed:
            raise RuntimeError("fake runner is closed")
        if batch.ndim < 3:
            raise ValueError(f"fake runner expects (N, C, *spatial), got shape {batch.shape}")
        with self._lock:
            self.calls.append(int(batch.shape[0]))
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        if self.poison is not None and bool(np.any(batch == self.poison)):
            raise RuntimeError("fake runner: poisoned input")
        if self.memory_patches is not None and batch.shape[0] > self.memory_patches:
            raise OutOfMemoryError(f"fake runner: {batch.shape[0]} patches do not fit in device memory")
        if self.hang_on is not None and bool(np.any(batch == self.hang_on)):
            self._released.wait()
            raise RuntimeError("fake runner: released after hanging")
        return self.expected(batch)

    def run_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.tensor_calls += 1
        scores = self.run(np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32))
        return torch.from_numpy(scores).to(self.device)

    def memory_use(self, window: tuple[int, ...]) -> MemoryUse | None:
        return self.memory

    def release(self) -> None:
        """Let hung calls return (with an error)."""
        self._released.set()

    def close(self) -> None:
        self.closed = True
