"""The audit log (radai.audit.AuditLog) in the SQLite database of the job store, table `audit`: append-only
(triggers), hash-chained, numbered without reuse (AUTOINCREMENT's `sqlite_sequence`). The CLI and the server
may both append (IMMEDIATE transactions serialise them across processes). The statements are shared with
PostgreSQL: radai.storage.sql_audit.
"""

from __future__ import annotations

from pathlib import Path

from radai.storage.sql_audit import SqlAuditLog
from radai.storage.sqlite_queue import SqliteDatabase


class SqliteAuditLog(SqlAuditLog):
    """The audit log in the SQLite database at `path` (usually the job store's)."""

    def __init__(self, path: Path) -> None:
        super().__init__(SqliteDatabase(path))
