"""Parts of one study received by several receivers (scale-out mode), on the shared `Database` (SQLite or
PostgreSQL): one row per (study, receiver). A receiver `touch`es its row while instances arrive and
`complete_part`s it when its local assembler decides its part is complete; `take_due` then merges all parts
and deletes them in one transaction, once every receiver's part is complete, so exactly one receiver plans
the whole study. Each row's times come from one receiver's clock only, so clock skew between receivers does
not matter. A receiver whose first instance of the study is not yet recorded (`touch`) cannot be waited for:
touch the first instance of a part at once, throttle only the later ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from radai.storage.sql import Database, Row

SCHEMA = """CREATE TABLE IF NOT EXISTS study_parts (
    study_uid {text} NOT NULL,
    receiver {text} NOT NULL,
    last_instance_at {real} NOT NULL,
    completed_through {real},
    paths {text} NOT NULL DEFAULT '[]',
    calling_ae {text} NOT NULL DEFAULT '',
    first_received {real},
    last_received {real},
    PRIMARY KEY (study_uid, receiver)
)"""

# A part is complete when it was completed and nothing arrived at its receiver after that.
_COMPLETE = "completed_through IS NOT NULL AND completed_through >= last_instance_at"


@dataclass(frozen=True)
class MergedStudy:
    """All parts of one study: the spool paths of every receiver (sorted, each once), the calling AE of the
    part that began first, the earliest and latest instance arrival, and the receivers that had parts."""

    study_uid: str
    paths: tuple[str, ...]
    calling_ae: str
    first_received: float
    last_received: float
    receivers: tuple[str, ...]


class StudyParts:
    """The table `study_parts` on `database` (created when missing); thread-safe, and safe for several
    processes on one database."""

    def __init__(self, database: Database) -> None:
        self._db = database
        with database.schema_transaction() as db:
            db.run(database.dialect.schema(SCHEMA))

    @classmethod
    def sqlite(cls, path: Path) -> StudyParts:
        from radai.storage.sqlite_queue import SqliteDatabase

        return cls(SqliteDatabase(path))

    @classmethod
    def postgres(cls, url: str) -> StudyParts:
        from radai.storage.postgres import PostgresDatabase  # psycopg only where PostgreSQL is used

        return cls(PostgresDatabase(url))

    @property
    def database(self) -> Database:
        return self._db

    def close(self) -> None:
        self._db.close()

    def touch(self, study_uid: str, receiver: str, at: float) -> None:
        """An instance of the study arrived at `receiver` at `at` (epoch seconds, the receiver's clock)."""
        with self._db.transaction() as db:
            db.run(
                "INSERT INTO study_parts (study_uid, receiver, last_instance_at) VALUES (?,?,?) "
                "ON CONFLICT (study_uid, receiver) DO UPDATE SET last_instance_at = CASE "
                "WHEN excluded.last_instance_at > study_parts.last_instance_at "
                "THEN excluded.last_instance_at ELSE study_parts.last_instance_at END",
                (study_uid, receiver, at),
            )

    def complete_part(
        self,
        study_uid: str,
        receiver: str,
        paths: Sequence[str],
        calling_ae: str,
        first_received: float,
        last_received: float,
    ) -> None:
        """`receiver`'s part is complete through `last_received`: its paths join those the row had (each
        once); the calling AE is that of the earliest-begun part this receiver completed."""
        with self._db.transaction() as db:
            db.run(
                "INSERT INTO study_parts (study_uid, receiver, last_instance_at) VALUES (?,?,?) "
                "ON CONFLICT (study_uid, receiver) DO NOTHING",
                (study_uid, receiver, last_received),
            )
            row = db.one(
                "SELECT * FROM study_parts WHERE study_uid=? AND receiver=?" + self._db.dialect.for_update,
                (study_uid, receiver),
            )
            if row is None:  # pragma: no cover - the row exists and is locked by this transaction
                raise RuntimeError("study part vanished inside its transaction")
            merged = sorted(set(json.loads(row["paths"])) | set(paths))
            began = row["first_received"]
            earlier = began is None or first_received < began
            db.run(
                "UPDATE study_parts SET paths=?, calling_ae=?, completed_through=?, last_instance_at=?, "
                "first_received=?, last_received=? WHERE study_uid=? AND receiver=?",
                (
                    json.dumps(merged),
                    calling_ae if earlier else row["calling_ae"],
                    last_received,
                    max(row["last_instance_at"], last_received),
                    first_received if earlier else began,
                    last_received
                    if row["last_received"] is None
                    else max(row["last_received"], last_received),
                    study_uid,
                    receiver,
                ),
            )

    def take_due(self, study_uid: str, *, abandoned_before: float | None = None) -> MergedStudy | None:
        """The whole study when every receiver's part is complete, its rows deleted in the same transaction
        (exactly one caller gets it); None while a receiver is still receiving, or when there is nothing.
        With `abandoned_before`, a part that got nothing since then and never completed (its receiver went
        away for good) no longer holds the study back: the completed parts are planned without it."""
        with self._db.transaction() as db:
            # receiver order: concurrent callers lock the rows in the same order, so they never deadlock
            rows = db.all(
                "SELECT * FROM study_parts WHERE study_uid=? ORDER BY receiver" + self._db.dialect.for_update,
                (study_uid,),
            )
            if not rows or not all(_complete(r) or _abandoned(r, abandoned_before) for r in rows):
                return None
            # only the rows read and locked here: a part begun meanwhile stays, to be planned on its own
            db.many(
                "DELETE FROM study_parts WHERE study_uid=? AND receiver=?",
                [(study_uid, r["receiver"]) for r in rows],
            )
        rows = [r for r in rows if r["completed_through"] is not None]
        if not rows:
            return None  # only abandoned parts: nothing was completed to plan
        first = min(rows, key=lambda r: (r["first_received"], r["receiver"]))
        return MergedStudy(
            study_uid=study_uid,
            paths=tuple(sorted({p for r in rows for p in json.loads(r["paths"])})),
            calling_ae=str(first["calling_ae"]),
            first_received=float(first["first_received"]),
            last_received=max(float(r["last_received"]) for r in rows),
            receivers=tuple(str(r["receiver"]) for r in rows),
        )

    def stalled(self, abandoned_before: float) -> list[str]:
        """Studies held back by a part that got nothing since `abandoned_before` and never completed."""
        with self._db.session() as db:
            rows = db.all(
                f"SELECT DISTINCT study_uid FROM study_parts WHERE NOT ({_COMPLETE}) AND last_instance_at<?"
                " ORDER BY study_uid",
                (abandoned_before,),
            )
        return [str(r["study_uid"]) for r in rows]

    def waiting(self, study_uid: str) -> list[str]:
        """The receivers whose part of the study is not complete yet (sorted)."""
        with self._db.session() as db:
            rows = db.all(
                f"SELECT receiver FROM study_parts WHERE study_uid=? AND NOT ({_COMPLETE}) ORDER BY receiver",
                (study_uid,),
            )
        return [str(r["receiver"]) for r in rows]


def _abandoned(row: Row, before: float | None) -> bool:
    return before is not None and float(row["last_instance_at"]) < before


def _complete(row: Row) -> bool:
    done = row["completed_through"]
    return done is not None and float(done) >= float(row["last_instance_at"])
