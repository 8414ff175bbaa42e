"""A throwaway `redis-server` on 127.0.0.1 for tests: free port, temp dir, no persistence; always stopped."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=30)


def missing_reason() -> str | None:
    """Why the redis tests cannot run here (None when they can)."""
    return (
        None if shutil.which("redis-server") else "redis-server is not installed (scripts/system-packages.sh)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _start(folder: Path) -> RedisServer | None:
    """One attempt on one free port; None when the server died (e.g. the port was taken meanwhile)."""
    port = _free_port()
    command = [
        "redis-server", "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
        "--protected-mode", "yes", "--dir", str(folder), "--logfile", str(folder / "redis.log"),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, process)
    client = server.client()
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return None
            try:
                if client.ping():
                    return server
            except redis.ConnectionError:
                time.sleep(0.05)
    finally:
        client.close()
    _stop(process)
    return None


@contextmanager
def run_redis(folder: Path) -> Iterator[RedisServer]:
    """Start redis-server in `folder`, yield it, stop it (even when the body raises)."""
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        server = _start(folder)
        if server is not None:
            break
    else:
        log = folder / "redis.log"
        raise RuntimeError("redis-server did not start: " + (log.read_text()[-2000:] if log.exists() else ""))
    try:
        yield server
    finally:
        _stop(server.process)
