"""Bearer tokens with read and admin scopes on every route, and the start-up refusal of an exposed API without
a secret or with a placeholder one."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from radai.api.app import create_api
from radai.api.auth import Tokens
from radai.app import RegistryAdmin
from radai.config import Settings, load_settings
from radai.errors import ConfigError
from radai.storage.model_store import ModelStore
from radai.storage.sqlite import SqliteJobStore
from tests.radai.api_parts import no_destinations

ADMIN = "q7Vx2mKp9LwZ4tRb8Nc3"
READ = "h5Jd8sFq2XkW9pLm4Ty6"


def client(tmp_path: Path, tokens: Tokens) -> TestClient:
    store = SqliteJobStore(tmp_path / "db.sqlite")
    admin = RegistryAdmin(ModelStore(tmp_path / "registry"), None, Settings())
    return TestClient(create_api(store, lambda: {"database": True}, admin, tokens, **no_destinations(store)))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


READ_ROUTES = ["/api/v1/studies", "/api/v1/studies/1.2.3", "/api/v1/models", "/api/v1/models/x"]


@pytest.mark.parametrize("route", READ_ROUTES)
def test_read_routes_need_the_read_or_admin_token_once_auth_is_on(tmp_path: Path, route: str) -> None:
    c = client(tmp_path, Tokens(admin=ADMIN, read=READ))
    assert c.get(route).status_code == 401
    assert c.get(route, headers=bearer("wrong-" + READ)).status_code == 401
    assert c.get(route, headers=bearer(READ)).status_code in (200, 404)
    assert c.get(route, headers=bearer(ADMIN)).status_code in (200, 404)


def test_health_and_metrics_stay_open_for_probes_and_prometheus(tmp_path: Path) -> None:
    c = client(tmp_path, Tokens(admin=ADMIN, read=READ))
    assert c.get("/livez").status_code == 200
    assert c.get("/readyz").status_code == 200
    assert c.get("/metrics").status_code == 200


def test_the_read_token_cannot_write(tmp_path: Path) -> None:
    c = client(tmp_path, Tokens(admin=ADMIN, read=READ))
    r = c.post("/api/v1/models/x/activate", json={"version": "1.0.0"}, headers=bearer(READ))
    assert r.status_code == 401
    assert c.delete("/api/v1/models/x", headers=bearer(READ)).status_code == 401


def test_every_write_route_in_the_openapi_document_refuses_without_the_admin_token(tmp_path: Path) -> None:
    c = client(tmp_path, Tokens(admin=ADMIN, read=READ))
    paths = c.get("/openapi.json").json()["paths"]
    writes = [(p, m) for p, ops in paths.items() for m in ops if m in ("post", "put", "patch", "delete")]
    assert writes  # upload, activate, shadow, remove at least
    for path, method in writes:
        url = path.replace("{model_id}", "x")
        for headers in ({}, bearer(READ)):
            assert c.request(method.upper(), url, headers=headers).status_code == 401, (method, path)


def test_without_tokens_reads_are_open_on_loopback_and_writes_are_refused(tmp_path: Path) -> None:
    c = client(tmp_path, Tokens())
    assert c.get("/api/v1/studies").status_code == 200
    assert c.post("/api/v1/models/x/activate", json={"version": "1"}).status_code == 403


@pytest.mark.parametrize(
    ("api", "message"),
    [
        ("{host: 0.0.0.0}", "beyond loopback needs api.admin_token"),
        ("{host: 10.1.2.3, read_token: h5Jd8sFq2XkW9pLm4Ty6}", "beyond loopback needs api.admin_token"),
        ("{admin_token: changeme-changeme-1}", "placeholder or default secret"),
        ("{admin_token: aaaaaaaaaaaaaaaaaaaa}", "placeholder or default secret"),
        ("{admin_token: short}", "at least 16 characters"),
    ],
)
def test_start_up_refuses_an_exposed_api_without_a_real_secret(
    tmp_path: Path, api: str, message: str
) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text(f"api: {api}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg)


def test_an_exposed_api_with_an_admin_token_is_accepted(tmp_path: Path) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text(f"api: {{host: 0.0.0.0, admin_token: {ADMIN}}}\n")
    assert load_settings(cfg).api.host == "0.0.0.0"
