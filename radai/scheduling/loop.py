"""Scheduler loop: worker threads per model pool the patches of every active job into batches.

Job threads call `Scheduler.infer` (numpy, on the host) or `Scheduler.infer_tensor` (torch tensors, on the
device path: the patches stay on the GPU), blocking; a worker asks `BatchPolicy` when a batch is due, runs it on
one of the model's runners (one per device, `in_flight` workers each) and hands each job its own rows back, in
the kind it gave. Every call is resolved exactly once: with its scores, or with `InferenceError` (runner
failure, out of memory even at batch 1, NaN, wrong shape, timeout, cancellation, shutdown).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from radai import metrics
from radai.domain import Priority
from radai.errors import InferenceError, InferenceTimeoutError, OutOfMemoryError
from radai.ports import DeviceRunner, ModelRunner
from radai.scheduling.calls import Call, Rows, all_finite, as_float32, concat, stack
from radai.scheduling.policy import Batch, BatchPolicy, PatchRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRecord:
    """What one executed batch looked like (passed to `on_batch`)."""

    model: str
    size: int
    job_ids: tuple[str, ...]
    waited_s: float  # how long the oldest patch in the batch waited in the queue
    run_s: float  # time inside the runner
    failed: bool = False  # the runner raised or returned an unusable shape


_Work = tuple[Call, int, Rows]  # (call, row in the call, patch)


class Scheduler:
    """Pools sliding-window patches of all active jobs of one model into batches on one worker thread."""

    def __init__(
        self,
        model: str,
        runner: ModelRunner | Sequence[ModelRunner],
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[BatchRecord], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        aging_s: float = 30.0,
        timeout_s: float | None = None,
        in_flight: int = 1,
        backend: str = "unknown",
        device_path: bool | None = None,
    ) -> None:
        """Several runners (one per GPU) share this model's queue, each serving `in_flight` batches at once
        (one worker thread each): on a GPU, 2 overlaps one batch's host-to-device copy and host work with the
        other's compute; on a CPU, 1 lets patches accumulate into full batches while the runner is busy.

        `device_path`: whether jobs keep their work on the runners' device as tensors (`device`); by default
        when every runner takes tensors (radai.ports.DeviceRunner) and they compute on CUDA."""
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self.model = model
        self._in_flight = in_flight
        self._runners: tuple[ModelRunner, ...] = tuple(runner) if isinstance(runner, Sequence) else (runner,)
        if not self._runners:
            raise ValueError("a scheduler needs at least one runner")
        self._policy = BatchPolicy(max_batch, max_wait_s, aging_s)
        self._devices = _job_devices(self._runners, device_path)
        # On the device path a batch is formed only once its runner is free (a STAT patch arriving meanwhile
        # waits for the running batch alone, not for one already formed behind it), and the rows of one batch
        # are handed out while the next runs. On the host path the workers stage batches in parallel.
        self._gates: tuple[AbstractContextManager[object], ...] = tuple(
            threading.Lock() if self._devices else contextlib.nullcontext() for _ in self._runners
        )
        self._next_device = 0
        self._timeout_s = timeout_s
        self._on_batch = on_batch
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: dict[PatchRef, _Work] = {}
        self._next_index = 0
        self._state = "new"  # new -> running -> stopped
        self._threads: list[threading.Thread] = []
        self._inflight: dict[int, tuple[Call, ...]] = {}  # worker index -> the calls of its running batch
        self._m_size = metrics.BATCH_SIZE.labels(model=model)
        self._m_jobs = metrics.BATCH_JOBS.labels(model=model)
        self._m_run = metrics.BATCH_SECONDS.labels(model=model)
        self._m_backend = metrics.INFERENCE_SECONDS.labels(backend=backend)
        self._m_wait = metrics.BATCH_WAIT_SECONDS.labels(model=model)
        self._m_depth = metrics.QUEUE_DEPTH.labels(model=model)
        self._m_limit = metrics.BATCH_LIMIT.labels(model=model)
        self._m_limit.set(max_batch)

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices jobs of this model work on (tensors, `infer_tensor`); empty: on the host (`infer`)."""
        return self._devices

    def job_device(self) -> str | None:
        """Where a new job prepares, cuts and blends: the runners' devices in turn, so that with several GPUs
        each holds its share of the jobs' work; None: on the host as numpy arrays."""
        if not self._devices:
            return None
        with self._cond:
            self._next_device += 1
            return self._devices[(self._next_device - 1) % len(self._devices)]

    @property
    def max_batch(self) -> int:
        """The size at which a batch closes now (lowered after an out-of-memory split)."""
        with self._cond:
            return self._policy.max_batch

    @property
    def depth(self) -> int:
        """Patches queued, not yet in a batch."""
        with self._cond:
            return self._policy.depth

    def start(self) -> None:
        """Start the worker thread (daemon, named after the model)."""
        with self._cond:
            if self._state != "new":
                raise RuntimeError(f"scheduler for model {self.model} was already started")
            self._state = "running"
            self._threads = [
                threading.Thread(
                    target=self._serve, args=(i,), name=f"radai-scheduler-{self.model}-{i}", daemon=True
                )
                for i in range(self._in_flight * len(self._runners))
            ]
            for thread in self._threads:
                thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fail every queued call with InferenceError, let the running batch finish (up to `timeout_s`,
        after which its callers fail too) and end the worker. The runner is not closed: its owner does."""
        with self._cond:
            if self._state == "stopped":
                return
            self._state = "stopped"
            queued = dict.fromkeys(call for call, _, _ in self._pending.values())
            for job_id in {ref.job_id for ref in self._pending}:
                self._policy.cancel(job_id)
            self._pending.clear()
            self._m_depth.set(0)
            self._cond.notify_all()
        for call in queued:
            call.fail(f"scheduler for model {self.model} stopped before the patches ran", None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.0))
                if thread.is_alive():
                    log.warning("model %s: batch still running after %.1f s at stop", self.model, timeout_s)
        with self._cond:
            inflight = [call for calls in self._inflight.values() for call in calls]
        for call in inflight:
            call.fail(f"scheduler for model {self.model} stopped while the batch was running", None)

    def cancel(self, job_id: str) -> int:
        """Drop a job's queued patches and fail its waiting calls; returns how many patches were dropped."""
        with self._cond:
            refs = self._policy.cancel(job_id)
            calls = dict.fromkeys(self._pending.pop(ref)[0] for ref in refs)
            self._m_depth.set(self._policy.depth)
        for call in calls:
            call.fail(f"job {job_id} cancelled", None)
        return len(refs)

    def infer(
        self, job_id: str, patches: NDArray[np.float32], priority: Priority = Priority.ROUTINE
    ) -> NDArray[np.float32]:
        """Score `patches` (n, C, *patch) -> (n, K, *patch), blocking until every patch has run.

        The patches may be split over several batches and share them with other jobs' patches.
        Raises InferenceError if the runner fails on one of those batches or returns unusable scores.
        """
        out = self._submit(job_id, np.ascontiguousarray(patches, dtype=np.float32), priority)
        if not isinstance(out, np.ndarray):  # unreachable: a call answers in the kind it was given
            raise InferenceError("internal error: scores of a numpy call came back as a tensor")
        return out

    def infer_tensor(
        self, job_id: str, patches: torch.Tensor, priority: Priority = Priority.ROUTINE
    ) -> torch.Tensor:
        """As `infer`, for a tensor: the scores come back as a float32 tensor on the patches' device (on the
        device path no row leaves the GPU)."""
        out = self._submit(job_id, patches.to(torch.float32), priority)
        if not isinstance(out, torch.Tensor):  # unreachable: a call answers in the kind it was given
            raise InferenceError("internal error: scores of a tensor call came back as numpy")
        return out

    def _submit(self, job_id: str, batch: Rows, priority: Priority) -> Rows:
        if batch.ndim < 3 or batch.shape[0] == 0:
            raise ValueError(f"patches must be (n >= 1, C, *spatial), got shape {tuple(batch.shape)}")
        call = Call(job_id, batch)
        with self._cond:
            if self._state != "running":
                raise InferenceError(f"scheduler for model {self.model} is not running")
            now = self._clock()
            for row in range(int(batch.shape[0])):
                ref = PatchRef(job_id, self._next_index)
                self._next_index += 1
                self._pending[ref] = (call, row, batch[row])
                self._policy.submit(ref, now, priority)
            self._m_depth.set(self._policy.depth)
            self._cond.notify_all()
        return call.wait()

    # -- worker thread -------------------------------------------------------------------------------------

    def _serve(self, worker: int) -> None:
        runner = self._runners[worker // self._in_flight]
        gate = self._gates[worker // self._in_flight]
        while True:
            work: list[_Work] = []
            try:
                with gate:
                    with self._cond:
                        batch = self._next_batch()
                        if batch is None:
                            return
                        work = [self._pending.pop(ref) for ref in batch.items]
                        work = [w for w in work if not w[0].done]  # calls that failed already: skip them
                        self._inflight[worker] = tuple(dict.fromkeys(call for call, _, _ in work))
                        self._m_depth.set(self._policy.depth)
                    ran = self._execute(work, runner) if work else None
                if ran is not None:
                    self._finish(batch, work, *ran)
            except Exception as exc:  # never let the worker die: fail this batch and go on
                log.exception("model %s: scheduler error", self.model)
                for call, _, _ in work:
                    call.fail(f"scheduler error on model {self.model}: {exc}", exc)
            finally:
                with self._cond:
                    self._inflight.pop(worker, None)

    def _next_batch(self) -> Batch | None:
        """Wait (holding the condition) until the policy closes a batch; None once stopped."""
        while self._state == "running":
            now = self._clock()
            batch = self._policy.next_batch(now)
            if batch is not None:
                return batch
            deadline = self._policy.deadline()
            self._cond.wait(None if deadline is None else max(deadline - now, 0.0))
        return None

    def _execute(self, work: list[_Work], runner: ModelRunner) -> tuple[Rows | None, float, float]:
        """Run one batch: (its scores, or None when it failed and its calls were failed; start; seconds)."""
        x = stack([patch for _, _, patch in work], _runner_device(runner))
        started = self._clock()
        scores: Rows | None = None
        try:
            scores = self._infer(x, runner)
        except Exception as exc:
            calls = dict.fromkeys(call for call, _, _ in work)
            reason = str(exc) if isinstance(exc, InferenceError) else f"{type(exc).__name__}: {exc}"
            log.warning(
                "model %s: batch of %d patches from jobs %s failed: %s",
                self.model,
                len(work),
                ",".join(dict.fromkeys(call.job_id for call in calls)),
                reason,
            )
            message = f"inference failed for model {self.model}: {reason}"
            for call in calls:
                call.fail(message, exc)
        return scores, started, self._clock() - started

    def _finish(
        self, batch: Batch, work: list[_Work], scores: Rows | None, started: float, run_s: float
    ) -> None:
        """Hand each job its rows and record the batch (after the runner is free for the next one)."""
        job_ids = tuple(dict.fromkeys(call.job_id for call, _, _ in work))
        if scores is not None:
            self._deliver(work, scores)
        waited_s = started - batch.oldest_enqueued_at
        record = BatchRecord(self.model, len(work), job_ids, waited_s, run_s, failed=scores is None)
        self._m_size.observe(record.size)
        self._m_jobs.observe(len(job_ids))
        self._m_run.observe(run_s)
        self._m_backend.observe(run_s)
        self._m_wait.observe(max(record.waited_s, 0.0))
        if self._on_batch is not None:
            try:
                self._on_batch(record)
            except Exception:
                log.exception("model %s: on_batch callback failed", self.model)

    def _infer(self, x: Rows, runner: ModelRunner) -> Rows:
        """Run a batch; on out-of-memory split it in halves (recursively) and cap later batches at the size
        that fits, so one too-large batch costs a retry, not the jobs in it."""
        try:
            return self._check_shape(self._call_runner(x, runner), tuple(x.shape))
        except OutOfMemoryError:
            n = int(x.shape[0])
            if n == 1:
                raise
            half = n // 2
            self._policy.limit(half)
            self._m_limit.set(self._policy.max_batch)
            log.warning(
                "model %s: out of memory at batch %d; splitting it and capping batches at %d",
                self.model,
                n,
                self._policy.max_batch,
            )
            return concat([self._infer(x[:half], runner), self._infer(x[half:], runner)])

    def _call_runner(self, x: Rows, runner: ModelRunner) -> Rows:
        """The runner on `x` (a tensor through `run_tensor`), given up after `timeout_s`: the call runs on its
        own daemon thread, so a hung device fails its batch's jobs and the worker goes on with the next batch."""

        def run() -> Rows:
            if isinstance(x, np.ndarray):
                return as_float32(runner.run(x))
            if not isinstance(runner, DeviceRunner):  # stack() gives tensors only to runners that take them
                raise InferenceError(f"model {self.model}: its runner takes no tensors")
            return as_float32(runner.run_tensor(x))

        if self._timeout_s is None:
            return run()
        box: list[Rows | BaseException] = []
        done = threading.Event()

        def call() -> None:
            try:
                box.append(run())
            except BaseException as exc:
                box.append(exc)
            finally:
                done.set()

        threading.Thread(target=call, name=f"radai-run-{self.model}", daemon=True).start()
        if not done.wait(self._timeout_s):
            raise InferenceTimeoutError(
                f"model {self.model}: batch of {x.shape[0]} did not return within {self._timeout_s:g} s"
            )
        (result,) = box
        if isinstance(result, BaseException):
            raise result
        return result

    def _check_shape(self, out: Rows, in_shape: tuple[int, ...]) -> Rows:
        scores = as_float32(out)
        if (
            scores.ndim != len(in_shape)
            or scores.shape[0] != in_shape[0]
            or tuple(scores.shape[2:]) != in_shape[2:]
            or scores.shape[1] < 1
        ):
            raise InferenceError(
                f"model {self.model} returned shape {tuple(scores.shape)} for input {in_shape}, "
                "expected (N, K, *spatial of the input)"
            )
        return scores

    def _deliver(self, work: list[_Work], scores: Rows) -> None:
        """Give each call its rows; a call whose rows hold NaN/inf fails alone (its input, not the batch)."""
        by_call: dict[Call, tuple[list[int], list[int]]] = {}
        for position, (call, row, _) in enumerate(work):
            positions, rows = by_call.setdefault(call, ([], []))
            positions.append(position)
            rows.append(row)
        for call, (positions, rows) in by_call.items():
            mine = scores[positions] if isinstance(scores, np.ndarray) else scores[torch.as_tensor(positions)]
            if not all_finite(mine):
                call.fail(f"model {self.model} returned non-finite scores (NaN or inf)", None)
            else:
                call.fill(rows, mine)


def _runner_device(runner: ModelRunner) -> str | None:
    return runner.device if isinstance(runner, DeviceRunner) else None


def _job_devices(runners: Sequence[ModelRunner], device_path: bool | None) -> tuple[str, ...]:
    """The devices jobs work on: the runners' own when they all take tensors (and, by default, on CUDA)."""
    takes_tensors = all(isinstance(r, DeviceRunner) for r in runners)
    if device_path and not takes_tensors:
        raise ValueError("device_path needs runners that take tensors (radai.ports.DeviceRunner)")
    if not takes_tensors or device_path is False:
        return ()
    devices = tuple(dict.fromkeys(d for d in (_runner_device(r) for r in runners) if d is not None))
    if device_path is None and not all(d.startswith("cuda") for d in devices):
        return ()
    return devices
