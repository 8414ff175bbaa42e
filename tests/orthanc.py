"""A real Orthanc (Debian packages `orthanc` and `orthanc-dicomweb`) on loopback for tests.

Orthanc 1.10 has no bind-address option: its HTTP server refuses every client but loopback
(`RemoteAccessAllowed: false`, no authentication then), and its DICOM server answers only the modalities
registered in `DicomModalities` with their host checked (`DicomCheckModalityHost`); pass them in `extra`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.dicom_router.peers import LOOPBACK, free_port, stop_process

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT_S = 30.0


def missing_reason() -> str | None:
    """Why a real Orthanc cannot run here (for pytest skip marks), or None when it can."""
    if not Path(ORTHANC).is_file():
        return f"Orthanc is not installed ({ORTHANC} absent; scripts/system-packages.sh installs it)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"the Orthanc DICOMweb plugin is not installed ({DICOMWEB_PLUGIN} absent)"
    return None


@dataclass
class OrthancServer:
    """A running Orthanc: its URLs, DICOM port and AE title, and a few REST helpers."""

    http_url: str
    dicom_port: int
    aet: str
    work_dir: Path
    process: subprocess.Popen[bytes]
    auth: tuple[str, str] | None = None

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    @property
    def log(self) -> Path:
        return self.work_dir / "orthanc.log"

    def get(self, path: str) -> Any:
        """GET a REST resource (e.g. `/instances`) and decode its JSON."""
        response = httpx.get(self.http_url + path, timeout=10, auth=self.auth)
        response.raise_for_status()
        return response.json()

    def instance_uids(self) -> set[str]:
        """The SOPInstanceUIDs Orthanc holds."""
        return {
            str(self.get(f"/instances/{oid}")["MainDicomTags"]["SOPInstanceUID"])
            for oid in self.get("/instances")
        }

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not stopped within 10 s; a second call does nothing."""
        if self.process.poll() is None:
            stop_process(self.process)


def _answers(url: str) -> bool:
    """Whether the HTTP server answers (401 counts: authentication is on)."""
    try:
        return httpx.get(url + "/system", timeout=2).status_code in (200, 401)
    except httpx.HTTPError:
        return False


@contextmanager
def run_orthanc(
    work_dir: Path, *, aet: str = "ORTHANC", extra: Mapping[str, Any] | None = None
) -> Iterator[OrthancServer]:
    """Start Orthanc with its storage, index, config and log under `work_dir`; stop it at exit.

    `extra` entries replace top-level configuration keys (e.g. `DicomModalities`, `LuaScripts`,
    `OverwriteInstances`, `StableAge`, or `AuthenticationEnabled` with `RegisteredUsers`: the first user is
    then used by the REST helpers). Not `SslEnabled`: Orthanc 1.10 of Debian 12 dies (SIGSEGV) at its first
    TLS handshake; put a TLS terminator in front of it instead.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config: dict[str, Any] = {
        "Name": "radai-test",
        "StorageDirectory": str(work_dir / "storage"),
        "IndexDirectory": str(work_dir / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "WebDavEnabled": False,
        "SaveJobs": False,
        "HttpThreadsCount": 8,
        "DicomThreadsCount": 2,
        "ConcurrentJobs": 1,
    }
    config.update(extra or {})
    config_file = work_dir / "orthanc.json"
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log = work_dir / "orthanc.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [ORTHANC, str(config_file)], stdout=sink, stderr=subprocess.STDOUT, cwd=work_dir
        )
    users: dict[str, str] = config.get("RegisteredUsers") or {}
    auth = next(iter(users.items())) if config.get("AuthenticationEnabled") and users else None
    server = OrthancServer(f"http://{LOOPBACK}:{http_port}", dicom_port, aet, work_dir, process, auth)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(server.http_url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
                raise RuntimeError(f"Orthanc did not start (exit {process.poll()}): {tail}")
            time.sleep(0.1)
        yield server
    finally:
        server.stop()
