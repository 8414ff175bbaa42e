"""The outbound queue with an injected clock and an in-memory destination: state transitions, the back-off
schedule, dead-letter past the limit, retry with attempts reset, a restart resuming what was left, readiness
probes, and the settings (including the older `retries` / `backoff_seconds` keys)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radai.config import DestinationSettings, load_settings
from radai.delivery import DeliveryService, DestinationProbe, Outbox, RetryPolicy
from radai.domain import DeliveryState, JobSpec, JobState, StudyRecord, StudyState
from radai.errors import DeliveryError
from radai.metrics import REGISTRY
from radai.outputs import Output, OutputPlan
from radai.storage.sqlite import SqliteJobStore

STUDY = "1.2.826.0.1.3680043.8.498.1"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Destination:
    """An in-memory PACS: stores what it receives while up, refuses (DeliveryError) while down."""

    def __init__(self, name: str, up: bool = True) -> None:
        self._name = name
        self.up = up
        self.received: list[str] = []
        self.echoes = 0

    @property
    def name(self) -> str:
        return self._name

    def send(self, datasets: Sequence[Dataset]) -> None:
        if not self.up:
            raise DeliveryError(f"destination {self._name}: association failed")
        self.received.extend(str(ds.SOPInstanceUID) for ds in datasets)

    def echo(self) -> bool:
        self.echoes += 1
        return self.up


def result(modality: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def keyed(*datasets: Dataset) -> list[Output]:
    """Results tagged with the output key of their kind (SEG -> 'seg', SR -> 'sr')."""
    return [Output(str(ds.Modality).lower(), ds) for ds in datasets]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    s = SqliteJobStore(tmp_path / "radai.sqlite")
    s.upsert_study(StudyRecord(STUDY, StudyState.PROCESSING, "MODALITY", 2, 1, 1.0, 2.0, 3.0))
    yield s
    s.close()


def add_job(store: SqliteJobStore, job_id: str = "ab12") -> str:
    store.add_job(JobSpec(job_id, STUDY, STUDY + ".1", "m@1", 1.0, 2.0, 3.0))
    store.finish_job(job_id, JobState.DELIVERING)
    return job_id


def service(
    store: SqliteJobStore,
    tmp_path: Path,
    *dests: Destination,
    clock: Clock,
    policy: RetryPolicy | None = None,
) -> DeliveryService:
    policies = {d.name: policy for d in dests if policy is not None}
    return DeliveryService(store, dests, Outbox(tmp_path / "outbox"), policies, clock=clock)


def test_delivery_is_sent_once_then_the_outbox_is_emptied_and_the_job_settles(
    store: SqliteJobStore, tmp_path: Path
) -> None:
    pacs, clock = Destination("pacs"), Clock()
    svc = service(store, tmp_path, pacs, clock=clock)
    settled: list[str] = []
    svc.add_listener(settled.append)
    job = add_job(store)
    seg, sr = result("SEG"), result("SR")
    svc.submit(job, STUDY, keyed(seg, sr))
    (queued,) = store.deliveries_for_job(job)
    assert queued.state is DeliveryState.QUEUED and queued.attempts == 0 and len(queued.files) == 2
    assert all(Path(f).is_file() for f in queued.files)

    done = svc.process_due("pacs")
    assert done is not None and done.state is DeliveryState.DELIVERED and done.attempts == 1
    assert pacs.received == [seg.SOPInstanceUID, sr.SOPInstanceUID]
    assert not (tmp_path / "outbox" / job).exists()
    assert svc.process_due("pacs") is None  # nothing left: never sent twice
    assert settled == [job]
    assert store.settle_job(job, clock()) is JobState.DELIVERED
    assert store.settle_job(job, clock()) is None  # exactly one caller settles a job
    assert store.settle_study(STUDY) is StudyState.DONE


def test_failed_attempts_back_off_exponentially_up_to_the_cap_then_dead_letter(
    store: SqliteJobStore, tmp_path: Path
) -> None:
    pacs, clock = Destination("pacs", up=False), Clock()
    policy = RetryPolicy(max_attempts=6, initial_seconds=2.0, factor=2.0, max_seconds=10.0)
    svc = service(store, tmp_path, pacs, clock=clock, policy=policy)
    job = add_job(store)
    svc.submit(job, STUDY, keyed(result("SEG")))
    delays: list[float] = []
    for _ in range(5):
        rec = svc.process_due("pacs")
        assert rec is not None and rec.state is DeliveryState.QUEUED
        assert "association failed" in rec.last_error
        delays.append(rec.next_attempt_at - clock.now)
        clock.now = rec.next_attempt_at - 0.01
        assert svc.process_due("pacs") is None  # not due yet
        clock.now = rec.next_attempt_at
    assert delays == [2.0, 4.0, 8.0, 10.0, 10.0]
    dead = svc.process_due("pacs")
    assert dead is not None and dead.state is DeliveryState.DEAD and dead.attempts == 6
    clock.now += 3600
    assert svc.process_due("pacs") is None  # dead stays dead until retried
    (row,) = store.deliveries_for_job(job)
    assert row.state is DeliveryState.DEAD and row.attempts == 6 and "association failed" in row.last_error
    assert all(Path(f).is_file() for f in row.files)  # kept for the retry


def test_dead_letter_is_visible_and_a_retry_delivers_with_attempts_reset(
    store: SqliteJobStore, tmp_path: Path
) -> None:
    pacs, clock = Destination("pacs-dl", up=False), Clock()
    svc = service(store, tmp_path, pacs, clock=clock, policy=RetryPolicy(max_attempts=1))

    def settle(job_id: str) -> None:
        store.settle_job(job_id, clock())
        store.settle_study(STUDY)

    svc.add_listener(settle)
    job = add_job(store)
    svc.submit(job, STUDY, keyed(result("SEG"), result("SR")))
    rec = svc.process_due("pacs-dl")
    assert rec is not None and rec.state is DeliveryState.DEAD
    study = store.get_study(STUDY)
    assert study.state is StudyState.DEAD_LETTER
    (record,) = study.jobs
    assert record.state is JobState.DEAD_LETTER and "dead-lettered after 1 attempt" in record.reason
    assert record.deliveries[0].state is DeliveryState.DEAD
    svc.refresh_gauges()
    assert REGISTRY.get_sample_value("radai_deliveries_dead", {"destination": "pacs-dl"}) == 1.0

    assert store.retry_dead(STUDY, clock()) == 1
    (again,) = store.deliveries_for_job(job)
    assert again.state is DeliveryState.QUEUED and again.attempts == 0 and again.last_error == ""
    assert store.get_study(STUDY).state is StudyState.PROCESSING
    assert store.get_job(job).state is JobState.DELIVERING
    pacs.up = True
    done = svc.process_due("pacs-dl")
    assert done is not None and done.state is DeliveryState.DELIVERED and done.attempts == 1
    assert len(pacs.received) == 2
    assert store.get_study(STUDY).state is StudyState.DONE
    assert store.get_job(job).state is JobState.DELIVERED
    svc.refresh_gauges()
    assert REGISTRY.get_sample_value("radai_deliveries_dead", {"destination": "pacs-dl"}) == 0.0
    assert store.retry_dead(STUDY, clock()) == 0  # nothing dead any more


def test_restart_resumes_an_interrupted_delivery_from_the_outbox(
    store: SqliteJobStore, tmp_path: Path
) -> None:
    pacs, clock = Destination("pacs"), Clock()
    svc = service(store, tmp_path, pacs, clock=clock)
    job = add_job(store)
    seg = result("SEG")
    svc.submit(job, STUDY, keyed(seg))
    assert store.claim_delivery("pacs", clock()) is not None  # the process stops while sending
    store.close()

    reopened = SqliteJobStore(tmp_path / "radai.sqlite")
    try:
        svc2 = service(reopened, tmp_path, pacs, clock=clock)
        assert svc2.process_due("pacs") is None  # 'sending' is not picked up twice ...
        assert svc2.resume() == 1  # ... until start-up queues it again
        done = svc2.process_due("pacs")
        assert done is not None and done.state is DeliveryState.DELIVERED
        assert pacs.received == [seg.SOPInstanceUID]
    finally:
        reopened.close()


def test_one_row_per_job_and_destination_even_when_submitted_twice(
    store: SqliteJobStore, tmp_path: Path
) -> None:
    pacs, clock = Destination("pacs"), Clock()
    svc = service(store, tmp_path, pacs, clock=clock)
    job = add_job(store)
    seg = result("SEG")
    svc.submit(job, STUDY, keyed(seg))
    svc.submit(job, STUDY, keyed(seg))
    assert len(store.deliveries_for_job(job)) == 1
    assert svc.process_due("pacs") is not None and svc.process_due("pacs") is None
    assert pacs.received == [seg.SOPInstanceUID]
    # A re-sent study after delivery: the same row is queued again (an overwrite at the PACS), still one row.
    svc.submit(job, STUDY, keyed(seg))
    (row,) = store.deliveries_for_job(job)
    assert row.state is DeliveryState.QUEUED and row.attempts == 0


def test_destinations_are_independent_and_the_outbox_waits_for_all(
    store: SqliteJobStore, tmp_path: Path
) -> None:
    up, down, clock = Destination("up"), Destination("down", up=False), Clock()
    svc = service(store, tmp_path, up, down, clock=clock)
    job = add_job(store)
    svc.submit(job, STUDY, keyed(result("SEG")))
    assert svc.process_due("up") is not None
    rec = svc.process_due("down")
    assert rec is not None and rec.state is DeliveryState.QUEUED
    assert (tmp_path / "outbox" / job).is_dir()  # still needed by "down"
    assert store.settle_job(job, clock()) is None  # not every destination acknowledged yet
    down.up = True
    clock.now = rec.next_attempt_at
    assert svc.process_due("down") is not None
    assert not (tmp_path / "outbox" / job).exists()
    assert store.settle_job(job, clock()) is JobState.DELIVERED


def test_missing_outbox_files_fail_the_attempt_instead_of_the_worker(
    store: SqliteJobStore, tmp_path: Path
) -> None:
    pacs, clock = Destination("pacs"), Clock()
    svc = service(store, tmp_path, pacs, clock=clock, policy=RetryPolicy(max_attempts=2))
    job = add_job(store)
    svc.submit(job, STUDY, keyed(result("SEG")))
    Outbox(tmp_path / "outbox").remove(job)
    rec = svc.process_due("pacs")
    assert rec is not None and rec.state is DeliveryState.QUEUED and "FileNotFoundError" in rec.last_error


def test_readiness_probe_echoes_each_destination_at_most_once_per_ttl() -> None:
    pacs, clock = Destination("pacs", up=False), Clock()
    probe = DestinationProbe([pacs], ttl_seconds=5.0, clock=clock)
    assert probe.checks() == {"destination:pacs": False}
    pacs.up = True
    clock.now += 4.0
    assert probe.checks() == {"destination:pacs": False} and pacs.echoes == 1
    clock.now += 1.0
    assert probe.checks() == {"destination:pacs": True} and pacs.echoes == 2


def test_retry_policy_maps_the_older_keys_and_new_keys_win() -> None:
    minimal = DestinationSettings(name="pacs", ae_title="PACS", host="10.0.0.5", port=104)
    assert RetryPolicy.from_settings(minimal) == RetryPolicy(20, 2.0, 2.0, 300.0)
    legacy = DestinationSettings(name="p", ae_title="P", host="h", port=104, retries=3, backoff_seconds=1.5)
    assert (legacy.max_attempts, legacy.backoff_initial_seconds) == (4, 1.5)
    both = DestinationSettings(name="p", ae_title="P", host="h", port=104, retries=3, max_attempts=7)
    assert both.max_attempts == 7
    assert (
        RetryPolicy(10, 1.0, 3.0, 100.0).delay(1) == 1.0 and RetryPolicy(10, 1.0, 3.0, 100.0).delay(4) == 27.0
    )
    assert RetryPolicy(10, 1.0, 3.0, 100.0).delay(5000) == 100.0


def test_bad_retry_setting_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 104, "max_attempts": 0}]}
        )
    )
    with pytest.raises(Exception, match=r"destinations\.0\.max_attempts"):
        load_settings(cfg)


def test_cli_retry_queues_dead_deliveries_and_refuses_when_there_are_none(
    store: SqliteJobStore, tmp_path: Path
) -> None:
    pacs, clock = Destination("pacs", up=False), Clock()
    svc = service(store, tmp_path, pacs, clock=clock, policy=RetryPolicy(max_attempts=1))
    job = add_job(store)
    svc.submit(job, STUDY, keyed(result("SEG")))
    svc.process_due("pacs")
    cfg = tmp_path / "radai.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path)}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "radai", "studies", *args, "-c", str(cfg)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    shown = cli("show", STUDY)
    assert shown.returncode == 0, shown.stderr
    assert '"state": "dead"' in shown.stdout and '"attempts": 1' in shown.stdout
    run = cli("retry", STUDY)
    assert run.returncode == 0, run.stderr
    (row,) = store.deliveries_for_job(job)
    assert row.state is DeliveryState.QUEUED and row.attempts == 0
    again = cli("retry", STUDY)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "no dead-lettered" in again.stderr


def test_each_destination_gets_only_the_outputs_its_plan_wants(store: SqliteJobStore, tmp_path: Path) -> None:
    modern, legacy, quiet = Destination("modern"), Destination("legacy"), Destination("quiet")
    plans = {
        "modern": OutputPlan(),
        "legacy": OutputPlan(kinds=frozenset({"sc", "notice"})),
        "quiet": OutputPlan(kinds=frozenset({"gsps"})),
    }
    svc = DeliveryService(
        store, [modern, legacy, quiet], Outbox(tmp_path / "outbox"), plans=plans, clock=Clock()
    )
    job = add_job(store)
    seg, sr, sc = result("SEG"), result("SR"), result("OT")
    svc.submit(job, STUDY, [Output("seg", seg), Output("sr", sr), Output("sc", sc)])

    assert {d.destination: len(d.files) for d in store.deliveries_for_job(job)} == {"modern": 2, "legacy": 1}
    for name in ("modern", "legacy"):
        svc.process_due(name)
    assert modern.received == [str(seg.SOPInstanceUID), str(sr.SOPInstanceUID)]
    assert legacy.received == [str(sc.SOPInstanceUID)]
    assert quiet.received == []


def test_destination_settings_become_output_plans(tmp_path: Path) -> None:
    from radai.delivery import plan_from_settings
    from radai.outputs import SegVariant

    default = DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)
    legacy = DestinationSettings(
        name="old", ae_title="OLD", host="127.0.0.1", port=104, outputs=["sc", "gsps"], seg_type="labelmap"
    )
    assert plan_from_settings(default).keys() == {"seg", "sr", "notice"}
    assert plan_from_settings(legacy).keys() == {"sc", "gsps"}
    labelmap = DestinationSettings(
        name="new", ae_title="NEW", host="127.0.0.1", port=104, seg_type="labelmap", seg_empty_frames="keep"
    )
    assert plan_from_settings(labelmap).seg == SegVariant(labelmap=True, keep_empty=True)
    assert plan_from_settings(labelmap).keys() == {
        "seg+labelmap+keep-empty",
        "sr+labelmap+keep-empty",
        "notice",
    }
    with pytest.raises(ValueError, match="repeat"):
        DestinationSettings(name="x", ae_title="X", host="h", port=1, outputs=["seg", "seg"])
