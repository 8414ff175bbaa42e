"""A throwaway PostgreSQL server on 127.0.0.1 for tests: Debian's binaries, a temp dir, a free port, fsync
off, trust authentication for the `radai` role on loopback; always stopped and removed. As root (CI),
initdb and postgres run as the `postgres` system user (initdb refuses root); without that user or without
the binaries the tests are skipped (and fail under CI=true: `missing_reason`)."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

LOOPBACK = "127.0.0.1"
ROLE = "radai"
_NAMES = itertools.count(1)


def _bin_dir() -> Path | None:
    """The newest Debian PostgreSQL with initdb (/usr/lib/postgresql/<major>/bin), else one on PATH."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def missing_reason() -> str | None:
    """Why a PostgreSQL server cannot be started here (None when it can)."""
    if _bin_dir() is None:
        return "PostgreSQL is not installed (scripts/system-packages.sh: postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a `postgres` system user to run PostgreSQL as"
    return None


@dataclass(frozen=True)
class PostgresServer:
    port: int
    process: subprocess.Popen[bytes]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{ROLE}@{LOOPBACK}:{self.port}/{database}"

    def create_database(self, prefix: str = "radai") -> str:
        """A new empty database (unique name); its URL."""
        name = f"{prefix}_{os.getpid()}_{next(_NAMES)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')  # a name made here, not a value from outside
        return self.url(name)

    def execute(self, database_url: str, sql: str) -> None:
        """Runs `sql` as the superuser on another connection (for changes made behind radai's back)."""
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.encode())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _as_postgres() -> dict[str, object]:
    """Popen arguments that run the child as the `postgres` user when this process is root."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("postgres")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # postgres: fast shutdown
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _start(bin_dir: Path, data: Path, root: Path) -> PostgresServer | None:
    """One attempt on one free port; None when the server died (e.g. the port was taken meanwhile)."""
    port = _free_port()
    command = [
        str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
        "-c", f"listen_addresses={LOOPBACK}", "-c", f"unix_socket_directories={root}",
        "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        "-c", "max_connections=60", "-c", "shared_buffers=32MB",
    ]  # fmt: skip
    log = (root / "postgres.log").open("ab")
    process = subprocess.Popen(command, stdout=log, stderr=log, cwd=root, **_as_postgres())  # type: ignore[call-overload]
    log.close()
    server = PostgresServer(port, process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        try:
            with psycopg.connect(server.url(), connect_timeout=2):
                return server
        except psycopg.OperationalError:
            time.sleep(0.1)
    _stop(process)
    return None


@contextmanager
def run_postgres() -> Iterator[PostgresServer]:
    """initdb in a new temp dir, start postgres, yield it; stop it and remove the dir even when the body
    raises. (Not pytest's tmp_path: its parents are private to root, and the server may run as `postgres`.)"""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed")
    root = Path(tempfile.mkdtemp(prefix="radai-pg-"))
    server: PostgresServer | None = None
    try:
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
        data = root / "data"
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", ROLE, "--auth=trust", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            cwd=root, check=True, capture_output=True, timeout=120, **_as_postgres(),  # type: ignore[call-overload]
        )  # fmt: skip
        for _ in range(3):
            server = _start(bin_dir, data, root)
            if server is not None:
                break
        else:
            log = root / "postgres.log"
            raise RuntimeError("postgres did not start: " + (log.read_text()[-2000:] if log.exists() else ""))
        yield server
    finally:
        if server is not None:
            _stop(server.process)
        shutil.rmtree(root, ignore_errors=True)
