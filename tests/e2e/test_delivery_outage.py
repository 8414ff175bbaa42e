"""End to end: the PACS (a real DCMTK storescp) is down when radai finishes a study, and comes back later.

A real `radai serve` keeps the results in its outbound queue across a restart and delivers them exactly once
when the PACS is up (storescp writes every received instance to a new file, so a duplicate would show). Past
a short retry limit the study is dead-lettered, visible in `radai studies show` and in a metric, and
`radai studies retry UID` delivers it once the PACS is up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import yaml

from tests.dicom_router.peers import DCMTK_ENV, MAX_PDU, DcmtkStoreScp, free_port, stop_process
from tests.e2e.peers import CRLM, RadaiServer, copy_as_new_study, send_folder, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CRLM.is_dir(), reason="../shared test data not present"),
]

CT_1004 = CRLM / "CRLM-CT-1004" / "image"


def write_config(tmp: Path, server: RadaiServer, pacs_port: int, retry: dict[str, float]) -> Path:
    config = {
        "dicom": {"ae_title": "RADAI", "host": "127.0.0.1", "port": server.dicom_port},
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, **retry}
        ],
        "delivery": {"poll_seconds": 0.2, "echo_cache_seconds": 0.5, "echo_timeout_seconds": 2.0},
        "completion": {"study_quiet_seconds": 1.0},
        "storage": {"data_dir": str(server.data_dir)},
        "api": {"host": "127.0.0.1", "port": server.api_port},
        "models": {"enabled": ["ct-body-classical"]},
    }
    cfg = tmp / "radai.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return cfg


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}


def _readyz(server: RadaiServer) -> dict[str, Any] | None:
    try:
        body = server.get("/readyz").json()
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) else None


@contextmanager
def radai(tmp: Path, server: RadaiServer, cfg: Path) -> Iterator[RadaiServer]:
    """`radai serve` as a subprocess; up once /readyz answers (a PACS that is down must not keep it from
    serving, whatever readiness says about it)."""
    with server.log.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "radai", "serve", "-c", str(cfg)],
            env=_env(),
            cwd=tmp,
            stdout=log,
            stderr=log,
        )
        try:
            wait_for(lambda: proc.poll() is not None or _readyz(server) is not None, 120, "radai to answer")
            if proc.poll() is not None:
                raise RuntimeError(f"radai serve exited: {server.log.read_text()[-2000:]}")
            yield server
        finally:
            stop_process(proc, timeout=30)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def pacs_on(port: int, folder: Path) -> Iterator[DcmtkStoreScp]:
    """DCMTK storescp on a given port, a new file for every instance received (+uf): duplicates would show."""
    folder.mkdir(parents=True, exist_ok=True)
    args = ["storescp", "-aet", "PACS", "--max-pdu", MAX_PDU, "-od", str(folder), "+xa", "+uf", str(port)]
    proc = subprocess.Popen(args, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: proc.poll() is not None or _listening(port), 15, "storescp to listen", 0.05)
        if proc.poll() is not None:
            raise RuntimeError("storescp exited early")
        yield DcmtkStoreScp(port=port, folder=folder, ae_title="PACS")
    finally:
        stop_process(proc)


def study(server: RadaiServer, uid: str) -> dict[str, Any] | None:
    r = server.get(f"/api/v1/studies/{uid}")
    return r.json() if r.status_code == 200 else None


def delivery(server: RadaiServer, uid: str) -> dict[str, Any] | None:
    s = study(server, uid)
    if not s or not s["jobs"] or not s["jobs"][0]["deliveries"]:
        return None
    return s["jobs"][0]["deliveries"][0]  # type: ignore[no-any-return]


def received(pacs: DcmtkStoreScp, uid: str) -> list[tuple[str, str]]:
    """(Modality, SOPInstanceUID) of every file the PACS wrote for the study, duplicates included."""
    out = []
    for path in pacs.files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.StudyInstanceUID == uid:
            out.append((str(ds.Modality), str(ds.SOPInstanceUID)))
    return sorted(out)


def metric(server: RadaiServer, name: str, labels: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.split()[-1])
    return 0.0


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "radai", "studies", *args, "-c", str(cfg)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_results_wait_out_a_pacs_outage_and_a_restart_then_arrive_exactly_once(tmp_path: Path) -> None:
    server = RadaiServer(free_port(), free_port(), tmp_path / "radai-data", tmp_path / "radai.log")
    pacs_port = free_port()
    cfg = write_config(
        tmp_path,
        server,
        pacs_port,
        {"max_attempts": 1000, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1.0},
    )
    uid = str(pydicom.dcmread(sorted(CT_1004.glob("*.dcm"))[0], stop_before_pixels=True).StudyInstanceUID)
    with radai(tmp_path, server, cfg):
        body = _readyz(server)
        assert body is not None and body["checks"]["destination:pacs"] is False
        assert send_folder(server.dicom_port, CT_1004).returncode == 0
        # Encoded, queued, and failing against the closed port, with back-off.
        wait_for(lambda: (delivery(server, uid) or {}).get("attempts", 0) >= 2, 300, "failed attempts")
        d = delivery(server, uid)
        assert d is not None and d["state"] in ("queued", "sending") and d["last_error"]
        assert (study(server, uid) or {})["state"] == "processing"
        assert metric(server, "radai_deliveries_total", 'outcome="retry"') >= 1
    # radai restarts while the PACS is still down; the queue and the outbox survive.
    with radai(tmp_path, server, cfg), pacs_on(pacs_port, tmp_path / "pacs") as pacs:
        wait_for(lambda: (study(server, uid) or {}).get("state") == "done", 120, "the study delivered")
        got = received(pacs, uid)
        assert [m for m, _ in got] == ["SEG", "SR"]  # one of each, never twice
        assert len({sop for _, sop in got}) == 2
        d = delivery(server, uid)
        assert d is not None and d["state"] == "delivered"
        (job,) = (study(server, uid) or {})["jobs"]
        assert job["state"] == "delivered" and "delivered" in job["stages"]
        assert not any((server.data_dir / "outbox").iterdir())  # outbox emptied
        # The received images are released after the restart too (their paths are kept in the database).
        wait_for(lambda: not any((server.data_dir / "spool").glob("*.dcm")), 10, "the spool released")
        wait_for(
            lambda: (_readyz(server) or {}).get("checks", {}).get("destination:pacs") is True, 10, "echo up"
        )


def test_past_the_retry_limit_a_study_is_dead_lettered_and_retried_from_the_cli(tmp_path: Path) -> None:
    server = RadaiServer(free_port(), free_port(), tmp_path / "radai-data", tmp_path / "radai.log")
    pacs_port = free_port()
    cfg = write_config(
        tmp_path,
        server,
        pacs_port,
        {"max_attempts": 2, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1},
    )
    uid = copy_as_new_study(CT_1004, tmp_path / "study")
    with radai(tmp_path, server, cfg):
        assert send_folder(server.dicom_port, tmp_path / "study").returncode == 0
        wait_for(
            lambda: (study(server, uid) or {}).get("state") == "dead-letter", 300, "the study dead-lettered"
        )
        shown = cli(cfg, "show", uid)
        assert shown.returncode == 0, shown.stderr
        assert '"state": "dead"' in shown.stdout and '"attempts": 2' in shown.stdout
        assert "association" in shown.stdout  # the last error, stated
        assert metric(server, "radai_deliveries_dead", 'destination="pacs"') == 1.0
        spool = server.data_dir / "spool"
        sops = [
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
            for p in (tmp_path / "study").glob("*.dcm")
        ]

        def spooled() -> int:
            return sum(1 for sop in sops if (spool / f"{sop}.dcm").is_file())

        assert spooled() == len(sops)  # received images kept while the study is dead-lettered

        with pacs_on(pacs_port, tmp_path / "pacs") as pacs:
            run = cli(cfg, "retry", uid)
            assert run.returncode == 0, run.stderr
            wait_for(
                lambda: (study(server, uid) or {}).get("state") == "done", 60, "the retried study delivered"
            )
            got = received(pacs, uid)
            assert [m for m, _ in got] == ["SEG", "SR"] and len({sop for _, sop in got}) == 2
            d = delivery(server, uid)
            assert d is not None and d["state"] == "delivered" and d["attempts"] == 1
            wait_for(
                lambda: metric(server, "radai_deliveries_dead", 'destination="pacs"') == 0.0,
                10,
                "dead gauge 0",
            )
            assert spooled() == 0  # released once every result was delivered
