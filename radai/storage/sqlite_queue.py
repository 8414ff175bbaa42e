"""SQLite connection handling and the persistent outbound queue: one row per (job, destination).

Thread-safe through one connection guarded by a lock (writes are tiny; WAL keeps readers such as the CLI
off the writer's back).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from radai.domain import DeliveryRecord, DeliveryState, JobState, StudyState
from radai.errors import NotFoundError

_PENDING = (DeliveryState.QUEUED.value, DeliveryState.SENDING.value)


class SqliteDatabase:
    """One SQLite connection guarded by a lock, and the outbound delivery queue on it (table `deliveries`).
    The job store (radai.storage.sqlite) extends it with studies and jobs."""

    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Lock + an IMMEDIATE transaction: atomic against this process's threads and against the CLI."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def ping(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1").fetchone() is not None

    def _deliveries(self, job_id: str) -> tuple[DeliveryRecord, ...]:
        rows = self._db.execute("SELECT * FROM deliveries WHERE job_id=? ORDER BY destination", (job_id,))
        return tuple(_delivery(r) for r in rows.fetchall())

    # -- the outbound queue ---------------------------------------------------------------------------------

    def enqueue_delivery(
        self, job_id: str, study_uid: str, destination: str, files: Sequence[str], at: float
    ) -> DeliveryState:
        """One row per (job, destination), never two. A pending row is kept as it is (the files are the same,
        deterministic results); a delivered or dead row is queued again with its attempts reset (a re-sent
        study: the PACS overwrites the same SOP instances). Returns the row's state afterwards."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO deliveries (job_id, destination, study_uid, files, state, attempts, next_attempt_at, "
                "updated_at) VALUES (?,?,?,?,?,0,?,?) ON CONFLICT(job_id, destination) DO UPDATE SET "
                "files=excluded.files, state=excluded.state, attempts=0, next_attempt_at=excluded.next_attempt_at, "
                "last_error='', updated_at=excluded.updated_at WHERE deliveries.state NOT IN (?,?)",
                (
                    job_id,
                    destination,
                    study_uid,
                    json.dumps(list(files)),
                    DeliveryState.QUEUED.value,
                    at,
                    at,
                    *_PENDING,
                ),
            )
            row = db.execute(
                "SELECT state FROM deliveries WHERE job_id=? AND destination=?", (job_id, destination)
            ).fetchone()
            return DeliveryState(row["state"])

    def claim_delivery(self, destination: str, now: float) -> DeliveryRecord | None:
        """The oldest due queued delivery for `destination`, switched to SENDING; None when nothing is due."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM deliveries WHERE destination=? AND state=? AND next_attempt_at<=? "
                "ORDER BY next_attempt_at, rowid LIMIT 1",
                (destination, DeliveryState.QUEUED.value, now),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE deliveries SET state=?, updated_at=? WHERE job_id=? AND destination=?",
                (DeliveryState.SENDING.value, now, row["job_id"], destination),
            )
            return _delivery(row, DeliveryState.SENDING)

    def update_delivery(
        self,
        job_id: str,
        destination: str,
        state: DeliveryState,
        attempts: int,
        next_attempt_at: float,
        error: str,
        at: float,
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE deliveries SET state=?, attempts=?, next_attempt_at=?, last_error=?, updated_at=? "
                "WHERE job_id=? AND destination=?",
                (state.value, attempts, next_attempt_at, error[:500], at, job_id, destination),
            )

    def resume_deliveries(self) -> int:
        """At start-up: deliveries left SENDING by a stopped process are queued again (sent again: an overwrite)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE deliveries SET state=? WHERE state=?",
                (DeliveryState.QUEUED.value, DeliveryState.SENDING.value),
            )
            return cur.rowcount

    def deliveries_for_job(self, job_id: str) -> tuple[DeliveryRecord, ...]:
        with self._lock:
            return self._deliveries(job_id)

    def count_deliveries(self, destination: str, state: DeliveryState) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) AS n FROM deliveries WHERE destination=? AND state=?",
                (destination, state.value),
            ).fetchone()
            return int(row["n"])

    def retry_dead(self, study_uid: str, at: float) -> int:
        """Queue a study's dead deliveries again with attempts reset; its jobs and the study go back to
        delivering / processing. Returns how many deliveries were queued."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM studies WHERE study_uid=?", (study_uid,)).fetchone() is None:
                raise NotFoundError(f"no study {study_uid}")
            cur = db.execute(
                "UPDATE deliveries SET state=?, attempts=0, next_attempt_at=?, last_error='', updated_at=? "
                "WHERE study_uid=? AND state=?",
                (DeliveryState.QUEUED.value, at, at, study_uid, DeliveryState.DEAD.value),
            )
            count = cur.rowcount
            if count:
                db.execute(
                    "UPDATE jobs SET state=?, reason='' WHERE study_uid=? AND state=?",
                    (JobState.DELIVERING.value, study_uid, JobState.DEAD_LETTER.value),
                )
                db.execute(
                    "UPDATE studies SET state=? WHERE study_uid=? AND state=?",
                    (StudyState.PROCESSING.value, study_uid, StudyState.DEAD_LETTER.value),
                )
            return count


def _delivery(r: sqlite3.Row, state: DeliveryState | None = None) -> DeliveryRecord:
    return DeliveryRecord(
        job_id=r["job_id"],
        destination=r["destination"],
        study_uid=r["study_uid"],
        state=state or DeliveryState(r["state"]),
        attempts=r["attempts"],
        next_attempt_at=r["next_attempt_at"],
        last_error=r["last_error"],
        files=tuple(json.loads(r["files"])),
        updated_at=r["updated_at"],
    )
