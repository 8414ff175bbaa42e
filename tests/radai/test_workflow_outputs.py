"""What each destination gets from a real CT job: SEG + SR for a modern PACS, a burned-in Secondary Capture
series for a legacy one, a LABELMAP SEG where asked; and the validation gate that keeps invalid results in."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from radai.config import bundled_models_dir
from radai.delivery import DeliveryService, Outbox
from radai.domain import JobState, StudyState
from radai.models.registry import open_package
from radai.outputs import OutputPlan, SegVariant
from radai.runtime import create_runner
from radai.scheduling.loop import Scheduler
from radai.senders import FolderSender
from radai.storage.sqlite import SqliteJobStore
from radai.workflow import ModelSlot, Workflow
from tests.radai.test_workflow import CT, run_one

pytestmark = pytest.mark.skipif(not CT.is_dir(), reason="../shared test data not present")

PLANS = {
    "modern": OutputPlan(),
    "legacy": OutputPlan(kinds=frozenset({"sc", "notice"})),
    "newer": OutputPlan(kinds=frozenset({"seg"}), seg=SegVariant(labelmap=True)),
}


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Workflow, SqliteJobStore, dict[str, FolderSender], Path]]:
    zoo = bundled_models_dir()
    assert zoo is not None
    pkg = open_package(zoo / "ct_body_classical")
    runner = create_runner("onnx", pkg.weights, output_channels=pkg.card.output.channels, device="cpu")
    scheduler = Scheduler(pkg.card.id, runner, pkg.card.runtime.max_batch, 0.01)
    scheduler.start()
    store = SqliteJobStore(tmp_path / "db.sqlite")
    senders = {name: FolderSender(tmp_path / name, name) for name in PLANS}
    delivery = DeliveryService(
        store, list(senders.values()), Outbox(tmp_path / "outbox"), plans=PLANS, poll_seconds=0.05
    )
    rejected = tmp_path / "rejected"
    workflow = Workflow(
        {pkg.key: ModelSlot(pkg, scheduler)}, delivery, store, workers=1, rejected_dir=rejected
    )
    delivery.add_listener(workflow.delivery_settled)
    delivery.start()
    try:
        yield workflow, store, senders, rejected
    finally:
        workflow.close()
        delivery.stop()
        scheduler.stop()
        runner.close()
        store.close()


def _modalities(sender: FolderSender) -> list[str]:
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in sender.written)


def test_each_destination_gets_the_outputs_it_is_configured_for(
    site: tuple[Workflow, SqliteJobStore, dict[str, FolderSender], Path],
) -> None:
    workflow, store, senders, _ = site
    study, state, job = run_one(workflow, store, CT)

    assert state is StudyState.DONE and job.state is JobState.DELIVERED
    assert _modalities(senders["modern"]) == ["SEG", "SR"]
    legacy = [pydicom.dcmread(p) for p in senders["legacy"].written]
    assert legacy and {ds.SOPClassUID for ds in legacy} == {"1.2.840.10008.5.1.4.1.1.7"}  # Secondary Capture
    assert all(ds.BurnedInAnnotation == "YES" and ds.StudyInstanceUID == study.study_uid for ds in legacy)
    (labelmap,) = [pydicom.dcmread(p) for p in senders["newer"].written]
    assert labelmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7" and labelmap.SegmentationType == "LABELMAP"
    modern_seg = next(pydicom.dcmread(p) for p in senders["modern"].written if "SEG" in p.name)
    assert labelmap.SOPInstanceUID != modern_seg.SOPInstanceUID


def test_results_that_fail_the_gate_are_kept_and_the_job_fails_with_the_reason(
    site: tuple[Workflow, SqliteJobStore, dict[str, FolderSender], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    workflow, store, senders, rejected = site
    import radai.workflow

    real = radai.workflow.problems

    def strict(outputs: list[pydicom.Dataset], source: list[pydicom.Dataset], **kw: bool) -> list[str]:
        found = real(outputs, source, **kw)
        is_notice = all(str(ds.SeriesDescription).startswith("AI NOT RUN") for ds in outputs)
        return found if is_notice else [*found, "SEG #1: planted problem"]

    monkeypatch.setattr(radai.workflow, "problems", strict)
    _, state, job = run_one(workflow, store, CT)

    assert state is StudyState.FAILED and job.state is JobState.FAILED
    assert "results failed validation: SEG #1: planted problem" in job.reason
    kept = sorted(p.name for p in (rejected / job.job_id).iterdir())
    assert any(name.endswith("-seg.dcm") for name in kept) and any(name.endswith("-sc.dcm") for name in kept)
    deadline = time.monotonic() + 60
    while not (senders["modern"].written and senders["legacy"].written):
        assert time.monotonic() < deadline, "the notices were not delivered"
        time.sleep(0.05)
    # Nothing invalid left: each destination that wants notices got exactly the notice, the other nothing.
    assert _modalities(senders["modern"]) == ["SR"] and _modalities(senders["legacy"]) == ["SR"]
    assert senders["newer"].written == []
