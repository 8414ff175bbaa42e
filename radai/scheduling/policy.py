"""Batching policy: a synchronous state machine with the clock passed in.

Patches from every active job of one model queue here; `next_batch` decides when a batch closes and which
patches it holds. Nothing here reads a clock, sleeps or starts a thread (like Ray Serve's `@serve.batch` and
vLLM's scheduler), so a list of `(time, event)` pairs drives it in tests.

Rules:
- a batch closes as soon as `max_batch` patches are queued, or once the oldest queued patch has waited
  `max_wait_s` (the wait is bounded from the first queued patch, not reset by later arrivals); a STAT patch
  does not wait at all: the next batch closes as soon as one is queued;
- each job has a priority lane (STAT, routine, background). Patches are taken lane by lane, the best lane
  first; a job's lane improves by one for every `aging_s` its oldest queued patch has waited, so background
  work is never starved by a steady stream of routine studies;
- within a lane, jobs take turns in order of their first arrival: a turn is up to `max_batch` consecutive
  patches of one job (a turn cut short by a full batch goes on in the next one), then the job moves to the
  back of the rotation, so a large study never starves a small one and a batch that one job cannot fill is
  filled with the next jobs' patches; within one job, first in, first out.

Why turns and not one patch per job in rotation: a job's call (`sw_batch_size` windows, radai.pipeline) then
runs in one batch instead of being spread over many, so each study gets its scores back after one batch and
blends them while the device runs the next study's batch, instead of every study waiting for the last batch
and then blending at once beside an idle device.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass

from radai.domain import Priority


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
    """Per-model queue of patch references that closes batches by size, by the oldest patch's wait, or at once
    for STAT patches, and fills them lane by lane with aging."""

    def __init__(self, max_batch: int, max_wait_s: float, aging_s: float = 30.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not max_wait_s >= 0.0:  # also refuses NaN
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if not aging_s > 0.0:
            raise ValueError(f"aging_s must be > 0, got {aging_s}")
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._aging_s = aging_s
        # Rotation order of the jobs with queued patches: a served job moves to the back. A job enters at the
        # back when its first patch arrives and leaves when it has none queued.
        self._queues: OrderedDict[str, deque[tuple[PatchRef, float]]] = OrderedDict()
        self._lanes: dict[str, Priority] = {}
        self._turns: dict[str, int] = {}  # patches taken in a turn that a full batch cut short
        self._depth = 0

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def limit(self, max_batch: int) -> None:
        """Lower the batch size from now on (e.g. after the device ran out of memory); never below 1."""
        self._max_batch = max(1, min(self._max_batch, max_batch))

    @property
    def max_wait_s(self) -> float:
        return self._max_wait_s

    @property
    def depth(self) -> int:
        """Patches queued and not yet handed out in a batch."""
        return self._depth

    def submit(self, ref: PatchRef, now: float, priority: Priority = Priority.ROUTINE) -> None:
        """Queue one patch that arrived at time `now`; a job keeps the lane its first queued patch gave it,
        unless a later patch asks for a better one."""
        queue = self._queues.get(ref.job_id)
        if queue is None:
            queue = self._queues[ref.job_id] = deque()
            self._lanes[ref.job_id] = priority
        elif priority.rank < self._lanes[ref.job_id].rank:
            self._lanes[ref.job_id] = priority
        queue.append((ref, now))
        self._depth += 1

    def lane(self, job_id: str, now: float) -> int:
        """The job's effective lane at `now` (0 = STAT): its own, improved by one per `aging_s` of waiting."""
        queue = self._queues.get(job_id)
        base = self._lanes.get(job_id, Priority.ROUTINE).rank
        if not queue:
            return base
        waited = max(now - queue[0][1], 0.0)
        return max(base - math.floor(waited / self._aging_s), 0)

    def oldest_enqueued_at(self) -> float | None:
        """Enqueue time of the oldest queued patch (the front of some job's FIFO), None if empty."""
        if not self._queues:
            return None
        return min(queue[0][1] for queue in self._queues.values())

    def deadline(self) -> float | None:
        """When `next_batch` closes a partial batch: the earliest of each job's oldest patch + max_wait (+ 0
        for a STAT job); None if nothing is queued."""
        if not self._queues:
            return None
        return min(
            queue[0][1] + (0.0 if self._lanes[job] is Priority.STAT else self._max_wait_s)
            for job, queue in self._queues.items()
        )

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
        by_lane: dict[int, list[str]] = {}
        for job in self._queues:  # rotation order
            by_lane.setdefault(self.lane(job, now), []).append(job)
        for lane in sorted(by_lane):
            for job in by_lane[lane]:
                self._take_turn(job, taken)
                if len(taken) >= self._max_batch:
                    break
            if len(taken) >= self._max_batch:
                break
        self._depth -= len(taken)
        return Batch(items=tuple(ref for ref, _ in taken), oldest_enqueued_at=min(t for _, t in taken))

    def _take_turn(self, job: str, taken: list[tuple[PatchRef, float]]) -> None:
        """Move the job's next patches of its turn into `taken`, and its place in the rotation on."""
        queue = self._queues[job]
        used = self._turns.pop(job, 0)
        n = max(min(self._max_batch - len(taken), self._max_batch - used, len(queue)), 0)
        taken.extend(queue.popleft() for _ in range(n))
        used += n
        if not queue:
            del self._queues[job]
            del self._lanes[job]
        elif used >= self._max_batch:
            self._queues.move_to_end(job)  # its turn is over
        else:
            self._turns[job] = used  # the batch filled up mid-turn: the turn goes on in the next batch

    def cancel(self, job_id: str) -> list[PatchRef]:
        """Drop every queued patch of a job; return them in their queue order."""
        queue = self._queues.pop(job_id, None)
        self._lanes.pop(job_id, None)
        self._turns.pop(job_id, None)
        if queue is None:
            return []
        self._depth -= len(queue)
        return [ref for ref, _ in queue]
