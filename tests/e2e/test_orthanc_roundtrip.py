"""End to end with a real PACS: studies sent to a real Orthanc by DCMTK storescu are auto-forwarded to
`radai serve` by the shipped Lua script (docs/orthanc/autoforward.lua); radai's results come back into the
same study in Orthanc, without a forwarding loop, and a study whose job fails gets the "AI did not run" SR."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest

from radai.results.notice import NOT_PERFORMED_TEXT
from tests.dicom_router.peers import free_port
from tests.e2e.peers import CRLM, RadaiServer, copy_as_new_study, radai_serve, send_folder, wait_for
from tests.orthanc import OrthancServer, missing_reason, run_orthanc

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "docs" / "orthanc" / "autoforward.lua"
CT_1004 = CRLM / "CRLM-CT-1004" / "image"
STABLE_AGE_S = 2

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CRLM.is_dir(), reason="../shared test data not present"),
    pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason())),
]


@dataclass
class Site:
    orthanc: OrthancServer
    radai: RadaiServer


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """Orthanc (accepting the modality and radai, forwarding to radai) and radai (sending back to Orthanc)."""
    radai_port = free_port()
    extra = {
        "DicomModalities": {
            "modality": ["MODALITY", "127.0.0.1", free_port()],
            "radai": ["RADAI", "127.0.0.1", radai_port],
        },
        "LuaScripts": [str(LUA)],
        "StableAge": STABLE_AGE_S,
    }
    with run_orthanc(tmp_path / "orthanc", extra=extra) as orthanc:
        destination = {
            "name": "orthanc",
            "ae_title": orthanc.aet,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
        }
        with radai_serve(tmp_path, None, dicom_port=radai_port, destinations=[destination]) as radai:
            yield Site(orthanc, radai)


def _study_id(orthanc: OrthancServer, study_uid: str) -> str | None:
    """Orthanc's id of the study, or None while it has none."""
    found = httpx.post(f"{orthanc.http_url}/tools/lookup", content=study_uid, timeout=10).json()
    return next((str(item["ID"]) for item in found if item["Type"] == "Study"), None)


def _modalities(orthanc: OrthancServer, study_uid: str) -> list[str]:
    """The modality of each series of the study in Orthanc, sorted."""
    study_id = _study_id(orthanc, study_uid)
    if study_id is None:
        return []
    return sorted(
        str(s["MainDicomTags"].get("Modality", "")) for s in orthanc.get(f"/studies/{study_id}/series")
    )


def _instances_of(orthanc: OrthancServer, study_uid: str, modality: str) -> list[pydicom.Dataset]:
    """The study's instances of one modality, as stored by Orthanc."""
    study_id = _study_id(orthanc, study_uid)
    out: list[pydicom.Dataset] = []
    for series in orthanc.get(f"/studies/{study_id}/series"):
        if series["MainDicomTags"].get("Modality") != modality:
            continue
        for instance_id in series["Instances"]:
            raw = httpx.get(f"{orthanc.http_url}/instances/{instance_id}/file", timeout=30).content
            out.append(pydicom.dcmread(io.BytesIO(raw)))
    return out


def test_ct_study_sent_to_orthanc_gets_radai_results_in_the_same_study_once(
    site: Site, tmp_path: Path
) -> None:
    study_uid = copy_as_new_study(CT_1004, tmp_path / "ct")
    assert send_folder(site.orthanc.dicom_port, tmp_path / "ct").returncode == 0

    wait_for(lambda: _modalities(site.orthanc, study_uid) == ["CT", "SEG", "SR"], 240, "results in Orthanc")

    (seg,) = _instances_of(site.orthanc, study_uid, "SEG")
    (sr,) = _instances_of(site.orthanc, study_uid, "SR")
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == study_uid
    # No loop: the results do not make Orthanc forward the study again (radai keeps one job, one delivery).
    time.sleep(STABLE_AGE_S * 3)
    study = site.radai.get(f"/api/v1/studies/{study_uid}").json()
    assert [job["state"] for job in study["jobs"]] == ["delivered"]
    assert _modalities(site.orthanc, study_uid) == ["CT", "SEG", "SR"]


def test_study_whose_job_fails_gets_the_did_not_run_notice_in_orthanc(site: Site, tmp_path: Path) -> None:
    study_uid = copy_as_new_study(CT_1004, tmp_path / "ct")
    slices = sorted(
        (tmp_path / "ct").glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2])
    )
    slices[len(slices) // 2].unlink()  # a gap: not a volume, so the CT model's job fails
    assert send_folder(site.orthanc.dicom_port, tmp_path / "ct").returncode == 0

    wait_for(lambda: _modalities(site.orthanc, study_uid) == ["CT", "SR"], 240, "the notice in Orthanc")

    (notice,) = _instances_of(site.orthanc, study_uid, "SR")
    texts = [str(e.value) for e in notice.iterall() if e.keyword == "TextValue"]
    assert NOT_PERFORMED_TEXT in texts
    assert any(t.startswith("Reason: ") and "spacing" in t for t in texts)
    study = site.radai.get(f"/api/v1/studies/{study_uid}").json()
    assert [job["state"] for job in study["jobs"]] == ["failed"]
