"""The workflow on real series (in process): a complete study -> jobs -> SEG + SR through the outbound queue to
a destination, or a job that fails with a stated reason. The runtime is the real ONNX Runtime with the bundled
CT model."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_router.assembler import Assembler, Study
from dicom_router.headers import read_header
from radai.config import bundled_models_dir
from radai.delivery import DeliveryService, Outbox, RetryPolicy
from radai.domain import DeliveryState, JobRecord, JobState, StudyState
from radai.models.registry import open_package
from radai.runtime import create_runner
from radai.scheduling.loop import Scheduler
from radai.senders import FolderSender
from radai.storage.sqlite import SqliteJobStore
from radai.workflow import ModelSlot, Workflow

ROOT = Path(__file__).resolve().parents[2]
DICOM = ROOT.parent / "shared" / "data" / "dicom"
CT = DICOM / "ct_abdomen_crlm" / "CRLM-CT-1004" / "image"
TILTED = DICOM / "ct_head_tilt_and_phantom" / "GE_headCT_tilt"

pytestmark = pytest.mark.skipif(not CT.is_dir(), reason="../shared test data not present")


def study_from(folder: Path) -> Study:
    assembler = Assembler(quiet_seconds=1.0)
    for path in sorted(folder.glob("*.dcm")):
        assembler.add(read_header(path, "MODALITY", 0.0), now=0.0)
    (study,) = assembler.pop_complete(now=10.0)
    return study


def run_one(workflow: Workflow, store: SqliteJobStore, folder: Path) -> tuple[Study, StudyState, JobRecord]:
    """Hand the folder's study to the workflow, drain it, and return the study's final state and its job."""
    study = study_from(folder)
    workflow.on_study_complete(study)
    workflow.close()
    state = settled(store, study.study_uid)
    (job,) = store.get_study(study.study_uid).jobs
    return study, state, job


def settled(store: SqliteJobStore, study_uid: str, timeout: float = 60.0) -> StudyState:
    """The study's state once it is final (the delivery workers run in their own threads)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = store.get_study(study_uid).state
        if state in (StudyState.DONE, StudyState.FAILED, StudyState.DEAD_LETTER):
            return state
        time.sleep(0.05)
    raise TimeoutError("study not settled")


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Workflow, SqliteJobStore, FolderSender, list[Path]]]:
    zoo = bundled_models_dir()
    assert zoo is not None
    pkg = open_package(zoo / "ct_body_classical")
    runner = create_runner("onnx", pkg.weights, output_channels=pkg.card.output.channels, device="cpu")
    scheduler = Scheduler(pkg.card.id, runner, pkg.card.runtime.max_batch, 0.01)
    scheduler.start()
    store = SqliteJobStore(tmp_path / "db.sqlite")
    sender = FolderSender(tmp_path / "out")
    released: list[Path] = []
    delivery = DeliveryService(store, [sender], Outbox(tmp_path / "outbox"), poll_seconds=0.05)
    workflow = Workflow(
        {pkg.key: ModelSlot(pkg, scheduler)},
        delivery,
        store,
        workers=2,
        release_instances=lambda paths, _at: released.extend(paths),
    )
    delivery.add_listener(workflow.delivery_settled)
    delivery.start()
    try:
        yield workflow, store, sender, released
    finally:
        workflow.close()
        delivery.stop()
        scheduler.stop()
        runner.close()
        store.close()


def test_complete_ct_study_gives_seg_and_sr_and_releases_the_spooled_images(
    parts: tuple[Workflow, SqliteJobStore, FolderSender, list[Path]], tmp_path: Path
) -> None:
    workflow, store, sender, released = parts
    study, state, job = run_one(workflow, store, CT)
    assert state is StudyState.DONE
    assert job.state is JobState.DELIVERED, job.reason
    assert set(job.stages) >= {"received", "complete", "queued", "inferred", "encoded", "delivered"}
    (delivery,) = job.deliveries
    assert delivery.state is DeliveryState.DELIVERED and delivery.attempts == 1
    modalities = sorted(pydicom.dcmread(p).Modality for p in sender.written)
    assert modalities == ["SEG", "SR"]
    assert len(released) == study.instance_count
    assert not (tmp_path / "outbox" / job.job_id).exists()  # outbox emptied once delivered


def test_same_study_twice_gives_the_same_result_uids(
    parts: tuple[Workflow, SqliteJobStore, FolderSender, list[Path]],
) -> None:
    workflow, store, sender, _ = parts
    study = study_from(CT)
    workflow.on_study_complete(study)
    workflow.on_study_complete(study_from(CT))
    workflow.close()
    assert settled(store, study.study_uid) is StudyState.DONE
    # The second run's re-queued delivery may still be under way: read what was sent once it is not.
    (job,) = store.list_studies()[0].jobs
    deadline = time.monotonic() + 60
    while any(d.state.value in ("queued", "sending") for d in store.deliveries_for_job(job.job_id)):
        assert time.monotonic() < deadline, "delivery never settled"
        time.sleep(0.05)
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in sender.written]
    # Sent once or twice (a re-send overwrites the same instances at the PACS), never two different results.
    assert len(uids) in (2, 4) and len(set(uids)) == 2
    assert len(store.list_studies()) == 1 and len(store.list_studies()[0].jobs) == 1
    (job,) = store.list_studies()[0].jobs
    assert len(job.deliveries) == 1  # one queue row per (job, destination), never two


def test_tilted_series_fails_its_job_with_the_reason_and_keeps_the_images(
    parts: tuple[Workflow, SqliteJobStore, FolderSender, list[Path]],
) -> None:
    workflow, store, sender, released = parts
    study, state, job = run_one(workflow, store, TILTED)
    assert state is StudyState.FAILED
    assert job.state is JobState.FAILED
    assert "NotAVolumeError" in job.reason and ("tilt" in job.reason or "spacing" in job.reason)
    assert store.get_study(study.study_uid).state is StudyState.FAILED
    assert released == []
    # The PACS is told that the model did not run, and why: one notice SR, no results.
    deadline = time.monotonic() + 60
    while not sender.written:
        assert time.monotonic() < deadline, "no notice was delivered"
        time.sleep(0.05)
    (path,) = sender.written
    notice = pydicom.dcmread(path)
    assert notice.Modality == "SR" and notice.SeriesDescription.startswith("AI NOT RUN")
    assert notice.StudyInstanceUID == study.study_uid
    texts = [str(e.value) for e in notice.iterall() if e.keyword == "TextValue"]
    assert f"Reason: {job.reason}" in texts


def test_failed_study_recovered_at_restart_is_not_run_again_but_a_resent_one_is(
    parts: tuple[Workflow, SqliteJobStore, FolderSender, list[Path]], tmp_path: Path
) -> None:
    workflow, store, _sender, _ = parts
    study = study_from(TILTED)
    workflow.on_study_complete(study)
    assert settled(store, study.study_uid) is StudyState.FAILED
    (first,) = store.get_study(study.study_uid).jobs

    workflow.on_study_complete(study_from(TILTED))  # the same files, recovered from the spool at start-up
    (again,) = store.get_study(study.study_uid).jobs
    assert again.state is JobState.FAILED and again.stages == first.stages  # not queued again

    resent = tmp_path / "resent"
    resent.mkdir()
    for path in TILTED.glob("*.dcm"):
        shutil.copy(path, resent / path.name)  # the PACS sends the study again: new files
    workflow.on_study_complete(study_from(resent))
    workflow.close()
    (rerun,) = store.get_study(study.study_uid).jobs
    assert rerun.state is JobState.FAILED and rerun.stages["queued"] > first.stages["queued"]


def test_study_recovered_while_its_results_wait_in_the_queue_is_not_run_again(tmp_path: Path) -> None:
    zoo = bundled_models_dir()
    assert zoo is not None
    pkg = open_package(zoo / "ct_body_classical")
    runner = create_runner("onnx", pkg.weights, output_channels=pkg.card.output.channels, device="cpu")
    scheduler = Scheduler(pkg.card.id, runner, pkg.card.runtime.max_batch, 0.01)
    scheduler.start()
    store = SqliteJobStore(tmp_path / "db.sqlite")
    (tmp_path / "down").write_text("a file where the destination folder should be: every attempt fails")
    delivery = DeliveryService(
        store,
        [FolderSender(tmp_path / "down")],
        Outbox(tmp_path / "outbox"),
        {"folder": RetryPolicy(5, 600.0)},
    )
    workflow = Workflow({pkg.key: ModelSlot(pkg, scheduler)}, delivery, store, workers=2)
    delivery.add_listener(workflow.delivery_settled)
    delivery.start()
    try:
        study = study_from(CT)
        workflow.on_study_complete(study)
        deadline = time.monotonic() + 60
        while not [d for j in store.get_study(study.study_uid).jobs for d in j.deliveries if d.attempts]:
            assert time.monotonic() < deadline, "no delivery attempt"
            time.sleep(0.05)
        (before,) = store.get_study(study.study_uid).jobs
        assert before.state is JobState.DELIVERING and before.deliveries[0].state is DeliveryState.QUEUED
        workflow.on_study_complete(study_from(CT))  # the same study, recovered from the spool at start-up
        workflow.close()
        (after,) = store.get_study(study.study_uid).jobs
        assert after.state is JobState.DELIVERING and after.stages == before.stages
        assert after.batches == before.batches  # no second inference
        assert store.get_study(study.study_uid).state is StudyState.PROCESSING
    finally:
        workflow.close()
        delivery.stop()
        scheduler.stop()
        runner.close()
        store.close()
