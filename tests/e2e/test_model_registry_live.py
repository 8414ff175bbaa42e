"""End to end, on a running `radai serve` with real peers (DCMTK storescu as the modality, storescp as the
PACS): model packages uploaded over HTTP with the admin token, a version in shadow on a live study (its
agreement in the study record and /metrics, nothing of it sent), a model on another model's mask, and an
activation that switches the next study to the new version without a restart."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom import Dataset

from tests.e2e.peers import CRLM, Pacs, RadaiServer, radai_serve, send_folder, storescp, wait_for
from tests.radai.model_packages import threshold_package

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CRLM.is_dir(), reason="../shared test data not present"),
]

TOKEN = "Gm7Xc2Qw9Lp4Zr8Vt5Hy"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CT_1004 = CRLM / "CRLM-CT-1004" / "image"
CT_1006 = CRLM / "CRLM-CT-1006" / "image"


def tar_gz(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RadaiServer, Pacs, Path]]:
    tmp = tmp_path_factory.mktemp("live-models")
    threshold_package(tmp / "zoo" / "threshold")  # the one model the server starts with (v1.0.0)
    extra: dict[str, dict[str, object]] = {
        "models": {"paths": [str(tmp / "zoo")], "poll_seconds": 0.5},
        "api": {"admin_token": TOKEN},
    }
    with storescp(tmp / "pacs") as pacs, radai_serve(tmp, pacs, quiet_seconds=1.0, extra=extra) as server:
        yield server, pacs, tmp


def results_for(pacs: Pacs, study_uid: str) -> list[Dataset]:
    found = [pydicom.dcmread(p) for p in pacs.files()]
    return [ds for ds in found if ds.StudyInstanceUID == study_uid]


def algorithms(results: list[Dataset]) -> set[str]:
    """`name@version` of every SEG segment's algorithm."""
    return {
        f"{a.AlgorithmName}@{a.AlgorithmVersion}"
        for ds in results
        if ds.Modality == "SEG"
        for segment in ds.SegmentSequence
        for a in segment.SegmentationAlgorithmIdentificationSequence
    }


def study_uid_of(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def authed(server: RadaiServer, path: str) -> httpx.Response:
    """A read with the admin token (auth is on once a token is configured)."""
    return httpx.get(server.url + path, headers=AUTH, timeout=10)


def done(server: RadaiServer, study_uid: str) -> dict[str, object]:
    def settled() -> bool:
        r = authed(server, f"/api/v1/studies/{study_uid}")
        return r.status_code == 200 and r.json()["state"] in ("done", "failed", "dead-letter")

    wait_for(settled, 180, "the study to settle")
    study: dict[str, object] = authed(server, f"/api/v1/studies/{study_uid}").json()
    return study


def test_uploads_shadow_pipeline_and_activation_on_a_live_server(
    stack: tuple[RadaiServer, Pacs, Path],
) -> None:
    server, pacs, tmp = stack
    url = server.url + "/api/v1/models"
    v2 = tar_gz(threshold_package(tmp / "threshold-1.1.0", version="1.1.0", thresholds_hu=(-150.0,)))
    refused = httpx.post(url, files={"package": ("v2.tar.gz", v2)}, timeout=60)
    assert refused.status_code == 401

    r = httpx.post(url, files={"package": ("v2.tar.gz", v2)}, headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["model"]["active"] is False  # a later version waits for activation
    r = httpx.post(f"{url}/threshold/shadow", json={"version": "1.1.0"}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    dense = tar_gz(
        threshold_package(
            tmp / "dense",
            "dense",
            thresholds_hu=(150.0,),
            labels=("bone",),
            consumes={"model": "threshold", "labels": [1]},
        )
    )
    r = httpx.post(url, files={"package": ("dense.tar.gz", dense)}, headers=AUTH, timeout=60)
    assert r.status_code == 201 and r.json()["model"]["active"] is True, r.text

    # A live study: the active threshold@1.0.0, the dense model on its mask, threshold@1.1.0 in shadow.
    assert send_folder(server.dicom_port, CT_1004).returncode == 0
    first = study_uid_of(CT_1004)
    study = done(server, first)
    assert study["state"] == "done"
    jobs = {j["model_key"]: j for j in study["jobs"]}  # type: ignore[attr-defined]
    assert set(jobs) == {"threshold@1.0.0", "dense@1.0.0"}
    (shadow,) = jobs["threshold@1.0.0"]["shadow"]
    assert shadow["model_key"] == "threshold@1.1.0" and shadow["outcome"] == "compared"
    assert 0.9 < shadow["agreement"]["dice:Body"] < 1.0
    wait_for(lambda: len(results_for(pacs, first)) >= 4, 60, "the results at the PACS")
    results = results_for(pacs, first)
    assert sorted(str(ds.Modality) for ds in results) == ["SEG", "SEG", "SR", "SR"]
    assert algorithms(results) == {"threshold@1.0.0", "dense@1.0.0"}  # nothing of the shadow version sent
    scraped = server.get("/metrics").text
    assert 'radai_shadow_agreement_count{label="Body",model="threshold",version="1.1.0"} 1.0' in scraped

    # Activation over HTTP: the next study runs on 1.1.0, no restart.
    r = httpx.post(f"{url}/threshold/activate", json={"version": "1.1.0"}, headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["active"] is True
    assert send_folder(server.dicom_port, CT_1006).returncode == 0
    second = study_uid_of(CT_1006)
    keys = {j["model_key"] for j in done(server, second)["jobs"]}  # type: ignore[attr-defined]
    assert keys == {"threshold@1.1.0", "dense@1.0.0"}
    wait_for(lambda: len(results_for(pacs, second)) >= 4, 60, "the second study's results")
    assert algorithms(results_for(pacs, second)) == {"threshold@1.1.0", "dense@1.0.0"}
    models = {m["key"]: m for m in authed(server, "/api/v1/models").json()}
    assert models["threshold@1.1.0"]["active"] and not models["threshold@1.0.0"]["active"]
