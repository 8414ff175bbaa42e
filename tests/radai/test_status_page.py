"""The operators' status page (`GET /status`): a real SQLite job store, this process's Prometheus metrics, a
stub model registry; and the histogram quantile estimate it shows, against hand-computed cases."""

from __future__ import annotations

import math
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Histogram

from dicom_router.uids import uid_fingerprint
from radai.api.status import status_router
from radai.api.status_data import histogram_quantile, stage_latencies
from radai.domain import JobSpec, JobState, Priority, Stage, StudyRecord, StudyState
from radai.metrics import DELIVERIES_DEAD, DELIVERIES_PENDING, QUEUE_DEPTH, STAGE_SECONDS
from radai.storage.sqlite import SqliteJobStore

MODEL = "status-test-model"
DESTINATION = "status-test-pacs"
DONE_UID, FAILED_UID = "1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.202"
SERIES_UID = "1.2.826.0.1.3680043.8.498.303"
INF = math.inf
DASH = "\u2013"  # an empty cell


class StubModels:
    """The registry as the page sees it: only views() is used."""

    max_upload_bytes = 0

    def __init__(self, views: list[dict[str, Any]]) -> None:
        self._views = views

    def views(self) -> list[dict[str, Any]]:
        return self._views

    def add_archive(self, archive: Path, workdir: Path) -> tuple[dict[str, Any], bool]:
        raise NotImplementedError

    def activate(self, ref: str) -> dict[str, Any]:
        raise NotImplementedError

    def set_shadow(self, model_id: str, version: str | None) -> dict[str, Any] | None:
        raise NotImplementedError

    def remove(self, ref: str) -> list[str]:
        raise NotImplementedError


class Tables(HTMLParser):
    """The text of every table row (cells stripped), per section id."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self._section = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section":
            self._section = dict(attrs).get("id") or ""
        elif tag == "tr":
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row:
            self.rows.setdefault(self._section, []).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _client(
    store: SqliteJobStore, views: list[dict[str, Any]], checks: dict[str, bool], **kw: Any
) -> TestClient:
    app = FastAPI()
    app.include_router(status_router(store, StubModels(views), lambda: dict(checks), **kw))
    return TestClient(app)


def _add_study(
    store: SqliteJobStore, uid: str, state: StudyState, job_state: JobState, reason: str, at: float
) -> None:
    """A study first received at `at`, complete 12 s later; a delivered job's results acknowledged at +42.5 s."""
    store.upsert_study(StudyRecord(uid, state, "CT_SCANNER", 41, 1, at, at + 10, at + 12))
    job_id = f"job-{uid[-3:]}"
    store.add_job(JobSpec(job_id, uid, SERIES_UID, f"{MODEL}@1.0.0", at, at + 10, at + 12, Priority.STAT))
    store.mark_stage(job_id, Stage.QUEUED, at + 13)
    if job_state is JobState.DELIVERED:
        store.mark_stage(job_id, Stage.DELIVERED, at + 42.5)
    store.finish_job(job_id, job_state, reason)


@pytest.fixture
def metrics() -> Iterator[None]:
    """Observations into this process's metrics under labels of this test only, removed afterwards."""
    STAGE_SECONDS.labels(stage="inferred", model=MODEL).observe(1.5)
    STAGE_SECONDS.labels(stage="inferred", model=MODEL).observe(3.0)
    STAGE_SECONDS.labels(stage="received", model=MODEL).observe(4.0)
    QUEUE_DEPTH.labels(model=MODEL).set(7)
    DELIVERIES_PENDING.labels(destination=DESTINATION).set(2)
    DELIVERIES_DEAD.labels(destination=DESTINATION).set(1)
    yield
    for stage in ("inferred", "received"):
        STAGE_SECONDS.remove(stage, MODEL)
    QUEUE_DEPTH.remove(MODEL)
    DELIVERIES_PENDING.remove(DESTINATION)
    DELIVERIES_DEAD.remove(DESTINATION)


@pytest.fixture
def page(tmp_path: Path, metrics: None) -> str:
    store = SqliteJobStore(tmp_path / "radai.sqlite")
    _add_study(store, DONE_UID, StudyState.DONE, JobState.DELIVERED, "", at=1_700_000_000.0)
    _add_study(
        store,
        FAILED_UID,
        StudyState.FAILED,
        JobState.FAILED,
        "<b>model crashed</b> " + "x" * 200,
        at=1_700_000_600.0,
    )
    views = [
        {"id": MODEL, "version": "1.0.0", "active": True, "shadow": False, "name": "Test", "task": "seg"},
        {"id": MODEL, "version": "2.0.0", "active": False, "shadow": True},
        {"id": "other-model", "version": "0.1.0", "active": False, "shadow": False},
    ]
    checks = {
        "spool_writable": True,
        "database": True,
        "models_loaded": True,
        f"destination:{DESTINATION}": False,
    }
    response = _client(store, views, checks).get("/status")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    text: str = response.text
    return text


def test_page_lists_recent_jobs_by_fingerprint_never_by_uid(page: str) -> None:
    jobs = Tables(page).rows["studies"]
    # newest study first; completed 2023-11-14 22:13:32 UTC and 10 minutes later
    assert [row[:4] + row[5:] for row in jobs] == [
        [uid_fingerprint(FAILED_UID), f"{MODEL}@1.0.0", "failed", "stat", "2023-11-14 22:23:32", DASH],
        [uid_fingerprint(DONE_UID), f"{MODEL}@1.0.0", "delivered", "stat", "2023-11-14 22:13:32", "42.5 s"],
    ]
    for uid in (DONE_UID, FAILED_UID, SERIES_UID):
        assert uid not in page
    assert "CT_SCANNER" not in page


def test_page_counts_studies_by_state(page: str) -> None:
    assert "(2 counted, at most 200)" in page
    assert '<div class="tile"><b>1</b><span><span class="pill good">done</span>' in page
    assert '<div class="tile"><b>1</b><span><span class="pill bad">failed</span>' in page


def test_page_escapes_and_truncates_a_job_reason(page: str) -> None:
    failed = next(r for r in Tables(page).rows["studies"] if r[2] == "failed")
    assert failed[4].startswith("<b>model crashed</b> x") and failed[4].endswith("…") and len(failed[4]) == 80
    assert "<b>model crashed" not in page and "&lt;b&gt;model crashed&lt;/b&gt;" in page


def test_page_shows_stage_latency_rows_from_the_metrics(page: str) -> None:
    rows = [r for r in Tables(page).rows["latency"] if r[0] == MODEL]
    # pipeline order. received: one observation in (2, 5]: p50 = 2 + 3 * 0.5, p95 = 2 + 3 * 0.95;
    # inferred: two in (1, 2] and (2, 5]: p50 = 1 + 1 * (1 / 1) = 2.0, p95 = 2 + 3 * (1.9 - 1) / 1
    assert rows == [
        [MODEL, "received", "1", "3.50 s", "4.85 s"],
        [MODEL, "inferred", "2", "2.00 s", "4.70 s"],
    ]
    assert "over the life of this process" in page


def test_page_shows_queues_models_and_destination_health(page: str) -> None:
    tables = Tables(page).rows
    assert [MODEL, "7"] in tables["queues"]
    assert [DESTINATION, "2", "1"] in tables["queues"]
    # (the metrics registry is the process's own: other tests' destinations may be listed too)
    assert [DESTINATION, "down", "2", "1"] in tables["destinations"]
    assert tables["models"] == [
        ["other-model", "0.1.0", "inactive", DASH, DASH, DASH],
        [MODEL, "1.0.0", "active", "Test", "seg", DASH],
        [MODEL, "2.0.0", "shadow", DASH, DASH, DASH],
    ]
    # a destination that is down does not make radai not ready (as /readyz)
    assert '<span id="ready"><span class="pill good">ready</span>' in page
    assert ["models_loaded", "ok"] in tables["overall"]


def test_page_refreshes_itself_and_runs_no_script(page: str) -> None:
    assert '<meta http-equiv="refresh" content="10">' in page
    assert "<script" not in page.lower()


def test_empty_page_renders_with_nothing_received_yet(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "radai.sqlite")
    client = _client(store, [], {"database": False}, registry=CollectorRegistry())
    response = client.get("/status")
    assert response.status_code == 200
    text = response.text
    for empty in ("No studies received yet", "No job has passed a stage", "No models registered"):
        assert empty in text
    assert "No destinations configured" in text and "No model has queued patches yet" in text
    assert '<span class="pill bad">not ready</span>' in text
    assert ["database", "failing"] in Tables(text).rows["overall"]


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, [(1.0, 2.0), (2.0, 6.0), (INF, 8.0)], 1.5),  # rank 4: 1 + (2 - 1) * (4 - 2) / 4
        (0.25, [(1.0, 2.0), (2.0, 6.0), (INF, 8.0)], 1.0),  # rank 2: the first bucket starts at 0
        (0.1, [(1.0, 2.0), (2.0, 6.0), (INF, 8.0)], 0.4),  # rank 0.8: 0 + 1 * 0.8 / 2
        (0.95, [(1.0, 2.0), (2.0, 6.0), (INF, 8.0)], 2.0),  # rank in +Inf: the highest finite bound
        (0.5, [(INF, 4.0), (1.0, 0.0), (0.5, 0.0)], 1.0),  # unsorted input; all in +Inf
        (0.5, [(0.5, 0.0), (1.0, 4.0), (INF, 4.0)], 0.75),  # 0.5 + 0.5 * 2 / 4
        (1.0, [(0.5, 1.0), (1.0, 4.0), (INF, 4.0)], 1.0),
        (1.5, [(1.0, 2.0), (INF, 2.0)], INF),
        (-0.1, [(1.0, 2.0), (INF, 2.0)], -INF),
    ],
)
def test_histogram_quantile_interpolates_as_promql(
    q: float, buckets: list[tuple[float, float]], expected: float
) -> None:
    assert histogram_quantile(q, buckets) == pytest.approx(expected)


@pytest.mark.parametrize("buckets", [[(1.0, 0.0), (INF, 0.0)], [(INF, 3.0)], [(1.0, 2.0), (2.0, 3.0)], []])
def test_histogram_quantile_is_nan_without_observations_or_a_complete_histogram(
    buckets: list[tuple[float, float]],
) -> None:
    assert math.isnan(histogram_quantile(0.5, buckets))


def test_stage_latencies_read_a_prometheus_histogram() -> None:
    registry = CollectorRegistry()
    histogram = Histogram(
        "radai_study_stage_seconds", "test", ["stage", "model"], buckets=(1, 10), registry=registry
    )
    for value in (0.5, 0.5, 5.0, 50.0):
        histogram.labels(stage="encoded", model="m").observe(value)
    histogram.labels(stage="queued", model="m").observe(2.0)
    rows = stage_latencies(registry)
    assert [(r.stage, r.model, r.count) for r in rows] == [("queued", "m", 1), ("encoded", "m", 4)]
    encoded = rows[1]
    assert encoded.p50 == pytest.approx(1.0)  # rank 2 of 4 ends the first bucket
    assert encoded.p95 == pytest.approx(10.0)  # rank 3.8 falls in +Inf
