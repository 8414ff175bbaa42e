"""The SQLite connection of the embedded store: one connection guarded by a lock (writes are tiny; WAL keeps
readers such as the CLI off the writer's back). The statements on it (job store, delivery queue, audit log)
are shared with PostgreSQL: radai.storage.sql_jobs, sql_queue and sql_audit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from radai.storage.sql import SQLITE, Database, Params, Row, Session


def _dict_row(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> Row:
    return {d[0]: v for d, v in zip(cursor.description, values, strict=True)}


class _SqliteSession:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def one(self, sql: str, params: Params = ()) -> Row | None:
        row: Row | None = self._db.execute(sql, tuple(params)).fetchone()
        return row

    def all(self, sql: str, params: Params = ()) -> list[Row]:
        rows: list[Row] = self._db.execute(sql, tuple(params)).fetchall()
        return rows

    def run(self, sql: str, params: Params = ()) -> int:
        return self._db.execute(sql, tuple(params)).rowcount

    def many(self, sql: str, rows: Sequence[Params]) -> None:
        self._db.executemany(sql, [tuple(r) for r in rows])

    def columns(self, table: str) -> set[str]:
        cursor = self._db.execute(f"SELECT * FROM {table} LIMIT 0")  # a table name from radai's code only
        return {d[0] for d in cursor.description}


class SqliteDatabase(Database):
    """One SQLite connection (autocommit; explicit `BEGIN IMMEDIATE` transactions) guarded by a lock."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = _dict_row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[_SqliteSession]:
        """Lock + an IMMEDIATE transaction: atomic against this process's threads and against the CLI."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteSession(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def schema_transaction(self) -> AbstractContextManager[Session]:
        return self.transaction()

    @contextmanager
    def session(self) -> Iterator[_SqliteSession]:
        with self._lock:
            yield _SqliteSession(self._db)
