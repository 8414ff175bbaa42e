"""The audit log: append-only in SQLite (triggers), a hash chain that finds changes made behind radai's back,
filters, the `radai audit` commands, and over HTTP: read with a token, one `api.write` record per write."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from radai.api.audit import audit_router, audit_writes
from radai.api.auth import Tokens, require_admin
from radai.audit import Auditor, AuditQuery, Event
from radai.errors import AuditTamperedError
from radai.storage.sqlite_audit import SqliteAuditLog

ADMIN, READ = "Adm1n-Token-0123456789", "Re4d-Token-0123456789"


def _filled(path: Path) -> SqliteAuditLog:
    log = SqliteAuditLog(path)
    audit = Auditor(log)
    audit(Event.ASSOCIATION_ACCEPTED, "CT1@10.0.0.7", "ct-scanner", "accepted")
    audit(Event.MODEL_ADDED, "api:admin", "body@1.0.0")
    audit(Event.RESULT_DELIVERED, "radai", "0123456789abcdef", "delivered", destination="pacs", files="2")
    return log


def test_records_come_back_oldest_first_with_their_details_and_filters_apply(tmp_path: Path) -> None:
    log = _filled(tmp_path / "radai.sqlite")
    records = log.records()
    assert [r.seq for r in records] == [1, 2, 3]
    assert [r.event for r in records] == ["association.accepted", "model.added", "result.delivered"]
    assert records[2].detail == {"destination": "pacs", "files": "2"}
    assert [r.subject for r in log.records(AuditQuery(event="model.added"))] == ["body@1.0.0"]
    assert [r.seq for r in log.records(AuditQuery(after=1, limit=1))] == [2]
    assert log.records(AuditQuery(since=records[2].at + 1)) == []
    assert log.verify() == 3


def test_the_database_refuses_to_change_or_delete_a_record(tmp_path: Path) -> None:
    _filled(tmp_path / "radai.sqlite").close()
    db = sqlite3.connect(tmp_path / "radai.sqlite")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE audit SET actor = 'someone else' WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM audit WHERE seq = 3")


def _behind_radais_back(path: Path, sql: str) -> None:
    db = sqlite3.connect(path)
    db.executescript(f"DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete; {sql};")
    db.commit()
    db.close()


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("UPDATE audit SET subject = 'other@9.9.9' WHERE seq = 2", "record 2"),
        ("DELETE FROM audit WHERE seq = 2", "missing"),
        ("DELETE FROM audit WHERE seq = 3", "missing"),  # cut from the end
    ],
)
def test_a_change_made_behind_radais_back_is_found(tmp_path: Path, sql: str, message: str) -> None:
    path = tmp_path / "radai.sqlite"
    _filled(path).close()
    _behind_radais_back(path, sql)
    with pytest.raises(AuditTamperedError, match=message):
        SqliteAuditLog(path).verify()


def test_over_long_values_are_cut(tmp_path: Path) -> None:
    log = SqliteAuditLog(tmp_path / "radai.sqlite")
    Auditor(log)(Event.ASSOCIATION_REJECTED, "X" * 5000, "unlisted", "called_ae")
    (record,) = log.records()
    assert len(record.actor) == 256 and log.verify() == 1


def _api(path: Path, tokens: Tokens) -> tuple[TestClient, SqliteAuditLog]:
    log = SqliteAuditLog(path)
    app = FastAPI()
    app.include_router(audit_router(log, tokens))

    admin = [Depends(require_admin(tokens))]

    @app.post("/api/v1/things/{thing_id}/poke", dependencies=admin)
    def poke(thing_id: str) -> dict[str, str]:
        return {"poked": thing_id}

    @app.delete("/api/v1/things/{thing_id}", dependencies=admin)
    def drop(thing_id: str) -> None:
        return None

    audit_writes(app, Auditor(log), tokens)
    return TestClient(app), log


def test_every_write_request_gets_one_record_naming_the_route_not_the_path(tmp_path: Path) -> None:
    client, log = _api(tmp_path / "radai.sqlite", Tokens(admin=ADMIN, read=READ))
    uid = "1.2.826.0.1.3680043.8.498.12345"
    assert (
        client.post(f"/api/v1/things/{uid}/poke", headers={"Authorization": f"Bearer {ADMIN}"}).status_code
        == 200
    )
    assert client.delete(f"/api/v1/things/{uid}").status_code == 401  # refused writes are audited too
    assert (
        client.delete(f"/api/v1/things/{uid}", headers={"Authorization": f"Bearer {READ}"}).status_code == 401
    )
    assert client.post("/nowhere/../etc").status_code == 404
    client.get("/api/v1/audit", headers={"Authorization": f"Bearer {READ}"})  # a read: not audited
    records = log.records()
    assert [(r.actor, r.subject, r.outcome, r.detail["method"]) for r in records] == [
        ("api:admin", "/api/v1/things/{thing_id}/poke", "200", "POST"),
        ("api:anonymous", "/api/v1/things/{thing_id}", "401", "DELETE"),
        ("api:read", "/api/v1/things/{thing_id}", "401", "DELETE"),
        ("api:anonymous", "unmatched", "404", "POST"),
    ]
    assert all(uid not in str(r) for r in records)


def test_the_audit_route_needs_a_token_when_auth_is_on_and_filters(tmp_path: Path) -> None:
    client, log = _api(tmp_path / "radai.sqlite", Tokens(admin=ADMIN, read=READ))
    Auditor(log)(Event.MODEL_ACTIVATED, "cli:ops", "body@1.1.0")
    Auditor(log)(Event.MODEL_REMOVED, "cli:ops", "body@1.0.0")
    assert client.get("/api/v1/audit").status_code == 401
    answer = client.get(
        "/api/v1/audit", params={"event": "model.removed"}, headers={"Authorization": f"Bearer {READ}"}
    )
    assert answer.status_code == 200
    assert [(r["event"], r["subject"]) for r in answer.json()] == [("model.removed", "body@1.0.0")]
    bad = client.get("/api/v1/audit", params={"event": "nope"}, headers={"Authorization": f"Bearer {READ}"})
    assert bad.status_code == 422


def test_radai_audit_commands_list_and_verify(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = tmp_path / "radai.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(data)}}))
    _filled(data / "radai.sqlite").close()

    def radai(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "radai", *args], capture_output=True, text=True, check=False
        )

    listed = radai("audit", "list", "-c", str(config), "--event", "model.added")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\t")[2:5] == ["model.added", "api:admin", "body@1.0.0"]
    verified = radai("audit", "verify", "-c", str(config))
    assert verified.returncode == 0 and "3 records" in verified.stdout
    _behind_radais_back(data / "radai.sqlite", "UPDATE audit SET outcome = 'x' WHERE seq = 1")
    broken = radai("audit", "verify", "-c", str(config))
    assert broken.returncode == 1 and "record 1" in broken.stderr and "Traceback" not in broken.stderr
