"""The job store on a `Database` (SQLite or PostgreSQL): one row per study and per (study, series, model)
job, with stage timestamps; the delivery queue (radai.storage.sql_queue) lives in the same database, so a job
and its deliveries settle in one transaction. Every read-modify-write locks the row it changes first, so
several processes (receivers, workers) may share one PostgreSQL database.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from radai.domain import (
    DeliveryState,
    JobRecord,
    JobSpec,
    JobState,
    Priority,
    ShadowRecord,
    Stage,
    StudyRecord,
    StudyState,
)
from radai.errors import NotFoundError
from radai.storage.sql import Database, Row, Session
from radai.storage.sql_queue import PENDING, SqlDeliveryQueue, deliveries

# Templates: `{real}`, `{text}`, `{rowid}` are filled by the dialect (radai.storage.sql); `{{}}` is `{}`.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS studies (
    {rowid}
    study_uid {text} PRIMARY KEY,
    state {text} NOT NULL,
    calling_ae {text} NOT NULL,
    instances INTEGER NOT NULL,
    series INTEGER NOT NULL,
    first_received {real} NOT NULL,
    last_received {real} NOT NULL,
    completed_at {real} NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS jobs (
    {rowid}
    job_id {text} PRIMARY KEY,
    study_uid {text} NOT NULL REFERENCES studies(study_uid),
    series_uid {text} NOT NULL,
    model_key {text} NOT NULL,
    state {text} NOT NULL,
    reason {text} NOT NULL DEFAULT '',
    stages {text} NOT NULL DEFAULT '{{}}',
    batches INTEGER NOT NULL DEFAULT 0,
    shared_batches INTEGER NOT NULL DEFAULT 0,
    outputs {text} NOT NULL DEFAULT '[]',
    priority {text} NOT NULL DEFAULT 'routine'
)""",
    "CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs(study_uid)",
    """CREATE TABLE IF NOT EXISTS deliveries (
    {rowid}
    job_id {text} NOT NULL,
    destination {text} NOT NULL,
    study_uid {text} NOT NULL,
    files {text} NOT NULL,
    state {text} NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at {real} NOT NULL,
    last_error {text} NOT NULL DEFAULT '',
    updated_at {real} NOT NULL,
    PRIMARY KEY (job_id, destination)
)""",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(destination, state, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS deliveries_by_study ON deliveries(study_uid)",
    """CREATE TABLE IF NOT EXISTS shadow_runs (
    job_id {text} NOT NULL,
    model_key {text} NOT NULL,
    outcome {text} NOT NULL,
    agreement {text} NOT NULL DEFAULT '{{}}',
    reason {text} NOT NULL DEFAULT '',
    at {real} NOT NULL,
    PRIMARY KEY (job_id, model_key)
)""",
    """CREATE TABLE IF NOT EXISTS study_spool (
    study_uid {text} PRIMARY KEY,
    paths {text} NOT NULL
)""",
)
_FINAL_JOB = {JobState.DELIVERED.value, JobState.FAILED.value, JobState.DEAD_LETTER.value}


class SqlJobStore(SqlDeliveryQueue):
    """radai.ports.JobStore and DeliveryQueue on `database` (creates the tables when they are missing)."""

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        with database.schema_transaction() as db:
            for statement in SCHEMA:
                db.run(database.dialect.schema(statement))
            if "priority" not in db.columns("jobs"):  # databases made before the priority column
                db.run(
                    database.dialect.schema(
                        "ALTER TABLE jobs ADD COLUMN priority {text} NOT NULL DEFAULT 'routine'"
                    )
                )

    def upsert_study(self, record: StudyRecord) -> None:
        with self._db.session() as db:
            db.run(
                "INSERT INTO studies (study_uid, state, calling_ae, instances, series, first_received, "
                "last_received, completed_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (study_uid) DO UPDATE SET "
                "state=excluded.state, calling_ae=excluded.calling_ae, instances=excluded.instances, "
                "series=excluded.series, last_received=excluded.last_received, completed_at=excluded.completed_at",
                (
                    record.study_uid,
                    record.state.value,
                    record.calling_ae,
                    record.instances,
                    record.series,
                    record.first_received,
                    record.last_received,
                    record.completed_at,
                ),
            )

    def set_study_state(self, study_uid: str, state: StudyState) -> None:
        with self._db.session() as db:
            db.run("UPDATE studies SET state=? WHERE study_uid=?", (state.value, study_uid))

    def add_job(self, spec: JobSpec) -> None:
        stages = {Stage.RECEIVED.value: spec.last_received, Stage.COMPLETE.value: spec.completed_at}
        with self._db.session() as db:
            # A re-sent study reuses its deterministic job id: reset the row instead of adding a second one
            # (one statement: two receivers adding the same job at once leave one row).
            db.run(
                "INSERT INTO jobs (job_id, study_uid, series_uid, model_key, state, stages, priority) "
                "VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT (job_id) DO UPDATE SET state=excluded.state, reason='', stages=excluded.stages, "
                "batches=0, shared_batches=0, outputs='[]', priority=excluded.priority",
                (
                    spec.job_id,
                    spec.study_uid,
                    spec.series_uid,
                    spec.model_key,
                    JobState.QUEUED.value,
                    json.dumps(stages),
                    spec.priority.value,
                ),
            )

    def mark_stage(self, job_id: str, stage: Stage, at: float) -> None:
        with self._db.transaction() as db:
            row = self._locked_job(db, job_id)
            if row is None:
                return
            state = row["state"]
            if state == JobState.QUEUED.value and stage is not Stage.QUEUED:
                state = JobState.RUNNING.value
            db.run(
                "UPDATE jobs SET stages=?, state=? WHERE job_id=?",
                (_with_stage(row["stages"], stage, at), state, job_id),
            )

    def finish_job(self, job_id: str, state: JobState, reason: str = "", outputs: Sequence[str] = ()) -> None:
        with self._db.session() as db:
            db.run(
                "UPDATE jobs SET state=?, reason=?, outputs=? WHERE job_id=?",
                (state.value, reason, json.dumps(list(outputs)), job_id),
            )

    def record_batch(self, job_ids: Sequence[str]) -> None:
        shared = 1 if len(set(job_ids)) > 1 else 0
        with self._db.session() as db:
            db.many(
                "UPDATE jobs SET batches=batches+1, shared_batches=shared_batches+? WHERE job_id=?",
                [(shared, j) for j in sorted(set(job_ids))],
            )

    def record_shadow(self, record: ShadowRecord) -> None:
        """One row per (job, shadow version); a re-run replaces it."""
        with self._db.session() as db:
            db.run(
                "INSERT INTO shadow_runs (job_id, model_key, outcome, agreement, reason, at) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT (job_id, model_key) DO UPDATE SET outcome=excluded.outcome, "
                "agreement=excluded.agreement, reason=excluded.reason, at=excluded.at",
                (
                    record.job_id,
                    record.model_key,
                    record.outcome,
                    json.dumps(record.agreement),
                    record.reason,
                    record.at,
                ),
            )

    def list_studies(
        self,
        limit: int = 100,
        *,
        state: StudyState | None = None,
        job_state: JobState | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[StudyRecord]:
        """Studies newest first (by the time they were complete), filtered in SQL: `state` of the study;
        `model` (an id, or id@version) and `job_state`: the study has a job of that model and/or in that state
        (both: one job with both); `since` <= completed_at < `until` (epoch seconds)."""
        where: list[str] = []
        params: list[str | float] = []
        if state is not None:
            where.append("s.state = ?")
            params.append(state.value)
        if since is not None:
            where.append("s.completed_at >= ?")
            params.append(since)
        if until is not None:
            where.append("s.completed_at < ?")
            params.append(until)
        job: list[str] = []
        if model is not None:
            # model_key is id@version: an id matches every version of it (compared exactly, unlike LIKE).
            job.append(
                "(j.model_key = CAST(? AS TEXT) OR "
                "substr(j.model_key, 1, length(CAST(? AS TEXT)) + 1) = CAST(? AS TEXT) || '@')"
            )
            params.extend((model, model, model))
        if job_state is not None:
            job.append("j.state = ?")
            params.append(job_state.value)
        if job:
            where.append(
                f"EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = s.study_uid AND {' AND '.join(job)})"
            )
        sql = "SELECT s.* FROM studies s"
        if where:
            sql += " WHERE " + " AND ".join(where)  # fixed fragments only; every value is a parameter
        sql += " ORDER BY s.completed_at DESC, s.rowid DESC LIMIT ?"
        params.append(limit)
        with self._db.session() as db:
            return [_study(db, r) for r in db.all(sql, params)]

    def get_study(self, study_uid: str) -> StudyRecord:
        with self._db.session() as db:
            row = db.one("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
            if row is None:
                raise NotFoundError(f"no study {study_uid}")
            return _study(db, row)

    def get_job(self, job_id: str) -> JobRecord:
        with self._db.session() as db:
            row = db.one("SELECT * FROM jobs WHERE job_id=?", (job_id,))
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            return _job(db, row)

    # -- job and study settlement (after the outbound queue has acknowledged or given up) ----------------------

    def settle_job(self, job_id: str, at: float) -> JobState | None:
        """Once no delivery of a delivering job is pending: DELIVERED if all were acknowledged, else
        DEAD_LETTER. Returns the new state when this call changed it (exactly one caller wins: the job's row
        is locked while its deliveries are read)."""
        with self._db.transaction() as db:
            row = self._locked_job(db, job_id)
            if row is None or row["state"] not in (JobState.DELIVERING.value, JobState.DEAD_LETTER.value):
                return None
            rows = db.all("SELECT * FROM deliveries WHERE job_id=? ORDER BY destination", (job_id,))
            if {r["state"] for r in rows} & set(PENDING):
                return None
            dead = [r for r in rows if r["state"] == DeliveryState.DEAD.value]
            new = JobState.DEAD_LETTER if dead else JobState.DELIVERED
            if new.value == row["state"]:
                return None
            reason = "; ".join(
                f"delivery to {r['destination']} dead-lettered after {r['attempts']} attempt(s): {r['last_error']}"
                for r in dead
            )[:500]
            stages = row["stages"]
            if new is JobState.DELIVERED:
                stages = _with_stage(stages, Stage.DELIVERED, at)
            db.run(
                "UPDATE jobs SET state=?, reason=?, stages=? WHERE job_id=?",
                (new.value, reason, stages, job_id),
            )
            return new

    def settle_study(self, study_uid: str) -> StudyState | None:
        """Once every job of a processing study is final: DONE, DEAD_LETTER (re-triable) or FAILED.
        Returns the new state when this call changed it (the study's row is locked meanwhile)."""
        with self._db.transaction() as db:
            row = db.one(
                "SELECT state FROM studies WHERE study_uid=?" + self._db.dialect.for_update, (study_uid,)
            )
            if row is None or row["state"] not in (StudyState.PROCESSING.value, StudyState.DEAD_LETTER.value):
                return None
            states = {r["state"] for r in db.all("SELECT state FROM jobs WHERE study_uid=?", (study_uid,))}
            if not states or not states <= _FINAL_JOB:
                return None
            if JobState.DEAD_LETTER.value in states:
                new = StudyState.DEAD_LETTER
            elif JobState.FAILED.value in states:
                new = StudyState.FAILED
            else:
                new = StudyState.DONE
            if new.value == row["state"]:
                return None
            db.run("UPDATE studies SET state=? WHERE study_uid=?", (new.value, study_uid))
            return new

    def unsettled_jobs(self) -> list[str]:
        """Delivering jobs with nothing left in the queue (e.g. the process stopped between the two)."""
        with self._db.session() as db:
            rows = db.all(
                "SELECT job_id FROM jobs j WHERE j.state=? AND NOT EXISTS (SELECT 1 FROM deliveries d "
                "WHERE d.job_id=j.job_id AND d.state IN (?,?)) ORDER BY j.job_id",
                (JobState.DELIVERING.value, *PENDING),
            )
            return [r["job_id"] for r in rows]

    def remember_spool(self, study_uid: str, paths: Sequence[Path]) -> None:
        """The spooled instances to release once the study's results are delivered (survives a restart)."""
        with self._db.session() as db:
            db.run(
                "INSERT INTO study_spool (study_uid, paths) VALUES (?,?) "
                "ON CONFLICT (study_uid) DO UPDATE SET paths=excluded.paths",
                (study_uid, json.dumps(sorted({str(p) for p in paths}))),
            )

    def spool_paths(self, study_uid: str) -> list[Path]:
        with self._db.session() as db:
            row = db.one("SELECT paths FROM study_spool WHERE study_uid=?", (study_uid,))
            return [Path(p) for p in json.loads(row["paths"])] if row is not None else []

    def forget_spool(self, study_uid: str) -> None:
        with self._db.session() as db:
            db.run("DELETE FROM study_spool WHERE study_uid=?", (study_uid,))

    def _locked_job(self, db: Session, job_id: str) -> Row | None:
        """The job's state and stages, its row locked until the transaction ends (PostgreSQL)."""
        return db.one(
            "SELECT state, stages FROM jobs WHERE job_id=?" + self._db.dialect.for_update, (job_id,)
        )


def _with_stage(stages: str, stage: Stage, at: float) -> str:
    values = json.loads(stages)
    values[stage.value] = at
    return json.dumps(values)


def _shadow(db: Session, job_id: str) -> tuple[ShadowRecord, ...]:
    rows = db.all("SELECT * FROM shadow_runs WHERE job_id=? ORDER BY model_key", (job_id,))
    return tuple(
        ShadowRecord(
            job_id=r["job_id"],
            model_key=r["model_key"],
            outcome=r["outcome"],
            agreement=json.loads(r["agreement"]),
            reason=r["reason"],
            at=r["at"],
        )
        for r in rows
    )


def _job(db: Session, r: Row) -> JobRecord:
    return JobRecord(
        job_id=r["job_id"],
        study_uid=r["study_uid"],
        series_uid=r["series_uid"],
        model_key=r["model_key"],
        state=JobState(r["state"]),
        reason=r["reason"],
        stages=json.loads(r["stages"]),
        batches=r["batches"],
        shared_batches=r["shared_batches"],
        outputs=tuple(json.loads(r["outputs"])),
        deliveries=deliveries(db, r["job_id"]),
        shadow=_shadow(db, r["job_id"]),
        priority=Priority(r["priority"]),
    )


def _study(db: Session, r: Row) -> StudyRecord:
    jobs = db.all("SELECT * FROM jobs WHERE study_uid=? ORDER BY model_key, rowid", (r["study_uid"],))
    return StudyRecord(
        study_uid=r["study_uid"],
        state=StudyState(r["state"]),
        calling_ae=r["calling_ae"],
        instances=r["instances"],
        series=r["series"],
        first_received=r["first_received"],
        last_received=r["last_received"],
        completed_at=r["completed_at"],
        jobs=tuple(_job(db, j) for j in jobs),
    )
