"""The OHIF viewer (the built `dist/` of npm `@ohif/app`, unpacked by scripts/viewer-deps.sh) on loopback.

One threaded HTTP server serves the viewer with a single-page-app fallback to index.html, answers
`/app-config.js` with a configuration whose only data source is the given DICOMweb server, and
reverse-proxies `/dicom-web/` to it, so that the viewer and its DICOMweb are same-origin (no CORS).
The standard library's server suffices here: a test serves one browser, and the proxy only relays
whole responses, so no web framework or proxy package is worth a dependency.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
OHIF_DIST = ROOT / ".cache" / "ohif" / "dist"
DICOMWEB_PREFIX = "/dicom-web"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
# Run in the page before OHIF starts: marks OHIF's onboarding tour as shown, so no popover covers the viewport.
SKIP_TOURS_JS = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
_TYPES = {".js": "application/javascript", ".wasm": "application/wasm", ".json": "application/json"}


def missing_reason(dist: Path = OHIF_DIST) -> str | None:
    """Why the OHIF viewer cannot be served (for pytest skips), or None when it can."""
    if not (dist / "index.html").is_file():
        return f"the OHIF viewer is not unpacked ({dist.name}/index.html absent; run scripts/viewer-deps.sh)"
    return None


def app_config(dicomweb_root: str) -> str:
    """OHIF's `window.config`: one DICOMweb data source at `dicomweb_root` (an absolute URL).

    Orthanc's DICOMweb plugin needs: no fuzzy matching, no `includefield` in QIDO, rendered
    thumbnails, and `wadors` image loading; studies load lazily (series metadata on demand).
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (radai tests)",
            "name": "orthanc",
            "wadoUriRoot": dicomweb_root,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 20, "thumbnail": 4, "prefetch": 4},
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class _Handler(BaseHTTPRequestHandler):
    server: _ViewerHttpServer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the browser's requests are not worth a line each in the test output."""

    def do_GET(self) -> None:
        if self.path.startswith(DICOMWEB_PREFIX + "/"):
            self._proxy()
        else:
            self._static()

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _static(self) -> None:
        path = urlsplit(self.path).path
        if path == "/app-config.js":
            body = self.server.config_js.encode("utf-8")
            self._send(200, body, {"Content-Type": "application/javascript", "Cache-Control": "no-store"})
            return
        dist = self.server.dist
        target = (dist / path.lstrip("/")).resolve()
        if not target.is_relative_to(dist) or not target.is_file():
            # Single-page app: every route that is no file (e.g. /viewer) is the app itself.
            target = dist / "index.html"
        kind = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, target.read_bytes(), {"Content-Type": kind})

    def _proxy(self) -> None:
        upstream = self.server.upstream
        connection = http.client.HTTPConnection(upstream.hostname or "127.0.0.1", upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            # The upstream path is the upstream root plus what follows the same-origin prefix.
            connection.request("GET", upstream.path + self.path[len(DICOMWEB_PREFIX) :], headers=headers)
            response = connection.getresponse()
            body = response.read()
            kept = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
            self._send(response.status, body, kept)
        except OSError as exc:
            self._send(502, f"upstream DICOMweb failed: {exc}".encode(), {"Content-Type": "text/plain"})
        finally:
            connection.close()


class _ViewerHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        host, port = self.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        # Absolute roots: OHIF builds request URLs from them.
        self.config_js = app_config(self.url + DICOMWEB_PREFIX)
        self.upstream = urlsplit(upstream.rstrip("/"))


@dataclass(frozen=True)
class OhifServer:
    """A running viewer: its base URL, e.g. `http://127.0.0.1:PORT`."""

    url: str

    def study_url(self, study_uid: str) -> str:
        """The basic viewer on one study."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"


@contextmanager
def serve_ohif(dicomweb_url: str, dist: Path = OHIF_DIST) -> Iterator[OhifServer]:
    """Serve the viewer on a free loopback port against `dicomweb_url` (e.g. Orthanc's); stop at exit."""
    reason = missing_reason(dist)
    if reason is not None:
        raise RuntimeError(reason)
    server = _ViewerHttpServer(dist, dicomweb_url)
    thread = threading.Thread(target=server.serve_forever, name="ohif-http", daemon=True)
    thread.start()
    try:
        yield OhifServer(server.url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
