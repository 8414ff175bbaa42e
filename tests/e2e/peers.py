"""Real peers for end-to-end tests: a DCMTK storescp as the PACS, `radai serve` as a subprocess, storescu."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import yaml
from pydicom.uid import generate_uid

from tests.dicom_router.peers import DcmtkStoreScp, dcmtk_storescp, free_port, stop_process, storescu

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
CRLM = SHARED / "data" / "dicom" / "ct_abdomen_crlm"
T1_NIFTI = SHARED / "models" / "brainchop" / "t1_crop.nii.gz"
Pacs = DcmtkStoreScp


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def storescp(folder: Path) -> Iterator[Pacs]:
    """The PACS: a DCMTK storescp on loopback accepting every transfer syntax into `folder`."""
    with dcmtk_storescp(folder, "+xa") as pacs:
        yield pacs


@dataclass
class RadaiServer:
    dicom_port: int
    api_port: int
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)


@contextmanager
def radai_serve(
    tmp: Path,
    pacs: Pacs | None,
    quiet_seconds: float | None = 1.0,
    max_wait_seconds: float = 0.05,
    *,
    dicom_port: int | None = None,
    destinations: list[dict[str, object]] | None = None,
    extra: dict[str, dict[str, object]] | None = None,
    options: tuple[str, ...] = (),
) -> Iterator[RadaiServer]:
    """`radai serve -c radai.yaml` in a subprocess with the minimal administrator's config file; the
    destination is `pacs` unless `destinations` are given."""
    server = RadaiServer(dicom_port or free_port(), free_port(), tmp / "radai-data", tmp / "radai.log")
    if destinations is None:
        if pacs is None:
            raise ValueError("give a pacs or the destinations")
        destinations = [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}]
    config: dict[str, object] = {
        "dicom": {"ae_title": "RADAI", "host": "127.0.0.1", "port": server.dicom_port},
        "destinations": destinations,
        "storage": {"data_dir": str(server.data_dir), "spool_min_free_bytes": 64 * 1024 * 1024},
        "api": {"host": "127.0.0.1", "port": server.api_port},
        "scheduler": {"max_wait_seconds": max_wait_seconds},
    }
    if quiet_seconds is not None:  # None: the embedded default
        config["completion"] = {"study_quiet_seconds": quiet_seconds}
    for section, values in (extra or {}).items():  # more settings, merged per section
        current = config.get(section)
        config[section] = {**current, **values} if isinstance(current, dict) else values
    cfg = tmp / "radai.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
    with server.log.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "radai", *options, "serve", "-c", str(cfg)],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=log,
        )
        server.process = proc
        try:
            wait_for(lambda: proc.poll() is not None or _ready(server), 120, "radai to become ready")
            if proc.poll() is not None:
                raise RuntimeError(f"radai serve exited: {server.log.read_text()[-2000:]}")
            yield server
        finally:
            stop_process(proc, timeout=30)


def _ready(server: RadaiServer) -> bool:
    try:
        return server.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def send_folder(port: int, folder: Path) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu sending every file below `folder` in one association."""
    return storescu(port, [folder], "+sd", "+r")


def copy_as_new_study(src: Path, dst: Path) -> str:
    """The same images under new Study/Series/SOP Instance UIDs: a second, distinct study."""
    dst.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for path in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(dst / path.name, enforce_file_format=True)
    return study
