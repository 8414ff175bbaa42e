"""The workflow: a complete study becomes one job per (study, matching model, chosen series); each job goes
volume -> model space -> batched sliding-window inference -> source grid -> SEG + SR -> destinations.

Talks only to ports (PatchInferer, ResultSender, JobStore) and pure layers; every stage is timed, persisted
and exported as a metric. A job fails with a stated reason, never silently.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom import Dataset

from dicom_router.assembler import Series, Study
from dicom_router.selection import select_series
from radai import metrics
from radai.domain import JobSpec, JobState, Stage, StudyRecord, StudyState, hashed, job_id_for
from radai.errors import InferenceError, RadaiError
from radai.imaging.resample import prepare, to_source_grid
from radai.imaging.volume import Volume, build_volume
from radai.models.manifest import ModelCard
from radai.models.registry import ModelPackage
from radai.ports import JobStore, PatchInferer, ResultSender
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
        senders: Sequence[ResultSender],
        store: JobStore,
        *,
        workers: int = 4,
        release_instances: Callable[[Sequence[Path]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._slots = dict(slots)
        self._senders = list(senders)
        self._store = store
        self._clock = clock
        self._release = release_instances
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="radai-job")
        self._lock = threading.Lock()
        self._open: dict[str, list[Future[bool]]] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    def on_study_complete(self, study: Study) -> None:
        """Called by the receiver: create the jobs and hand them to the pool (returns at once)."""
        now = self._clock()
        instances = sum(len(s.instances) for s in study.series.values())
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
        futures: list[Future[bool]] = []
        for slot in self._slots.values():
            series = select_series(study, slot.package.series_rules())
            if series is None:
                continue
            spec = JobSpec(
                job_id=job_id_for(study.study_uid, series.series_uid, slot.package.key),
                study_uid=study.study_uid,
                series_uid=series.series_uid,
                model_key=slot.package.key,
                first_received=study.first_received,
                last_received=study.last_received,
                completed_at=now,
            )
            self._store.add_job(spec)
            self._stage(spec, Stage.QUEUED, self._clock())
            futures.append(self._pool.submit(self._run_job, spec, slot, series))
            log.info("study %s: job %s queued for %s", hashed(study.study_uid), spec.job_id, spec.model_key)
        if not futures:
            log.info(
                "study %s: no model accepts any of its %d series", hashed(study.study_uid), len(study.series)
            )
            self._store.set_study_state(study.study_uid, StudyState.NO_MATCH)
            self._release_study(study)
            return
        self._store.set_study_state(study.study_uid, StudyState.PROCESSING)
        with self._lock:
            self._open[study.study_uid] = futures
        finish = functools.partial(self._maybe_finish_study, study)
        for fut in futures:
            fut.add_done_callback(lambda _f: finish())

    def _stage(self, spec: JobSpec, stage: Stage, at: float) -> None:
        self._store.mark_stage(spec.job_id, stage, at)

    def _run_job(self, spec: JobSpec, slot: ModelSlot, series: Series) -> bool:
        card = slot.package.card
        model = card.id
        times: dict[Stage, float] = {
            Stage.RECEIVED: spec.last_received,
            Stage.COMPLETE: spec.completed_at,
            Stage.QUEUED: self._clock(),
        }

        def mark(stage: Stage) -> None:
            times[stage] = self._clock()
            self._stage(spec, stage, times[stage])

        try:
            datasets = [pydicom.dcmread(h.path) for h in series.instances]
            result = run_pipeline(datasets, card, slot.inferer, spec.job_id, mark)
            self._deliver(result.datasets)
            mark(Stage.DELIVERED)
        except (RadaiError, ValueError, OSError) as exc:
            return self._fail(spec, model, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug must fail the job with a reason, never kill the worker
            log.exception("job %s crashed", spec.job_id)
            return self._fail(spec, model, f"internal error: {type(exc).__name__}: {exc}")
        outputs = [str(ds.SOPInstanceUID) for ds in result.datasets]
        self._store.finish_job(spec.job_id, JobState.DELIVERED, outputs=outputs)
        self._observe(spec, model, times)
        metrics.JOBS.labels(model=model, outcome="delivered").inc()
        log.info("job %s delivered (%s)", spec.job_id, spec.model_key)
        return True

    def _fail(self, spec: JobSpec, model: str, reason: str) -> bool:
        reason = reason.splitlines()[0][:500] if reason else "unknown error"
        log.warning("job %s failed: %s", spec.job_id, reason)
        self._store.finish_job(spec.job_id, JobState.FAILED, reason=reason)
        metrics.JOBS.labels(model=model, outcome="failed").inc()
        return False

    def _deliver(self, datasets: Sequence[Dataset]) -> None:
        for sender in self._senders:
            try:
                sender.send(datasets)
            except RadaiError:
                metrics.DELIVERIES.labels(destination=sender.name, outcome="failed").inc()
                raise
            metrics.DELIVERIES.labels(destination=sender.name, outcome="delivered").inc()

    def _observe(self, spec: JobSpec, model: str, times: Mapping[Stage, float]) -> None:
        previous = spec.first_received
        for stage in Stage:
            at = times.get(stage)
            if at is None:
                continue
            metrics.STAGE_SECONDS.labels(stage=stage.value, model=model).observe(max(0.0, at - previous))
            previous = at
        metrics.STUDY_SECONDS.labels(model=model, outcome="delivered").observe(
            max(0.0, times[Stage.DELIVERED] - spec.first_received)
        )

    def _maybe_finish_study(self, study: Study) -> None:
        with self._lock:
            futures = self._open.get(study.study_uid)
            if futures is None or not all(f.done() for f in futures):
                return
            del self._open[study.study_uid]
        ok = all(not f.cancelled() and f.exception() is None and f.result() for f in futures)
        self._store.set_study_state(study.study_uid, StudyState.DONE if ok else StudyState.FAILED)
        if ok:
            self._release_study(study)

    def _release_study(self, study: Study) -> None:
        """Privacy by default: received images leave the spool once their results are delivered."""
        if self._release is not None:
            self._release([h.path for s in study.series.values() for h in s.instances])
