"""Peers for the crash test: a `radai serve` that can be killed with SIGKILL and restarted on the same data
directory and ports, and a DCMTK storescu whose per-instance acknowledgements are read as they come."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.dicom_router.peers import DCMTK_ENV, LOOPBACK, MAX_PDU, free_port, stop_process
from tests.e2e.peers import Pacs, RadaiServer, wait_for

_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


class CrashableRadai:
    """`radai serve` in a subprocess, restartable after ``kill()`` on the same data dir and ports."""

    def __init__(self, tmp: Path, pacs: Pacs, quiet_seconds: float, max_wait_seconds: float = 0.05) -> None:
        self.server = RadaiServer(free_port(), free_port(), tmp / "radai-data", tmp / "radai.log")
        config = {
            "dicom": {"ae_title": "RADAI", "host": LOOPBACK, "port": self.server.dicom_port},
            "destinations": [
                {"name": "pacs", "ae_title": pacs.ae_title, "host": LOOPBACK, "port": pacs.port}
            ],
            "storage": {"data_dir": str(self.server.data_dir)},
            "api": {"host": LOOPBACK, "port": self.server.api_port},
            "scheduler": {"max_wait_seconds": max_wait_seconds},
            "completion": {"study_quiet_seconds": quiet_seconds},
        }
        self._config = tmp / "radai.yaml"
        self._config.write_text(yaml.safe_dump(config))
        self._cwd = tmp
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def spool(self) -> Path:
        return self.server.data_dir / "spool"

    def start(self, timeout: float = 180) -> None:
        """Start and wait until /readyz answers 200; RuntimeError if the process exits first."""
        if self._proc is not None:
            raise RuntimeError("already running")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
        with self.server.log.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "radai", "serve", "-c", str(self._config)],
                env=env,
                cwd=self._cwd,
                stdout=log,
                stderr=log,
            )
        self._proc = proc
        self.starts += 1
        wait_for(lambda: proc.poll() is not None or self._ready(), timeout, "radai to become ready")
        if proc.poll() is not None:
            self._proc = None
            raise RuntimeError(f"radai serve exited: {self.server.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a power cut for the process."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if proc is not None:
            proc.wait(timeout=30)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout=30)

    def _ready(self) -> bool:
        import httpx

        try:
            return self.server.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False


@dataclass
class SendLog:
    """What storescu reported, instance by instance."""

    acknowledged: list[Path] = field(default_factory=list)  # answered Success
    other: list[tuple[Path, str]] = field(default_factory=list)  # answered with another status
    returncode: int | None = None


def send_watching_acks(
    port: int, files: list[Path], on_ack: Callable[[int], None] | None = None, timeout: float = 300
) -> SendLog:
    """Run `storescu -v` on ``files`` in one association; ``on_ack(n)`` runs (on this thread) after the n-th
    Success response is read, so a caller can act at a precise point of the transfer."""
    args = ["storescu", "-v", "-aet", "MODALITY", "-aec", "RADAI", "--max-pdu", MAX_PDU, LOOPBACK, str(port)]
    proc = subprocess.Popen(
        [*args, *map(str, files)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    timer = threading.Timer(timeout, proc.kill)  # a hung storescu must not hang the test run
    timer.start()
    log = SendLog()
    current: Path | None = None
    try:
        if proc.stderr is None:
            raise RuntimeError("storescu has no stderr pipe")
        for line in proc.stderr:
            if sending := _SENDING.search(line):
                current = Path(sending.group(1).strip())
            elif (response := _RESPONSE.search(line)) and current is not None:
                if response.group(1) == "Success":
                    log.acknowledged.append(current)
                    if on_ack is not None:
                        on_ack(len(log.acknowledged))
                else:
                    log.other.append((current, response.group(1)))
                current = None
        log.returncode = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log
