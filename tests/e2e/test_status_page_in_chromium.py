"""The status page of a running `radai serve`, opened in headless Debian chromium after a real CT study went
storescu -> radai -> storescp: the browser shows the study (by fingerprint) as delivered, the model, its
per-stage latencies and the destination up. A full-page screenshot goes to test-artifacts/status/.
Skipped where chromium or the shared data is missing, except under CI=true, where that is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import Page

from dicom_router.uids import uid_fingerprint
from radai.metrics import STAGES
from tests.e2e.peers import CRLM, RadaiServer, copy_as_new_study, radai_serve, send_folder, storescp, wait_for
from tests.viewer import browser
from tests.viewer.browser import ConsoleLog, open_page

pytestmark = pytest.mark.e2e

CT_1004 = CRLM / "CRLM-CT-1004" / "image"
MODEL = "ct-body-classical"
ARTIFACTS = browser.ROOT / "test-artifacts" / "status"


def _missing() -> str | None:
    if not CT_1004.is_dir():
        return "../shared test data not present"
    return browser.missing_reason()


def full_page_screenshot(page: Page, name: str) -> Path:
    """A PNG of the whole page (not only the viewport) as `test-artifacts/status/<name>.png`."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _rows(page: Page, section: str) -> list[str]:
    """The text of each body row of the tables in one section, as the browser lays it out."""
    return [row.inner_text() for row in page.locator(f"#{section} tbody tr").all()]


def _delivered(server: RadaiServer, study_uid: str) -> bool:
    response = server.get(f"/api/v1/studies/{study_uid}")
    return response.status_code == 200 and response.json()["state"] == "done"


def test_status_page_shows_a_delivered_study_in_chromium(tmp_path: Path) -> None:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"status page test prerequisites missing in CI: {reason}")
        pytest.skip(reason)
    study_uid = copy_as_new_study(CT_1004, tmp_path / "study")
    with storescp(tmp_path / "pacs") as pacs, radai_serve(tmp_path, pacs, quiet_seconds=1.0) as server:
        assert send_folder(server.dicom_port, tmp_path / "study").returncode == 0
        wait_for(lambda: _delivered(server, study_uid), 180, "the study's results to be delivered")
        log = ConsoleLog()
        with open_page(log) as page:
            response = page.goto(f"{server.url}/status", wait_until="load")
            assert response is not None and response.status == 200
            shot = full_page_screenshot(page, "status-page")
            assert page.locator("#ready").inner_text().strip() == "ready"

            jobs = [row for row in _rows(page, "studies") if uid_fingerprint(study_uid) in row]
            assert len(jobs) == 1 and "delivered" in jobs[0] and MODEL in jobs[0], jobs
            latency = [row.split("\t") for row in _rows(page, "latency")]
            assert {cells[1] for cells in latency if cells[0] == MODEL} == set(STAGES), latency
            models = [row for row in _rows(page, "models") if row.startswith(MODEL)]
            assert any("active" in row for row in models), models
            assert any(row.split("\t")[:2] == ["pacs", "up"] for row in _rows(page, "destinations"))
            text = page.inner_text("body")
            assert study_uid not in text and study_uid not in page.content()
            assert not [line for line in log.lines if line.startswith("pageerror")], log.tail()
    assert shot.is_file() and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
