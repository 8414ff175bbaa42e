"""End to end with a real PACS: studies sent to a real Orthanc by DCMTK storescu are auto-forwarded to
`radai serve` by the shipped Lua script (docs/orthanc/autoforward.lua); radai's results come back into the
same study in Orthanc (SEG, SR and the Secondary Capture series), without a forwarding loop, and a study whose
job fails gets the "AI did not run" SR."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from radai.results.notice import NOT_PERFORMED_TEXT
from tests.e2e.peers import CRLM, copy_as_new_study, send_folder, wait_for
from tests.e2e.site import STABLE_AGE_S, Site, instances_of, modalities, run_site
from tests.orthanc import missing_reason

CT_1004 = CRLM / "CRLM-CT-1004" / "image"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CRLM.is_dir(), reason="../shared test data not present"),
    pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason())),
]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """Orthanc (accepting the modality and radai, forwarding to radai) and radai sending back SEG, SR, the
    burned-in Secondary Capture series and notices."""
    with run_site(tmp_path, outputs=["seg", "sr", "sc", "notice"]) as running:
        yield running


def _job_states(site: Site, study_uid: str) -> list[str]:
    response = site.radai.get(f"/api/v1/studies/{study_uid}")
    return [str(job["state"]) for job in response.json()["jobs"]] if response.status_code == 200 else []


def test_ct_study_sent_to_orthanc_gets_radai_results_in_the_same_study_once(
    site: Site, tmp_path: Path
) -> None:
    study_uid = copy_as_new_study(CT_1004, tmp_path / "ct")
    assert send_folder(site.orthanc.dicom_port, tmp_path / "ct").returncode == 0

    expected = ["CT", "OT", "SEG", "SR"]  # OT: the Secondary Capture series for PACS without SEG support
    wait_for(lambda: modalities(site.orthanc, study_uid) == expected, 240, "results in Orthanc")
    wait_for(lambda: _job_states(site, study_uid) == ["delivered"], 240, "Orthanc to acknowledge everything")
    sc_count = len(instances_of(site.orthanc, study_uid, "OT"))

    (seg,) = instances_of(site.orthanc, study_uid, "SEG")
    (sr,) = instances_of(site.orthanc, study_uid, "SR")
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == study_uid
    captures = instances_of(site.orthanc, study_uid, "OT")
    assert captures and all(ds.BurnedInAnnotation == "YES" for ds in captures)
    assert all(ds.StudyInstanceUID == study_uid for ds in captures)
    # No loop: the results do not make Orthanc forward the study again (radai keeps one job, one delivery).
    time.sleep(STABLE_AGE_S * 3)
    assert _job_states(site, study_uid) == ["delivered"]
    assert modalities(site.orthanc, study_uid) == expected
    assert len(instances_of(site.orthanc, study_uid, "OT")) == sc_count


def test_study_whose_job_fails_gets_the_did_not_run_notice_in_orthanc(site: Site, tmp_path: Path) -> None:
    study_uid = copy_as_new_study(CT_1004, tmp_path / "ct")
    slices = sorted(
        (tmp_path / "ct").glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2])
    )
    slices[len(slices) // 2].unlink()  # a gap: not a volume, so the CT model's job fails
    assert send_folder(site.orthanc.dicom_port, tmp_path / "ct").returncode == 0

    wait_for(lambda: modalities(site.orthanc, study_uid) == ["CT", "SR"], 240, "the notice in Orthanc")

    (notice,) = instances_of(site.orthanc, study_uid, "SR")
    texts = [str(e.value) for e in notice.iterall() if e.keyword == "TextValue"]
    assert NOT_PERFORMED_TEXT in texts
    assert any(t.startswith("Reason: ") and "spacing" in t for t in texts)
    study = site.radai.get(f"/api/v1/studies/{study_uid}").json()
    assert [job["state"] for job in study["jobs"]] == ["failed"]
