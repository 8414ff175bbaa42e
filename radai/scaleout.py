"""Scale-out mode: receivers plan, workers run, on PostgreSQL (state), Redis Streams (jobs) and a shared volume.

A **receiver** keeps the DICOM edge: SCP, spool on the shared volume, assembly. When its part of a study is
complete it records the part in the database (`StudyCoordinator`); the receiver whose part completes last,
when no receiver is still getting instances of the study, merges every part into one study and plans it
once — so a study whose series reached different receivers still yields one study. Planning uses the
registry's cards only (`RegistryCatalog`: receivers load no model); each planned chain goes on the stream of
its first model (`ChainPublisher`).

A **worker** takes chains from the streams of the models it serves (`ScaleOutWorker`), runs each on the exact
versions it was planned with, and acknowledges the stream entry once every job of the chain is final
(delivered, failed or dead-lettered) — until then it keeps the entry claimed (`touch`), so a worker that
dies (even `kill -9`) leaves its entries to be claimed by another after `scaleout.claim_idle_seconds`.
Any worker sends any queued delivery (rows claimed with SKIP LOCKED).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from redis import RedisError

from dicom_router.assembler import Assembler, Study
from dicom_router.headers import InstanceHeader, read_header
from dicom_router.uids import uid_fingerprint
from radai.catalog import ModelSlot
from radai.dispatch import PlannedChain, PlannedJob
from radai.domain import JobSpec, JobState, Priority
from radai.errors import InferenceError, NotFoundError
from radai.ports import JobStore
from radai.storage.model_store import ModelStore
from radai.storage.redis_streams import Delivery, JobMessage, JobStreams
from radai.storage.sql_parts import MergedStudy, StudyParts
from radai.workflow import Workflow

log = logging.getLogger(__name__)

FINAL = (JobState.DELIVERED, JobState.FAILED, JobState.DEAD_LETTER)


class _Elsewhere:
    """The inferer of a receiver's slots: receivers plan, workers infer."""

    def infer(
        self, job_id: str, patches: NDArray[np.float32], priority: Priority = Priority.ROUTINE
    ) -> NDArray[np.float32]:
        raise InferenceError("a scale-out receiver runs no model")


class RegistryCatalog:
    """The registry's active versions as cards, for planning only (implements radai.catalog.ModelCatalog)."""

    def __init__(self, registry: ModelStore) -> None:
        self._registry = registry
        self._inferer = _Elsewhere()

    def lease_active(self) -> list[ModelSlot]:
        return [ModelSlot(p, self._inferer) for p in self._registry.selection().active.values()]

    def lease_shadow(self, model_id: str) -> ModelSlot | None:
        return None  # shadow runs happen on the worker that runs the active version

    def lease(self, key: str) -> ModelSlot:
        return ModelSlot(self._registry.find(key).package, self._inferer)

    def release(self, key: str) -> None:
        return None


def model_id_of(key: str) -> str:
    return key.split("@", 1)[0]


class ChainPublisher:
    """Puts each planned chain on the stream of its first model; paths are sent relative to the shared
    data directory."""

    def __init__(self, streams: JobStreams, data_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self._streams = streams
        self._data_dir = data_dir
        self._clock = clock

    def __call__(self, chain: PlannedChain) -> None:
        head = chain.head
        message = JobMessage(
            job_id=head.job_id,
            study_uid=head.study_uid,
            series_uid=chain.series_uid,
            model_key=head.model_key,
            priority=head.priority,
            instances=tuple(str(p.relative_to(self._data_dir)) for p in chain.paths),
            enqueued_at=self._clock(),
            chain=tuple((job.spec.job_id, job.run) for job in chain.jobs),
        )
        if self._streams.publish(model_id_of(head.model_key), message):
            log.info("job %s published for %s", head.job_id, head.model_key)
        else:
            log.info("job %s is already queued; not published again", head.job_id)


def assemble(paths: Sequence[Path], calling_ae: str, received_at: float) -> Study | None:
    """One study from spooled files (headers read again; unreadable files are left out)."""
    assembler = Assembler(quiet_seconds=0.0)
    study_uid = None
    for path in paths:
        try:
            header = read_header(path, calling_ae, received_at)
        except (OSError, ValueError) as exc:
            log.warning("spooled instance %s unreadable: %s", uid_fingerprint(path.stem), type(exc).__name__)
            continue
        assembler.add(header, received_at)
        study_uid = header.study_uid
    return None if study_uid is None else assembler.pop_study(study_uid)


class StudyCoordinator:
    """The receivers' shared assembly: a study is planned once, when the last receiver's part completes."""

    def __init__(
        self,
        parts: StudyParts,
        receiver: str,
        on_study: Callable[[Study], None],
        clock: Callable[[], float] = time.time,
        touch_every_s: float = 1.0,
    ) -> None:
        self._parts = parts
        self._receiver = receiver
        self._on_study = on_study
        self._clock = clock
        self._every = touch_every_s
        self._touched: dict[str, float] = {}  # study uid -> when this receiver last recorded activity

    def on_instance(self, header: InstanceHeader) -> None:
        """On the assembler thread: record (at most once a second per study) that the study is arriving."""
        last = self._touched.get(header.study_uid)
        if last is not None and header.received_at - last < self._every:
            return
        self._touched[header.study_uid] = header.received_at
        if len(self._touched) > 10_000:  # bounded: forget the oldest half
            for uid in sorted(self._touched, key=self._touched.__getitem__)[:5_000]:
                del self._touched[uid]
        self._parts.touch(header.study_uid, self._receiver, header.received_at)

    def on_part_complete(self, study: Study) -> None:
        self._touched.pop(study.study_uid, None)
        paths = [str(h.path) for s in study.series.values() for h in s.instances]
        self._parts.complete_part(
            study.study_uid,
            self._receiver,
            paths,
            study.calling_ae,
            study.first_received,
            study.last_received,
        )
        merged = self._parts.take_due(study.study_uid)
        if merged is None:
            waiting = ", ".join(self._parts.waiting(study.study_uid)) or "-"
            fingerprint = uid_fingerprint(study.study_uid)
            log.info("study %s: part complete; receivers still receiving: %s", fingerprint, waiting)
            return
        self._plan(merged)

    def sweep(self, abandoned_after_s: float) -> int:
        """Plan the studies held back only by parts whose receiver got nothing for `abandoned_after_s` and
        never completed them (it went away for good); returns how many were planned."""
        before = self._clock() - abandoned_after_s
        planned = 0
        for study_uid in self._parts.stalled(before):
            merged = self._parts.take_due(study_uid, abandoned_before=before)
            if merged is not None:
                log.warning(
                    "study %s: planned without the unfinished parts of receivers silent for %.0f s",
                    uid_fingerprint(study_uid),
                    abandoned_after_s,
                )
                self._plan(merged)
                planned += 1
        return planned

    def _plan(self, merged: MergedStudy) -> None:
        fingerprint = uid_fingerprint(merged.study_uid)
        whole = assemble([Path(p) for p in merged.paths], merged.calling_ae, merged.first_received)
        if whole is None:
            log.error("study %s: no readable instance in its parts", fingerprint)
            return
        whole = Study(
            whole.study_uid, whole.series, merged.first_received, merged.last_received, merged.calling_ae
        )
        log.info(
            "study %s complete across %d receiver(s): %d instances",
            fingerprint,
            len(merged.receivers),
            whole.instance_count,
        )
        self._on_study(whole)


@dataclass
class _Held:
    delivery: Delivery
    jobs: tuple[str, ...]  # the chain's jobs that run: the entry is acknowledged when all are final
    last_touch: float = field(default_factory=time.monotonic)


class ScaleOutWorker:
    """Takes chains from the job streams, runs them, and acknowledges each entry once its jobs are final."""

    def __init__(
        self,
        streams: JobStreams,
        workflow: Workflow,
        store: JobStore,
        registry: ModelStore,
        data_dir: Path,
        *,
        threads: int = 2,
        claim_idle_s: float = 300.0,
    ) -> None:
        self._streams = streams
        self._workflow = workflow
        self._store = store
        self._registry = registry
        self._data_dir = data_dir
        self._threads_n = threads
        self._touch_every = claim_idle_s / 3
        self._stop = threading.Event()
        self._held: list[_Held] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self._threads_n):
            self._spawn(self._take_loop, f"radai-worker-{i}")
        self._spawn(self._settle_loop, "radai-worker-ack")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _models(self) -> list[str]:
        return sorted(self._registry.selection().active)

    def _take_loop(self) -> None:
        while not self._stop.is_set():
            try:
                taken = self._streams.take(self._models(), block_ms=1000)
            except RedisError as exc:  # Redis away for a moment: keep trying
                log.warning("taking jobs from the streams failed: %s", exc)
                self._stop.wait(2.0)
                continue
            for delivery in taken:
                self._run(delivery)

    def _run(self, delivery: Delivery) -> None:
        message = delivery.message
        held = _Held(delivery, tuple(job_id for job_id, run in message.chain if run) or (message.job_id,))
        with self._lock:
            self._held.append(held)  # touched while it runs (the settle loop), acknowledged when final
        try:
            chain = self._chain(message)
            study = self._store.get_study(message.study_uid)
            whole = assemble(chain.paths, study.calling_ae, chain.head.first_received)
            series = None if whole is None else whole.series.get(chain.series_uid)
            if series is None:
                raise NotFoundError(f"the images of job {message.job_id} are gone from the shared spool")
            if delivery.delivery_count > 1:
                log.warning("job %s reclaimed from a worker that went silent", message.job_id)
            else:
                log.info("job %s taken (%s)", message.job_id, message.model_key)
            self._workflow.run_planned(chain, series)
        except Exception as exc:
            log.error("job %s could not run here: %s", message.job_id, exc)
            for job_id in held.jobs:
                try:
                    job = self._store.get_job(job_id)
                except NotFoundError:
                    continue
                if job.state not in FINAL and job.state is not JobState.DELIVERING:
                    self._store.finish_job(job_id, JobState.FAILED, reason=f"{type(exc).__name__}: {exc}")
                    self._workflow.delivery_settled(job_id)

    def _chain(self, message: JobMessage) -> PlannedChain:
        entries = message.chain or ((message.job_id, True),)
        study = self._store.get_study(message.study_uid)
        jobs = []
        for job_id, run in entries:
            r = self._store.get_job(job_id)
            spec = JobSpec(
                r.job_id,
                r.study_uid,
                r.series_uid,
                r.model_key,
                study.first_received,
                study.last_received,
                study.completed_at,
                r.priority,
            )
            jobs.append(PlannedJob(spec, run))
        paths = tuple(self._data_dir / p for p in message.instances)
        return PlannedChain(message.series_uid, paths, tuple(jobs))

    def _settle_loop(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                held = list(self._held)
            for item in held:
                try:
                    self._settle(item)
                except Exception:
                    log.exception("job %s: settling its stream entry failed", item.delivery.message.job_id)

    def _settle(self, item: _Held) -> None:
        states = [self._store.get_job(job_id).state for job_id in item.jobs]
        if all(state in FINAL for state in states):
            for job_id in item.jobs:
                self._streams.forget(job_id)  # a later re-send of the study may queue it again
            self._streams.ack(item.delivery)
            with self._lock:
                self._held.remove(item)
            return
        if time.monotonic() - item.last_touch >= self._touch_every:
            item.last_touch = time.monotonic()
            if not self._streams.touch(item.delivery):
                log.warning("job %s was claimed by another worker", item.delivery.message.job_id)
                with self._lock:
                    self._held.remove(item)
