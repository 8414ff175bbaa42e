"""The outbound queue: results written to an outbox on disk, one queued delivery per (job, destination), and
one worker thread per destination that sends with exponential back-off, a retry limit, then dead-letter.

Survives a restart: the outbox files and the queue rows are durable; deliveries left 'sending' by a stopped
process are queued again at start-up (a re-send is an overwrite at the PACS: result UIDs are deterministic).
The worker polls the queue (so a `radai studies retry` from another process is picked up) and is woken at
once on enqueue.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from radai import metrics
from radai.audit import NO_AUDIT, Auditor, Event
from radai.config import DestinationSettings
from radai.domain import DeliveryRecord, DeliveryState
from radai.errors import RadaiError
from radai.outputs import KINDS, Output, OutputPlan, SegVariant, select
from radai.ports import Clock, DeliveryQueue, ResultSender

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt n (1-based) that fails is retried after min(max_seconds, initial_seconds * factor**(n-1));
    after max_attempts failures the delivery is dead."""

    max_attempts: int = 20
    initial_seconds: float = 2.0
    factor: float = 2.0
    max_seconds: float = 300.0

    @classmethod
    def from_settings(cls, dest: DestinationSettings) -> RetryPolicy:
        return cls(
            dest.max_attempts, dest.backoff_initial_seconds, dest.backoff_factor, dest.backoff_max_seconds
        )

    def delay(self, failed_attempts: int) -> float:
        exponent = max(0, failed_attempts - 1)
        # Capped before the power can overflow a float for large attempt numbers.
        if self.factor > 1.0 and exponent > 1000:
            return self.max_seconds
        return float(min(self.max_seconds, self.initial_seconds * self.factor**exponent))


class Outbox:
    """Result files of jobs waiting for delivery: `<root>/<job_id>/<index>-<Modality>.dcm`, written durably."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, job_id: str, datasets: Sequence[Dataset]) -> list[str]:
        if not job_id.isalnum():  # job ids are hex digests; never let anything else become a path
            raise ValueError(f"invalid job id {job_id!r}")
        folder = self.root / job_id
        folder.mkdir(parents=True, exist_ok=True)
        paths: list[str] = []
        for index, ds in enumerate(datasets):
            modality = "".join(c for c in str(ds.get("Modality", "OT")) if c.isalnum())[:16] or "OT"
            path = folder / f"{index:03d}-{modality}.dcm"
            tmp = path.with_suffix(".tmp")
            with tmp.open("wb") as fh:
                ds.save_as(fh, enforce_file_format=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            paths.append(str(path))
        _fsync_dir(folder)
        _fsync_dir(self.root)
        return paths

    @staticmethod
    def read(files: Sequence[str]) -> list[Dataset]:
        return [pydicom.dcmread(f) for f in files]

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plan_from_settings(dest: DestinationSettings) -> OutputPlan:
    """The destination's outputs, SEG type and empty-frame choice as an OutputPlan."""
    return OutputPlan(
        kinds=frozenset(k for k in KINDS if k in dest.outputs),
        seg=SegVariant(labelmap=dest.seg_type == "labelmap", keep_empty=dest.seg_empty_frames == "keep"),
    )


class DeliveryService:
    """Implements radai.ports.ResultDelivery on a DeliveryQueue (the job store) and one sender per destination."""

    def __init__(
        self,
        queue: DeliveryQueue,
        senders: Sequence[ResultSender],
        outbox: Outbox,
        policies: Mapping[str, RetryPolicy] | None = None,
        plans: Mapping[str, OutputPlan] | None = None,
        *,
        clock: Clock = time.time,
        poll_seconds: float = 0.5,
        audit: Auditor = NO_AUDIT,
        claim_lease_s: float | None = None,
    ) -> None:
        """`claim_lease_s` (scale-out, several processes on one queue): a delivery left 'sending' that long
        belongs to a process that died; it is queued again (checked at start and while idle). None: one
        process owns the queue, and everything left 'sending' is resumed at start."""
        self._lease = claim_lease_s
        self._next_sweep = 0.0
        self._queue = queue
        self._audit = audit
        self._senders = {s.name: s for s in senders}
        if len(self._senders) != len(senders):
            raise ValueError("destination names must be unique")
        self._outbox = outbox
        self._policies = {name: (policies or {}).get(name, RetryPolicy()) for name in self._senders}
        self._plans = {name: (plans or {}).get(name, OutputPlan()) for name in self._senders}
        self._clock = clock
        self._poll = poll_seconds
        self._files_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = {name: threading.Event() for name in self._senders}
        self._threads: list[threading.Thread] = []
        self._listeners: list[Callable[[str], None]] = []

    @property
    def destinations(self) -> tuple[str, ...]:
        return tuple(self._senders)

    @property
    def plans(self) -> Mapping[str, OutputPlan]:
        """What each destination gets."""
        return dict(self._plans)

    def add_listener(self, on_settled: Callable[[str], None]) -> None:
        """Called with a job id whenever one of its deliveries is acknowledged or dead-lettered."""
        self._listeners.append(on_settled)

    def submit(self, job_id: str, study_uid: str, outputs: Sequence[Output]) -> None:
        """Write the results to the outbox and queue one delivery per destination (once per pair, ever) with
        the outputs its plan wants; a destination that wants none of them gets no delivery."""
        if not self._senders:
            return
        keys = [o.key for o in outputs]
        with self._files_lock:
            files = self._outbox.write(job_id, [o.dataset for o in outputs])
            now = self._clock()
            for name in self._senders:
                chosen = [files[i] for i in select(keys, self._plans[name])]
                if not chosen:
                    log.info("job %s: nothing for %s (outputs %s)", job_id, name, ", ".join(keys))
                    continue
                state = self._queue.enqueue_delivery(job_id, study_uid, name, chosen, now)
                log.info("job %s: delivery to %s %s", job_id, name, state.value)
        for event in self._wake.values():
            event.set()

    def process_due(self, destination: str) -> DeliveryRecord | None:
        """One attempt of the oldest due delivery to `destination`; returns its record afterwards, or None."""
        now = self._clock()
        record = self._queue.claim_delivery(destination, now)
        if record is None:
            return None
        sender = self._senders[destination]
        policy = self._policies[destination]
        attempts = record.attempts + 1
        started = time.monotonic()
        error = ""
        try:
            sender.send(self._outbox.read(record.files))
        except (RadaiError, OSError, ValueError, InvalidDicomError) as exc:
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        except Exception as exc:  # a bug must become a failed attempt, never kill the worker
            log.exception("job %s: delivery to %s crashed", record.job_id, destination)
            error = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
        finished = self._clock()
        if not error:
            state, next_at, outcome = DeliveryState.DELIVERED, finished, "delivered"
        elif attempts >= policy.max_attempts:
            state, next_at, outcome = DeliveryState.DEAD, finished, "dead"
        else:
            state, next_at, outcome = DeliveryState.QUEUED, finished + policy.delay(attempts), "retry"
        metrics.DELIVERY_SECONDS.labels(destination=destination, outcome=outcome).observe(
            time.monotonic() - started
        )
        metrics.DELIVERIES.labels(destination=destination, outcome=outcome).inc()
        with self._files_lock:
            self._queue.update_delivery(record.job_id, destination, state, attempts, next_at, error, finished)
            if state is DeliveryState.DELIVERED:
                others = self._queue.deliveries_for_job(record.job_id)
                if all(d.state is DeliveryState.DELIVERED for d in others):
                    self._outbox.remove(record.job_id)
        if state is DeliveryState.DELIVERED:
            log.info("job %s: delivered to %s (attempt %d)", record.job_id, destination, attempts)
            self._audit(
                Event.RESULT_DELIVERED,
                "radai",
                record.job_id,
                "delivered",
                destination=destination,
                attempts=str(attempts),
                files=str(len(record.files)),
            )
        elif state is DeliveryState.DEAD:
            self._audit(
                Event.RESULT_DEAD_LETTERED,
                "radai",
                record.job_id,
                "dead",
                destination=destination,
                attempts=str(attempts),
                error=error,
            )
            log.warning(
                "job %s: delivery to %s dead-lettered after %d attempt(s): %s",
                record.job_id,
                destination,
                attempts,
                error,
            )
        else:
            log.warning(
                "job %s: delivery to %s failed (attempt %d/%d), next in %.1f s: %s",
                record.job_id,
                destination,
                attempts,
                policy.max_attempts,
                next_at - finished,
                error,
            )
        if state is not DeliveryState.QUEUED:
            for listener in self._listeners:
                listener(record.job_id)
        return DeliveryRecord(
            record.job_id,
            destination,
            record.study_uid,
            state,
            attempts,
            next_at,
            error,
            record.files,
            finished,
        )

    def refresh_gauges(self) -> None:
        for name in self._senders:
            pending = self._queue.count_deliveries(name, DeliveryState.QUEUED) + self._queue.count_deliveries(
                name, DeliveryState.SENDING
            )
            metrics.DELIVERIES_PENDING.labels(destination=name).set(pending)
            metrics.DELIVERIES_DEAD.labels(destination=name).set(
                self._queue.count_deliveries(name, DeliveryState.DEAD)
            )

    def resume(self) -> int:
        """Deliveries a stopped process left 'sending' are queued again; returns how many."""
        claimed_before = None if self._lease is None else self._clock() - self._lease
        resumed = self._queue.resume_deliveries(claimed_before)
        if resumed:
            log.info("resumed %d interrupted deliveries", resumed)
        return resumed

    def start(self) -> None:
        """Resume what a stopped process left, then one worker thread per destination."""
        self.resume()
        self.refresh_gauges()
        self._stop.clear()
        for name in self._senders:
            thread = threading.Thread(
                target=self._loop, args=(name,), name=f"radai-deliver-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the workers after their current attempt; what is queued stays queued for the next start."""
        self._stop.set()
        for event in self._wake.values():
            event.set()
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def _loop(self, destination: str) -> None:
        wake = self._wake[destination]
        while not self._stop.is_set():
            try:
                if self.process_due(destination) is not None:
                    continue
                self.refresh_gauges()
                if self._lease is not None and self._clock() >= self._next_sweep:
                    self._next_sweep = self._clock() + min(self._lease / 4, 60.0)
                    self.resume()  # another process's stale claims
            except Exception:  # the database busy or gone for a moment: keep the worker alive
                log.exception("delivery worker for %s: unexpected error", destination)
            wake.wait(self._poll)
            wake.clear()


class DestinationProbe:
    """C-ECHO of each destination for /readyz, cached for `ttl_seconds` so that /readyz stays cheap."""

    def __init__(
        self, senders: Sequence[ResultSender], ttl_seconds: float = 10.0, clock: Clock = time.monotonic
    ):
        self._senders = list(senders)
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, bool]] = {}

    def last(self, name: str) -> bool | None:
        """The cached result for `name`, without any network; None if never checked."""
        with self._lock:
            cached = self._cache.get(name)
        return None if cached is None else cached[1]

    def record(self, name: str, up: bool) -> None:
        """A fresh echo's result (the API's echo test), cached as if /readyz had checked it now."""
        with self._lock:
            self._cache[name] = (self._clock(), up)
        metrics.DESTINATION_UP.labels(destination=name).set(1 if up else 0)

    def checks(self) -> dict[str, bool]:
        out: dict[str, bool] = {}
        with self._lock:
            for sender in self._senders:
                cached = self._cache.get(sender.name)
                now = self._clock()
                if cached is None or now - cached[0] >= self._ttl:
                    up = sender.echo()
                    cached = (self._clock(), up)
                    self._cache[sender.name] = cached
                    metrics.DESTINATION_UP.labels(destination=sender.name).set(1 if up else 0)
                out[f"destination:{sender.name}"] = cached[1]
        return out
