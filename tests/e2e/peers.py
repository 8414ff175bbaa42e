"""Real peers for end-to-end tests: a DCMTK storescp as the PACS, `radai serve` as a subprocess, storescu."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
CRLM = SHARED / "data" / "dicom" / "ct_abdomen_crlm"
T1_NIFTI = SHARED / "models" / "brainchop" / "t1_crop.nii.gz"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: object, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Pacs:
    port: int
    folder: Path
    ae_title: str = "PACS"

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())


@contextmanager
def storescp(folder: Path) -> Iterator[Pacs]:
    """A DCMTK storescp on loopback that accepts everything into `folder` (the PACS)."""
    folder.mkdir(parents=True, exist_ok=True)
    pacs = Pacs(port=free_port(), folder=folder)
    proc = subprocess.Popen(
        [
            "storescp",
            "--aetitle",
            pacs.ae_title,
            "--max-pdu",
            "131072",
            "-od",
            str(folder),
            "+xa",
            "--sort-on-study-uid",
            "st",
            str(pacs.port),
        ],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _port_open(pacs.port), 10, "storescp to listen")
        yield pacs
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class RadaiServer:
    dicom_port: int
    api_port: int
    data_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)


@contextmanager
def radai_serve(
    tmp: Path, pacs: Pacs, quiet_seconds: float = 1.0, max_wait_seconds: float = 0.05
) -> Iterator[RadaiServer]:
    """`radai serve -c radai.yaml` in a subprocess with the minimal administrator's config file."""
    server = RadaiServer(free_port(), free_port(), tmp / "radai-data", tmp / "radai.log")
    config = {
        "dicom": {"ae_title": "RADAI", "host": "127.0.0.1", "port": server.dicom_port},
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        "completion": {"study_quiet_seconds": quiet_seconds},
        "storage": {"data_dir": str(server.data_dir)},
        "api": {"host": "127.0.0.1", "port": server.api_port},
        "scheduler": {"max_wait_seconds": max_wait_seconds},
    }
    cfg = tmp / "radai.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
    with server.log.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "radai", "serve", "-c", str(cfg)], env=env, cwd=tmp, stdout=log, stderr=log
        )
        try:
            wait_for(lambda: proc.poll() is not None or _ready(server), 120, "radai to become ready")
            if proc.poll() is not None:
                raise RuntimeError(f"radai serve exited: {server.log.read_text()[-2000:]}")
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ready(server: RadaiServer) -> bool:
    try:
        return server.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def storescu(port: int, files: list[Path] | Path, *extra: str) -> subprocess.CompletedProcess[str]:
    paths = [files] if isinstance(files, Path) else files
    args = [
        "storescu",
        "--aetitle",
        "MODALITY",
        "--call",
        "RADAI",
        "--max-pdu",
        "131072",
        *extra,
        "127.0.0.1",
        str(port),
    ]
    if any(p.is_dir() for p in paths):
        args.insert(1, "+sd")
        args.insert(1, "+r")
    return subprocess.run(
        [*args, *map(str, paths)], env=DCMTK_ENV, capture_output=True, text=True, timeout=120
    )
