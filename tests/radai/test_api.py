"""The HTTP API in process (FastAPI's TestClient): health, metrics, models, studies."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from radai.api.app import create_api
from radai.app import RegistryAdmin
from radai.config import Settings, bundled_models_dir
from radai.domain import JobSpec, StudyRecord, StudyState
from radai.storage.model_store import ModelStore
from radai.storage.sqlite import SqliteJobStore
from tests.radai.api_parts import no_destinations


def client(tmp_path: Path, ready: bool = True) -> tuple[TestClient, SqliteJobStore]:
    store = SqliteJobStore(tmp_path / "db.sqlite")
    zoo = bundled_models_dir()
    registry = ModelStore(tmp_path / "models", [zoo] if zoo else [])
    admin = RegistryAdmin(registry, None, Settings())
    readiness = lambda: {"database": store.ping(), "models_loaded": ready}  # noqa: E731
    api = create_api(store, readiness, admin, **no_destinations(store))
    return TestClient(api), store


def test_livez_always_answers(tmp_path: Path) -> None:
    c, _ = client(tmp_path)
    assert c.get("/livez").status_code == 200


def test_readyz_is_503_while_a_check_fails(tmp_path: Path) -> None:
    c, _ = client(tmp_path, ready=False)
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["models_loaded"] is False
    c, _ = client(tmp_path / "b", ready=True)
    assert c.get("/readyz").status_code == 200


def test_metrics_are_prometheus_text_with_the_radai_prefix(tmp_path: Path) -> None:
    c, _ = client(tmp_path)
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    names = {line.split()[2] for line in r.text.splitlines() if line.startswith("# TYPE")}
    assert names and all(n.startswith("radai_") for n in names)


def test_models_lists_the_bundled_cards(tmp_path: Path) -> None:
    c, _ = client(tmp_path)
    ids = {m["id"]: m for m in c.get("/api/v1/models").json()}
    assert {"ct-body-classical", "brain-tissue"} <= ids.keys()
    assert all(m["not_for_clinical_use"] for m in ids.values())


def test_studies_list_and_show_with_jobs(tmp_path: Path) -> None:
    c, store = client(tmp_path)
    store.upsert_study(StudyRecord("1.2.3", StudyState.PROCESSING, "MODALITY", 41, 1, 1.0, 2.0, 3.0))
    store.add_job(JobSpec("j1", "1.2.3", "1.2.3.4", "ct-body-classical@1.0.0", 1.0, 2.0, 3.0))
    (study,) = c.get("/api/v1/studies").json()
    assert study["study_uid"] == "1.2.3" and study["jobs"][0]["state"] == "queued"
    assert c.get("/api/v1/studies/1.2.3").json()["instances"] == 41
    assert c.get("/api/v1/studies/9.9").status_code == 404


def test_openapi_documents_the_endpoints(tmp_path: Path) -> None:
    c, _ = client(tmp_path)
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/livez", "/readyz", "/metrics", "/api/v1/models", "/api/v1/studies"} <= paths.keys()
