"""Keeps the registry's active and shadow model versions loaded in a running server, and switches them
without a restart.

`ModelHost` implements the workflow's `ModelCatalog`. `reconcile()` (called every `models.poll_seconds`, and
at once after a write through the HTTP API) loads what the registry now selects — each new version passes its
reference check and gets its runner and batching scheduler *before* it is published — then publishes the new
selection: from then on new jobs start on it. A version no longer selected is unloaded when the last job
holding a lease on it has finished, so in-flight jobs complete on the version they started with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from radai import metrics
from radai.catalog import ModelSlot
from radai.errors import ConfigError, ModelPackageError, OutOfMemoryError, RadaiError
from radai.models.registry import ModelPackage, RunnerFactory, reference_check
from radai.ports import DeviceRunner, ModelRunner
from radai.runtime.memory import batch_for
from radai.runtime.tuning import tuned_batch
from radai.scheduling.loop import BatchRecord, Scheduler
from radai.storage.model_store import ModelStore

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    slot: ModelSlot
    scheduler: Scheduler
    runners: tuple[ModelRunner, ...]
    leases: int = 0
    selected: bool = True


@dataclass(frozen=True)
class HostOptions:
    max_wait_s: float = 0.05
    poll_s: float = 2.0
    aging_s: float = 30.0
    timeout_s: float | None = None
    in_flight: int = 1
    # One runner per device (e.g. each GPU), all serving the model's one queue; empty: the factory's device.
    devices: tuple[str, ...] = ()
    runner_on: Callable[[str], RunnerFactory] | None = None
    on_batch: Callable[[BatchRecord], None] | None = None
    # Share of a GPU's free memory (at load) a model's batches may take; the batch is lowered to fit.
    memory_fraction: float = 0.8
    # Time the model at load at batch 1, 2, 4, ... and serve the smallest batch that runs as fast as the best:
    # `on`, `off`, or `auto` (on where the runner computes on CUDA).
    batch_tuning: str = "off"
    device_path: bool | None = None  # radai.scheduling.loop.Scheduler's: None is its default (CUDA runners)


@dataclass
class _Published:
    active: dict[str, str] = field(default_factory=dict)  # model id -> key
    shadow: dict[str, str] = field(default_factory=dict)


def _describe(runner: ModelRunner) -> str:
    providers = getattr(runner, "providers", None)
    if isinstance(providers, list):
        return ", ".join(str(p) for p in providers)
    return str(getattr(runner, "device", type(runner).__name__))


class ModelHost:
    def __init__(self, store: ModelStore, make_runner: RunnerFactory, options: HostOptions) -> None:
        self._store = store
        self._make_runner = make_runner
        self._options = options
        self._lock = threading.Lock()
        self._reconciling = threading.Lock()  # the poller and an HTTP write may reconcile at the same time
        self._loaded: dict[str, _Loaded] = {}
        self._published = _Published()
        self._failed: set[str] = set()  # versions that failed to load: not retried until a restart
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the catalog the workflow uses ---------------------------------------------------------------------

    def lease_active(self) -> list[ModelSlot]:
        with self._lock:
            held = [self._loaded[key] for key in self._published.active.values()]
            for loaded in held:
                loaded.leases += 1
            return [loaded.slot for loaded in held]

    def lease_shadow(self, model_id: str) -> ModelSlot | None:
        with self._lock:
            key = self._published.shadow.get(model_id)
            if key is None:
                return None
            loaded = self._loaded[key]
            loaded.leases += 1
            return loaded.slot

    def lease(self, key: str) -> ModelSlot:
        """The exact version `id@version` a job was planned with (a scale-out worker runs jobs a receiver
        planned), held until released. A registered version that is not served now is loaded for the job and
        unloaded after its last lease; NotFoundError if it is not registered, ModelPackageError if it fails
        to load."""
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is not None:
                loaded.leases += 1
                return loaded.slot
        with self._reconciling:  # one load at a time, and never beside a reconcile loading the same version
            with self._lock:
                loaded = self._loaded.get(key)
                if loaded is not None:
                    loaded.leases += 1
                    return loaded.slot
            fresh = self._load(self._store.find(key).package)
            fresh.selected = False  # served for the jobs that lease it; reconcile selects it if it is chosen
            with self._lock:
                fresh.leases = 1
                self._loaded[key] = fresh
            return fresh.slot

    def release(self, key: str) -> None:
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is None:
                return
            loaded.leases -= 1
            retire = loaded.leases <= 0 and not loaded.selected
            if retire:
                del self._loaded[key]
        if retire:
            self._unload(loaded)

    # -- what is served ------------------------------------------------------------------------------------

    @property
    def active(self) -> list[ModelPackage]:
        with self._lock:
            return [self._loaded[k].slot.package for k in sorted(self._published.active.values())]

    @property
    def shadow(self) -> list[ModelPackage]:
        with self._lock:
            return [self._loaded[k].slot.package for k in sorted(self._published.shadow.values())]

    @property
    def loaded(self) -> dict[str, int]:
        """Every loaded version and how many jobs hold it (old versions stay until their jobs end)."""
        with self._lock:
            return {key: loaded.leases for key, loaded in sorted(self._loaded.items())}

    def _load(self, package: ModelPackage) -> _Loaded:
        card = package.card
        factories = (
            [self._options.runner_on(d) for d in self._options.devices]
            if self._options.devices and self._options.runner_on is not None
            else [self._make_runner]
        )
        runners: list[ModelRunner] = []
        try:
            reference_check(package, self._make_runner)
            for factory in factories:  # one runner per device, all serving the model's queue
                runners.append(factory(card.runtime.backend, package.weights, card.output.channels))
            batch = self._batch(package, runners)
        except (ModelPackageError, RadaiError) as exc:
            for made in runners:
                made.close()
            raise ModelPackageError(f"model {package.key} failed validation: {exc}") from exc
        scheduler = Scheduler(
            card.id,  # metrics label: the model id (bounded), as for every other per-model metric
            runners,
            batch,
            self._options.max_wait_s,
            on_batch=self._options.on_batch,
            aging_s=self._options.aging_s,
            timeout_s=self._options.timeout_s,
            in_flight=self._options.in_flight,
            backend=card.runtime.backend,
            device_path=self._options.device_path,
        )
        scheduler.start()
        where = "; ".join(_describe(r) for r in runners)
        log.info("model %s loaded (%s, %s)", package.key, card.runtime.backend, where)
        return _Loaded(ModelSlot(package, scheduler), scheduler, tuple(runners))

    def _batch(self, package: ModelPackage, runners: list[ModelRunner]) -> int:
        """The card's batch, lowered to what fits in `memory_fraction` of each GPU's free memory (measured
        on the runner), then to the smallest that runs as fast as the best where `batch_tuning` says so (a
        `whole`-volume model's window is only known per study, so it keeps the card's)."""
        card = package.card
        window = card.input.patch_size
        if window == "whole":
            return card.runtime.max_batch
        batch = card.runtime.max_batch
        for runner in runners:
            try:
                batch = min(
                    batch, batch_for(runner, window, self._options.memory_fraction, batch, package.key)
                )
            except OutOfMemoryError:
                log.warning(
                    "model %s: two windows do not fit on %s; batches of 1", package.key, _describe(runner)
                )
                batch = 1
        first = runners[0]
        on_cuda = isinstance(first, DeviceRunner) and first.device.startswith("cuda")
        tuning = self._options.batch_tuning
        if batch > 1 and (tuning == "on" or (tuning == "auto" and on_cuda)):
            batch = tuned_batch(first, card.input.channels, window, batch, package.key)
        return batch

    @staticmethod
    def _unload(loaded: _Loaded) -> None:
        loaded.scheduler.stop()
        for runner in loaded.runners:
            runner.close()
        log.info("model %s unloaded", loaded.slot.key)

    def reconcile(self) -> bool:
        """Load and publish what the registry selects now; returns whether the served set changed."""
        with self._reconciling:
            return self._reconcile()

    def _reconcile(self) -> bool:
        selection = self._store.selection()
        wanted = [*selection.active.values(), *selection.shadow.values()]
        with self._lock:
            missing = [p for p in wanted if p.key not in self._loaded and p.key not in self._failed]
        fresh: dict[str, _Loaded] = {}
        for package in missing:  # loaded outside the lock: jobs keep leasing the published versions meanwhile
            try:
                fresh[package.key] = self._load(package)
            except RadaiError as exc:
                log.error("%s; keeping the versions served now", exc)
                self._failed.add(package.key)
        retired: list[_Loaded] = []
        with self._lock:
            self._loaded.update(fresh)
            published = _Published()
            for model_id, package in selection.active.items():
                if package.key in self._loaded:
                    published.active[model_id] = package.key
                elif model_id in self._published.active:  # the new version failed: keep serving the old one
                    published.active[model_id] = self._published.active[model_id]
            for model_id in selection.broken & set(self._published.active):
                published.active[model_id] = self._published.active[model_id]  # keep the loaded copy
            for model_id, package in selection.shadow.items():
                if package.key in self._loaded:
                    published.shadow[model_id] = package.key
            changed = published != self._published
            self._published = published
            keep = set(published.active.values()) | set(published.shadow.values())
            for key, loaded in list(self._loaded.items()):
                loaded.selected = key in keep
                if not loaded.selected and loaded.leases <= 0:
                    retired.append(self._loaded.pop(key))
        for loaded in retired:
            self._unload(loaded)
        if changed:
            metrics.MODEL_ACTIVATIONS.inc()
            log.info(
                "serving models: %s%s",
                ", ".join(sorted(published.active.values())) or "none",
                f"; in shadow: {', '.join(sorted(published.shadow.values()))}" if published.shadow else "",
            )
        return changed

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the selected versions (refusing to start when none loads), then poll the registry."""
        self.reconcile()
        if not self._published.active:
            raise ConfigError(
                "no valid model package could be loaded (registry "
                f"{self._store.root}; see the log for each package's problem)"
            )
        self._thread = threading.Thread(target=self._poll, name="radai-model-host", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self._options.poll_s):
            try:
                self.reconcile()
            except Exception:  # the registry is shared with the CLI: never let a bad state kill the poller
                log.exception("model registry poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            loaded, self._loaded = list(self._loaded.values()), {}
            self._published = _Published()
        for item in loaded:
            self._unload(item)
