"""Privacy: fake patient names, IDs, birth dates and accession numbers planted in real studies (one that is
processed, one whose job fails) never appear in radai's logs (JSON, at DEBUG), its metrics, its API answers,
its API error bodies, its audit records or its status page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pydicom
import pytest

from tests.e2e.peers import CRLM, SHARED, copy_as_new_study, radai_serve, send_folder, storescp, wait_for

TILTED = SHARED / "data" / "dicom" / "ct_head_tilt_and_phantom" / "GE_headCT_tilt"
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CRLM.is_dir() or not TILTED.is_dir(), reason="../shared test data not present"),
]
PLANTED = {
    "PatientName": "Plantedname^Phileas^Q",
    "PatientID": "PHIPID-73519",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACCPHI-88214",
    "OtherPatientIDs": "PHIOTHER-4471",
    "ReferringPhysicianName": "Referrerphi^Octavia",
}
NEEDLES = [*PLANTED.values(), "Plantedname", "Referrerphi", "73519", "88214", "4471", "1923-04-17"]


def leaked(needle: str, text: str) -> bool:
    """A digits-only needle counts only as a whole number: "4471" inside a float such as 0.0344712 in the
    metrics is chance, not a leak."""
    if needle.isdigit():
        return re.search(rf"(?<![\d.]){needle}(?![\d.])", text) is not None
    return needle in text


def plant(folder: Path) -> None:
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword, value in PLANTED.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


def test_planted_patient_values_appear_in_no_log_metric_or_api_answer(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good_uid = copy_as_new_study(CRLM / "CRLM-CT-1004" / "image", good)
    failing = tmp_path / "failing"
    failing_uid = copy_as_new_study(TILTED, failing)  # gantry tilt: its job fails with a reason
    plant(good)
    plant(failing)
    options = ("--log-format", "json", "--log-level", "DEBUG")
    with (
        storescp(tmp_path / "pacs") as pacs,
        radai_serve(tmp_path, pacs, quiet_seconds=1.0, options=options) as s,
    ):
        assert send_folder(s.dicom_port, good).returncode == 0
        assert send_folder(s.dicom_port, failing).returncode == 0

        def settled(uid: str) -> bool:
            r = s.get(f"/api/v1/studies/{uid}")
            return r.status_code == 200 and r.json()["state"] in ("done", "failed", "dead-letter")

        wait_for(lambda: settled(good_uid) and settled(failing_uid), 240, "both studies to settle")
        answers = [
            s.get("/metrics").text,
            s.get("/api/v1/studies").text,
            s.get(f"/api/v1/studies/{good_uid}").text,
            s.get(f"/api/v1/studies/{failing_uid}").text,
            s.get("/api/v1/studies/1.2.999.404").text,  # an error body
            s.get("/api/v1/models").text,
            s.get("/api/v1/audit?limit=1000").text,
            s.get("/status").text,
        ]
        assert "association.accepted" in answers[-2]  # the audit log was read
        failed_job = s.get(f"/api/v1/studies/{failing_uid}").json()["jobs"][0]
        assert failed_job["state"] == "failed" and failed_job["reason"]  # the failure path ran
    log = s.log.read_text()
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["level"] for line in lines)  # every line is one JSON object
    for needle in NEEDLES:
        assert not leaked(needle, log), f"{needle!r} in the log"
        for answer in answers:
            assert not leaked(needle, answer), f"{needle!r} in an HTTP answer"
