"""BatchPolicy driven by explicit (time, event) sequences: no clock, no threads."""

from __future__ import annotations

import pytest

from radai.domain import Priority
from radai.scheduling.policy import Batch, BatchPolicy, PatchRef


def refs(job: str, n: int, start: int = 0) -> list[PatchRef]:
    return [PatchRef(job, i) for i in range(start, start + n)]


def labels(batch: Batch | None) -> list[str]:
    if batch is None:
        return []
    return [f"{r.job_id}{r.index}" for r in batch.items]


def test_full_batch_closes_immediately_when_max_batch_patches_are_queued() -> None:
    policy = BatchPolicy(max_batch=4, max_wait_s=10.0)
    for ref in refs("A", 3):
        policy.submit(ref, now=0.0)
    assert policy.next_batch(now=0.0) is None
    policy.submit(PatchRef("A", 3), now=0.001)
    batch = policy.next_batch(now=0.001)
    assert labels(batch) == ["A0", "A1", "A2", "A3"]
    assert policy.depth == 0


def test_partial_batch_closes_exactly_at_first_queued_plus_max_wait() -> None:
    policy = BatchPolicy(max_batch=8, max_wait_s=0.5)
    policy.submit(PatchRef("A", 0), now=1.0)
    policy.submit(PatchRef("A", 1), now=1.3)  # later arrivals do not push the deadline back
    assert policy.deadline() == pytest.approx(1.5)
    assert policy.next_batch(now=1.0) is None
    assert policy.next_batch(now=1.4999) is None
    batch = policy.next_batch(now=1.5)
    assert batch is not None
    assert labels(batch) == ["A0", "A1"]
    assert batch.oldest_enqueued_at == 1.0


def test_jobs_take_turns_of_a_batch_in_order_of_first_arrival() -> None:
    policy = BatchPolicy(max_batch=4, max_wait_s=1.0)
    for ref in refs("A", 4):
        policy.submit(ref, now=0.0)
    for ref in refs("B", 4):
        policy.submit(ref, now=0.1)
    first = policy.next_batch(now=0.1)
    second = policy.next_batch(now=0.1)
    assert labels(first) == ["A0", "A1", "A2", "A3"]  # A's call runs in one batch, then B's
    assert labels(second) == ["B0", "B1", "B2", "B3"]
    assert policy.next_batch(now=100.0) is None


def test_a_batch_one_job_cannot_fill_is_filled_with_the_next_jobs_patches() -> None:
    policy = BatchPolicy(max_batch=4, max_wait_s=1.0)
    for job, n in (("A", 3), ("B", 3), ("C", 3)):
        for ref in refs(job, n):
            policy.submit(ref, now=0.0)
    first = policy.next_batch(now=0.0)
    assert labels(first) == ["A0", "A1", "A2", "B0"]
    assert first is not None and first.job_ids == ("A", "B")
    assert labels(policy.next_batch(now=0.0)) == ["B1", "B2", "C0", "C1"]  # B's turn goes on first


def test_small_job_is_not_starved_by_a_large_one_queued_before_it() -> None:
    policy = BatchPolicy(max_batch=4, max_wait_s=1.0)
    for ref in refs("big", 100):
        policy.submit(ref, now=0.0)
    policy.submit(PatchRef("small", 0), now=0.2)
    assert labels(policy.next_batch(now=0.2)) == ["big0", "big1", "big2", "big3"]
    assert labels(policy.next_batch(now=0.2)) == ["small0", "big4", "big5", "big6"]


def test_turns_rotate_across_batches_so_each_job_gets_an_equal_share() -> None:
    policy = BatchPolicy(max_batch=4, max_wait_s=1.0)
    for job in "ABC":
        for ref in refs(job, 8):
            policy.submit(ref, now=0.0)
    taken: dict[str, int] = {"A": 0, "B": 0, "C": 0}
    for _ in range(3):
        batch = policy.next_batch(now=0.0)
        assert batch is not None
        for ref in batch.items:
            taken[ref.job_id] += 1
    assert taken == {"A": 4, "B": 4, "C": 4}


def test_a_lowered_batch_size_shortens_the_turn_of_a_job_in_the_middle_of_one() -> None:
    policy = BatchPolicy(max_batch=4, max_wait_s=1.0)
    for ref in refs("A", 3):
        policy.submit(ref, now=0.0)
    for ref in refs("B", 6):
        policy.submit(ref, now=0.0)
    assert labels(policy.next_batch(now=0.0)) == ["A0", "A1", "A2", "B0"]
    policy.limit(2)  # B has had 1 of its turn; the turn is now 2
    assert labels(policy.next_batch(now=0.0)) == ["B1"]
    assert labels(policy.next_batch(now=0.0)) == ["B2", "B3"]


def test_within_a_job_patches_leave_first_in_first_out() -> None:
    policy = BatchPolicy(max_batch=3, max_wait_s=0.0)
    for i in (5, 2, 9, 1):
        policy.submit(PatchRef("A", i), now=float(i))
    assert labels(policy.next_batch(now=10.0)) == ["A5", "A2", "A9"]
    assert labels(policy.next_batch(now=10.0)) == ["A1"]


def test_deadline_follows_the_oldest_patch_still_queued() -> None:
    policy = BatchPolicy(max_batch=2, max_wait_s=0.25)
    assert policy.deadline() is None
    policy.submit(PatchRef("A", 0), now=1.0)
    policy.submit(PatchRef("A", 1), now=2.0)
    policy.submit(PatchRef("B", 0), now=3.0)
    assert policy.deadline() == pytest.approx(1.25)
    assert labels(policy.next_batch(now=3.0)) == ["A0", "A1"]  # full: closes without waiting
    assert policy.deadline() == pytest.approx(3.25)  # B0 is the oldest left
    assert policy.next_batch(now=3.2) is None
    batch = policy.next_batch(now=3.25)
    assert labels(batch) == ["B0"]
    assert policy.deadline() is None


def test_zero_max_wait_closes_any_queued_patch_at_once() -> None:
    policy = BatchPolicy(max_batch=8, max_wait_s=0.0)
    assert policy.next_batch(now=0.0) is None
    policy.submit(PatchRef("A", 0), now=5.0)
    assert labels(policy.next_batch(now=5.0)) == ["A0"]


def test_cancel_removes_only_that_jobs_patches_in_queue_order() -> None:
    policy = BatchPolicy(max_batch=4, max_wait_s=1.0)
    for ref in refs("A", 2):
        policy.submit(ref, now=0.0)
    for ref in refs("B", 3):
        policy.submit(ref, now=0.5)
    assert policy.cancel("A") == [PatchRef("A", 0), PatchRef("A", 1)]
    assert policy.cancel("A") == []
    assert policy.cancel("unknown") == []
    assert policy.depth == 3
    assert policy.deadline() == pytest.approx(1.5)  # now bounded by B's first patch
    assert policy.next_batch(now=1.4) is None
    assert labels(policy.next_batch(now=1.5)) == ["B0", "B1", "B2"]


def test_depth_counts_queued_patches_across_jobs() -> None:
    policy = BatchPolicy(max_batch=3, max_wait_s=1.0)
    events: list[tuple[float, str, PatchRef | None]] = [
        (0.0, "submit", PatchRef("A", 0)),
        (0.1, "submit", PatchRef("B", 0)),
        (0.2, "submit", PatchRef("A", 1)),
        (0.3, "submit", PatchRef("B", 1)),
        (0.3, "next", None),
    ]
    depths = []
    for now, kind, ref in events:
        if kind == "submit" and ref is not None:
            policy.submit(ref, now)
        else:
            policy.next_batch(now)
        depths.append(policy.depth)
    assert depths == [1, 2, 3, 4, 1]


@pytest.mark.parametrize(("max_batch", "max_wait_s"), [(0, 1.0), (4, -0.1), (4, float("nan"))])
def test_invalid_settings_are_refused(max_batch: int, max_wait_s: float) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_batch=max_batch, max_wait_s=max_wait_s)


# -- priority lanes and aging -------------------------------------------------------------------------------


def test_a_stat_patch_closes_the_next_batch_at_once_and_goes_first() -> None:
    policy = BatchPolicy(max_batch=4, max_wait_s=1.0)
    for ref in refs("R", 2):
        policy.submit(ref, now=0.0)
    assert policy.next_batch(now=0.1) is None  # routine patches wait for a fuller batch
    policy.submit(PatchRef("S", 0), now=0.2, priority=Priority.STAT)
    assert policy.deadline() == pytest.approx(0.2)
    assert labels(policy.next_batch(now=0.2)) == ["S0", "R0", "R1"]


def test_stat_patches_fill_the_batch_before_routine_ones_queued_earlier() -> None:
    policy = BatchPolicy(max_batch=3, max_wait_s=1.0)
    for ref in refs("R", 3):
        policy.submit(ref, now=0.0)
    for ref in refs("S", 4):
        policy.submit(ref, now=0.5, priority=Priority.STAT)
    assert labels(policy.next_batch(now=0.5)) == ["S0", "S1", "S2"]
    assert labels(policy.next_batch(now=0.5)) == ["S3", "R0", "R1"]
    assert labels(policy.next_batch(now=1.0)) == ["R2"]


def test_background_work_is_promoted_by_aging_so_a_routine_stream_cannot_starve_it() -> None:
    policy = BatchPolicy(max_batch=2, max_wait_s=0.0, aging_s=10.0)
    policy.submit(PatchRef("B", 0), now=0.0, priority=Priority.BACKGROUND)
    served: list[str] = []
    for t in range(0, 25):  # a new routine job every second keeps the routine lane full
        policy.submit(PatchRef(f"R{t}", 0), now=float(t))
        policy.submit(PatchRef(f"R{t}", 1), now=float(t))
        served += labels(policy.next_batch(now=float(t)))
        if "B0" in served:
            break
    assert "B0" in served
    # it waited 10 s to reach the routine lane and then took its turn, not 25 s or forever
    assert 10 <= served.index("B0") // 2 <= 12


def test_lane_improves_one_step_per_aging_period_and_never_past_stat() -> None:
    policy = BatchPolicy(max_batch=8, max_wait_s=1.0, aging_s=5.0)
    policy.submit(PatchRef("B", 0), now=0.0, priority=Priority.BACKGROUND)
    assert [policy.lane("B", now=t) for t in (0.0, 4.9, 5.0, 10.0, 100.0)] == [2, 2, 1, 0, 0]


def test_cancelling_a_stat_job_removes_its_lane_and_its_deadline() -> None:
    policy = BatchPolicy(max_batch=4, max_wait_s=1.0)
    policy.submit(PatchRef("R", 0), now=0.0)
    policy.submit(PatchRef("S", 0), now=0.1, priority=Priority.STAT)
    assert policy.cancel("S") == [PatchRef("S", 0)]
    assert policy.deadline() == pytest.approx(1.0) and policy.depth == 1
    assert labels(policy.next_batch(now=1.0)) == ["R0"]
