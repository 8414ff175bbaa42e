"""`/api/v1/models` in process: multipart upload with the admin token, size cap, hostile archives refused,
activate / shadow / remove, and reads open to all."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from radai.api.app import create_api
from radai.api.auth import Tokens
from radai.app import RegistryAdmin
from radai.config import Settings
from radai.storage.model_store import ModelStore
from radai.storage.sqlite import SqliteJobStore
from tests.radai.api_parts import no_destinations
from tests.radai.model_packages import threshold_package

TOKEN = "Tq4Lz8Wm2Rx6Hv9Kb3Nj"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def client(tmp_path: Path, token: str | None = TOKEN, max_upload: int = 64 * 1024**2) -> TestClient:
    store = SqliteJobStore(tmp_path / "db.sqlite")
    registry = ModelStore(tmp_path / "registry")
    settings = Settings.model_validate(
        {"api": {"admin_token": token}, "models": {"max_upload_bytes": max_upload}}
    )
    tokens = Tokens(admin=token)
    admin = RegistryAdmin(registry, None, settings)
    return TestClient(create_api(store, dict, admin, tokens, **no_destinations(store)))


def zipped(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, f"{folder.name}/{path.relative_to(folder)}")
    return buffer.getvalue()


def test_upload_registers_a_package_and_the_first_version_is_active(tmp_path: Path) -> None:
    c = client(tmp_path)
    r = c.post(
        "/api/v1/models",
        files={"package": ("p.zip", zipped(threshold_package(tmp_path / "v1")), "application/zip")},
        headers=AUTH,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["new"] is True and body["model"]["key"] == "threshold@1.0.0" and body["model"]["active"]
    again = c.post(
        "/api/v1/models",
        files={"package": ("p.zip", zipped(threshold_package(tmp_path / "v1b")), "application/zip")},
        headers=AUTH,
    )
    assert again.status_code == 201 and again.json()["new"] is False
    (listed,) = c.get("/api/v1/models", headers=AUTH).json()
    assert listed["source"] == "installed" and listed["not_for_clinical_use"] is True
    assert c.get("/api/v1/models/threshold", headers=AUTH).status_code == 200
    assert c.get("/api/v1/models/nothing", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (None, 401),
        ({"Authorization": "Bearer wrong-token-wrong-token"}, 401),
        ({"Authorization": TOKEN}, 401),
    ],
)
def test_every_write_route_refuses_without_the_admin_token(
    tmp_path: Path, headers: dict[str, str] | None, status: int
) -> None:
    c = client(tmp_path)
    data = zipped(threshold_package(tmp_path / "v1"))
    assert c.post("/api/v1/models", files={"package": ("p.zip", data)}, headers=headers).status_code == status
    assert (
        c.post("/api/v1/models/x/activate", json={"version": "1.0.0"}, headers=headers).status_code == status
    )
    assert c.post("/api/v1/models/x/shadow", json={"version": "1.0.0"}, headers=headers).status_code == status
    assert c.delete("/api/v1/models/x", headers=headers).status_code == status
    assert c.get("/api/v1/models", headers=AUTH).json() == []


def test_writes_are_refused_outright_while_no_admin_token_is_configured(tmp_path: Path) -> None:
    c = client(tmp_path, token=None)
    data = zipped(threshold_package(tmp_path / "v1"))
    r = c.post("/api/v1/models", files={"package": ("p.zip", data)}, headers=AUTH)
    assert r.status_code == 403 and "no api.admin_token" in r.json()["detail"]


def test_an_upload_over_the_size_cap_is_refused_with_413(tmp_path: Path) -> None:
    c = client(tmp_path, max_upload=2048)
    data = zipped(threshold_package(tmp_path / "v1"))
    assert len(data) > 2048
    r = c.post("/api/v1/models", files={"package": ("p.zip", data)}, headers=AUTH)
    assert r.status_code == 413
    assert c.get("/api/v1/models", headers=AUTH).json() == []


def test_an_archive_entry_leaving_the_target_folder_is_refused_and_nothing_is_registered(
    tmp_path: Path,
) -> None:
    c = client(tmp_path)
    pkg = threshold_package(tmp_path / "v1")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(pkg, arcname="p")
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"owned"))
    r = c.post("/api/v1/models", files={"package": ("p.tar.gz", buffer.getvalue())}, headers=AUTH)
    assert r.status_code == 400 and ".." in r.json()["detail"]
    assert c.get("/api/v1/models", headers=AUTH).json() == []


def test_a_package_failing_a_check_is_refused_with_its_reason(tmp_path: Path) -> None:
    c = client(tmp_path)
    pkg = threshold_package(tmp_path / "v1")
    (pkg / "model.onnx").write_bytes((pkg / "model.onnx").read_bytes() + b"\x00")
    r = c.post("/api/v1/models", files={"package": ("p.zip", zipped(pkg))}, headers=AUTH)
    assert r.status_code == 400 and "sha256 mismatch" in r.json()["detail"]


def test_activate_shadow_and_remove_over_http(tmp_path: Path) -> None:
    c = client(tmp_path)
    for name, version, hu in (("v1", "1.0.0", -200.0), ("v2", "1.1.0", -150.0)):
        data = zipped(threshold_package(tmp_path / name, version=version, thresholds_hu=(hu,)))
        assert c.post("/api/v1/models", files={"package": ("p.zip", data)}, headers=AUTH).status_code == 201

    r = c.post("/api/v1/models/threshold/shadow", json={"version": "1.1.0"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["shadow"]["shadow"] is True
    assert c.post("/api/v1/models/threshold/shadow", json={"version": None}, headers=AUTH).json() == {
        "shadow": None
    }
    bad = c.post("/api/v1/models/threshold/activate", json={"version": "9.0.0"}, headers=AUTH)
    assert bad.status_code == 404 and "registered: 1.0.0, 1.1.0" in bad.json()["detail"]
    r = c.post("/api/v1/models/threshold/activate", json={"version": "1.1.0"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["active"] is True
    refused = c.delete("/api/v1/models/threshold", params={"version": "1.1.0"}, headers=AUTH)
    assert refused.status_code == 400 and "active version" in refused.json()["detail"]
    assert c.delete("/api/v1/models/threshold", params={"version": "1.0.0"}, headers=AUTH).json() == {
        "removed": ["threshold@1.0.0"]
    }
    assert [m["key"] for m in c.get("/api/v1/models", headers=AUTH).json()] == ["threshold@1.1.0"]
