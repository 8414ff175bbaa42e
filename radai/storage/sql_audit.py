"""The audit log (radai.audit.AuditLog) on a `Database` (SQLite or PostgreSQL), table `audit`.

Append-only twice over: triggers refuse every UPDATE and DELETE on the table, and each record carries the
SHA-256 of the previous record's hash and its own content, so a change made with another client (after
dropping the triggers) breaks the chain and `verify` names the first record that no longer fits. Records cut
from the end leave a gap against the highest number ever given: SQLite keeps it in `sqlite_sequence`
(AUTOINCREMENT), PostgreSQL in the one-row table `audit_head`, updated in the same transaction as the record
(a sequence would not do: a rolled-back append would leave a false gap). Appends are serialised across
processes: SQLite's IMMEDIATE transaction, PostgreSQL's lock on the `audit_head` row.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping

from radai.audit import AuditQuery, AuditRecord, Event
from radai.errors import AuditTamperedError
from radai.storage.sql import Database, Session

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit (
    seq {seq_pk},
    at {real} NOT NULL,
    event {text} NOT NULL,
    actor {text} NOT NULL,
    subject {text} NOT NULL,
    outcome {text} NOT NULL,
    detail {text} NOT NULL,
    hash {text} NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS audit_event ON audit(event, seq)",
    "CREATE INDEX IF NOT EXISTS audit_at ON audit(at)",
)
# What truly differs: the triggers, and where the highest number ever given is kept.
_APPEND_ONLY = {
    "sqlite": (
        "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit "
        "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
        "CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit "
        "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    ),
    "postgresql": (
        "CREATE TABLE IF NOT EXISTS audit_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL)",
        "INSERT INTO audit_head (id, seq) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
        "CREATE OR REPLACE FUNCTION radai_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$",
        "CREATE OR REPLACE FUNCTION radai_audit_head_forward() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF TG_OP <> 'UPDATE' OR NEW.seq <> OLD.seq + 1 THEN "
        "RAISE EXCEPTION 'the audit log is append-only'; END IF; RETURN NEW; END $$",
        "CREATE OR REPLACE TRIGGER audit_no_update BEFORE UPDATE ON audit "
        "FOR EACH ROW EXECUTE FUNCTION radai_audit_append_only()",
        "CREATE OR REPLACE TRIGGER audit_no_delete BEFORE DELETE ON audit "
        "FOR EACH ROW EXECUTE FUNCTION radai_audit_append_only()",
        "CREATE OR REPLACE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit "
        "FOR EACH STATEMENT EXECUTE FUNCTION radai_audit_append_only()",
        "CREATE OR REPLACE TRIGGER audit_head_forward BEFORE UPDATE OR DELETE ON audit_head "
        "FOR EACH ROW EXECUTE FUNCTION radai_audit_head_forward()",
        "CREATE OR REPLACE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head "
        "FOR EACH STATEMENT EXECUTE FUNCTION radai_audit_append_only()",
    ),
}
# The highest number ever given (PostgreSQL: its row locked, which serialises appends and verify).
_TOP = {
    "sqlite": "SELECT seq FROM sqlite_sequence WHERE name = 'audit'",
    "postgresql": "SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE",
}
_ADVANCE = {"postgresql": "UPDATE audit_head SET seq = ? WHERE id = 1"}
_GENESIS = "0" * 64
_MAX_FIELD = 256  # bounded fields: an over-long value (a hostile AE title, a long reason) is cut


def _chain(previous: str, at: float, event: str, actor: str, subject: str, outcome: str, detail: str) -> str:
    body = json.dumps([previous, repr(at), event, actor, subject, outcome, detail], ensure_ascii=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _cut(value: str) -> str:
    return value if len(value) <= _MAX_FIELD else value[: _MAX_FIELD - 1] + "…"


class SqlAuditLog:
    """radai.audit.AuditLog on `database` (creates the table and its triggers when they are missing)."""

    def __init__(self, database: Database) -> None:
        self._db = database
        with database.schema_transaction() as db:
            for statement in SCHEMA:
                db.run(database.dialect.schema(statement))
            for statement in _APPEND_ONLY[database.dialect.name]:
                db.run(statement)

    @property
    def database(self) -> Database:
        return self._db

    def close(self) -> None:
        self._db.close()

    def ping(self) -> bool:
        return self._db.ping()

    def _top(self, db: Session) -> int:
        row = db.one(_TOP[self._db.dialect.name])
        return int(row["seq"]) if row is not None else 0

    def append(
        self, event: Event, actor: str, subject: str, outcome: str, detail: Mapping[str, str] | None = None
    ) -> None:
        at = time.time()
        fields = (str(event), _cut(actor), _cut(subject), _cut(outcome))
        text = json.dumps({k: _cut(str(v)) for k, v in sorted((detail or {}).items())}, ensure_ascii=False)
        with self._db.transaction() as db:
            seq = self._top(db) + 1  # after AUTOINCREMENT's rule: never a number given before
            row = db.one("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1")
            digest = _chain(row["hash"] if row else _GENESIS, at, *fields, text)
            db.run(
                "INSERT INTO audit (seq, at, event, actor, subject, outcome, detail, hash) VALUES (?,?,?,?,?,?,?,?)",
                (seq, at, *fields, text, digest),
            )
            advance = _ADVANCE.get(self._db.dialect.name)
            if advance is not None:
                db.run(advance, (seq,))

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
        with self._db.session() as db:
            rows = db.all(sql, args)
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
        with self._db.transaction() as db:  # the head first: no append lands between the two reads
            top = self._top(db)
            rows = db.all("SELECT * FROM audit ORDER BY seq")
        # Numbers are never reused: the highest ever given is kept apart, so records cut from the end show as
        # a gap there, and from anywhere else as a gap in the numbers.
        numbers = [r["seq"] for r in rows]
        if numbers != list(range(1, len(rows) + 1)) or top != len(rows):
            raise AuditTamperedError("audit records are missing (the sequence numbers have gaps)")
        for r in rows:
            expected = _chain(
                previous, r["at"], r["event"], r["actor"], r["subject"], r["outcome"], r["detail"]
            )
            if expected != r["hash"]:
                raise AuditTamperedError(f"audit record {r['seq']} does not match the chain")
            previous, count = r["hash"], count + 1
        return count
