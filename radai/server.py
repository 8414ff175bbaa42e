"""The radai process, built from settings: embedded (one process, SQLite) or one role of a scale-out set.

Start-up order: store -> models (each validated with its reference check) -> schedulers -> delivery queue
(resuming what a stopped process left) -> workflow -> DICOM receiver -> HTTP. Shutdown in reverse, draining:
the receiver stops taking studies, running jobs finish (their results stay queued on disk), the delivery
workers finish their current attempt, schedulers resolve every pending patch.

Scale-out (`scaleout.mode: distributed`, see radai.scaleout): state in PostgreSQL, jobs on Redis Streams,
`storage.data_dir` on a shared volume. Role `receiver`: the DICOM edge and planning, no model loaded; role
`worker`: models, inference and delivery; role `all`: both. Every role serves the HTTP API.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from dicom_router.receiver import Receiver
from dicom_router.spool import Spool
from radai.app import (
    RegistryAdmin,
    api_tokens,
    batches_in_flight,
    make_runner_factory,
    model_store,
    named_senders,
    scp_options,
)
from radai.audit import AuditLog, Auditor
from radai.catalog import ModelCatalog
from radai.config import DestinationSettings, Settings
from radai.delivery import DeliveryService, DestinationProbe, Outbox, RetryPolicy, plan_from_settings
from radai.destination_admin import ServerDestinations
from radai.errors import ConfigError
from radai.hosting import HostOptions, ModelHost
from radai.ports import ResultSender
from radai.reception import ReceptionObserver
from radai.runtime import RUNTIME_OPTIONS
from radai.scaleout import ChainPublisher, RegistryCatalog, ScaleOutWorker, StudyCoordinator
from radai.scheduling.loop import BatchRecord
from radai.senders import DicomSender
from radai.storage.sql_jobs import SqlJobStore
from radai.storage.sql_parts import StudyParts
from radai.stow import StowSender
from radai.workflow import Workflow

log = logging.getLogger(__name__)

# Scale-out: a delivery left 'sending' this long belongs to a process that died and is sent again.
DELIVERY_CLAIM_LEASE_S = 900.0


class Server:
    """The radai process: receiver, workflow, schedulers and store, built from settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        scale = settings.scaleout
        self.distributed = scale.mode == "distributed"
        self.receives = scale.role in ("all", "receiver")
        self.runs_models = scale.role in ("all", "worker")
        self._stopping = threading.Event()
        RUNTIME_OPTIONS.tensorrt_cache = settings.storage.data_dir / "tensorrt"
        RUNTIME_OPTIONS.tensorrt_fp16 = settings.scheduler.tensorrt_fp16
        RUNTIME_OPTIONS.triton_url = settings.scheduler.triton_url
        self.store, self.audit_log = self._stores()
        self.audit = Auditor(self.audit_log)
        self.registry = model_store(settings)
        self.host = self._host() if self.runs_models else None
        catalog: ModelCatalog = self.host if self.host is not None else RegistryCatalog(self.registry)
        names = [d.name for d in settings.destinations]
        if len(set(names)) != len(names):
            raise ConfigError(f"invalid setting 'destinations': names must be unique ({', '.join(names)})")
        senders = [self._sender(d) for d in settings.destinations]
        if not senders:
            log.warning("no destinations configured: results will be computed but not sent anywhere")
        self.delivery = DeliveryService(
            self.store,
            senders,
            Outbox(settings.storage.data_dir / "outbox"),
            {d.name: RetryPolicy.from_settings(d) for d in settings.destinations},
            {d.name: plan_from_settings(d) for d in settings.destinations},
            poll_seconds=settings.delivery.poll_seconds,
            audit=self.audit,
            claim_lease_s=DELIVERY_CLAIM_LEASE_S if self.distributed else None,
        )
        self.probe = DestinationProbe(senders, ttl_seconds=settings.delivery.echo_cache_seconds)
        self.destinations = ServerDestinations(settings.destinations, senders, self.probe, self.store)
        self._spools: dict[Path, Spool] = {}  # scale-out: the receivers' folders in the shared spool
        self._spools_lock = threading.Lock()
        self.spool = Spool(
            settings.storage.spool_dir,
            max_used_fraction=settings.storage.spool_max_used_fraction,
            min_free_bytes=settings.storage.spool_min_free_bytes,
        )
        self.streams = None
        if self.distributed:
            from radai.storage.redis_streams import JobStreams

            self.streams = JobStreams.from_settings(scale)
        self.workflow = Workflow(
            catalog,
            self.delivery,
            self.store,
            workers=settings.scheduler.job_workers,
            release_instances=self._release,
            rejected_dir=settings.storage.data_dir / "rejected",
            priorities=settings.scheduler.priorities,
            dispatch=(
                ChainPublisher(self.streams, settings.storage.data_dir)
                if self.streams is not None and self.receives
                else None
            ),
        )
        self.delivery.add_listener(self.workflow.delivery_settled)
        self.parts: StudyParts | None = None
        self.coordinator: StudyCoordinator | None = None
        self.receiver = self._receiver() if self.receives else None
        self.worker = None
        if self.streams is not None and self.runs_models:
            self.worker = ScaleOutWorker(
                self.streams,
                self.workflow,
                self.store,
                self.registry,
                settings.storage.data_dir,
                threads=settings.scheduler.job_workers,
                claim_idle_s=scale.claim_idle_seconds,
            )

    def _stores(self) -> tuple[SqlJobStore, AuditLog]:
        if not self.distributed:
            from radai.storage.sqlite import SqliteJobStore
            from radai.storage.sqlite_audit import SqliteAuditLog

            database = self.settings.storage.database
            return SqliteJobStore(database), SqliteAuditLog(database)
        from radai.storage.postgres import PostgresAuditLog, PostgresJobStore

        url = self.settings.scaleout.database_url
        if url is None:  # the settings' validator already refuses this
            raise ConfigError("invalid setting 'scaleout.database_url': required in distributed mode")
        return PostgresJobStore(url.get_secret_value()), PostgresAuditLog(url.get_secret_value())

    def _host(self) -> ModelHost:
        s = self.settings.scheduler
        return ModelHost(
            self.registry,
            make_runner_factory(s.device),
            HostOptions(
                max_wait_s=s.max_wait_seconds,
                poll_s=self.settings.models.poll_seconds,
                aging_s=s.aging_seconds,
                timeout_s=s.inference_timeout_seconds,
                in_flight=batches_in_flight(self.settings),
                devices=tuple(s.devices),
                runner_on=make_runner_factory,
                on_batch=self._on_batch,
                memory_fraction=s.gpu_memory_fraction,
                batch_tuning=s.batch_tuning,
                device_path=None if s.device_path else False,
            ),
        )

    def _receiver(self) -> Receiver:
        settings = self.settings
        on_complete, on_instance = self.workflow.on_study_complete, None
        if self.distributed:
            url = self.settings.scaleout.database_url
            assert url is not None  # distributed mode: checked by the settings and _stores()
            self.parts = StudyParts.postgres(url.get_secret_value())
            coordinator = StudyCoordinator(self.parts, self._receiver_name(), self.workflow.on_study_complete)
            self.coordinator = coordinator
            on_complete, on_instance = coordinator.on_part_complete, coordinator.on_instance
        # Scale-out: each receiver spools into its own folder of the shared spool, so that its start-up
        # recovery resumes only what it received itself.
        spool_dir = settings.storage.spool_dir
        if self.distributed:
            spool_dir = spool_dir / self._receiver_name()
        return Receiver(
            settings.dicom.ae_title,
            settings.dicom.host,
            settings.dicom.port,
            spool_dir,
            settings.completion.study_quiet_seconds,
            on_complete,
            release_grace_seconds=settings.completion.association_grace_seconds,
            spool_max_used_fraction=settings.storage.spool_max_used_fraction,
            spool_min_free_bytes=settings.storage.spool_min_free_bytes,
            rules=settings.completion.rules(),
            scp_options=scp_options(
                settings.dicom, ReceptionObserver(named_senders(settings.dicom), self.audit)
            ),
            on_instance=on_instance,
        )

    def _receiver_name(self) -> str:
        """Stable across restarts (its spool folder and its parts of studies carry it): `consumer_name`, or
        the host name."""
        return self.settings.scaleout.consumer_name or socket.gethostname()

    def _sender(self, dest: DestinationSettings) -> ResultSender:
        """The destination's sender: DICOMweb STOW-RS for `type: stow`, else C-STORE."""
        timeout, echo_timeout = (
            self.settings.delivery.timeout_seconds,
            self.settings.delivery.echo_timeout_seconds,
        )
        if dest.type == "stow":
            return StowSender(dest, timeout_s=timeout, echo_timeout_s=echo_timeout)
        return DicomSender(dest, self.settings.dicom.ae_title, timeout_s=timeout, echo_timeout_s=echo_timeout)

    def _on_batch(self, record: BatchRecord) -> None:
        self.store.record_batch(record.job_ids)

    def _spool_of(self, path: Path) -> Spool:
        """The spool holding `path`: the spool itself, or (scale-out) one receiver's folder in it."""
        root = self.settings.storage.spool_dir.resolve()
        folder = path.parent.resolve()
        if folder == root:
            return self.spool
        if folder.parent != root:
            raise ValueError("path is not in the spool")
        with self._spools_lock:
            spool = self._spools.get(folder)
            if spool is None:  # released, never written to here: no space checks
                spool = self._spools[folder] = Spool(folder, max_used_fraction=1.0, min_free_bytes=0)
        return spool

    def _release(self, paths: Sequence[Path], handed_off_at: float) -> None:
        for p in paths:
            try:
                self._spool_of(p).remove(p, unless_written_after=handed_off_at)
            except (OSError, ValueError) as exc:
                log.warning("could not remove a spooled instance: %s", exc)

    def _spool_has_room(self) -> bool:
        """The same watermark and floor the SCP applies before answering a C-STORE."""
        try:
            self.spool.check_space()
        except OSError:
            return False
        return True

    def readiness(self) -> dict[str, bool]:
        """The checks of /readyz. `destination:<name>` (a cached C-ECHO) is reported but does not decide
        readiness: a PACS that is down must not take radai out of service (the queue holds its results)."""
        spool = self.settings.storage.spool_dir
        served = self.host.active if self.host is not None else self.registry.selection().active
        checks = {
            "spool_writable": spool.is_dir() and os.access(spool, os.W_OK),
            "database": self.store.ping(),
            "models_loaded": bool(served),
            "disk_free": self._spool_has_room(),
        }
        if self.streams is not None:
            checks["job_streams"] = self.streams.ping()
        return {**checks, **self.probe.checks()}

    def start(self) -> None:
        self.settings.storage.spool_dir.mkdir(parents=True, exist_ok=True)
        if self.host is not None:
            self.host.start()  # loads and checks every selected model version; refuses to start with none
        elif not self.registry.selection().active:
            raise ConfigError(f"no model package is registered (registry {self.registry.root})")
        if self.runs_models:
            self.delivery.start()  # resumes the deliveries a stopped process left
        if not self.distributed:
            for job_id in self.store.unsettled_jobs():
                self.workflow.delivery_settled(job_id)
        if self.worker is not None:
            self.worker.start()
        if self.receiver is not None:
            self.receiver.start()
        threading.Thread(target=self._probe_destinations, name="radai-destination-probe", daemon=True).start()
        if self.coordinator is not None:
            threading.Thread(target=self._sweep_parts, name="radai-study-parts", daemon=True).start()
        models = self.host.active if self.host is not None else self.registry.selection().active.values()
        role = f"{self.settings.scaleout.role} (distributed)" if self.distributed else "embedded"
        where = (
            f"listening as {self.settings.dicom.ae_title} on {self.settings.dicom.host}:{self.receiver.port}"
            if self.receiver is not None
            else "taking jobs from the streams"
        )
        log.info("radai %s, %s; models: %s", role, where, ", ".join(p.key for p in models))

    def _probe_destinations(self) -> None:
        """C-ECHO every destination each `delivery.echo_cache_seconds` (at least 5 s), so that
        radai_destination_up stays current without anyone polling /readyz."""
        interval = max(self.settings.delivery.echo_cache_seconds, 5.0)
        while not self._stopping.wait(interval):
            try:
                self.probe.checks()
            except Exception:  # a sender bug must not end the probe
                log.exception("destination probe failed")

    def _sweep_parts(self, every_s: float = 60.0) -> None:
        """Scale-out receivers: plan studies left waiting for a receiver that went away for good."""
        assert self.coordinator is not None
        while not self._stopping.wait(every_s):
            try:
                self.coordinator.sweep(self.settings.scaleout.abandoned_part_seconds)
            except Exception:  # the database away for a moment: try again next time
                log.exception("sweep of abandoned study parts failed")

    def stop(self) -> None:
        self._stopping.set()
        log.info("radai stopping: no new associations; finishing running jobs")
        if self.receiver is not None:
            self.receiver.stop()
        if self.worker is not None:
            self.worker.stop()
        self.workflow.close()
        self.delivery.stop()
        if self.host is not None:
            self.host.stop()
        if self.streams is not None:
            self.streams.close()
        if self.parts is not None:
            self.parts.close()
        self.store.close()
        self.audit_log.close()
        log.info("radai stopped")


def serve(settings: Settings) -> None:
    """Run until interrupted: DICOM receiver and HTTP API in one process (or the role's part of them)."""
    import uvicorn

    from radai.api.app import create_api
    from radai.api.studies import retry_dead_deliveries

    server = Server(settings)
    server.start()
    try:
        admin = RegistryAdmin(server.registry, server.host, settings, server.audit)
        api = create_api(
            server.store,
            server.readiness,
            admin,
            api_tokens(settings),
            server.audit_log,
            destinations=server.destinations,
            retry=retry_dead_deliveries(server.store),
        )
        uvicorn.run(api, host=settings.api.host, port=settings.api.port, log_level="warning")
    finally:
        server.stop()
