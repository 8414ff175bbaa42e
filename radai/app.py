"""Composition root: builds the server from settings and starts/stops it in order.

Start-up order: store -> models (each validated with its reference check) -> schedulers -> delivery queue
(resuming what a stopped process left) -> workflow -> DICOM receiver -> HTTP. Shutdown in reverse, draining:
the receiver stops taking studies, running jobs finish (their results stay queued on disk), the delivery
workers finish their current attempt, schedulers resolve every pending patch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dicom_router.events import ScpObserver
from dicom_router.receiver import Receiver
from dicom_router.scp import ScpOptions
from dicom_router.security import AllowedPeer
from radai.api.auth import Tokens
from radai.audit import NO_AUDIT, Auditor, Event
from radai.config import DestinationSettings, DicomSettings, Settings
from radai.delivery import DeliveryService, DestinationProbe, Outbox, RetryPolicy, plan_from_settings
from radai.destination_admin import ServerDestinations
from radai.errors import ConfigError, NotFoundError
from radai.hosting import HostOptions, ModelHost
from radai.models.archive import ArchiveLimits, extract_package
from radai.models.registry import ModelPackage, RunnerFactory, validate_package
from radai.ports import ModelRunner, ResultSender
from radai.reception import NamedPeer, ReceptionObserver
from radai.runtime import RUNTIME_OPTIONS, create_runner
from radai.scheduling.loop import BatchRecord
from radai.senders import DicomSender, router_tls
from radai.storage.model_store import Entry, ModelStore
from radai.storage.sqlite import SqliteJobStore
from radai.storage.sqlite_audit import SqliteAuditLog
from radai.stow import StowSender
from radai.workflow import Workflow

log = logging.getLogger(__name__)
API_ADMIN = "api:admin"  # the actor of audit records made through the HTTP API's admin routes


def describe(runner: ModelRunner) -> str:
    providers = getattr(runner, "providers", None)
    return ", ".join(providers) if isinstance(providers, list | tuple) else type(runner).__name__


def make_runner_factory(device: str) -> RunnerFactory:
    def factory(backend: str, path: Path, channels: int) -> ModelRunner:
        return create_runner(backend, path, output_channels=channels, device=device)

    return factory


def named_senders(dicom: DicomSettings) -> list[NamedPeer]:
    """The allow-list entries with the names they carry in metrics and the audit log."""
    return [
        NamedPeer(p.name or p.ae_title, AllowedPeer(p.ae_title, p.network)) for p in dicom.allowed_peers or ()
    ]


def scp_options(dicom: DicomSettings, observer: ScpObserver | None = None) -> ScpOptions:
    """The DICOM receiver's security and limits, from the `dicom:` settings."""
    allowed = None
    if dicom.allowed_peers is not None:
        allowed = [AllowedPeer(p.ae_title, p.network) for p in dicom.allowed_peers]
    return ScpOptions(
        observer=observer,
        allowed=allowed,
        require_called_ae=dicom.require_called_ae,
        tls=router_tls(dicom.tls),
        max_associations=dicom.max_associations,
        max_connections=dicom.max_connections,
        acse_timeout_s=dicom.acse_timeout_seconds,
        dimse_timeout_s=dicom.dimse_timeout_seconds,
        network_timeout_s=dicom.network_timeout_seconds,
        max_pdu_size=dicom.max_pdu_size,
        max_inflated_bytes=dicom.max_inflated_bytes,
        max_message_bytes=max(dicom.max_dataset_bytes, dicom.max_pdu_size),
        max_association_s=dicom.max_association_seconds,
    )


def batches_in_flight(settings: Settings) -> int:
    """`scheduler.batches_in_flight`, or 2 when the models run on a CUDA device, else 1."""
    if settings.scheduler.batches_in_flight is not None:
        return settings.scheduler.batches_in_flight
    device = settings.scheduler.device
    if device == "cuda":
        return 2
    if device == "auto":
        import torch

        return 2 if torch.cuda.is_available() else 1
    return 1


def model_store(settings: Settings) -> ModelStore:
    """The registry: installed packages under the registry folder, plus the bundled (or configured) ones."""
    return ModelStore(settings.registry_dir, settings.models.search_paths(), settings.models.enabled)


def model_view(entry: Entry, holding: int | None = None) -> dict[str, Any]:
    """One registered version as the API and `radai models show` describe it."""
    c = entry.package.card
    return {
        "id": c.id,
        "version": c.version,
        "key": c.key,
        "name": c.name,
        "task": c.task,
        "kind": c.kind,
        "modality": c.modality,
        "body_part": c.body_part,
        "labels": [lab.name for lab in c.labels],
        "consumes": c.consumes.model if c.consumes else None,
        "sha256": c.runtime.sha256,
        "source": entry.source,
        "active": entry.active,
        "shadow": entry.shadow,
        "jobs_holding": holding,
        "intended_use": c.intended_use,
        "licence": c.licence,
        "not_for_clinical_use": c.not_for_clinical_use,
    }


class RegistryAdmin:
    """The registry writes of the HTTP API (radai.api.models.ModelAdmin): each takes effect in the running
    server at once (the host reconciles right after), without a restart."""

    def __init__(
        self, registry: ModelStore, host: ModelHost | None, settings: Settings, audit: Auditor = NO_AUDIT
    ) -> None:
        self._registry = registry
        self._host = host
        self._audit = audit
        self.max_upload_bytes = settings.models.max_upload_bytes
        self._validate = make_validator(settings.scheduler.device)

    def _sync(self) -> None:
        if self._host is not None:
            self._host.reconcile()

    def views(self) -> list[dict[str, Any]]:
        loaded = self._host.loaded if self._host is not None else {}
        return [model_view(e, loaded.get(e.key)) for e in self._registry.entries()]

    def add_archive(self, archive: Path, workdir: Path) -> tuple[dict[str, Any], bool]:
        limits = ArchiveLimits(max_total_bytes=self.max_upload_bytes)
        added = self._registry.add(extract_package(archive, workdir, limits), self._validate)
        if added.new:
            self._audit(Event.MODEL_ADDED, API_ADMIN, added.entry.key)
        self._sync()
        return model_view(self._registry.find(added.entry.key)), added.new

    def activate(self, ref: str) -> dict[str, Any]:
        entry = self._registry.activate(ref)
        self._audit(Event.MODEL_ACTIVATED, API_ADMIN, entry.key)
        self._sync()
        return model_view(entry)

    def set_shadow(self, model_id: str, version: str | None) -> dict[str, Any] | None:
        if version is None:
            if not self._registry.clear_shadow(model_id):
                raise NotFoundError(f"model {model_id!r} has no shadow version")
            self._audit(Event.MODEL_SHADOW, API_ADMIN, model_id, "off")
            self._sync()
            return None
        entry = self._registry.set_shadow(f"{model_id}@{version}")
        self._audit(Event.MODEL_SHADOW, API_ADMIN, entry.key, "on")
        self._sync()
        return model_view(entry)

    def remove(self, ref: str) -> list[str]:
        removed = self._registry.remove(ref)
        for key in removed:
            self._audit(Event.MODEL_REMOVED, API_ADMIN, key)
        self._sync()
        return removed


def api_tokens(settings: Settings) -> Tokens:
    admin, read = settings.api.admin_token, settings.api.read_token
    return Tokens(
        admin=admin.get_secret_value() if admin is not None else None,
        read=read.get_secret_value() if read is not None else None,
    )


def make_validator(device: str) -> Callable[[Path], ModelPackage]:
    """Registration checks with a runner on `device` (radai.models.registry.validate_package)."""
    factory = make_runner_factory(device)

    def validate(directory: Path) -> ModelPackage:
        package, _ = validate_package(directory, factory)
        return package

    return validate


class Server:
    """The radai process: receiver, workflow, schedulers and store, built from settings."""

    def __init__(self, settings: Settings) -> None:
        if settings.scaleout.mode != "embedded":
            # The PostgreSQL store and Redis job streams exist as parts; the receiver/worker processes that
            # use them are not wired yet. Refuse rather than silently run embedded.
            raise ConfigError("invalid setting 'scaleout.mode': distributed operation is not available yet")
        self.settings = settings
        self._stopping = threading.Event()
        RUNTIME_OPTIONS.tensorrt_cache = settings.storage.data_dir / "tensorrt"
        RUNTIME_OPTIONS.tensorrt_fp16 = settings.scheduler.tensorrt_fp16
        RUNTIME_OPTIONS.triton_url = settings.scheduler.triton_url
        self.store = SqliteJobStore(settings.storage.database)
        self.audit_log = SqliteAuditLog(settings.storage.database)
        self.audit = Auditor(self.audit_log)
        self.registry = model_store(settings)
        self.host = ModelHost(
            self.registry,
            make_runner_factory(settings.scheduler.device),
            HostOptions(
                max_wait_s=settings.scheduler.max_wait_seconds,
                poll_s=settings.models.poll_seconds,
                aging_s=settings.scheduler.aging_seconds,
                timeout_s=settings.scheduler.inference_timeout_seconds,
                in_flight=batches_in_flight(settings),
                devices=tuple(settings.scheduler.devices),
                runner_on=make_runner_factory,
                on_batch=self._on_batch,
            ),
        )
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
        )
        self.probe = DestinationProbe(senders, ttl_seconds=settings.delivery.echo_cache_seconds)
        self.destinations = ServerDestinations(settings.destinations, senders, self.probe, self.store)
        self.workflow = Workflow(
            self.host,
            self.delivery,
            self.store,
            workers=settings.scheduler.job_workers,
            release_instances=self._release,
            rejected_dir=settings.storage.data_dir / "rejected",
            priorities=settings.scheduler.priorities,
        )
        self.delivery.add_listener(self.workflow.delivery_settled)
        self.receiver = Receiver(
            settings.dicom.ae_title,
            settings.dicom.host,
            settings.dicom.port,
            settings.storage.spool_dir,
            settings.completion.study_quiet_seconds,
            self.workflow.on_study_complete,
            release_grace_seconds=settings.completion.association_grace_seconds,
            spool_max_used_fraction=settings.storage.spool_max_used_fraction,
            spool_min_free_bytes=settings.storage.spool_min_free_bytes,
            rules=settings.completion.rules(),
            scp_options=scp_options(
                settings.dicom, ReceptionObserver(named_senders(settings.dicom), self.audit)
            ),
        )

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

    def _release(self, paths: Sequence[Path], handed_off_at: float) -> None:
        for p in paths:
            try:
                self.receiver.spool.remove(p, unless_written_after=handed_off_at)
            except (OSError, ValueError) as exc:
                log.warning("could not remove a spooled instance: %s", exc)

    def _spool_has_room(self) -> bool:
        """The same watermark and floor the SCP applies before answering a C-STORE."""
        try:
            self.receiver.spool.check_space()
        except OSError:
            return False
        return True

    def readiness(self) -> dict[str, bool]:
        """The checks of /readyz. `destination:<name>` (a cached C-ECHO) is reported but does not decide
        readiness: a PACS that is down must not take radai out of service (the queue holds its results)."""
        spool = self.settings.storage.spool_dir
        return {
            "spool_writable": spool.is_dir() and os.access(spool, os.W_OK),
            "database": self.store.ping(),
            "models_loaded": bool(self.host.active),
            "disk_free": self._spool_has_room(),
            **self.probe.checks(),
        }

    def start(self) -> None:
        self.settings.storage.spool_dir.mkdir(parents=True, exist_ok=True)
        self.host.start()  # loads and checks every selected model version; refuses to start with none
        self.delivery.start()  # resumes the deliveries a stopped process left
        for job_id in self.store.unsettled_jobs():
            self.workflow.delivery_settled(job_id)
        self.receiver.start()
        threading.Thread(target=self._probe_destinations, name="radai-destination-probe", daemon=True).start()
        log.info(
            "radai listening as %s on %s:%d; models: %s",
            self.settings.dicom.ae_title,
            self.settings.dicom.host,
            self.receiver.port,
            ", ".join(p.key for p in self.host.active),
        )

    def _probe_destinations(self) -> None:
        """C-ECHO every destination each `delivery.echo_cache_seconds` (at least 5 s), so that
        radai_destination_up stays current without anyone polling /readyz."""
        interval = max(self.settings.delivery.echo_cache_seconds, 5.0)
        while not self._stopping.wait(interval):
            try:
                self.probe.checks()
            except Exception:  # a sender bug must not end the probe
                log.exception("destination probe failed")

    def stop(self) -> None:
        self._stopping.set()
        log.info("radai stopping: no new associations; finishing running jobs")
        self.receiver.stop()
        self.workflow.close()
        self.delivery.stop()
        self.host.stop()
        self.store.close()
        self.audit_log.close()
        log.info("radai stopped")


def serve(settings: Settings) -> None:
    """Run until interrupted: DICOM receiver and HTTP API in one process."""
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
