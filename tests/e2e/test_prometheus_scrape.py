"""A real Prometheus (Debian `prometheus`, on loopback) scrapes a running `radai serve` while a real CT study
goes storescu -> radai -> storescp; PromQL over the stage histograms returns one series per pipeline stage,
and the shipped recording rules and alerts load and evaluate on the live data."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from tests.dicom_router.peers import free_port, stop_process
from tests.e2e.peers import CRLM, radai_serve, send_folder, storescp, wait_for

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CRLM.is_dir(), reason="../shared test data not present"),
    pytest.mark.skipif(
        PROMETHEUS is None, reason="Debian prometheus not installed (scripts/system-packages.sh)"
    ),
]
CT_1004 = CRLM / "CRLM-CT-1004" / "image"
RULES = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "radai-rules.yaml"
STAGES = {"received", "complete", "queued", "inferred", "encoded", "delivered"}


@contextmanager
def prometheus(tmp: Path, target_port: int) -> Iterator[str]:
    """Prometheus scraping 127.0.0.1:<target_port>/metrics every second with radai's recording rules and
    alerts (deploy/monitoring) evaluated every second; yields its base URL."""
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{RULES}']\n"
        "scrape_configs:\n"
        f"  - job_name: radai\n    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    log = (tmp / "prometheus.log").open("wb")
    assert PROMETHEUS is not None
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(tmp / 'prometheus.log').read_text()[-2000:]}")
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, "prometheus to become ready")
        yield url
    finally:
        stop_process(proc, timeout=15)
        log.close()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_prometheus_scrapes_the_stage_histograms_of_a_real_study(tmp_path: Path) -> None:
    study_uid = str(pydicom.dcmread(next(CT_1004.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    with (
        storescp(tmp_path / "pacs") as pacs,
        radai_serve(tmp_path, pacs, quiet_seconds=1.0) as server,
        prometheus(tmp_path, server.api_port) as prom,
    ):
        wait_for(lambda: bool(query(prom, 'up{job="radai"} == 1')), 60, "prometheus to scrape radai")
        assert send_folder(server.dicom_port, CT_1004).returncode == 0

        def delivered() -> bool:
            r = server.get(f"/api/v1/studies/{study_uid}")
            return r.status_code == 200 and r.json()["state"] == "done"

        wait_for(delivered, 180, "the study's results to be delivered")
        model = 'model="ct-body-classical"'
        counts = f"radai_study_stage_seconds_count{{{model}}}"
        wait_for(
            lambda: len(query(prom, f"{counts} >= 1")) == len(STAGES), 60, "prometheus to scrape the stages"
        )

        per_stage = query(prom, f"sum by (stage) ({counts})")
        assert {s["metric"]["stage"] for s in per_stage} == STAGES
        assert all(float(s["value"][1]) >= 1 for s in per_stage)
        p95 = query(
            prom,
            f"histogram_quantile(0.95, sum by (le, stage) (radai_study_stage_seconds_bucket{{{model}}}))",
        )
        assert {s["metric"]["stage"] for s in p95} == STAGES
        end_to_end = query(prom, f'radai_study_end_to_end_seconds_count{{{model},priority="routine"}}')
        assert len(end_to_end) == 1 and float(end_to_end[0]["value"][1]) >= 1
        # labels stay bounded: no UID or patient value in any radai series Prometheus holds
        series = httpx.get(f"{prom}/api/v1/series", params={"match[]": '{job="radai"}'}, timeout=10).json()
        label_values = {str(v) for s in series["data"] for v in s.values()}
        assert study_uid not in label_values and label_values

        # The shipped rules load and evaluate on live data (their values are proven by `promtool test rules`
        # in tests/monitoring; a whole study can arrive between two scrapes, so a rate here may be 0), and
        # no alert fires on a healthy run.
        rules = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert rules and all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
        received = query(prom, 'radai:instances_received:rate5m{sender="unlisted"}')
        assert [r["metric"]["outcome"] for r in received] == ["success"]
        assert query(prom, 'ALERTS{alertstate="firing"}') == []
