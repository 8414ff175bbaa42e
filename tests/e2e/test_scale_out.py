"""Scale-out with real servers: PostgreSQL and redis-server (Debian, on loopback, started here), two receiver
processes and two worker processes (`radai serve` with `scaleout.role`), one shared data folder, a DCMTK
storescp as the PACS.

- A worker is killed with SIGKILL while it runs a job: after `claim_idle_seconds` the other worker claims
  the job from the stream, runs it and the results are delivered once.
- Studies go to both receivers, one of them split (its two series sent to different receivers): every
  study is planned once as one study (the split one: one job over both parts' instances), processed once,
  and delivered once (one `result.delivered` audit record per job).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import redis
from pydicom.uid import generate_uid

from tests.e2e.peers import CRLM, Pacs, RadaiServer, radai_serve, send_folder, storescp, wait_for
from tests.radai import postgres_server, redis_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CRLM.is_dir(), reason="../shared test data not present"),
]
MODEL = "ct-body-classical"
STREAM = f"radai:jobs:{MODEL}"
CLAIM_IDLE_S = 4.0


def _servers_missing() -> str | None:
    return postgres_server.missing_reason() or redis_server.missing_reason()


def copy_series(src: Path, dst: Path, study_uid: str, count: int | None = None) -> int:
    """The images of `src` (the first `count`) as a new series of the study `study_uid`; returns how many."""
    dst.mkdir(parents=True)
    series = generate_uid()
    paths = sorted(src.glob("*.dcm"))[:count]
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(dst / path.name, enforce_file_format=True)
    return len(paths)


class Cluster:
    def __init__(self, tmp: Path, stack: ExitStack, pacs: Pacs, database_url: str, redis_url: str) -> None:
        self.tmp, self.stack, self.pacs = tmp, stack, pacs
        self.common = {
            "database_url": database_url,
            "redis_url": redis_url,
            "claim_idle_seconds": CLAIM_IDLE_S,
        }
        self.shared = tmp / "shared"

    def start(self, name: str, role: str) -> RadaiServer:
        extra: dict[str, dict[str, object]] = {
            "storage": {"data_dir": str(self.shared)},
            "scaleout": {"mode": "distributed", "role": role, "consumer_name": name, **self.common},
            "scheduler": {"job_workers": 1},
        }
        folder = self.tmp / name
        folder.mkdir()
        return self.stack.enter_context(radai_serve(folder, self.pacs, quiet_seconds=1.0, extra=extra))


def get(server: RadaiServer, path: str) -> Any:
    r = httpx.get(server.url + path, timeout=10)
    r.raise_for_status()
    return r.json()


def settled(server: RadaiServer, study_uid: str) -> bool:
    r = httpx.get(f"{server.url}/api/v1/studies/{study_uid}", timeout=10)
    return r.status_code == 200 and r.json()["state"] in ("done", "failed", "dead-letter")


def jobs_of(server: RadaiServer, study_uid: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{server.url}/api/v1/studies/{study_uid}", timeout=10)
    return list(r.json()["jobs"]) if r.status_code == 200 else []


def storescu(port: int, folder: Path) -> subprocess.Popen[bytes]:
    """DCMTK storescu sending a folder in one association, in the background."""
    command = [
        "storescu",
        "-aet",
        "MODALITY",
        "-aec",
        "RADAI",
        "+sd",
        "+r",
        "127.0.0.1",
        str(port),
        str(folder),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def holder(client: redis.Redis, job_id: str) -> str | None:
    """The consumer that has taken the job's stream entry and not acknowledged it yet."""
    entries: dict[Any, Any] = {e[0]: e[1] for e in client.xrange(STREAM) or []}
    for pending in client.xpending_range(STREAM, "workers", min="-", max="+", count=100):
        fields: dict[Any, Any] = entries.get(pending["message_id"]) or {}
        if _text(fields.get(b"job_id", b"")) == job_id:
            return _text(pending["consumer"])
    return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Cluster, redis.Redis]]:
    missing = _servers_missing()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"scale-out servers cannot start in CI: {missing}")
        pytest.skip(missing)
    with (
        postgres_server.run_postgres() as pg,
        redis_server.run_redis(tmp_path / "redis") as rd,
        storescp(tmp_path / "pacs") as pacs,
        ExitStack() as stack,  # the radai processes: stopped first, while their servers still run
    ):
        yield Cluster(tmp_path, stack, pacs, pg.create_database(), rd.url), rd.client()


def test_two_receivers_two_workers_each_study_once_and_a_killed_workers_job_finished_by_the_other(
    cluster: tuple[Cluster, redis.Redis],
) -> None:
    c, client = cluster
    r1, r2 = c.start("receiver-1", "receiver"), c.start("receiver-2", "receiver")
    w1, w2 = c.start("worker-1", "worker"), c.start("worker-2", "worker")
    workers = {"worker-1": w1, "worker-2": w2}

    # 1. kill -9 a worker in the middle of a job
    first = generate_uid()
    copy_series(CRLM / "CRLM-CT-1004" / "image", c.tmp / "first", first)
    assert send_folder(r1.dicom_port, c.tmp / "first").returncode == 0
    wait_for(lambda: bool(jobs_of(r1, first)), 120, "the first study to be planned")
    (job,) = jobs_of(r1, first)
    wait_for(lambda: holder(client, job["job_id"]) is not None, 60, "a worker to take the job")
    victim = workers.pop(str(holder(client, job["job_id"])))
    assert victim.process is not None
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=30)
    assert get(r1, f"/api/v1/studies/{first}")["jobs"][0]["state"] not in ("delivering", "delivered")
    survivor = next(iter(workers.values()))
    wait_for(lambda: settled(r1, first), 240, "the other worker to finish the killed worker's job")
    assert get(r1, f"/api/v1/studies/{first}")["state"] == "done"
    assert f"job {job['job_id']} reclaimed from a worker that went silent" in survivor.log.read_text()
    replacement = c.start("worker-3", "worker")  # two workers again

    # 2. studies at both receivers, one split across them
    second, third, split = generate_uid(), generate_uid(), generate_uid()
    copy_series(CRLM / "CRLM-CT-1006" / "image", c.tmp / "second", second)
    copy_series(CRLM / "CRLM-CT-1004" / "image", c.tmp / "third", third)
    part_a = copy_series(CRLM / "CRLM-CT-1004" / "image", c.tmp / "split-a", split)
    part_b = copy_series(CRLM / "CRLM-CT-1006" / "image", c.tmp / "split-b", split)
    sends = [  # at the same time
        storescu(r1.dicom_port, c.tmp / "second"),
        storescu(r2.dicom_port, c.tmp / "third"),
        storescu(r1.dicom_port, c.tmp / "split-a"),
        storescu(r2.dicom_port, c.tmp / "split-b"),
    ]
    assert [p.wait(timeout=300) for p in sends] == [0, 0, 0, 0]
    studies = (first, second, third, split)
    wait_for(lambda: all(settled(r2, uid) for uid in studies), 300, "every study to be done")

    records = {uid: get(r2, f"/api/v1/studies/{uid}") for uid in studies}
    assert {uid: r["state"] for uid, r in records.items()} == dict.fromkeys(studies, "done")
    jobs = {uid: r["jobs"] for uid, r in records.items()}
    assert all(len(j) == 1 for j in jobs.values()), jobs  # the split study too: planned once, as one study
    assert records[split]["instances"] == part_a + part_b
    assert records[split]["series"] == 2
    delivered = Counter(r["subject"] for r in get(r2, "/api/v1/audit?event=result.delivered&limit=1000"))
    job_ids = [j[0]["job_id"] for j in jobs.values()]
    assert {job_id: delivered[job_id] for job_id in job_ids} == dict.fromkeys(job_ids, 1)  # delivered once
    seg_series = {
        str(ds.StudyInstanceUID)
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in c.pacs.files())
        if ds.Modality == "SEG"
    }
    assert seg_series == set(studies)
    # the command line reads the same PostgreSQL database: studies, and the audit log's intact hash chain
    config = str(c.tmp / "receiver-1" / "radai.yaml")
    listed = subprocess.run(
        [sys.executable, "-m", "radai", "studies", "list", "-c", config],
        capture_output=True,
        text=True,
        check=False,
    )
    assert listed.returncode == 0 and all(uid in listed.stdout for uid in studies), listed.stderr
    verified = subprocess.run(
        [sys.executable, "-m", "radai", "audit", "verify", "-c", config],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stderr
    assert survivor.process is not None and survivor.process.poll() is None
    assert replacement.process is not None and replacement.process.poll() is None
