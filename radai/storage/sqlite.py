"""SQLite job store: one row per study and per (study, series, model) job, with stage timestamps. The
connection and the outbound delivery queue (one row per (job, destination)) are in
:mod:`radai.storage.sqlite_queue`; both live in one database file, so a job and its deliveries settle in one
transaction.
"""

from __future__ import annotations

import json
import sqlite3
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
from radai.storage.sqlite_queue import SqliteDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    instances INTEGER NOT NULL,
    series INTEGER NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    completed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    series_uid TEXT NOT NULL,
    model_key TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    stages TEXT NOT NULL DEFAULT '{}',
    batches INTEGER NOT NULL DEFAULT 0,
    shared_batches INTEGER NOT NULL DEFAULT 0,
    outputs TEXT NOT NULL DEFAULT '[]',
    priority TEXT NOT NULL DEFAULT 'routine'
);
CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs(study_uid);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    files TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    PRIMARY KEY (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(destination, state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_study ON deliveries(study_uid);
CREATE TABLE IF NOT EXISTS shadow_runs (
    job_id TEXT NOT NULL,
    model_key TEXT NOT NULL,
    outcome TEXT NOT NULL,
    agreement TEXT NOT NULL DEFAULT '{}',
    reason TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL,
    PRIMARY KEY (job_id, model_key)
);
CREATE TABLE IF NOT EXISTS study_spool (
    study_uid TEXT PRIMARY KEY,
    paths TEXT NOT NULL
);
"""

_PENDING = (DeliveryState.QUEUED.value, DeliveryState.SENDING.value)


class SqliteJobStore(SqliteDatabase):
    """Studies and jobs with their stage timestamps, on the database that also holds the delivery queue."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)
        with self._lock:  # databases made before the priority column
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "priority" not in columns:
                self._db.execute("ALTER TABLE jobs ADD COLUMN priority TEXT NOT NULL DEFAULT 'routine'")

    def upsert_study(self, record: StudyRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO studies VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(study_uid) DO UPDATE SET "
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
        with self._lock:
            self._db.execute("UPDATE studies SET state=? WHERE study_uid=?", (state.value, study_uid))

    def add_job(self, spec: JobSpec) -> None:
        stages = {
            Stage.RECEIVED.value: spec.last_received,
            Stage.COMPLETE.value: spec.completed_at,
        }
        with self._lock:
            # A re-sent study reuses its deterministic job id: reset the row instead of adding a second one.
            self._db.execute(
                "INSERT INTO jobs (job_id, study_uid, series_uid, model_key, state, stages, priority) "
                "VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT(job_id) DO UPDATE SET state=excluded.state, reason='', stages=excluded.stages, "
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
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET stages=json_set(stages, ?, ?), state=CASE WHEN state=? THEN ? ELSE state END "
                "WHERE job_id=?",
                (
                    f"$.{stage.value}",
                    at,
                    JobState.QUEUED.value,
                    JobState.RUNNING.value if stage is not Stage.QUEUED else JobState.QUEUED.value,
                    job_id,
                ),
            )

    def finish_job(self, job_id: str, state: JobState, reason: str = "", outputs: Sequence[str] = ()) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state=?, reason=?, outputs=? WHERE job_id=?",
                (state.value, reason, json.dumps(list(outputs)), job_id),
            )

    def record_batch(self, job_ids: Sequence[str]) -> None:
        shared = 1 if len(set(job_ids)) > 1 else 0
        with self._lock:
            self._db.executemany(
                "UPDATE jobs SET batches=batches+1, shared_batches=shared_batches+? WHERE job_id=?",
                [(shared, j) for j in set(job_ids)],
            )

    def record_shadow(self, record: ShadowRecord) -> None:
        """One row per (job, shadow version); a re-run replaces it."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO shadow_runs (job_id, model_key, outcome, agreement, reason, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.job_id,
                    record.model_key,
                    record.outcome,
                    json.dumps(record.agreement),
                    record.reason,
                    record.at,
                ),
            )

    def _shadow(self, job_id: str) -> tuple[ShadowRecord, ...]:
        rows = self._db.execute("SELECT * FROM shadow_runs WHERE job_id=? ORDER BY model_key", (job_id,))
        return tuple(
            ShadowRecord(
                job_id=r["job_id"],
                model_key=r["model_key"],
                outcome=r["outcome"],
                agreement=json.loads(r["agreement"]),
                reason=r["reason"],
                at=r["at"],
            )
            for r in rows.fetchall()
        )

    def _jobs(self, study_uid: str) -> tuple[JobRecord, ...]:
        rows = self._db.execute("SELECT * FROM jobs WHERE study_uid=? ORDER BY model_key", (study_uid,))
        return tuple(
            JobRecord(
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
                deliveries=self._deliveries(r["job_id"]),
                shadow=self._shadow(r["job_id"]),
                priority=Priority(r["priority"]),
            )
            for r in rows.fetchall()
        )

    def _study(self, r: sqlite3.Row) -> StudyRecord:
        return StudyRecord(
            study_uid=r["study_uid"],
            state=StudyState(r["state"]),
            calling_ae=r["calling_ae"],
            instances=r["instances"],
            series=r["series"],
            first_received=r["first_received"],
            last_received=r["last_received"],
            completed_at=r["completed_at"],
            jobs=self._jobs(r["study_uid"]),
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
            job.append("(j.model_key = ? OR substr(j.model_key, 1, length(?) + 1) = ? || '@')")
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
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
            return [self._study(r) for r in rows]

    def get_study(self, study_uid: str) -> StudyRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None:
                raise NotFoundError(f"no study {study_uid}")
            return self._study(row)

    def get_job(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT study_uid FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            (job,) = [j for j in self._jobs(row["study_uid"]) if j.job_id == job_id]
            return job

    # -- job and study settlement (after the outbound queue has acknowledged or given up) ----------------------

    def settle_job(self, job_id: str, at: float) -> JobState | None:
        """Once no delivery of a delivering job is pending: DELIVERED if all were acknowledged, else
        DEAD_LETTER. Returns the new state when this call changed it (exactly one caller wins)."""
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            if row is None or row["state"] not in (JobState.DELIVERING.value, JobState.DEAD_LETTER.value):
                return None
            rows = db.execute("SELECT * FROM deliveries WHERE job_id=?", (job_id,)).fetchall()
            states = {r["state"] for r in rows}
            if states & set(_PENDING):
                return None
            dead = [r for r in rows if r["state"] == DeliveryState.DEAD.value]
            new = JobState.DEAD_LETTER if dead else JobState.DELIVERED
            if new.value == row["state"]:
                return None
            reason = "; ".join(
                f"delivery to {r['destination']} dead-lettered after {r['attempts']} attempt(s): {r['last_error']}"
                for r in dead
            )[:500]
            db.execute("UPDATE jobs SET state=?, reason=? WHERE job_id=?", (new.value, reason, job_id))
            if new is JobState.DELIVERED:
                db.execute(
                    "UPDATE jobs SET stages=json_set(stages, ?, ?) WHERE job_id=?",
                    (f"$.{Stage.DELIVERED.value}", at, job_id),
                )
            return new

    def settle_study(self, study_uid: str) -> StudyState | None:
        """Once every job of a processing study is final: DONE, DEAD_LETTER (re-triable) or FAILED.
        Returns the new state when this call changed it."""
        with self._transaction() as db:
            row = db.execute("SELECT state FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None or row["state"] not in (StudyState.PROCESSING.value, StudyState.DEAD_LETTER.value):
                return None
            states = {
                r["state"] for r in db.execute("SELECT state FROM jobs WHERE study_uid=?", (study_uid,))
            }
            final = {JobState.DELIVERED.value, JobState.FAILED.value, JobState.DEAD_LETTER.value}
            if not states or not states <= final:
                return None
            if JobState.DEAD_LETTER.value in states:
                new = StudyState.DEAD_LETTER
            elif JobState.FAILED.value in states:
                new = StudyState.FAILED
            else:
                new = StudyState.DONE
            if new.value == row["state"]:
                return None
            db.execute("UPDATE studies SET state=? WHERE study_uid=?", (new.value, study_uid))
            return new

    def unsettled_jobs(self) -> list[str]:
        """Delivering jobs with nothing left in the queue (e.g. the process stopped between the two)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id FROM jobs j WHERE state=? AND NOT EXISTS (SELECT 1 FROM deliveries d "
                "WHERE d.job_id=j.job_id AND d.state IN (?,?))",
                (JobState.DELIVERING.value, *_PENDING),
            ).fetchall()
            return [r["job_id"] for r in rows]

    def remember_spool(self, study_uid: str, paths: Sequence[Path]) -> None:
        """The spooled instances to release once the study's results are delivered (survives a restart)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO study_spool VALUES (?,?) ON CONFLICT(study_uid) DO UPDATE SET paths=excluded.paths",
                (study_uid, json.dumps(sorted({str(p) for p in paths}))),
            )

    def spool_paths(self, study_uid: str) -> list[Path]:
        with self._lock:
            row = self._db.execute("SELECT paths FROM study_spool WHERE study_uid=?", (study_uid,)).fetchone()
            return [Path(p) for p in json.loads(row["paths"])] if row is not None else []

    def forget_spool(self, study_uid: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM study_spool WHERE study_uid=?", (study_uid,))
