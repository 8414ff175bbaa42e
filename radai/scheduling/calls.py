"""One `Scheduler.infer` call and the rows it hands in: numpy arrays on the host, or torch tensors on a device.

A batch may hold rows of both kinds (jobs on the host path beside jobs on the device path); `stack` brings
them to one kind for the runner, and each call gets its rows back in the kind, and on the device, it gave.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from radai.errors import InferenceError

Rows = NDArray[np.float32] | torch.Tensor


def stack(patches: Sequence[Rows], device: str | None) -> Rows:
    """One batch from single patches: numpy when every patch is numpy, else a float32 tensor on `device`
    (the runner's; None keeps the first tensor's device)."""
    if all(isinstance(p, np.ndarray) for p in patches):
        return np.stack([np.asarray(p, dtype=np.float32) for p in patches])
    first = next(p for p in patches if isinstance(p, torch.Tensor))
    target = torch.device(device) if device is not None else first.device
    return torch.stack([torch.as_tensor(p).to(target, torch.float32) for p in patches])


def concat(parts: Sequence[Rows]) -> Rows:
    """Batches split for an out-of-memory retry, joined again."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    device = next(p.device for p in parts if isinstance(p, torch.Tensor))
    return torch.cat([torch.as_tensor(p).to(device) for p in parts])


def all_finite(scores: Rows) -> bool:
    if isinstance(scores, torch.Tensor):
        return bool(torch.isfinite(scores).all().item())
    return bool(np.isfinite(scores).all())


def as_float32(scores: object) -> Rows:
    """A runner's answer as float32 rows (a tensor stays a tensor, anything else becomes numpy)."""
    if isinstance(scores, torch.Tensor):
        return scores if scores.dtype == torch.float32 else scores.float()
    return np.asarray(scores, dtype=np.float32)


class Call:
    """One `infer` call: resolved once, with every row filled or with the first error. Its scores come back
    as numpy when the patches were numpy, as a tensor on the patches' device when they were a tensor."""

    def __init__(self, job_id: str, patches: Rows) -> None:
        self.job_id = job_id
        self._n = int(patches.shape[0])
        self._spatial = tuple(int(s) for s in patches.shape[2:])
        self._device: torch.device | None = patches.device if isinstance(patches, torch.Tensor) else None
        self._remaining = self._n
        self._out: Rows | None = None
        self._error: str | None = None
        self._cause: BaseException | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _mine(self, scores: Rows) -> Rows:
        if self._device is None:
            if isinstance(scores, torch.Tensor):
                return np.asarray(scores.detach().cpu().numpy(), dtype=np.float32)
            return scores
        if isinstance(scores, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(scores)).to(self._device)
        return scores.to(self._device)

    def fill(self, rows: Sequence[int], scores: Rows) -> None:
        mine = self._mine(scores)
        with self._lock:
            if self._done.is_set():
                return
            if self._out is None:
                shape = (self._n, int(mine.shape[1]), *self._spatial)
                if isinstance(mine, torch.Tensor):
                    self._out = torch.empty(shape, dtype=torch.float32, device=mine.device)
                else:
                    self._out = np.empty(shape, dtype=np.float32)
            elif self._out.shape[1] != mine.shape[1]:
                self._resolve_error(
                    f"model returned {mine.shape[1]} channels, earlier batches {self._out.shape[1]}", None
                )
                return
            if isinstance(self._out, torch.Tensor):
                self._out[torch.as_tensor(list(rows), device=self._out.device)] = torch.as_tensor(mine)
            else:
                self._out[list(rows)] = np.asarray(mine)
            self._remaining -= len(rows)
            if self._remaining == 0:
                self._done.set()

    def fail(self, message: str, cause: BaseException | None) -> None:
        with self._lock:
            if not self._done.is_set():
                self._resolve_error(message, cause)

    def _resolve_error(self, message: str, cause: BaseException | None) -> None:
        self._error, self._cause, self._out = message, cause, None
        self._done.set()

    def wait(self) -> Rows:
        self._done.wait()
        if self._error is not None:
            raise InferenceError(self._error) from self._cause
        if self._out is None:  # unreachable: done without error means every row was filled
            raise InferenceError("internal error: call resolved without scores")
        return self._out
