"""Batching policy: a synchronous state machine with the clock passed in.

Patches from every active job of one model queue here; `next_batch` decides when a batch closes and which
patches it holds. Nothing here reads a clock, sleeps or starts a thread (like Ray Serve's `@serve.batch` and
vLLM's scheduler), so a list of `(time, event)` pairs drives it in tests.

Rules:
- a batch closes as soon as `max_batch` patches are queued, or once the oldest queued patch has waited
  `max_wait_s` (the wait is bounded from the first queued patch, not reset by later arrivals);
- patches are taken round-robin across jobs, starting in order of each job's first arrival and rotating
  from one batch to the next, so a large study never starves a small one and concurrent jobs share batches;
- within one job, first in, first out.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class PatchRef:
    """Identity of one queued patch; the payload stays with the caller."""

    job_id: str
    index: int


@dataclass(frozen=True)
class Batch:
    """Patches chosen to run together, in the order they go into the batch tensor."""

    items: tuple[PatchRef, ...]
    oldest_enqueued_at: float  # enqueue time of the oldest patch in this batch

    @property
    def job_ids(self) -> tuple[str, ...]:
        """Distinct job ids, in order of first appearance in the batch."""
        return tuple(dict.fromkeys(ref.job_id for ref in self.items))

    def __len__(self) -> int:
        return len(self.items)


class BatchPolicy:
    """Per-model queue of patch references that closes batches by size or by the oldest patch's wait."""

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not max_wait_s >= 0.0:  # also refuses NaN
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        # Rotation order of the jobs with queued patches: the front job gives the next patch, then moves to
        # the back. A job enters at the back when its first patch arrives and leaves when it has none queued.
        self._queues: OrderedDict[str, deque[tuple[PatchRef, float]]] = OrderedDict()
        self._depth = 0

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def max_wait_s(self) -> float:
        return self._max_wait_s

    @property
    def depth(self) -> int:
        """Patches queued and not yet handed out in a batch."""
        return self._depth

    def submit(self, ref: PatchRef, now: float) -> None:
        """Queue one patch that arrived at time `now`."""
        queue = self._queues.get(ref.job_id)
        if queue is None:
            queue = self._queues[ref.job_id] = deque()
        queue.append((ref, now))
        self._depth += 1

    def oldest_enqueued_at(self) -> float | None:
        """Enqueue time of the oldest queued patch (the front of some job's FIFO), None if empty."""
        if not self._queues:
            return None
        return min(queue[0][1] for queue in self._queues.values())

    def deadline(self) -> float | None:
        """When `next_batch` closes a partial batch (oldest enqueue + max_wait); None if nothing is queued."""
        oldest = self.oldest_enqueued_at()
        return None if oldest is None else oldest + self._max_wait_s

    def ready(self, now: float) -> bool:
        """Whether `next_batch(now)` would return a batch."""
        if self._depth >= self._max_batch:
            return True
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def next_batch(self, now: float) -> Batch | None:
        """Close and return a batch if one is due at `now`, else None."""
        if not self.ready(now):
            return None
        taken: list[tuple[PatchRef, float]] = []
        while len(taken) < self._max_batch and self._queues:
            job_id, queue = next(iter(self._queues.items()))
            taken.append(queue.popleft())
            if queue:
                self._queues.move_to_end(job_id)
            else:
                del self._queues[job_id]
        self._depth -= len(taken)
        return Batch(items=tuple(ref for ref, _ in taken), oldest_enqueued_at=min(t for _, t in taken))

    def cancel(self, job_id: str) -> list[PatchRef]:
        """Drop every queued patch of a job; return them in their queue order."""
        queue = self._queues.pop(job_id, None)
        if queue is None:
            return []
        self._depth -= len(queue)
        return [ref for ref, _ in queue]
