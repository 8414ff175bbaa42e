"""The workflow: a complete study becomes one job per (study, matching model, chosen series); each job goes
volume -> model space -> batched sliding-window inference -> source grid -> SEG + SR -> outbound queue.

Talks only to ports (PatchInferer, ResultDelivery, JobStore) and pure layers; every stage is timed, persisted
and exported as a metric. A job fails with a stated reason, never silently. A job reaches 'delivered' (and
its study 'done') when every destination has acknowledged its results (`delivery_settled`, called by the
queue); only then are the study's received images released from the spool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom import Dataset

from dicom_router.assembler import Series, Study
from dicom_router.selection import select_series
from radai import metrics
from radai.domain import JobRecord, JobSpec, JobState, Stage, StudyRecord, StudyState, hashed, job_id_for
from radai.errors import EncodingError, InferenceError, NotFoundError, RadaiError
from radai.imaging.resample import prepare, to_source_grid
from radai.imaging.volume import Volume, build_volume
from radai.models.manifest import ModelCard
from radai.models.registry import ModelPackage
from radai.ports import JobStore, PatchInferer, ResultDelivery
from radai.results.seg import Algorithm, CodedConcept, SegmentSpec, SegRequest, build_seg
from radai.results.sr import SegmentMeasurement, SrRequest, build_sr, measure_volumes
from radai.scheduling.inferer import sliding_window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSlot:
    """A served model: its package and the scheduler its patches go through."""

    package: ModelPackage
    inferer: PatchInferer


@dataclass(frozen=True)
class JobResult:
    job_id: str
    datasets: tuple[Dataset, ...]
    labels: NDArray[np.uint8]
    volume: Volume


def _segments(card: ModelCard) -> list[SegmentSpec]:
    return [
        SegmentSpec(
            value=lab.value,
            name=lab.name,
            category=CodedConcept(lab.category.scheme, lab.category.value, lab.category.meaning),
            type=CodedConcept(lab.type.scheme, lab.type.value, lab.type.meaning),
            color=lab.color,
        )
        for lab in card.labels
    ]


def infer_labels(volume: Volume, card: ModelCard, inferer: PatchInferer, job_id: str) -> NDArray[np.uint8]:
    """Model space, batched sliding window, back to the source grid, argmax: labels shaped like the volume."""
    prepared = prepare(volume, card.input)
    scores = sliding_window(
        prepared.image, card.input, lambda p: inferer.infer(job_id, p), sw_batch_size=card.runtime.max_batch
    )
    if scores.shape[0] != card.output.channels:
        raise InferenceError(f"model returned {scores.shape[0]} channels, card says {card.output.channels}")
    back = to_source_grid(scores, prepared)
    labels: NDArray[np.uint8] = np.argmax(back, axis=0).astype(np.uint8)
    return labels


def encode_results(
    source: Sequence[Dataset], volume: Volume, labels: NDArray[np.uint8], card: ModelCard
) -> tuple[Dataset, Dataset]:
    """SEG (one segment per label present) and a TID 1500 SR with one volume per segment."""
    algorithm = Algorithm(model_id=card.id, version=card.version, name=card.name)
    specs = _segments(card)
    seg = build_seg(SegRequest(source=source, labels=labels, segments=specs, algorithm=algorithm))
    volumes = measure_volumes(labels, volume.voxel_volume_ml)
    by_value = {s.value: s for s in specs}
    present = [v for v in sorted(volumes) if v in by_value and volumes[v] > 0]
    measurements = [
        SegmentMeasurement(
            segment_number=number,
            name=by_value[value].name,
            type=by_value[value].type,
            volume_ml=volumes[value],
            mean_value=float(volume.array[labels == value].mean()) if card.modality == "CT" else None,
        )
        for number, value in enumerate(present, start=1)
    ]
    sr = build_sr(SrRequest(seg=seg, source=source, measurements=measurements, algorithm=algorithm))
    return seg, sr


def run_pipeline(
    datasets: Sequence[Dataset],
    card: ModelCard,
    inferer: PatchInferer,
    job_id: str,
    mark: Callable[[Stage], None] = lambda _s: None,
) -> JobResult:
    """Everything between 'queued' and 'encoded' for one job, on datasets already read."""
    volume = build_volume(datasets)
    if volume.frame_numbers is not None:
        # Refused before inference so no GPU time is spent on a result that cannot be encoded yet.
        raise EncodingError("SEG output for Enhanced multi-frame sources is not supported yet")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    source = [by_uid[uid] for uid in volume.sop_instance_uids]
    labels = infer_labels(volume, card, inferer, job_id)
    mark(Stage.INFERRED)
    seg, sr = encode_results(source, volume, labels, card)
    mark(Stage.ENCODED)
    return JobResult(job_id=job_id, datasets=(seg, sr), labels=labels, volume=volume)


class Workflow:
    def __init__(
        self,
        slots: Mapping[str, ModelSlot],
        delivery: ResultDelivery,
        store: JobStore,
        *,
        workers: int = 4,
        release_instances: Callable[[Sequence[Path], float], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._slots = dict(slots)
        self._delivery = delivery
        self._store = store
        self._clock = clock
        self._release = release_instances
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="radai-job")
        self._lock = threading.RLock()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    def on_study_complete(self, study: Study) -> None:
        """Called by the receiver: create the jobs and hand them to the pool (returns at once).

        A job whose results are already in the outbound queue (delivering or dead-lettered), or delivered with
        its images since released, is not run again: this is the same study recovered from the spool after a
        restart. A delivered job whose images are all present again (a re-sent study) runs again; its
        deterministic result UIDs make the new delivery an overwrite at the PACS.
        """
        now = self._clock()
        instances = sum(len(s.instances) for s in study.series.values())
        work: list[tuple[JobSpec, ModelSlot, Series]] = []
        # The lock orders this decision against _settle_study's release of the images (see _already_handled).
        with self._lock:
            matched = False
            for slot in self._slots.values():
                series = select_series(study, slot.package.series_rules())
                if series is None:
                    continue
                matched = True
                spec = JobSpec(
                    job_id=job_id_for(study.study_uid, series.series_uid, slot.package.key),
                    study_uid=study.study_uid,
                    series_uid=series.series_uid,
                    model_key=slot.package.key,
                    first_received=study.first_received,
                    last_received=study.last_received,
                    completed_at=now,
                )
                if self._already_handled(spec.job_id, series):
                    log.info("study %s: job %s already has its results", hashed(study.study_uid), spec.job_id)
                    continue
                work.append((spec, slot, series))
            if matched and not work:
                return
            self._store.upsert_study(
                StudyRecord(
                    study_uid=study.study_uid,
                    state=StudyState.COMPLETE,
                    calling_ae=study.calling_ae,
                    instances=instances,
                    series=len(study.series),
                    first_received=study.first_received,
                    last_received=study.last_received,
                    completed_at=now,
                )
            )
            # Remembered in the store: the images are released when the results are delivered, maybe after a
            # restart.
            self._store.remember_spool(
                study.study_uid, [h.path for s in study.series.values() for h in s.instances]
            )
            if not work:
                log.info(
                    "study %s: no model accepts any of its %d series",
                    hashed(study.study_uid),
                    len(study.series),
                )
                self._store.set_study_state(study.study_uid, StudyState.NO_MATCH)
                self._release_study(study.study_uid)
                return
            for spec, _, _ in work:
                self._store.add_job(spec)
                self._stage(spec, Stage.QUEUED, self._clock())
            # Every job is in the store before any can finish: the study settles only when all are final.
            self._store.set_study_state(study.study_uid, StudyState.PROCESSING)
        for spec, slot, series in work:
            self._pool.submit(self._run_job, spec, slot, series)
            log.info("study %s: job %s queued for %s", hashed(study.study_uid), spec.job_id, spec.model_key)

    def _already_handled(self, job_id: str, series: Series) -> bool:
        try:
            job = self._store.get_job(job_id)
        except NotFoundError:
            return False
        if job.state in (JobState.DELIVERING, JobState.DEAD_LETTER):
            return True
        return job.state is JobState.DELIVERED and not all(h.path.is_file() for h in series.instances)

    def _stage(self, spec: JobSpec, stage: Stage, at: float) -> None:
        self._store.mark_stage(spec.job_id, stage, at)

    def _run_job(self, spec: JobSpec, slot: ModelSlot, series: Series) -> bool:
        card = slot.package.card
        model = card.id

        def mark(stage: Stage) -> None:
            self._stage(spec, stage, self._clock())

        try:
            datasets = [pydicom.dcmread(h.path) for h in series.instances]
            result = run_pipeline(datasets, card, slot.inferer, spec.job_id, mark)
            outputs = [str(ds.SOPInstanceUID) for ds in result.datasets]
            self._store.finish_job(spec.job_id, JobState.DELIVERING, outputs=outputs)
            self._delivery.submit(spec.job_id, spec.study_uid, result.datasets)
        except (RadaiError, ValueError, OSError) as exc:
            return self._fail(spec, model, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug must fail the job with a reason, never kill the worker
            log.exception("job %s crashed", spec.job_id)
            return self._fail(spec, model, f"internal error: {type(exc).__name__}: {exc}")
        log.info(
            "job %s encoded; queued for %d destination(s)", spec.job_id, len(self._delivery.destinations)
        )
        # Settles at once without destinations (results computed, sent nowhere) or if the queue was quicker.
        self.delivery_settled(spec.job_id)
        return True

    def _fail(self, spec: JobSpec, model: str, reason: str) -> bool:
        reason = reason.splitlines()[0][:500] if reason else "unknown error"
        log.warning("job %s failed: %s", spec.job_id, reason)
        self._store.finish_job(spec.job_id, JobState.FAILED, reason=reason)
        metrics.JOBS.labels(model=model, outcome="failed").inc()
        self._settle_study(spec.study_uid)
        return False

    def delivery_settled(self, job_id: str) -> None:
        """A delivery of the job was acknowledged or dead-lettered: settle the job, then its study."""
        new = self._store.settle_job(job_id, self._clock())
        job = self._store.get_job(job_id)
        model = job.model_key.split("@", 1)[0]
        if new is JobState.DELIVERED:
            self._observe(job, model)
            metrics.JOBS.labels(model=model, outcome="delivered").inc()
            log.info("job %s delivered (%s)", job_id, job.model_key)
        elif new is JobState.DEAD_LETTER:
            metrics.JOBS.labels(model=model, outcome="dead-letter").inc()
            log.warning("job %s dead-lettered: %s", job_id, job.reason)
        self._settle_study(job.study_uid)

    def _observe(self, job: JobRecord, model: str) -> None:
        study = self._store.get_study(job.study_uid)
        previous = study.first_received
        for stage in Stage:
            at = job.stages.get(stage.value)
            if at is None:
                continue
            metrics.STAGE_SECONDS.labels(stage=stage.value, model=model).observe(max(0.0, at - previous))
            previous = at
        delivered = job.stages.get(Stage.DELIVERED.value, previous)
        metrics.STUDY_SECONDS.labels(model=model, outcome="delivered").observe(
            max(0.0, delivered - study.first_received)
        )

    def _settle_study(self, study_uid: str) -> None:
        with self._lock:
            new = self._store.settle_study(study_uid)
            if new is StudyState.DONE:
                self._release_study(study_uid)
        if new is not None:
            log.info("study %s: %s", hashed(study_uid), new.value)

    def _release_study(self, study_uid: str) -> None:
        """Privacy by default: received images leave the spool once their results are delivered."""
        if self._release is not None:
            # Files written after the study was handed off are a re-sent copy of a later hand-off: kept.
            handed_off = self._store.get_study(study_uid).completed_at
            self._release(self._store.spool_paths(study_uid), handed_off)
        self._store.forget_spool(study_uid)
