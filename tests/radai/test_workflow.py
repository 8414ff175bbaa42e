"""The workflow on real series (in process): a complete study -> jobs -> SEG + SR to a destination, or a job
that fails with a stated reason. The runtime is the real ONNX Runtime with the bundled CT model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_router.assembler import Assembler, Study
from dicom_router.headers import read_header
from radai.config import bundled_models_dir
from radai.domain import JobState, StudyState
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
    workflow = Workflow(
        {pkg.key: ModelSlot(pkg, scheduler)}, [sender], store, workers=2, release_instances=released.extend
    )
    try:
        yield workflow, store, sender, released
    finally:
        workflow.close()
        scheduler.stop()
        runner.close()
        store.close()


def test_complete_ct_study_gives_seg_and_sr_and_releases_the_spooled_images(
    parts: tuple[Workflow, SqliteJobStore, FolderSender, list[Path]],
) -> None:
    workflow, store, sender, released = parts
    study = study_from(CT)
    workflow.on_study_complete(study)
    workflow.close()
    record = store.get_study(study.study_uid)
    (job,) = record.jobs
    assert job.state is JobState.DELIVERED, job.reason
    assert record.state is StudyState.DONE
    assert set(job.stages) >= {"received", "complete", "queued", "inferred", "encoded", "delivered"}
    modalities = sorted(pydicom.dcmread(p).Modality for p in sender.written)
    assert modalities == ["SEG", "SR"]
    assert len(released) == study.instance_count


def test_same_study_twice_gives_the_same_result_uids(
    parts: tuple[Workflow, SqliteJobStore, FolderSender, list[Path]],
) -> None:
    workflow, store, sender, _ = parts
    workflow.on_study_complete(study_from(CT))
    workflow.on_study_complete(study_from(CT))
    workflow.close()
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in sender.written]
    assert len(uids) == 4 and len(set(uids)) == 2
    assert len(store.list_studies()) == 1 and len(store.list_studies()[0].jobs) == 1


def test_tilted_series_fails_its_job_with_the_reason_and_keeps_the_images(
    parts: tuple[Workflow, SqliteJobStore, FolderSender, list[Path]],
) -> None:
    workflow, store, sender, released = parts
    study = study_from(TILTED)
    workflow.on_study_complete(study)
    workflow.close()
    record = store.get_study(study.study_uid)
    (job,) = record.jobs
    assert job.state is JobState.FAILED
    assert "NotAVolumeError" in job.reason and ("tilt" in job.reason or "spacing" in job.reason)
    assert record.state is StudyState.FAILED
    assert sender.written == [] and released == []
