"""Composition root: builds the server from settings and starts/stops it in order.

Start-up order: store -> models (each validated with its reference check) -> schedulers -> delivery queue
(resuming what a stopped process left) -> workflow -> DICOM receiver -> HTTP. Shutdown in reverse, draining:
the receiver stops taking studies, running jobs finish (their results stay queued on disk), the delivery
workers finish their current attempt, schedulers resolve every pending patch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicom_router.events import ScpObserver
from dicom_router.scp import ScpOptions
from dicom_router.security import AllowedPeer
from radai.api.auth import Tokens
from radai.audit import NO_AUDIT, Auditor, Event
from radai.config import DicomSettings, Settings
from radai.errors import NotFoundError
from radai.hosting import ModelHost
from radai.models.archive import ArchiveLimits, extract_package
from radai.models.registry import ModelPackage, RunnerFactory, validate_package
from radai.ports import ModelRunner
from radai.reception import NamedPeer
from radai.runtime import create_runner
from radai.senders import router_tls
from radai.storage.model_store import Entry, ModelStore

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
