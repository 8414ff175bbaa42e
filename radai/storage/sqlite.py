"""SQLite job store of the embedded mode: studies, jobs with their stage timestamps and the outbound delivery
queue in one database file, so a job and its deliveries settle in one transaction. The statements are shared
with PostgreSQL (radai.storage.sql_jobs); the connection is radai.storage.sqlite_queue.SqliteDatabase.
"""

from __future__ import annotations

from pathlib import Path

from radai.storage.sql_jobs import SqlJobStore
from radai.storage.sqlite_queue import SqliteDatabase


class SqliteJobStore(SqlJobStore):
    """Studies and jobs with their stage timestamps, on the database that also holds the delivery queue."""

    def __init__(self, path: Path) -> None:
        super().__init__(SqliteDatabase(path))
