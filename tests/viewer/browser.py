"""Debian's `chromium`, headless, driven by the PyPI `playwright` package (its own browsers are never used).

Cornerstone3D renders with WebGL 2: with no GPU, Chromium's ANGLE runs it on SwiftShader (software).
The page's console lines and errors are kept, so that a test can show why the viewer drew nothing.
Screenshots go to `test-artifacts/viewer/` at the project root (git-ignored; CI keeps the folder).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import Page, ViewportSize, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "viewer"
CHROMIUM_ARGS = (
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--use-gl=angle",
    "--ignore-gpu-blocklist",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-pings",
    # Test traffic stays on loopback: no host name resolves (the tests use 127.0.0.1 literally).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
VIEWPORT = ViewportSize(width=1400, height=900)


def chromium_path() -> str | None:
    """Debian's chromium binary, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing_reason() -> str | None:
    """Why a headless browser cannot run here (for pytest skips), or None when it can."""
    if chromium_path() is None:
        return "Debian's chromium is not installed (run scripts/viewer-deps.sh)"
    return None


@dataclass
class ConsoleLog:
    """What the page printed: console lines (`type: text`) and uncaught errors."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def has(self, text: str) -> bool:
        """Whether any line so far contains `text`."""
        return any(text in line for line in self.lines)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")


@contextmanager
def open_page(log: ConsoleLog) -> Iterator[Page]:
    """A fresh headless Chromium with one page (1400x900) whose console goes into `log`."""
    executable = chromium_path()
    if executable is None:
        raise RuntimeError("chromium is not installed")
    args = list(CHROMIUM_ARGS)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to start its sandbox as root
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
            page = context.new_page()
            page.on("console", lambda m: log.add(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: log.add(f"pageerror: {e}"))
            page.on("requestfailed", lambda r: log.add(f"requestfailed: {r.url} {r.failure}"))
            yield page
        finally:
            browser.close()


def screenshot(page: Page, name: str) -> Path:
    """Save a PNG of the whole page as `test-artifacts/viewer/<name>.png`; return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path
