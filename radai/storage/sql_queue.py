"""The persistent outbound queue (table `deliveries`: one row per (job, destination)) on a `Database`,
SQLite or PostgreSQL. Several workers may share one PostgreSQL database: a claim locks the row it takes and
skips rows locked by others, so two workers never claim the same delivery.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from radai.domain import DeliveryRecord, DeliveryState, JobState, StudyState
from radai.errors import NotFoundError
from radai.storage.sql import Database, Row, Session

PENDING = (DeliveryState.QUEUED.value, DeliveryState.SENDING.value)


class SqlDeliveryQueue:
    """radai.ports.DeliveryQueue on `database`; the job store (radai.storage.sql_jobs) extends it."""

    def __init__(self, database: Database) -> None:
        self._db = database

    @property
    def database(self) -> Database:
        return self._db

    def close(self) -> None:
        self._db.close()

    def ping(self) -> bool:
        return self._db.ping()

    def enqueue_delivery(
        self, job_id: str, study_uid: str, destination: str, files: Sequence[str], at: float
    ) -> DeliveryState:
        """One row per (job, destination), never two. A pending row is kept as it is (the files are the same,
        deterministic results); a delivered or dead row is queued again with its attempts reset (a re-sent
        study: the PACS overwrites the same SOP instances). Returns the row's state afterwards."""
        with self._db.transaction() as db:
            db.run(
                "INSERT INTO deliveries (job_id, destination, study_uid, files, state, attempts, next_attempt_at, "
                "updated_at) VALUES (?,?,?,?,?,0,?,?) ON CONFLICT (job_id, destination) DO UPDATE SET "
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
                    *PENDING,
                ),
            )
            row = db.one(
                "SELECT state FROM deliveries WHERE job_id=? AND destination=?", (job_id, destination)
            )
            if row is None:  # pragma: no cover - the row was just written in this transaction
                raise NotFoundError(f"no delivery {job_id} -> {destination}")
            return DeliveryState(row["state"])

    def claim_delivery(self, destination: str, now: float) -> DeliveryRecord | None:
        """The oldest due queued delivery for `destination`, switched to SENDING; None when nothing is due."""
        with self._db.transaction() as db:
            row = db.one(
                "SELECT * FROM deliveries WHERE destination=? AND state=? AND next_attempt_at<=? "
                "ORDER BY next_attempt_at, rowid LIMIT 1" + self._db.dialect.skip_locked,
                (destination, DeliveryState.QUEUED.value, now),
            )
            if row is None:
                return None
            db.run(
                "UPDATE deliveries SET state=?, updated_at=? WHERE job_id=? AND destination=?",
                (DeliveryState.SENDING.value, now, row["job_id"], destination),
            )
            return delivery(row, DeliveryState.SENDING)

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
        with self._db.session() as db:
            db.run(
                "UPDATE deliveries SET state=?, attempts=?, next_attempt_at=?, last_error=?, updated_at=? "
                "WHERE job_id=? AND destination=?",
                (state.value, attempts, next_attempt_at, error[:500], at, job_id, destination),
            )

    def resume_deliveries(self, claimed_before: float | None = None) -> int:
        """At start-up: deliveries left SENDING by a stopped process are queued again (sent again: an
        overwrite). With several workers on one database, pass `claimed_before` (epoch seconds: now less a
        lease longer than any send) so that only claims that old are taken back, not another worker's."""
        sql = "UPDATE deliveries SET state=? WHERE state=?"
        params: list[object] = [DeliveryState.QUEUED.value, DeliveryState.SENDING.value]
        if claimed_before is not None:
            sql += " AND updated_at<?"
            params.append(claimed_before)
        with self._db.session() as db:
            return db.run(sql, params)

    def deliveries_for_job(self, job_id: str) -> tuple[DeliveryRecord, ...]:
        with self._db.session() as db:
            return deliveries(db, job_id)

    def count_deliveries(self, destination: str, state: DeliveryState) -> int:
        with self._db.session() as db:
            row = db.one(
                "SELECT COUNT(*) AS n FROM deliveries WHERE destination=? AND state=?",
                (destination, state.value),
            )
            return int(row["n"]) if row is not None else 0

    def retry_dead(self, study_uid: str, at: float) -> int:
        """Queue a study's dead deliveries again with attempts reset; its jobs and the study go back to
        delivering / processing. Returns how many deliveries were queued."""
        with self._db.transaction() as db:
            # the study's row lock serialises this with settle_study on another worker
            found = db.one(
                "SELECT state FROM studies WHERE study_uid=?" + self._db.dialect.for_update, (study_uid,)
            )
            if found is None:
                raise NotFoundError(f"no study {study_uid}")
            count = db.run(
                "UPDATE deliveries SET state=?, attempts=0, next_attempt_at=?, last_error='', updated_at=? "
                "WHERE study_uid=? AND state=?",
                (DeliveryState.QUEUED.value, at, at, study_uid, DeliveryState.DEAD.value),
            )
            if count:
                db.run(
                    "UPDATE jobs SET state=?, reason='' WHERE study_uid=? AND state=?",
                    (JobState.DELIVERING.value, study_uid, JobState.DEAD_LETTER.value),
                )
                db.run(
                    "UPDATE studies SET state=? WHERE study_uid=? AND state=?",
                    (StudyState.PROCESSING.value, study_uid, StudyState.DEAD_LETTER.value),
                )
            return count


def deliveries(db: Session, job_id: str) -> tuple[DeliveryRecord, ...]:
    rows = db.all("SELECT * FROM deliveries WHERE job_id=? ORDER BY destination", (job_id,))
    return tuple(delivery(r) for r in rows)


def delivery(r: Row, state: DeliveryState | None = None) -> DeliveryRecord:
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
