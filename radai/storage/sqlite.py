"""SQLite job store: one row per study and per (study, series, model) job, with stage timestamps.

Thread-safe through one connection guarded by a lock (writes are tiny; WAL keeps readers such as the CLI
off the writer's back).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from radai.domain import JobRecord, JobSpec, JobState, Stage, StudyRecord, StudyState
from radai.errors import NotFoundError

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
    outputs TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs(study_uid);
"""


class SqliteJobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ping(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1").fetchone() is not None

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
                "INSERT INTO jobs (job_id, study_uid, series_uid, model_key, state, stages) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(job_id) DO UPDATE SET state=excluded.state, reason='', stages=excluded.stages, "
                "batches=0, shared_batches=0, outputs='[]'",
                (
                    spec.job_id,
                    spec.study_uid,
                    spec.series_uid,
                    spec.model_key,
                    JobState.QUEUED.value,
                    json.dumps(stages),
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

    def list_studies(self, limit: int = 100) -> list[StudyRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM studies ORDER BY completed_at DESC LIMIT ?", (limit,)
            ).fetchall()
            return [self._study(r) for r in rows]

    def get_study(self, study_uid: str) -> StudyRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None:
                raise NotFoundError(f"no study {study_uid}")
            return self._study(row)
