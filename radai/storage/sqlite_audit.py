"""The audit log (radai.audit.AuditLog) in the SQLite database of the job store, table `audit`.

Append-only twice over: triggers refuse every UPDATE and DELETE on the table, and each record carries the
SHA-256 of the previous record's hash and its own content, so a change made with another SQLite client
(after dropping the triggers) breaks the chain and `verify` names the first record that no longer fits;
records cut from the end leave a gap in the sequence SQLite keeps for AUTOINCREMENT.
The CLI and the server may both append (IMMEDIATE transactions serialise them across processes).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path

from radai.audit import AuditQuery, AuditRecord, Event
from radai.errors import AuditTamperedError
from radai.storage.sqlite_queue import SqliteDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    subject TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_event ON audit(event, seq);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
_GENESIS = "0" * 64
_MAX_FIELD = 256  # bounded fields: an over-long value (a hostile AE title, a long reason) is cut


def _chain(previous: str, at: float, event: str, actor: str, subject: str, outcome: str, detail: str) -> str:
    body = json.dumps([previous, repr(at), event, actor, subject, outcome, detail], ensure_ascii=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _cut(value: str) -> str:
    return value if len(value) <= _MAX_FIELD else value[: _MAX_FIELD - 1] + "…"


class SqliteAuditLog(SqliteDatabase):
    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    def append(
        self, event: Event, actor: str, subject: str, outcome: str, detail: Mapping[str, str] | None = None
    ) -> None:
        at = time.time()
        fields = (str(event), _cut(actor), _cut(subject), _cut(outcome))
        text = json.dumps({k: _cut(str(v)) for k, v in sorted((detail or {}).items())}, ensure_ascii=False)
        with self._transaction() as db:
            row = db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            digest = _chain(row["hash"] if row else _GENESIS, at, *fields, text)
            db.execute(
                "INSERT INTO audit (at, event, actor, subject, outcome, detail, hash) VALUES (?,?,?,?,?,?,?)",
                (at, *fields, text, digest),
            )

    def records(self, query: AuditQuery | None = None) -> list[AuditRecord]:
        """Oldest first, from sequence number `query.after` on (page with the last seq seen)."""
        query = query or AuditQuery()
        sql, args = "SELECT * FROM audit WHERE seq > ?", list[object]([query.after])
        if query.event is not None:
            sql += " AND event = ?"
            args.append(query.event)
        if query.since is not None:
            sql += " AND at >= ?"
            args.append(query.since)
        if query.until is not None:
            sql += " AND at <= ?"
            args.append(query.until)
        sql += " ORDER BY seq LIMIT ?"
        args.append(max(1, min(query.limit, 10_000)))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            AuditRecord(
                seq=r["seq"],
                at=r["at"],
                event=r["event"],
                actor=r["actor"],
                subject=r["subject"],
                outcome=r["outcome"],
                detail=json.loads(r["detail"]),
            )
            for r in rows
        ]

    def verify(self) -> int:
        previous, count = _GENESIS, 0
        with self._lock:
            rows = self._db.execute("SELECT * FROM audit ORDER BY seq").fetchall()
            top = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
        # AUTOINCREMENT never reuses a number: sqlite_sequence keeps the highest ever given, so records
        # cut from the end show as a gap there, and from anywhere else as a gap in the numbers.
        numbers = [r["seq"] for r in rows]
        if numbers != list(range(1, len(rows) + 1)) or (top is not None and top["seq"] != len(rows)):
            raise AuditTamperedError("audit records are missing (the sequence numbers have gaps)")
        for r in rows:
            expected = _chain(
                previous, r["at"], r["event"], r["actor"], r["subject"], r["outcome"], r["detail"]
            )
            if expected != r["hash"]:
                raise AuditTamperedError(f"audit record {r['seq']} does not match the chain")
            previous, count = r["hash"], count + 1
        return count
