"""Model versions in a running workflow, on real CT and real ONNX Runtime: activation while a job runs,
shadow mode, and a model that runs on another model's mask."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom import Dataset

from radai import metrics
from radai.app import make_validator
from radai.delivery import DeliveryService, Outbox
from radai.domain import JobState, StudyState
from radai.hosting import HostOptions, ModelHost
from radai.ports import ModelRunner
from radai.runtime import create_runner
from radai.senders import FolderSender
from radai.storage.model_store import ModelStore
from radai.storage.sqlite import SqliteJobStore
from radai.workflow import Workflow
from tests.radai.model_packages import threshold_package
from tests.radai.test_workflow import DICOM, settled, study_from

CT_1004 = DICOM / "ct_abdomen_crlm" / "CRLM-CT-1004" / "image"
CT_1006 = DICOM / "ct_abdomen_crlm" / "CRLM-CT-1006" / "image"
pytestmark = pytest.mark.skipif(not CT_1004.is_dir(), reason="../shared test data not present")
VALIDATE = make_validator("cpu")


class GatedRunner:
    """A real ONNX runner whose study batches wait for `gate` (the reference check's small input does not):
    it holds a job in inference for as long as the test needs."""

    def __init__(self, inner: ModelRunner, entered: threading.Event, gate: threading.Event) -> None:
        self._inner, self._entered, self._gate = inner, entered, gate

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        if batch.shape[2:] != (8, 8, 4):
            self._entered.set()
            self._gate.wait(60)
        return self._inner.run(batch)

    def close(self) -> None:
        self._inner.close()


@dataclass
class Site:
    registry: ModelStore
    host: ModelHost
    workflow: Workflow
    store: SqliteJobStore
    sender: FolderSender

    def results(self, study_uid: str) -> list[Dataset]:
        found = [pydicom.dcmread(p) for p in self.sender.written]
        return [ds for ds in found if ds.StudyInstanceUID == study_uid]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    registry = ModelStore(tmp_path / "registry")
    registry.add(threshold_package(tmp_path / "v1", version="1.0.0"), VALIDATE)
    entered, gate = threading.Event(), threading.Event()
    gates = {"entered": entered, "gate": gate}

    def factory(backend: str, path: Path, channels: int) -> ModelRunner:
        runner = create_runner(backend, path, output_channels=channels, device="cpu")
        return GatedRunner(runner, entered, gate) if path.parent.name == "1.0.0" else runner

    host = ModelHost(registry, factory, HostOptions(max_wait_s=0.0, poll_s=3600))
    store = SqliteJobStore(tmp_path / "db.sqlite")
    sender = FolderSender(tmp_path / "pacs")
    delivery = DeliveryService(store, [sender], Outbox(tmp_path / "outbox"), poll_seconds=0.05)
    workflow = Workflow(host, delivery, store, workers=2, validate_with_dciodvfy=False)
    delivery.add_listener(workflow.delivery_settled)
    gate.set()  # open unless a test closes it
    host.start()
    delivery.start()
    s = Site(registry, host, workflow, store, sender)
    s.gates = gates  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        gate.set()
        workflow.close()
        delivery.stop()
        host.stop()
        store.close()


def _versions(results: list[Dataset]) -> set[str]:
    """AlgorithmVersion of every SEG segment in the results."""
    return {
        str(algo.AlgorithmVersion)
        for ds in results
        if ds.Modality == "SEG"
        for segment in ds.SegmentSequence
        for algo in segment.SegmentationAlgorithmIdentificationSequence
    }


def test_activation_during_a_running_job_finishes_it_on_the_old_version_and_the_next_uses_the_new(
    site: Site, tmp_path: Path
) -> None:
    site.registry.add(threshold_package(tmp_path / "v2", version="1.1.0", thresholds_hu=(-150.0,)), VALIDATE)
    gates = site.gates  # type: ignore[attr-defined]
    gates["gate"].clear()
    gates["entered"].clear()
    first = study_from(CT_1004)
    site.workflow.on_study_complete(first)
    assert gates["entered"].wait(60), "the first job never reached inference"

    site.registry.activate("threshold@1.1.0")
    assert site.host.reconcile() is True
    # the old version stays loaded, held by the running job; the new one is what new jobs get
    assert site.host.loaded == {"threshold@1.0.0": 1, "threshold@1.1.0": 0}
    assert [p.key for p in site.host.active] == ["threshold@1.1.0"]

    second = study_from(CT_1006)
    site.workflow.on_study_complete(second)
    assert settled(site.store, second.study_uid) is StudyState.DONE  # while the first is still held
    assert site.store.get_study(first.study_uid).state is StudyState.PROCESSING

    gates["gate"].set()
    assert settled(site.store, first.study_uid) is StudyState.DONE
    (job1,) = site.store.get_study(first.study_uid).jobs
    (job2,) = site.store.get_study(second.study_uid).jobs
    assert (job1.model_key, job1.state) == ("threshold@1.0.0", JobState.DELIVERED)
    assert (job2.model_key, job2.state) == ("threshold@1.1.0", JobState.DELIVERED)
    assert _versions(site.results(first.study_uid)) == {"1.0.0"}
    assert _versions(site.results(second.study_uid)) == {"1.1.0"}
    assert site.host.loaded == {"threshold@1.1.0": 0}  # the old version was unloaded after its last job


def _sample(name: str, labels: dict[str, str]) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_shadow_version_runs_on_the_live_study_its_agreement_is_recorded_and_only_the_active_results_sent(
    site: Site, tmp_path: Path
) -> None:
    site.registry.add(threshold_package(tmp_path / "v2", version="1.1.0", thresholds_hu=(-150.0,)), VALIDATE)
    site.registry.set_shadow("threshold@1.1.0")
    site.host.reconcile()
    labels = {"model": "threshold", "version": "1.1.0", "label": "Body"}
    before = _sample("radai_shadow_agreement_count", labels)

    study = study_from(CT_1004)
    site.workflow.on_study_complete(study)
    assert settled(site.store, study.study_uid) is StudyState.DONE
    site.workflow.close()  # the shadow run follows the active job's hand-off: wait for it

    (job,) = site.store.get_study(study.study_uid).jobs
    assert job.model_key == "threshold@1.0.0"
    (shadow,) = job.shadow
    assert shadow.model_key == "threshold@1.1.0" and shadow.outcome == "compared"
    assert 0.9 < shadow.agreement["dice:Body"] < 1.0  # -200 vs -150 HU: nearly, not exactly, the same body
    results = site.results(study.study_uid)
    assert sorted(str(ds.Modality) for ds in results) == ["SEG", "SR"]
    assert _versions(results) == {"1.0.0"}  # nothing of the shadow version left the building
    assert _sample("radai_shadow_agreement_count", labels) == before + 1
    assert _sample("radai_shadow_agreement_sum", labels) > 0.9 * (before + 1) - 1e-9


def test_a_model_consuming_another_models_mask_runs_after_it_and_its_results_name_both(
    site: Site, tmp_path: Path
) -> None:
    # A: body (> -200 HU, largest component: drops the table); B: dense (> 150 HU) inside A's body only.
    site.registry.remove("threshold")
    site.registry.add(
        threshold_package(
            tmp_path / "a",
            "body",
            output={"name": "scores", "channels": 2, "components": {"largest_only": True}},
        ),
        VALIDATE,
    )
    site.registry.add(
        threshold_package(
            tmp_path / "b",
            "dense",
            thresholds_hu=(150.0,),
            labels=("bone",),
            consumes={"model": "body", "labels": [1]},
        ),
        VALIDATE,
    )
    site.host.reconcile()
    study = study_from(CT_1004)
    site.workflow.on_study_complete(study)
    assert settled(site.store, study.study_uid) is StudyState.DONE
    jobs = {j.model_key: j for j in site.store.get_study(study.study_uid).jobs}
    assert set(jobs) == {"body@1.0.0", "dense@1.0.0"}
    assert jobs["body@1.0.0"].stages["encoded"] <= jobs["dense@1.0.0"].stages["inferred"]  # A before B

    segs = {
        str(ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName): ds
        for ds in site.results(study.study_uid)
        if ds.Modality == "SEG"
    }
    body, dense = segs["body"], segs["dense"]
    params = dense.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert "restricted to body@1.0.0 labels 1" in str(params)
    reports = [ds for ds in site.results(study.study_uid) if ds.Modality == "SR"]
    assert any("restricted to body@1.0.0 labels 1" in _texts(ds) for ds in reports)
    # every dense voxel lies inside the body mask (frames matched by their source image)
    body_frames = _frames_by_source(body)
    dense_frames = _frames_by_source(dense)
    assert dense_frames, "the dense model found nothing"
    outside = sum(
        int((mask & ~body_frames.get(uid, np.zeros_like(mask))).sum()) for uid, mask in dense_frames.items()
    )
    assert outside == 0


def _texts(ds: Dataset) -> list[str]:
    """Every TEXT value in an SR content tree."""
    out: list[str] = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out.extend(_texts(item))
    return out


def _frames_by_source(seg: Dataset) -> dict[str, NDArray[np.bool_]]:
    pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns)).astype(bool)
    out: dict[str, NDArray[np.bool_]] = {}
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        out[uid] = out.get(uid, np.zeros_like(pixels[index])) | pixels[index]
    return out
