"""radai's SEG and SR, stored in a real Orthanc, shown by the real OHIF viewer in headless Chromium.

A CT series (CRLM-CT-1004) goes into Orthanc with a SEG and a TID 1500 SR that radai's encoders made for
a box mask through every slice; OHIF 3.13.2 is served against Orthanc's DICOMweb. Screenshots and the
page's console go to test-artifacts/viewer/. Skipped where Chromium, the OHIF build or Orthanc is missing,
except under CI=true, where that is a failure (scripts/viewer-deps.sh and scripts/system-packages.sh
install them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from playwright.sync_api import Page

from tests import orthanc as orthanc_peer
from tests.viewer import browser, ohif
from tests.viewer.browser import ConsoleLog, open_page, screenshot
from tests.viewer.ohif import SKIP_TOURS_JS, OhifServer, serve_ohif
from tests.viewer.overlay import (
    IMAGE_SHOWN_JS,
    NEXT_IMAGE_JS,
    SEGMENT_COLOUR_JS,
    Projection,
    bright,
    coloured,
    fraction,
    project_box,
    shown_instance,
)
from tests.viewer.study import BOX, CT_SERIES, ViewerStudy, build_study, upload

pytestmark = pytest.mark.e2e

LOAD_TIMEOUT_MS = 120_000  # two slow cores, a software-rendered WebGL and 41 CT slices
THUMBNAIL = "[data-cy=study-browser-thumbnail-no-image]"
VOLUME_TEXT = "Volume:"
CRASH_MARK = "Error Boundary"  # what OHIF logs when a route's React tree fails
INSET, OUTSET = 4, 6  # screen pixels: the box's edge is drawn as an outline a few pixels wide


def _missing() -> str | None:
    if not CT_SERIES.is_dir():
        return f"shared CT test data absent ({CT_SERIES.name})"
    return orthanc_peer.missing_reason() or ohif.missing_reason() or browser.missing_reason()


@dataclass(frozen=True)
class Viewer:
    study: ViewerStudy
    server: OhifServer


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewer]:
    """Orthanc holding the CT, SEG and SR, and OHIF served against it (once for the module)."""
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"viewer test prerequisites missing in CI: {reason}")
        pytest.skip(reason)
    study = build_study()
    with orthanc_peer.run_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        upload(server.http_url, [*study.ct, study.seg, study.sr])
        with serve_ohif(server.dicomweb_url) as viewer_server:
            yield Viewer(study, viewer_server)


@pytest.fixture
def page(request: pytest.FixtureRequest, viewer: Viewer) -> Iterator[tuple[Page, ConsoleLog]]:
    """A fresh browser on the study; its console is saved next to the screenshots."""
    log = ConsoleLog()
    with open_page(log) as opened:
        opened.add_init_script(SKIP_TOURS_JS)
        try:
            opened.goto(viewer.server.study_url(viewer.study.study_uid))
            yield opened, log
        finally:
            log.save(browser.ARTIFACTS / f"{request.node.name}-console.log")


def _until(page: Page, condition: Callable[[], bool], what: str, log: ConsoleLog) -> None:
    """Poll `condition` (re-checking the page every 250 ms) until it holds; fail with the console tail."""
    deadline = time.monotonic() + LOAD_TIMEOUT_MS / 1000
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; OHIF console:\n{log.tail()}")
        page.wait_for_timeout(250)


def _open_series(page: Page, modality: str) -> None:
    """Double-click a series' entry in OHIF's study browser (SEG and SR entries have no image)."""
    page.locator(THUMBNAIL, has_text=modality).first.dblclick()


def _shown_box(tab: Page, study: ViewerStudy) -> Projection:
    """Where the box of the image now shown lies on screen."""
    columns, rows = study.box_on(shown_instance(tab))
    return project_box(tab, columns, rows)


def _assert_overlay_on_box(tab: Page, study: ViewerStudy, log: ConsoleLog, name: str) -> None:
    """Wait for the overlay to fill the shown image's box, then check no overlay colour lies outside it."""
    projection = _shown_box(tab, study)

    def filled(png: bytes) -> float:
        green = coloured(png, BOX.color)
        return fraction(green, projection.box.grown(-INSET).mask(green.shape))

    counts: list[int] = []

    def drawn() -> bool:
        """The box is filled, or some overlay has been drawn and stayed the same over three screenshots."""
        png = tab.screenshot()
        counts.append(int(coloured(png, BOX.color).sum()))
        settled = len(counts) >= 3 and counts[-1] > 0 and len(set(counts[-3:])) == 1
        return filled(png) > 0.9 or settled

    _until(tab, drawn, f"the SEG overlay on {name}", log)
    shot = screenshot(tab, name).read_bytes()
    green = coloured(shot, BOX.color)
    outside = projection.canvas.mask(green.shape) & ~projection.box.grown(OUTSET).mask(green.shape)
    assert filled(shot) > 0.9, f"the overlay covers {filled(shot):.0%} of the mask's projection ({name})"
    assert fraction(green, outside) < 0.001, f"overlay colour outside the mask's projection ({name})"


def test_ohif_draws_the_seg_overlay_exactly_over_the_mask(
    viewer: Viewer, page: tuple[Page, ConsoleLog]
) -> None:
    tab, log = page
    study = viewer.study
    tab.wait_for_function(IMAGE_SHOWN_JS, timeout=LOAD_TIMEOUT_MS)
    tab.wait_for_selector(THUMBNAIL, timeout=LOAD_TIMEOUT_MS)
    projection = _shown_box(tab, study)

    def ct_drawn() -> bool:
        lit = bright(tab.screenshot())
        return fraction(lit, projection.canvas.mask(lit.shape)) > 0.1

    _until(tab, ct_drawn, "the CT image to be drawn", log)
    before = coloured(screenshot(tab, "01-ct-without-seg").read_bytes(), BOX.color)
    canvas = projection.canvas.mask(before.shape)
    assert fraction(before, canvas) < 0.001, "the CT alone already shows the segment's colour"

    _open_series(tab, "SEG")
    # OHIF previews the SEG over the CT and asks whether to load it as a segmentation: load it.
    tab.get_by_role("button", name="Yes").click(timeout=LOAD_TIMEOUT_MS)
    _assert_overlay_on_box(tab, study, log, "02-seg-on-first-image")
    # The next slice has its box on the other side: an overlay from the wrong frame would show.
    tab.evaluate(NEXT_IMAGE_JS)
    _assert_overlay_on_box(tab, study, log, "03-seg-on-next-image")
    rgba = tab.evaluate(SEGMENT_COLOUR_JS)
    assert all(abs(int(a) - b) <= 2 for a, b in zip(rgba[:3], BOX.color, strict=True)), rgba
    # The segmentation panel names the segment as the SEG does (the model card's label).
    tab.locator("[data-cy=panelSegmentation-btn]").click()
    tab.get_by_text(BOX.name, exact=True).first.wait_for(state="visible", timeout=LOAD_TIMEOUT_MS)
    screenshot(tab, "04-segmentation-panel")
    assert not log.has(CRASH_MARK), log.tail()


def test_ohif_shows_the_sr_volume_measurement(viewer: Viewer, page: tuple[Page, ConsoleLog]) -> None:
    tab, log = page
    tab.wait_for_function(IMAGE_SHOWN_JS, timeout=LOAD_TIMEOUT_MS)
    tab.wait_for_selector(THUMBNAIL, timeout=LOAD_TIMEOUT_MS)
    _open_series(tab, "SR")
    volume = tab.get_by_text(VOLUME_TEXT).first

    def shown_or_crashed() -> bool:
        return volume.is_visible() or log.has(CRASH_MARK)

    _until(tab, shown_or_crashed, "the SR's measurements (or an OHIF crash)", log)
    screenshot(tab, "05-sr")
    assert not log.has(CRASH_MARK), f"OHIF failed on the SR:\n{log.tail()}"
    text = volume.text_content() or ""  # an SVG <text> of the SR overlay: no inner_text
    assert "ml" in text.lower(), text
    expected = f"{viewer.study.volume_ml:.2f}"
    assert expected in text, f"{text!r} does not show the encoded volume {expected} ml"
