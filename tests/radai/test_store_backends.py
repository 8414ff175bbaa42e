"""The one data-access layer on both engines: the same behaviour tests on SQLite (a file) and on a real
PostgreSQL server started on 127.0.0.1 (one database per test), then PostgreSQL with several connections at
once, as several receivers and workers use it: claims never overlap, one row per job and per delivery, one
winner per settlement, and an audit chain that stays valid."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from radai.audit import Auditor, AuditQuery, Event
from radai.domain import (
    DeliveryState,
    JobSpec,
    JobState,
    Priority,
    ShadowRecord,
    Stage,
    StudyRecord,
    StudyState,
)
from radai.errors import AuditTamperedError, NotFoundError
from radai.storage.postgres import PostgresAuditLog, PostgresJobStore
from radai.storage.sql_audit import SqlAuditLog
from radai.storage.sql_jobs import SqlJobStore
from radai.storage.sqlite import SqliteJobStore
from radai.storage.sqlite_audit import SqliteAuditLog
from tests.radai.postgres_server import PostgresServer, missing_reason, run_postgres
from tests.radai.together import together

STUDY = "1.2.826.0.1.3680043.8.498.7"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    reason = missing_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with run_postgres() as server:
        yield server


@dataclass
class Backend:
    """Opens stores on one database: each call is a new connection (as another process would have)."""

    name: str
    jobs: Callable[[], SqlJobStore]
    audit: Callable[[], SqlAuditLog]
    behind_radais_back: Callable[[str], None]  # SQL run by another client, bypassing radai


def _sqlite(path: Path) -> Backend:
    def raw(sql: str) -> None:
        db = sqlite3.connect(path)
        try:
            db.executescript(sql)
        finally:
            db.close()

    return Backend("sqlite", lambda: SqliteJobStore(path), lambda: SqliteAuditLog(path), raw)


def _postgres(server: PostgresServer) -> Backend:
    url = server.create_database()
    return Backend(
        "postgresql",
        lambda: PostgresJobStore(url),
        lambda: PostgresAuditLog(url),
        lambda s: server.execute(url, s),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return _sqlite(tmp_path / "radai.sqlite")
    return _postgres(request.getfixturevalue("postgres"))


@pytest.fixture
def store(backend: Backend) -> Iterator[SqlJobStore]:
    s = backend.jobs()
    yield s
    s.close()


def study(uid: str = STUDY, state: StudyState = StudyState.PROCESSING, completed: float = 3.0) -> StudyRecord:
    return StudyRecord(uid, state, "MODALITY", 2, 1, 1.0, 2.0, completed)


def job(job_id: str, model: str = "m@1", uid: str = STUDY, priority: Priority = Priority.ROUTINE) -> JobSpec:
    return JobSpec(job_id, uid, uid + ".1", model, 1.0, 2.0, 3.0, priority)


def delivering(store: SqlJobStore, job_id: str, *destinations: str) -> None:
    store.add_job(job(job_id))
    store.finish_job(job_id, JobState.DELIVERING, outputs=("seg",))
    for d in destinations:
        store.enqueue_delivery(job_id, STUDY, d, [f"/outbox/{job_id}/{d}.dcm"], 10.0)


# -- the same behaviour on both engines ---------------------------------------------------------------------


def test_a_job_keeps_its_stages_batches_shadow_runs_and_outputs(store: SqlJobStore) -> None:
    store.upsert_study(study())
    store.add_job(job("j1", priority=Priority.STAT))
    store.mark_stage("j1", Stage.QUEUED, 4.0)
    assert store.get_job("j1").state is JobState.QUEUED
    store.mark_stage("j1", Stage.INFERRED, 5.5)
    store.record_batch(["j1", "j1"])
    store.record_batch(["j1", "other"])
    store.record_shadow(ShadowRecord("j1", "m@2", "agreed", {"dice:Lung": 0.97}, "", 6.0))
    store.record_shadow(ShadowRecord("j1", "m@2", "disagreed", {"dice:Lung": 0.5}, "low", 7.0))
    store.finish_job("j1", JobState.DELIVERING, outputs=("seg", "sr"))
    found = store.get_job("j1")
    assert found.state is JobState.DELIVERING and found.priority is Priority.STAT
    assert found.stages == {"received": 2.0, "complete": 3.0, "queued": 4.0, "inferred": 5.5}
    assert (found.batches, found.shared_batches, found.outputs) == (2, 1, ("seg", "sr"))
    (shadow,) = found.shadow
    assert (shadow.outcome, shadow.agreement, shadow.reason) == ("disagreed", {"dice:Lung": 0.5}, "low")
    with pytest.raises(NotFoundError):
        store.get_job("nope")
    with pytest.raises(NotFoundError):
        store.get_study("9.9")


def test_a_resent_study_resets_its_job_instead_of_adding_a_second(store: SqlJobStore) -> None:
    store.upsert_study(study())
    store.add_job(job("j1"))
    store.mark_stage("j1", Stage.INFERRED, 5.0)
    store.finish_job("j1", JobState.FAILED, reason="boom")
    store.upsert_study(study(state=StudyState.COMPLETE, completed=9.0))
    store.add_job(job("j1"))
    (again,) = store.get_study(STUDY).jobs
    assert (again.state, again.reason, again.stages) == (
        JobState.QUEUED,
        "",
        {"received": 2.0, "complete": 3.0},
    )
    assert store.get_study(STUDY).completed_at == 9.0 and store.get_study(STUDY).state is StudyState.COMPLETE


def test_studies_list_newest_first_with_filters(store: SqlJobStore) -> None:
    for index, (uid, model, state) in enumerate(
        [("1.1", "ct-body@1.0.0", JobState.DELIVERED), ("1.2", "brain@2.0.0", JobState.FAILED),
         ("1.3", "ct-body-xl@1.0.0", JobState.DELIVERED), ("1.4", "ct-body@1.1.0", JobState.QUEUED)]
    ):  # fmt: skip
        store.upsert_study(study(uid, StudyState.PROCESSING, completed=100.0 * index))
        store.add_job(job(f"j{index}", model, uid))
        store.finish_job(f"j{index}", state)
    store.upsert_study(study("1.5", StudyState.NO_MATCH, completed=300.0))  # a tie: the later insert first
    assert [s.study_uid for s in store.list_studies()] == ["1.5", "1.4", "1.3", "1.2", "1.1"]
    assert [s.study_uid for s in store.list_studies(model="ct-body")] == ["1.4", "1.1"]
    assert [s.study_uid for s in store.list_studies(model="ct-body%")] == []
    assert [s.study_uid for s in store.list_studies(job_state=JobState.DELIVERED, since=100.0)] == ["1.3"]
    assert [s.study_uid for s in store.list_studies(2, until=300.0)] == ["1.3", "1.2"]
    assert [s.study_uid for s in store.list_studies(state=StudyState.NO_MATCH)] == ["1.5"]


def test_a_delivery_is_queued_once_claimed_when_due_and_requeued_when_resent(store: SqlJobStore) -> None:
    store.upsert_study(study())
    delivering(store, "j1", "pacs", "archive")
    assert store.enqueue_delivery("j1", STUDY, "pacs", ["/other.dcm"], 50.0) is DeliveryState.QUEUED
    assert store.claim_delivery("pacs", now=9.0) is None  # not due yet
    claimed = store.claim_delivery("pacs", now=10.0)
    assert claimed is not None and claimed.state is DeliveryState.SENDING
    assert claimed.files == ("/outbox/j1/pacs.dcm",)  # the pending row was kept as it was
    assert store.claim_delivery("pacs", now=99.0) is None  # never claimed twice
    assert store.count_deliveries("pacs", DeliveryState.SENDING) == 1
    store.update_delivery("j1", "pacs", DeliveryState.DELIVERED, 1, 0.0, "", 11.0)
    assert store.enqueue_delivery("j1", STUDY, "pacs", ["/new.dcm"], 60.0) is DeliveryState.QUEUED
    pacs, _ = (d for d in store.deliveries_for_job("j1") if d.destination == "pacs"), None
    (row,) = pacs
    assert (row.attempts, row.files, row.next_attempt_at) == (0, ("/new.dcm",), 60.0)
    assert [d.destination for d in store.deliveries_for_job("j1")] == ["archive", "pacs"]


def test_the_oldest_due_delivery_is_claimed_first(store: SqlJobStore) -> None:
    store.upsert_study(study())
    for job_id, at in (("late", 30.0), ("first", 10.0), ("second", 10.0)):
        store.add_job(job(job_id))
        store.enqueue_delivery(job_id, STUDY, "pacs", [], at)
    claims = [store.claim_delivery("pacs", 100.0) for _ in range(4)]
    assert [c.job_id if c else None for c in claims] == ["first", "second", "late", None]


def test_a_restart_queues_again_what_was_left_sending(backend: Backend) -> None:
    store = backend.jobs()
    store.upsert_study(study())
    delivering(store, "j1", "pacs")
    assert store.claim_delivery("pacs", 10.0) is not None
    store.close()
    reopened = backend.jobs()
    assert reopened.resume_deliveries(claimed_before=10.0) == 0  # claimed at 10.0: another worker's
    assert reopened.resume_deliveries() == 1
    (again,) = reopened.deliveries_for_job("j1")
    assert again.state is DeliveryState.QUEUED and reopened.claim_delivery("pacs", 10.0) is not None
    reopened.close()


def test_settling_a_dead_letter_then_retrying_it(store: SqlJobStore) -> None:
    store.upsert_study(study())
    delivering(store, "j1", "pacs", "archive")
    delivering(store, "j2", "pacs")
    store.update_delivery("j1", "pacs", DeliveryState.DELIVERED, 1, 0.0, "", 11.0)
    assert store.settle_job("j1", 12.0) is None  # archive is still queued
    store.update_delivery("j1", "archive", DeliveryState.DEAD, 5, 0.0, "refused", 13.0)
    store.update_delivery("j2", "pacs", DeliveryState.DELIVERED, 1, 0.0, "", 13.0)
    assert store.unsettled_jobs() == ["j1", "j2"]
    assert store.settle_job("j1", 14.0) is JobState.DEAD_LETTER
    assert store.settle_job("j1", 14.0) is None  # once
    assert (
        store.settle_job("j2", 15.0) is JobState.DELIVERED and store.get_job("j2").stages["delivered"] == 15.0
    )
    assert "archive dead-lettered after 5 attempt(s): refused" in store.get_job("j1").reason
    assert store.settle_study(STUDY) is StudyState.DEAD_LETTER and store.settle_study(STUDY) is None
    assert store.retry_dead(STUDY, 20.0) == 1
    assert store.get_study(STUDY).state is StudyState.PROCESSING
    assert store.get_job("j1").state is JobState.DELIVERING and store.get_job("j1").reason == ""
    assert store.count_deliveries("archive", DeliveryState.QUEUED) == 1
    with pytest.raises(NotFoundError):
        store.retry_dead("9.9", 20.0)


def test_spool_paths_survive_a_restart_until_forgotten(backend: Backend) -> None:
    store = backend.jobs()
    store.remember_spool(STUDY, [Path("/spool/b.dcm"), Path("/spool/a.dcm"), Path("/spool/a.dcm")])
    store.close()
    store = backend.jobs()
    assert store.spool_paths(STUDY) == [Path("/spool/a.dcm"), Path("/spool/b.dcm")]
    store.forget_spool(STUDY)
    assert store.spool_paths(STUDY) == [] and store.ping()
    store.close()


def test_a_database_made_before_the_priority_column_gets_it(backend: Backend) -> None:
    backend.behind_radais_back(
        "CREATE TABLE studies (study_uid TEXT PRIMARY KEY, state TEXT NOT NULL, calling_ae TEXT NOT NULL, "
        "instances INTEGER NOT NULL, series INTEGER NOT NULL, first_received REAL NOT NULL, "
        "last_received REAL NOT NULL, completed_at REAL NOT NULL);"
        "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, "
        "model_key TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', "
        "stages TEXT NOT NULL DEFAULT '{}', batches INTEGER NOT NULL DEFAULT 0, "
        "shared_batches INTEGER NOT NULL DEFAULT 0, outputs TEXT NOT NULL DEFAULT '[]');"
        "INSERT INTO studies VALUES ('1.1', 'processing', 'CT', 1, 1, 1.0, 2.0, 3.0);"
        "INSERT INTO jobs (job_id, study_uid, series_uid, model_key, state) VALUES ('old', '1.1', '1.1.1', "
        "'m@1', 'queued');"
    )
    store = backend.jobs()
    assert store.get_job("old").priority is Priority.ROUTINE
    store.close()


def _filled(backend: Backend) -> SqlAuditLog:
    log = backend.audit()
    audit = Auditor(log)
    audit(Event.ASSOCIATION_ACCEPTED, "CT1@10.0.0.7", "ct-scanner", "accepted")
    audit(Event.MODEL_ADDED, "api:admin", "body@1.0.0")
    audit(Event.RESULT_DELIVERED, "radai", "0123456789abcdef", "delivered", destination="pacs", files="2")
    return log


def test_audit_records_come_back_oldest_first_and_filter(backend: Backend) -> None:
    log = _filled(backend)
    records = log.records()
    assert [r.seq for r in records] == [1, 2, 3] and records[2].detail == {
        "destination": "pacs",
        "files": "2",
    }
    assert [r.subject for r in log.records(AuditQuery(event="model.added"))] == ["body@1.0.0"]
    assert [r.seq for r in log.records(AuditQuery(after=1, limit=1))] == [2]
    assert log.records(AuditQuery(since=records[2].at + 1)) == []
    assert log.verify() == 3
    Auditor(log)(Event.ASSOCIATION_REJECTED, "X" * 5000, "unlisted")
    assert len(log.records(AuditQuery(after=3))[0].actor) == 256 and log.verify() == 4
    log.close()


@pytest.mark.parametrize(
    "sql", ["UPDATE audit SET actor = 'someone else' WHERE seq = 2", "DELETE FROM audit"]
)
def test_the_database_refuses_to_change_or_delete_an_audit_record(backend: Backend, sql: str) -> None:
    _filled(backend).close()
    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.RaiseException), match="append-only"):
        backend.behind_radais_back(sql)


_DROP = {
    "sqlite": "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;",
    "postgresql": "DROP TRIGGER audit_no_update ON audit; DROP TRIGGER audit_no_delete ON audit;",
}


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("UPDATE audit SET subject = 'other@9.9.9' WHERE seq = 2", "record 2"),
        ("DELETE FROM audit WHERE seq = 2", "missing"),
        ("DELETE FROM audit WHERE seq = 3", "missing"),  # cut from the end
    ],
)
def test_an_audit_change_made_behind_radais_back_is_found(backend: Backend, sql: str, message: str) -> None:
    _filled(backend).close()
    backend.behind_radais_back(f"{_DROP[backend.name]} {sql};")
    log = backend.audit()  # opening again puts the triggers back, and finds the change all the same
    with pytest.raises(AuditTamperedError, match=message):
        log.verify()
    log.append(Event.MODEL_ADDED, "api:admin", "later@1.0.0", "ok")  # appending does not hide it
    with pytest.raises(AuditTamperedError):
        log.verify()
    log.close()


# -- PostgreSQL: several processes on one database ----------------------------------------------------------


def test_workers_on_several_connections_never_claim_the_same_delivery(postgres: PostgresServer) -> None:
    backend = _postgres(postgres)
    stores = [backend.jobs() for _ in range(4)]
    stores[0].upsert_study(study())
    for n in range(120):
        stores[0].add_job(job(f"j{n:03}"))
        stores[0].enqueue_delivery(f"j{n:03}", STUDY, "pacs", [], float(n % 7))

    def claim_all(i: int) -> list[str]:
        claimed: list[str] = []
        while (record := stores[i].claim_delivery("pacs", 100.0)) is not None:
            claimed.append(record.job_id)
        return claimed

    claims = together(4, claim_all)
    every = [j for c in claims for j in c]
    assert sorted(every) == [f"j{n:03}" for n in range(120)]  # each exactly once
    assert sum(1 for c in claims if c) >= 2  # the workers did take turns
    assert stores[0].count_deliveries("pacs", DeliveryState.SENDING) == 120
    for s in stores:
        s.close()


def test_two_receivers_adding_the_same_study_and_jobs_leave_one_row_each(postgres: PostgresServer) -> None:
    backend = _postgres(postgres)
    stores = [backend.jobs() for _ in range(2)]

    def receive(i: int) -> None:
        for n in range(30):
            uid = f"1.{n}"
            stores[i].upsert_study(study(uid, StudyState.COMPLETE))
            stores[i].add_job(job(f"j{n}", uid=uid))
            stores[i].add_job(job(f"j{n}", uid=uid))
            stores[i].enqueue_delivery(f"j{n}", uid, "pacs", [], 1.0)

    together(2, receive)
    studies = stores[0].list_studies(1000)
    assert len(studies) == 30 and all(len(s.jobs) == 1 for s in studies)
    assert all(len(s.jobs[0].deliveries) == 1 for s in studies)
    for s in stores:
        s.close()


def test_two_workers_settling_the_same_job_and_study_have_one_winner(postgres: PostgresServer) -> None:
    backend = _postgres(postgres)
    stores = [backend.jobs() for _ in range(2)]
    for n in range(20):
        uid = f"2.{n}"
        stores[0].upsert_study(study(uid))
        stores[0].add_job(job(f"j{n}", uid=uid))
        stores[0].finish_job(f"j{n}", JobState.DELIVERING)
        stores[0].enqueue_delivery(f"j{n}", uid, "pacs", [], 1.0)
        stores[0].update_delivery(f"j{n}", "pacs", DeliveryState.DELIVERED, 1, 0.0, "", 2.0)

    def settle(i: int) -> list[tuple[JobState | None, StudyState | None]]:
        return [(stores[i].settle_job(f"j{n}", 3.0), stores[i].settle_study(f"2.{n}")) for n in range(20)]

    first, second = together(2, settle)
    for n in range(20):
        jobs = [first[n][0], second[n][0]]
        assert jobs.count(JobState.DELIVERED) == 1 and jobs.count(None) == 1, n
        assert StudyState.DONE in (first[n][1], second[n][1]) and None in (first[n][1], second[n][1])
    for s in stores:
        s.close()


def test_concurrent_audit_appends_from_several_processes_keep_the_chain(postgres: PostgresServer) -> None:
    backend = _postgres(postgres)
    logs = [backend.audit() for _ in range(4)]

    def append(i: int) -> None:
        for n in range(25):
            logs[i].append(Event.API_WRITE, f"api:{i}", f"/r/{n}", "200")

    together(4, append)
    assert logs[0].verify() == 100
    assert sorted(r.subject for r in logs[1].records(AuditQuery(limit=1000)) if r.actor == "api:3") == sorted(
        f"/r/{n}" for n in range(25)
    )
    for log in logs:
        log.close()


@pytest.mark.parametrize(
    "sql",
    [
        "TRUNCATE audit",
        "UPDATE audit_head SET seq = 2",  # the highest number given only ever moves on by one
        "DELETE FROM audit_head",
        "TRUNCATE audit_head",
    ],
)
def test_postgres_refuses_to_truncate_the_audit_log_or_move_its_head(
    postgres: PostgresServer, sql: str
) -> None:
    backend = _postgres(postgres)
    _filled(backend).close()
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        backend.behind_radais_back(sql)
    log = backend.audit()
    assert log.verify() == 3
    log.close()


def test_a_connection_cut_by_the_server_is_opened_again(postgres: PostgresServer) -> None:
    backend = _postgres(postgres)
    store = backend.jobs()
    store.upsert_study(study())
    backend.behind_radais_back(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    assert store.get_study(STUDY).study_uid == STUDY and store.ping()
    store.close()
