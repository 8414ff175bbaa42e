"""Study parts of several receivers (scale-out assembly) on SQLite (a file) and on a real PostgreSQL server
started on 127.0.0.1: a study split across receivers is planned once, with every part, only after every
receiver's part is complete, and by exactly one of several processes that ask at the same moment."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from radai.storage.sql_parts import MergedStudy, StudyParts
from tests.radai.postgres_server import PostgresServer, missing_reason, run_postgres
from tests.radai.together import together

STUDY = "1.2.826.0.1.3680043.8.498.11"
Opener = Callable[[], StudyParts]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    reason = missing_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with run_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens stores on one database: each call is a new connection, as another receiver process has."""
    if request.param == "sqlite":
        make: Opener = functools.partial(StudyParts.sqlite, tmp_path / "radai.sqlite")
    else:
        make = functools.partial(StudyParts.postgres, request.getfixturevalue("postgres").create_database())
    opened: list[StudyParts] = []

    def open_one() -> StudyParts:
        opened.append(make())
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def parts(opener: Opener) -> StudyParts:
    return opener()


def test_a_study_received_by_one_receiver_is_due_once_its_part_completes(parts: StudyParts) -> None:
    parts.touch(STUDY, "a", 10.0)
    parts.touch(STUDY, "a", 12.0)
    assert parts.take_due(STUDY) is None and parts.waiting(STUDY) == ["a"]
    parts.complete_part(STUDY, "a", ["/spool/a/2.dcm", "/spool/a/1.dcm"], "CT1", 10.0, 12.0)
    assert parts.waiting(STUDY) == []
    assert parts.take_due(STUDY) == MergedStudy(
        STUDY, ("/spool/a/1.dcm", "/spool/a/2.dcm"), "CT1", 10.0, 12.0, ("a",)
    )
    assert parts.take_due(STUDY) is None  # the rows are gone: taken once


def test_a_study_with_no_parts_is_not_due(parts: StudyParts) -> None:
    assert parts.take_due(STUDY) is None and parts.waiting(STUDY) == []


def test_a_split_study_waits_for_every_receiver_then_merges_all_parts(opener: Opener) -> None:
    a, b = opener(), opener()
    a.touch(STUDY, "a", 100.0)
    b.touch(STUDY, "b", 101.0)
    a.complete_part(STUDY, "a", ["/spool/a/s1.dcm"], "MR_EARLY", 100.0, 105.0)
    assert a.take_due(STUDY) is None  # b is still receiving
    assert a.waiting(STUDY) == ["b"]
    b.touch(STUDY, "b", 110.0)
    b.complete_part(STUDY, "b", ["/spool/b/s2.dcm", "/spool/b/s2b.dcm"], "MR_LATE", 101.0, 110.0)
    merged = b.take_due(STUDY)
    assert merged == MergedStudy(
        STUDY,
        ("/spool/a/s1.dcm", "/spool/b/s2.dcm", "/spool/b/s2b.dcm"),
        "MR_EARLY",  # of the part that began first
        100.0,
        110.0,
        ("a", "b"),
    )
    assert a.take_due(STUDY) is None and b.take_due(STUDY) is None


def test_an_instance_arriving_after_a_part_completed_holds_the_study_until_it_completes_again(
    opener: Opener,
) -> None:
    a, b = opener(), opener()
    a.complete_part(STUDY, "a", ["/a/1"], "AE", 1.0, 5.0)
    b.complete_part(STUDY, "b", ["/b/1"], "AE", 2.0, 6.0)
    b.touch(STUDY, "b", 9.0)  # a late instance at b
    a.touch(STUDY, "a", 4.0)  # an old, out-of-order touch moves nothing back
    assert a.take_due(STUDY) is None and a.waiting(STUDY) == ["b"]
    b.complete_part(STUDY, "b", ["/b/2"], "AE", 9.0, 9.0)
    merged = a.take_due(STUDY)
    assert merged is not None
    assert merged.paths == ("/a/1", "/b/1", "/b/2")
    assert (merged.first_received, merged.last_received) == (1.0, 9.0)


def test_a_study_sent_again_after_it_was_taken_is_due_again_on_its_own(parts: StudyParts) -> None:
    parts.complete_part(STUDY, "a", ["/a/1"], "AE", 1.0, 2.0)
    assert parts.take_due(STUDY) is not None
    parts.touch(STUDY, "a", 50.0)
    assert parts.take_due(STUDY) is None
    parts.complete_part(STUDY, "a", ["/a/again"], "AE2", 50.0, 51.0)
    assert parts.take_due(STUDY) == MergedStudy(STUDY, ("/a/again",), "AE2", 50.0, 51.0, ("a",))


def test_completing_the_same_part_twice_does_not_repeat_paths(parts: StudyParts) -> None:
    parts.complete_part(STUDY, "a", ["/a/1", "/a/2"], "FIRST", 3.0, 4.0)
    parts.complete_part(STUDY, "a", ["/a/2", "/a/1", "/a/2"], "LATER", 5.0, 6.0)
    merged = parts.take_due(STUDY)
    assert merged == MergedStudy(STUDY, ("/a/1", "/a/2"), "FIRST", 3.0, 6.0, ("a",))


def test_studies_are_kept_apart(parts: StudyParts) -> None:
    parts.complete_part(STUDY, "a", ["/a/1"], "AE", 1.0, 2.0)
    parts.touch("9.9.9", "a", 1.0)
    assert parts.take_due("9.9.9") is None
    merged = parts.take_due(STUDY)
    assert merged is not None and merged.paths == ("/a/1",)
    assert parts.waiting("9.9.9") == ["a"]


def test_receivers_taking_a_completed_study_at_the_same_moment_get_it_exactly_once(opener: Opener) -> None:
    receivers = [opener(), opener()]
    for n in range(40):
        uid = f"{STUDY}.{n}"
        receivers[0].complete_part(uid, "a", [f"/a/{n}"], "AE", 1.0, 2.0)
        receivers[1].complete_part(uid, "b", [f"/b/{n}"], "AE", 1.5, 3.0)

        def take(i: int, uid: str = uid) -> MergedStudy | None:
            return receivers[i].take_due(uid)

        taken = together(2, take)
        winners = [m for m in taken if m is not None]
        assert len(winners) == 1, n
        assert winners[0].paths == (f"/a/{n}", f"/b/{n}") and winners[0].receivers == ("a", "b")


def test_receivers_completing_and_taking_at_the_same_moment_plan_the_study_exactly_once(
    opener: Opener,
) -> None:
    """Each receiver completes its own part and asks at once: whoever asks last sees both parts."""
    receivers = [opener(), opener()]
    names = ("a", "b")
    for n in range(40):
        uid = f"{STUDY}.{n}"
        for i, r in enumerate(receivers):
            r.touch(uid, names[i], 1.0)

        def finish(i: int, uid: str = uid, n: int = n) -> MergedStudy | None:
            receivers[i].complete_part(uid, names[i], [f"/{names[i]}/{n}"], "AE", 1.0, 2.0)
            return receivers[i].take_due(uid)

        winners = [m for m in together(2, finish) if m is not None]
        assert len(winners) == 1, n
        assert winners[0].paths == (f"/a/{n}", f"/b/{n}")


def test_a_part_whose_receiver_went_away_for_good_stops_holding_the_study_back(opener: Opener) -> None:
    a, b = opener(), opener()
    b.touch(STUDY, "b", 100.0)  # b got a first instance, then died and never came back
    a.touch(STUDY, "a", 100.0)
    a.complete_part(STUDY, "a", ["/spool/a/s1.dcm"], "CT", 100.0, 105.0)
    assert a.take_due(STUDY) is None
    assert a.stalled(abandoned_before=100.0) == []  # b's last instance is not older than that
    assert a.stalled(abandoned_before=3700.0) == [STUDY]
    assert a.take_due(STUDY, abandoned_before=50.0) is None
    merged = a.take_due(STUDY, abandoned_before=3700.0)
    assert merged is not None and merged.paths == ("/spool/a/s1.dcm",) and merged.receivers == ("a",)
    assert a.stalled(abandoned_before=3700.0) == [] and a.waiting(STUDY) == []  # b's row went with it


def test_only_abandoned_parts_plan_nothing(parts: StudyParts) -> None:
    parts.touch(STUDY, "gone", 100.0)
    assert parts.take_due(STUDY, abandoned_before=3700.0) is None
    assert parts.stalled(abandoned_before=3700.0) == []
