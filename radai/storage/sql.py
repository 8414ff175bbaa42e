"""The shared data-access layer of the job store, the delivery queue and the audit log: one set of SQL
statements (written with `?` placeholders, standard SQL that SQLite >= 3.24 and PostgreSQL both accept) run
through a `Database` (one connection guarded by a lock) whose `Dialect` holds what truly differs: the
placeholder style, a few DDL types, and row locks. SQLite: radai.storage.sqlite_queue; PostgreSQL:
radai.storage.postgres.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

Row = dict[str, Any]
Params = Sequence[object]


@dataclass(frozen=True)
class Dialect:
    """What differs between the engines. `ddl` values fill the `{name}` fields of schema statements;
    `for_update` ends a SELECT that reads a row this transaction will write (PostgreSQL row locks; SQLite
    needs none: its transactions take the database write lock up front); `skip_locked` ends the claim of a
    queue row, so that concurrent workers claim different rows."""

    name: str
    paramstyle: str  # "qmark" (SQLite) or "format" (psycopg)
    ddl: tuple[tuple[str, str], ...]
    for_update: str
    skip_locked: str

    def sql(self, text: str) -> str:
        return _to_format(text) if self.paramstyle == "format" else text

    def schema(self, template: str) -> str:
        return template.format(**dict(self.ddl))


@functools.lru_cache(maxsize=256)
def _to_format(text: str) -> str:
    """`?` placeholders to psycopg's `%s` (a literal `%` doubled). radai's statements hold no `?` inside
    string literals or as an operator, which is what makes this plain replacement exact."""
    return text.replace("%", "%%").replace("?", "%s")


SQLITE = Dialect(
    name="sqlite",
    paramstyle="qmark",
    ddl=(
        ("real", "REAL"),
        ("text", "TEXT"),
        ("rowid", ""),  # SQLite tables have an implicit rowid (insertion order)
        ("seq_pk", "INTEGER PRIMARY KEY AUTOINCREMENT"),
    ),
    for_update="",
    skip_locked="",
)

POSTGRES = Dialect(
    name="postgresql",
    paramstyle="format",
    ddl=(
        ("real", "DOUBLE PRECISION"),
        ("text", 'TEXT COLLATE "C"'),  # compared and ordered bytewise, as SQLite does
        # an explicit stand-in for SQLite's implicit rowid: insertion order for ties in the ORDER BY clauses
        ("rowid", "rowid BIGINT GENERATED ALWAYS AS IDENTITY,"),
        # numbered by the audit log itself (from the audit_head row, transactional, unlike a sequence)
        ("seq_pk", "BIGINT PRIMARY KEY"),
    ),
    for_update=" FOR UPDATE",
    skip_locked=" FOR UPDATE SKIP LOCKED",
)


class Session(Protocol):
    """Statements on the connection of a `Database` while its lock is held."""

    def one(self, sql: str, params: Params = ()) -> Row | None: ...

    def all(self, sql: str, params: Params = ()) -> list[Row]: ...

    def run(self, sql: str, params: Params = ()) -> int:
        """Executes a statement; the number of rows it changed."""
        ...

    def many(self, sql: str, rows: Sequence[Params]) -> None: ...

    def columns(self, table: str) -> set[str]: ...


class Database(ABC):
    """One connection guarded by a lock. `transaction()`: an atomic unit against this process's threads and
    against other processes; `session()`: plain statements (each atomic by itself)."""

    dialect: Dialect

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Session]: ...

    @abstractmethod
    def session(self) -> AbstractContextManager[Session]: ...

    @abstractmethod
    def schema_transaction(self) -> AbstractContextManager[Session]:
        """A transaction for schema changes, serialised across processes that start at the same time."""
        ...

    @abstractmethod
    def close(self) -> None: ...

    def ping(self) -> bool:
        with self.session() as s:
            return s.one("SELECT 1 AS one") is not None
