"""`/api/v1/studies` over HTTP on a real SQLite store: the filters as query parameters (validated), and the
retry of a study's dead-lettered deliveries (admin only; 404 unknown study, 409 nothing to retry)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from radai.api.auth import Tokens
from radai.api.studies import retry_dead_deliveries, studies_router
from radai.domain import DeliveryState, JobState, StudyState
from radai.storage.sqlite import SqliteJobStore
from tests.radai.test_study_filters import HOUR, T0, add_study

ADMIN = "Pz3Rk8Wq5Nv2Xb7Lm4Tc"
READ = "Gd6Ys9Jf2Qh5Kw8Vn3Bx"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    s = SqliteJobStore(tmp_path / "radai.sqlite")
    add_study(s, "1.1", T0, StudyState.DONE, {"ct-body@1.0.0": JobState.DELIVERED})
    add_study(s, "1.2", T0 + HOUR, StudyState.FAILED, {"ct-body@1.1.0": JobState.FAILED})
    add_study(s, "1.3", T0 + 2 * HOUR, StudyState.DEAD_LETTER, {"brain@2.0.0": JobState.DEAD_LETTER})
    # 1.3's result: acknowledged by one PACS, dead-lettered at the other.
    job = s.list_studies(model="brain")[0].jobs[0].job_id
    for dest in ("pacs", "archive"):
        s.enqueue_delivery(job, "1.3", dest, ["/outbox/x/000-SEG.dcm"], T0 + 2 * HOUR)
    s.update_delivery(job, "pacs", DeliveryState.DELIVERED, 1, T0, "", T0 + 2 * HOUR)
    s.update_delivery(job, "archive", DeliveryState.DEAD, 20, T0, "refused", T0 + 2 * HOUR)
    yield s
    s.close()


def client(store: SqliteJobStore, tokens: Tokens) -> TestClient:
    api = FastAPI()
    api.include_router(studies_router(store, tokens, retry_dead_deliveries(store, lambda: T0 + 5 * HOUR)))
    return TestClient(api)


def listed(c: TestClient, **params: str | int) -> list[str]:
    r = c.get("/api/v1/studies", params=params, headers=bearer(READ))
    assert r.status_code == 200, r.text
    return [s["study_uid"] for s in r.json()]


def test_studies_filter_by_state_job_state_model_and_time(store: SqliteJobStore) -> None:
    c = client(store, Tokens(admin=ADMIN, read=READ))
    assert listed(c) == ["1.3", "1.2", "1.1"]
    assert listed(c, state="failed") == ["1.2"]
    assert listed(c, job_state="dead-letter") == ["1.3"]
    assert listed(c, model="ct-body") == ["1.2", "1.1"]
    assert listed(c, model="ct-body@1.0.0") == ["1.1"]
    assert listed(c, since="2026-11-23T09:00:00Z") == ["1.3", "1.2"]
    assert listed(c, since="2026-11-23T10:00:00+01:00", until="2026-11-23T10:00:00+00:00") == ["1.2"]
    assert listed(c, since="2026-11-23T09:00:00") == ["1.3", "1.2"]  # no timezone: UTC
    assert listed(c, limit=1) == ["1.3"]


def test_each_study_keeps_its_jobs_stage_timestamps_reason_and_deliveries(store: SqliteJobStore) -> None:
    c = client(store, Tokens(admin=ADMIN, read=READ))
    (study,) = c.get("/api/v1/studies", params={"state": "dead-letter"}, headers=bearer(READ)).json()
    (job,) = study["jobs"]
    assert job["model_key"] == "brain@2.0.0" and job["state"] == "dead-letter"
    assert {"received", "complete", "queued", "inferred"} <= job["stages"].keys()
    assert {d["destination"]: d["state"] for d in job["deliveries"]} == {
        "pacs": "delivered",
        "archive": "dead",
    }
    failed = c.get("/api/v1/studies/1.2", headers=bearer(READ)).json()
    assert failed["jobs"][0]["reason"] == "boom"


@pytest.mark.parametrize(
    "params",
    [
        {"state": "lost"},
        {"job_state": "sleeping"},
        {"since": "yesterday"},
        {"until": "2026-13-01"},
        {"limit": 0},
        {"limit": 1001},
        {"model": ""},
    ],
)
def test_invalid_filters_are_refused_with_422(store: SqliteJobStore, params: dict[str, str | int]) -> None:
    c = client(store, Tokens(admin=ADMIN, read=READ))
    assert c.get("/api/v1/studies", params=params, headers=bearer(READ)).status_code == 422


def test_retry_requeues_the_dead_deliveries_and_answers_202(store: SqliteJobStore) -> None:
    c = client(store, Tokens(admin=ADMIN, read=READ))
    r = c.post("/api/v1/studies/1.3/retry", headers=bearer(ADMIN))
    assert r.status_code == 202
    assert r.json() == {"study_uid": "1.3", "deliveries_requeued": 1}
    study = store.get_study("1.3")
    assert study.state is StudyState.PROCESSING and study.jobs[0].state is JobState.DELIVERING
    (archive,) = [d for d in study.jobs[0].deliveries if d.destination == "archive"]
    assert archive.state is DeliveryState.QUEUED and archive.attempts == 0
    assert archive.next_attempt_at == T0 + 5 * HOUR and archive.last_error == ""
    assert store.count_deliveries("pacs", DeliveryState.DELIVERED) == 1  # the acknowledged one is left alone
    # Nothing dead any more: a second retry is a conflict.
    assert c.post("/api/v1/studies/1.3/retry", headers=bearer(ADMIN)).status_code == 409


def test_retry_of_a_study_without_dead_deliveries_is_409_and_of_an_unknown_one_404(
    store: SqliteJobStore,
) -> None:
    c = client(store, Tokens(admin=ADMIN, read=READ))
    r = c.post("/api/v1/studies/1.2/retry", headers=bearer(ADMIN))
    assert r.status_code == 409 and "no dead-lettered deliveries" in r.json()["detail"]
    assert c.post("/api/v1/studies/9.9/retry", headers=bearer(ADMIN)).status_code == 404
    assert c.get("/api/v1/studies/9.9", headers=bearer(READ)).status_code == 404


def test_reads_need_a_token_and_the_retry_needs_the_admin_token(store: SqliteJobStore) -> None:
    c = client(store, Tokens(admin=ADMIN, read=READ))
    for route in ("/api/v1/studies", "/api/v1/studies/1.3"):
        assert c.get(route).status_code == 401
        assert c.get(route, headers=bearer("x" + READ)).status_code == 401
        assert c.get(route, headers=bearer(ADMIN)).status_code == 200
    for headers in ({}, bearer(READ)):
        assert c.post("/api/v1/studies/1.3/retry", headers=headers).status_code == 401
    assert store.count_deliveries("archive", DeliveryState.DEAD) == 1  # nothing was re-queued


def test_without_an_admin_token_the_retry_is_refused_with_403(store: SqliteJobStore) -> None:
    c = client(store, Tokens())
    assert c.get("/api/v1/studies").status_code == 200
    assert c.post("/api/v1/studies/1.3/retry").status_code == 403
    assert store.count_deliveries("archive", DeliveryState.DEAD) == 1


def test_the_openapi_document_lists_the_filters_and_the_retry(store: SqliteJobStore) -> None:
    paths = client(store, Tokens()).get("/openapi.json").json()["paths"]
    params = {p["name"] for p in paths["/api/v1/studies"]["get"]["parameters"]}
    assert {"state", "job_state", "model", "since", "until", "limit"} <= params
    assert "202" in paths["/api/v1/studies/{study_uid}/retry"]["post"]["responses"]


def test_the_since_filter_accepts_the_extremes_of_the_calendar(store: SqliteJobStore) -> None:
    c = client(store, Tokens())
    assert listed(c, since="0001-01-01T00:00:00+14:00") == ["1.3", "1.2", "1.1"]
    assert (
        listed(
            c, since=dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(-dt.timedelta(hours=14))).isoformat()
        )
        == []
    )
