"""Audit, end to end on a running `radai serve` with real peers: exactly one record per auditable event.

The run: a study stored by a listed sender (DCMTK storescu), an association refused (echoscu to the wrong
called AE), two model versions added, one activated and one removed over HTTP with the admin token, a write refused
without it, and each job's results delivered to the PACS (storescp) and dead-lettered at a destination
that is down. The audit log then holds exactly these records, readable with the read token, its hash
chain intact (`radai audit verify`), and no Study UID in it.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.dicom_router.peers import echoscu, free_port
from tests.e2e.peers import CRLM, copy_as_new_study, radai_serve, send_folder, storescp, wait_for
from tests.e2e.test_model_registry_live import tar_gz
from tests.radai.model_packages import threshold_package

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CRLM.is_dir(), reason="../shared test data not present"),
]
ADMIN = "Vb3Nq8Wm2Xk7Jd4Rp6Ts"
READ = "Hz5Lc9Fy1Qg3Mw7Pn2Dk"


def test_one_audit_record_per_auditable_event_in_an_end_to_end_run(tmp_path: Path) -> None:
    threshold_package(tmp_path / "zoo" / "threshold")
    study = tmp_path / "study"
    study_uid = copy_as_new_study(CRLM / "CRLM-CT-1004" / "image", study)
    extra: dict[str, dict[str, object]] = {
        "models": {"paths": [str(tmp_path / "zoo")], "poll_seconds": 0.5},
        "api": {"admin_token": ADMIN, "read_token": READ},
        "dicom": {"allowed_peers": [{"ae_title": "MODALITY", "network": "127.0.0.1/32", "name": "ct-room"}]},
    }
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with storescp(tmp_path / "pacs") as pacs:
        destinations: list[dict[str, object]] = [
            {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
            {
                "name": "archive",
                "ae_title": "ARCHIVE",
                "host": "127.0.0.1",
                "port": free_port(),
                "max_attempts": 1,
            },
        ]
        with radai_serve(tmp_path, None, destinations=destinations, extra=extra) as s:
            assert send_folder(s.dicom_port, study).returncode == 0
            assert echoscu(s.dicom_port, called_ae="SOMEONE_ELSE").returncode != 0
            models = s.url + "/api/v1/models"
            v2 = tar_gz(threshold_package(tmp_path / "v2", version="1.1.0", thresholds_hu=(-150.0,)))
            v3 = tar_gz(threshold_package(tmp_path / "v3", version="1.2.0", thresholds_hu=(-100.0,)))
            assert httpx.post(models, files={"package": ("v2.tar.gz", v2)}, timeout=60).status_code == 401
            for package in (v2, v3):
                added = httpx.post(
                    models, files={"package": ("p.tar.gz", package)}, headers=admin, timeout=60
                )
                assert added.status_code == 201, added.text
            activated = httpx.post(
                f"{models}/threshold/activate", json={"version": "1.1.0"}, headers=admin, timeout=30
            )
            assert activated.status_code == 200, activated.text
            removed = httpx.delete(
                f"{models}/threshold", params={"version": "1.2.0"}, headers=admin, timeout=30
            )
            assert removed.status_code == 200, removed.text

            def read(path: str) -> httpx.Response:
                return httpx.get(s.url + path, headers={"Authorization": f"Bearer {READ}"}, timeout=10)

            def settled() -> bool:
                r = read(f"/api/v1/studies/{study_uid}")
                jobs = r.json()["jobs"] if r.status_code == 200 else []
                deliveries = [d for j in jobs for d in j["deliveries"]]
                return len(deliveries) == 2 * len(jobs) > 0 and all(
                    d["state"] in ("delivered", "dead") for d in deliveries
                )

            wait_for(settled, 240, "the study's deliveries to settle")
            jobs = read(f"/api/v1/studies/{study_uid}").json()["jobs"]
            assert httpx.get(s.url + "/api/v1/audit", timeout=10).status_code == 401
            records = read("/api/v1/audit?limit=1000").json()
        verify = subprocess.run(
            [sys.executable, "-m", "radai", "audit", "verify", "-c", str(tmp_path / "radai.yaml")],
            capture_output=True,
            text=True,
            check=False,
        )
    counts = Counter(r["event"] for r in records)
    assert counts == {
        "association.accepted": 1,
        "association.rejected": 1,
        "model.added": 2,
        "model.activated": 1,
        "model.removed": 1,
        "api.write": 5,  # the refused upload, two uploads, the activation, the removal
        "result.delivered": len(jobs),
        "result.dead-lettered": len(jobs),
    }
    by_event = {r["event"]: r for r in records}
    assert by_event["association.accepted"]["subject"] == "ct-room"
    assert by_event["association.rejected"]["outcome"] == "called_ae"
    assert by_event["model.removed"]["subject"] == "threshold@1.2.0"
    assert by_event["model.activated"]["subject"] == "threshold@1.1.0"
    assert by_event["model.added"]["actor"] == "api:admin"
    writes = [(r["actor"], r["subject"], r["outcome"]) for r in records if r["event"] == "api.write"]
    assert writes[0] == ("api:anonymous", "/api/v1/models", "401")
    assert {r["subject"] for r in records if r["event"] == "result.delivered"} == {j["job_id"] for j in jobs}
    assert {r["detail"]["destination"] for r in records if r["event"] == "result.dead-lettered"} == {
        "archive"
    }
    assert study_uid not in str(records)
    assert verify.returncode == 0 and f"{len(records)} records" in verify.stdout, verify.stderr
