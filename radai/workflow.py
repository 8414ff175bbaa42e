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
from radai import metrics
from radai.catalog import Lane, ModelCatalog, ModelSlot, StaticCatalog, plan_chains, priority_for
from radai.config import PriorityRule
from radai.dispatch import PlannedChain, PlannedJob
from radai.domain import (
    JobRecord,
    JobSpec,
    JobState,
    Priority,
    ShadowRecord,
    Stage,
    StudyRecord,
    StudyState,
    hashed,
    job_id_for,
)
from radai.errors import EncodingError, InferenceError, NotFoundError, RadaiError
from radai.models.manifest import ModelCard
from radai.outputs import Needed, Output, needed
from radai.pipeline import JobResult, Upstream, algorithm_of, run_pipeline
from radai.ports import JobStore, ResultDelivery
from radai.results.gate import problems
from radai.results.notice import NoticeRequest, build_notice
from radai.shadow import dice_per_label, findings_agreement

__all__ = ["ModelSlot", "Workflow", "plan_chains"]

log = logging.getLogger(__name__)

# What a run that sends nothing builds: a shadow run, or an upstream model re-run for its mask only.
NOTHING = Needed(seg_variants=(), sr_variants=(), sc=False, gsps=False, notice=False)


@dataclass(frozen=True)
class _Step:
    """One model's job in a chain. ``run`` False: its results were already delivered; it runs again only to
    give its labels to a later model of the chain (nothing of it is stored or sent)."""

    spec: JobSpec
    slot: ModelSlot
    run: bool = True


class Workflow:
    def __init__(
        self,
        slots: Mapping[str, ModelSlot] | ModelCatalog,
        delivery: ResultDelivery,
        store: JobStore,
        *,
        workers: int = 4,
        release_instances: Callable[[Sequence[Path], float], None] | None = None,
        clock: Callable[[], float] = time.time,
        rejected_dir: Path | None = None,
        validate_with_dciodvfy: bool = True,
        priorities: Sequence[PriorityRule] = (),
        dispatch: Callable[[PlannedChain], None] | None = None,
    ) -> None:
        """`dispatch`: where planned chains go instead of this process's job pool (a scale-out receiver
        publishes them on the job streams; a worker runs them with `run_planned`)."""
        self._dispatch = dispatch
        self._catalog: ModelCatalog = StaticCatalog(slots) if isinstance(slots, Mapping) else slots
        self._priorities = list(priorities)
        self._delivery = delivery
        self._wanted = needed(delivery.plans.values())
        self._rejected = rejected_dir
        self._dciodvfy = validate_with_dciodvfy
        self._store = store
        self._clock = clock
        self._release = release_instances
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="radai-job")
        self._lock = threading.RLock()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    def on_study_complete(self, study: Study) -> None:
        """Called by the receiver: create the jobs and hand them to the pool (returns at once).

        Jobs run on the model versions active now; each holds its version until it ends, so an activation
        meanwhile switches only later studies. A job whose results are already in the outbound queue
        (delivering or dead-lettered), or delivered with its images since released, is not run again: this is
        the same study recovered from the spool after a restart. A delivered job whose images are all present
        again (a re-sent study) runs again; its deterministic result UIDs make the new delivery an overwrite.
        """
        slots = self._catalog.lease_active()
        held = {slot.key for slot in slots}
        try:
            for series, steps in self._plan(study, slots):
                if self._dispatch is not None:
                    self._dispatch(
                        PlannedChain(
                            series.series_uid,
                            tuple(h.path for h in series.instances),
                            tuple(PlannedJob(step.spec, step.run) for step in steps),
                        )
                    )
                    continue  # the leases in `held` are released below: another process runs the chain
                self._pool.submit(self._run_chain, steps, series)
                for step in steps:
                    held.discard(step.slot.key)  # released by the chain when it ends
                    if step.run:
                        log.info(
                            "study %s: job %s queued for %s",
                            hashed(study.study_uid),
                            step.spec.job_id,
                            step.spec.model_key,
                        )
        finally:
            for key in held:
                self._catalog.release(key)

    def _plan(self, study: Study, slots: Sequence[ModelSlot]) -> list[tuple[Series, list[_Step]]]:
        now = self._clock()
        instances = sum(len(s.instances) for s in study.series.values())
        work: list[tuple[Series, list[_Step]]] = []
        # The lock orders this decision against _settle_study's release of the images (see _already_handled).
        with self._lock:
            chains = plan_chains(study, slots)
            for series, chain in chains:
                steps: list[_Step] = []
                for slot in chain:
                    spec = JobSpec(
                        job_id=job_id_for(study.study_uid, series.series_uid, slot.key),
                        study_uid=study.study_uid,
                        series_uid=series.series_uid,
                        model_key=slot.key,
                        first_received=study.first_received,
                        last_received=study.last_received,
                        completed_at=now,
                        priority=priority_for(self._priorities, study, series),
                    )
                    handled = self._already_handled(spec.job_id, series)
                    if handled:
                        log.info(
                            "study %s: job %s already has its results", hashed(study.study_uid), spec.job_id
                        )
                    steps.append(_Step(spec, slot, run=not handled))
                while steps and not steps[-1].run:
                    steps.pop()  # nothing downstream needs it
                if steps:
                    work.append((series, steps))
            if chains and not work:
                return []
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
                return []
            for _, steps in work:
                for step in steps:
                    if step.run:
                        self._store.add_job(step.spec)
                        self._stage(step.spec, Stage.QUEUED, self._clock())
            # Every job is in the store before any can finish: the study settles only when all are final.
            self._store.set_study_state(study.study_uid, StudyState.PROCESSING)
        return work

    def run_planned(self, chain: PlannedChain, series: Series) -> None:
        """Run a chain another process planned (a scale-out worker), on the exact model versions it was
        planned with, in the calling thread. A job already final or in the outbound queue is not run again
        (a chain reclaimed from a worker that died after its results were queued)."""
        steps: list[_Step] = []
        try:
            for job in chain.jobs:
                run = job.run and self._store.get_job(job.spec.job_id).state in (
                    JobState.QUEUED,
                    JobState.RUNNING,
                )
                steps.append(_Step(job.spec, self._catalog.lease(job.spec.model_key), run))
        except Exception:
            for step in steps:
                self._catalog.release(step.slot.key)
            raise
        while steps and not steps[-1].run:
            self._catalog.release(steps.pop().slot.key)
        if steps:
            self._run_chain(steps, series)

    def _already_handled(self, job_id: str, series: Series) -> bool:
        try:
            job = self._store.get_job(job_id)
        except NotFoundError:
            return False
        if job.state in (JobState.DELIVERING, JobState.DEAD_LETTER):
            return True
        if job.state is JobState.FAILED:
            # The same images, recovered from the spool after a restart, fail the same way: not run again (and
            # no second notice). Images written after the study was handed off are a re-send: run again.
            handed_off = self._store.get_study(job.study_uid).completed_at
            return all(h.path.is_file() and h.path.stat().st_mtime <= handed_off for h in series.instances)
        return job.state is JobState.DELIVERED and not all(h.path.is_file() for h in series.instances)

    def _stage(self, spec: JobSpec, stage: Stage, at: float) -> None:
        self._store.mark_stage(spec.job_id, stage, at)

    def _run_chain(self, steps: Sequence[_Step], series: Series) -> None:
        """Run a chain's jobs in order on the series' images, read once; a model that consumes another's
        output gets that output's mask. Every lease is released at the end."""
        try:
            datasets: list[Dataset] = []
            try:
                datasets = [pydicom.dcmread(h.path) for h in series.instances]
            except (OSError, ValueError) as exc:
                for step in steps:
                    if step.run:
                        self._fail(
                            step.spec, step.slot.package.card, f"{type(exc).__name__}: {exc}", datasets
                        )
                return
            labels: dict[str, NDArray[np.uint8]] = {}
            keys: dict[str, str] = {}
            for step in steps:
                card = step.slot.package.card
                upstream = None
                if card.consumes is not None:
                    done = labels.get(card.consumes.model)
                    if done is None:
                        if step.run:
                            reason = f"upstream model {card.consumes.model} gave no result"
                            self._fail(step.spec, card, reason, datasets)
                        continue
                    described = ",".join(str(v) for v in card.consumes.labels)
                    upstream = Upstream(
                        mask=np.isin(done, card.consumes.labels),
                        description=f"restricted to {keys[card.consumes.model]} labels {described}",
                    )
                result = self._run_job(step, datasets, upstream)
                if result is not None:
                    labels[card.id], keys[card.id] = result.labels, step.slot.key
                    if step.run:
                        self._run_shadow(step.spec, card, result, datasets, upstream)
        finally:
            for step in steps:
                self._catalog.release(step.slot.key)

    def _run_job(
        self, step: _Step, datasets: Sequence[Dataset], upstream: Upstream | None
    ) -> JobResult | None:
        spec, slot = step.spec, step.slot
        card = slot.package.card

        def mark(stage: Stage) -> None:
            if step.run:
                self._stage(spec, stage, self._clock())

        wanted = self._wanted if step.run else NOTHING
        try:
            inferer = Lane(slot.inferer, spec.priority)
            urgent = spec.priority is Priority.STAT
            result = run_pipeline(datasets, card, inferer, spec.job_id, mark, wanted, upstream, urgent)
            if not step.run:
                return result
            self._gate(spec.job_id, result.outputs, result.source)
            uids = list(dict.fromkeys(str(o.dataset.SOPInstanceUID) for o in result.outputs))
            self._store.finish_job(spec.job_id, JobState.DELIVERING, outputs=uids)
            self._delivery.submit(spec.job_id, spec.study_uid, result.outputs)
        except Exception as exc:  # a bug must fail the job with a reason, never kill the worker
            expected = isinstance(exc, RadaiError | ValueError | OSError)
            if not expected:
                log.exception("job %s crashed", spec.job_id)
            if step.run:
                prefix = "" if expected else "internal error: "
                self._fail(spec, card, f"{prefix}{type(exc).__name__}: {exc}", datasets)
            return None
        log.info(
            "job %s encoded; queued for %d destination(s)", spec.job_id, len(self._delivery.destinations)
        )
        # Settles at once without destinations (results computed, sent nowhere) or if the queue was quicker.
        self.delivery_settled(spec.job_id)
        return result

    def _run_shadow(
        self,
        spec: JobSpec,
        card: ModelCard,
        active: JobResult,
        datasets: Sequence[Dataset],
        upstream: Upstream | None,
    ) -> None:
        """Run the shadow version of the job's model, if one is set, on the same images (after the active
        results were queued, so it never delays them); record its agreement, send nothing."""
        slot = self._catalog.lease_shadow(card.id)
        if slot is None:
            return
        shadow_card = slot.package.card
        version = shadow_card.version
        try:
            if shadow_card.task != card.task:
                raise InferenceError(f"shadow task {shadow_card.task} differs from the active {card.task}")
            shadow = run_pipeline(
                datasets,
                shadow_card,
                slot.inferer,
                f"{spec.job_id}:shadow",
                wanted=NOTHING,
                upstream=upstream,
            )
            if card.task == "detection":
                agreement = findings_agreement(active.findings, shadow.findings)
                metrics.SHADOW_AGREEMENT.labels(model=card.id, version=version, label="findings").observe(
                    agreement["f1"]
                )
            else:
                agreement = dice_per_label(active.labels, shadow.labels, card)
                for name, dice in agreement.items():
                    metrics.SHADOW_AGREEMENT.labels(
                        model=card.id, version=version, label=name.removeprefix("dice:")
                    ).observe(dice)
            record = ShadowRecord(spec.job_id, slot.key, "compared", agreement, at=self._clock())
            log.info("job %s: shadow %s compared: %s", spec.job_id, slot.key, agreement)
        except Exception as exc:  # a shadow version must never affect the job it shadows
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            log.warning("job %s: shadow %s failed: %s", spec.job_id, slot.key, reason)
            record = ShadowRecord(spec.job_id, slot.key, "failed", {}, reason, at=self._clock())
        finally:
            self._catalog.release(slot.key)
        metrics.SHADOW_RUNS.labels(model=card.id, version=version, outcome=record.outcome).inc()
        self._store.record_shadow(record)

    def _gate(self, job_id: str, outputs: Sequence[Output], source: Sequence[Dataset]) -> None:
        """The validation gate: raise EncodingError (after keeping the objects for inspection) when any
        object must not leave."""
        found = problems([o.dataset for o in outputs], source, dciodvfy=self._dciodvfy)
        if not found:
            return
        kept = self._keep_rejected(job_id, outputs)
        more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
        raise EncodingError(f"results failed validation: {found[0]}{more}{kept}")

    def _keep_rejected(self, job_id: str, outputs: Sequence[Output]) -> str:
        if self._rejected is None:
            return ""
        folder = self._rejected / job_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for index, output in enumerate(outputs):
                output.dataset.save_as(folder / f"{index:03d}-{output.key}.dcm", enforce_file_format=True)
        except (OSError, ValueError) as exc:
            log.error("job %s: rejected results could not be kept: %s", job_id, exc)
            return ""
        return f"; kept in {folder.name} under the rejected folder"

    def _fail(self, spec: JobSpec, card: ModelCard, reason: str, datasets: Sequence[Dataset]) -> None:
        reason = reason.splitlines()[0][:500] if reason else "unknown error"
        log.warning("job %s failed: %s", spec.job_id, reason)
        self._store.finish_job(spec.job_id, JobState.FAILED, reason=reason)
        metrics.JOBS.labels(model=card.id, outcome="failed").inc()
        self._notify(spec, card, reason, datasets)
        self._settle_study(spec.study_uid)

    def _notify(self, spec: JobSpec, card: ModelCard, reason: str, datasets: Sequence[Dataset]) -> None:
        """Send the "AI did not run" notice to the destinations that want it, so silence never reads as
        "normal". Needs the series' headers; a series that could not even be read gets none (logged)."""
        if not self._wanted.notice or not self._delivery.destinations:
            return
        source = [ds for ds in datasets if str(ds.get("SeriesInstanceUID", "")) == spec.series_uid]
        if not source:
            log.warning("job %s: no readable image of the series, no notice sent", spec.job_id)
            return
        try:
            notice = build_notice(NoticeRequest(source=source, algorithm=algorithm_of(card), reason=reason))
            self._gate(spec.job_id, [Output("notice", notice)], source)
            self._delivery.submit(spec.job_id, spec.study_uid, [Output("notice", notice)])
        except (RadaiError, ValueError, OSError) as exc:
            log.error("job %s: the did-not-run notice could not be sent: %s", spec.job_id, exc)
            return
        log.info("job %s: did-not-run notice queued", spec.job_id)

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
        metrics.STUDY_SECONDS.labels(model=model, priority=job.priority.value).observe(
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
