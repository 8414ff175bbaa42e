"""PostgreSQL for the distributed mode: the same tables and statements as the embedded SQLite store
(radai.storage.sql_jobs, sql_queue, sql_audit), on one psycopg 3 connection per store guarded by a lock.
Every statement runs in an explicit transaction (READ COMMITTED; rows a read-modify-write changes are locked
with SELECT ... FOR UPDATE, queue claims skip rows other workers hold). A connection found broken when a
transaction begins is opened again once (nothing was sent yet, so that retry is safe).
Needs PostgreSQL >= 14 (CREATE OR REPLACE TRIGGER).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager

import psycopg
from psycopg.rows import DictRow, dict_row

from radai.storage.sql import POSTGRES, Database, Params, Row, Session
from radai.storage.sql_audit import SqlAuditLog
from radai.storage.sql_jobs import SqlJobStore

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key: processes that start together create and migrate the tables in turn
_SCHEMA_LOCK = 0x72616461_69000001
_CONNECT_TIMEOUT_S = 10

Connection = psycopg.Connection[DictRow]


class _PgSession:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @staticmethod
    def _sql(sql: str) -> str:
        # radai's statements are fixed fragments (values are always parameters)
        return POSTGRES.sql(sql)

    def one(self, sql: str, params: Params = ()) -> Row | None:
        return self._conn.execute(self._sql(sql), tuple(params)).fetchone()

    def all(self, sql: str, params: Params = ()) -> list[Row]:
        return self._conn.execute(self._sql(sql), tuple(params)).fetchall()

    def run(self, sql: str, params: Params = ()) -> int:
        return self._conn.execute(self._sql(sql), tuple(params)).rowcount

    def many(self, sql: str, rows: Sequence[Params]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(self._sql(sql), [tuple(r) for r in rows])

    def columns(self, table: str) -> set[str]:
        cursor = self._conn.execute(self._sql(f"SELECT * FROM {table} LIMIT 0"))  # radai's table names only
        return {d.name for d in cursor.description or ()}


class PostgresDatabase(Database):
    """One PostgreSQL connection (`url`: postgresql://user:password@host:5432/dbname) guarded by a lock."""

    dialect = POSTGRES

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url
        self._conn = self._connect()

    def _connect(self) -> Connection:
        return psycopg.connect(
            self._url, autocommit=True, row_factory=dict_row, connect_timeout=_CONNECT_TIMEOUT_S
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _begin(self, stack: ExitStack) -> Connection:
        """BEGIN on the connection; a broken one (server restarted, idle connection cut) is replaced once."""
        if self._conn.closed or self._conn.broken:
            self._reconnect()
        try:
            stack.enter_context(self._conn.transaction())
        except psycopg.OperationalError:
            if not (self._conn.closed or self._conn.broken):
                raise
            self._reconnect()
            stack.enter_context(self._conn.transaction())
        return self._conn

    def _reconnect(self) -> None:
        log.warning("database connection lost: connecting again")
        self._conn.close()
        self._conn = self._connect()

    @contextmanager
    def transaction(self) -> Iterator[_PgSession]:
        with self._lock, ExitStack() as stack:
            yield _PgSession(self._begin(stack))

    def session(self) -> AbstractContextManager[Session]:
        return self.transaction()

    @contextmanager
    def schema_transaction(self) -> Iterator[_PgSession]:
        with self.transaction() as session:
            session.run("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            yield session

    def ping(self) -> bool:
        try:
            return super().ping()
        except psycopg.Error:
            return False


class PostgresJobStore(SqlJobStore):
    """The job store and delivery queue (radai.ports.JobStore, DeliveryQueue) in PostgreSQL."""

    def __init__(self, url: str) -> None:
        super().__init__(PostgresDatabase(url))


class PostgresAuditLog(SqlAuditLog):
    """The audit log (radai.audit.AuditLog) in PostgreSQL."""

    def __init__(self, url: str) -> None:
        super().__init__(PostgresDatabase(url))
