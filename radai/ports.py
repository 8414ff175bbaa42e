"""Protocols the application services talk to; adapters implement them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset

from radai.domain import (
    DeliveryRecord,
    DeliveryState,
    JobRecord,
    JobSpec,
    JobState,
    Priority,
    ShadowRecord,
    Stage,
    StudyRecord,
    StudyState,
)
from radai.outputs import Output, OutputPlan

if TYPE_CHECKING:
    import torch


class ModelRunner(Protocol):
    """Runs one model on a batch: (N, C, X, Y, Z) float32 in, (N, K, X, Y, Z) float32 scores out."""

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]: ...

    def close(self) -> None: ...


class ResultSender(Protocol):
    """Delivers result datasets to one destination; raises radai.errors.DeliveryError on failure."""

    @property
    def name(self) -> str: ...

    def send(self, datasets: Sequence[Dataset]) -> None: ...

    def echo(self) -> bool:
        """Whether the destination answers now (C-ECHO for DICOM peers); never raises."""
        ...


class Clock(Protocol):
    def __call__(self) -> float: ...


class JobStore(Protocol):
    """Persists studies and jobs with their stage timestamps (SQLite embedded, PostgreSQL later)."""

    def upsert_study(self, record: StudyRecord) -> None: ...

    def set_study_state(self, study_uid: str, state: StudyState) -> None: ...

    def add_job(self, spec: JobSpec) -> None: ...

    def mark_stage(self, job_id: str, stage: Stage, at: float) -> None: ...

    def finish_job(
        self, job_id: str, state: JobState, reason: str = "", outputs: Sequence[str] = ()
    ) -> None: ...

    def record_batch(self, job_ids: Sequence[str]) -> None: ...

    def record_shadow(self, record: ShadowRecord) -> None: ...

    def list_studies(
        self,
        limit: int = 100,
        *,
        state: StudyState | None = None,
        job_state: JobState | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[StudyRecord]:
        """Newest first; `model` is an id (every version) or id@version, `since`/`until` epoch seconds of
        the study's completion (since inclusive, until exclusive)."""
        ...

    def get_study(self, study_uid: str) -> StudyRecord: ...

    def get_job(self, job_id: str) -> JobRecord: ...

    def settle_job(self, job_id: str, at: float) -> JobState | None: ...

    def settle_study(self, study_uid: str) -> StudyState | None: ...

    def remember_spool(self, study_uid: str, paths: Sequence[Path]) -> None: ...

    def spool_paths(self, study_uid: str) -> list[Path]: ...

    def forget_spool(self, study_uid: str) -> None: ...


class DeliveryQueue(Protocol):
    """The persistent outbound queue: one row per (job, destination) (SQLite embedded)."""

    def enqueue_delivery(
        self, job_id: str, study_uid: str, destination: str, files: Sequence[str], at: float
    ) -> DeliveryState: ...

    def claim_delivery(self, destination: str, now: float) -> DeliveryRecord | None: ...

    def update_delivery(
        self,
        job_id: str,
        destination: str,
        state: DeliveryState,
        attempts: int,
        next_attempt_at: float,
        error: str,
        at: float,
    ) -> None: ...

    def resume_deliveries(self, claimed_before: float | None = None) -> int: ...

    def deliveries_for_job(self, job_id: str) -> tuple[DeliveryRecord, ...]: ...

    def count_deliveries(self, destination: str, state: DeliveryState) -> int: ...

    def retry_dead(self, study_uid: str, at: float) -> int: ...


@runtime_checkable
class DeviceRunner(ModelRunner, Protocol):
    """A runner that also takes torch tensors where they are (on a GPU: no trip through host memory)."""

    @property
    def device(self) -> str:
        """Where it computes: `cpu` or `cuda:N`."""
        ...

    def run_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) float32 on any device -> (N, K, *spatial) float32 on `device`; raises as `run`."""
        ...


class PatchInferer(Protocol):
    """Runs patches of one job through a model's batching scheduler (blocking the calling job thread)."""

    def infer(
        self, job_id: str, patches: NDArray[np.float32], priority: Priority = Priority.ROUTINE
    ) -> NDArray[np.float32]: ...


@runtime_checkable
class DeviceInferer(PatchInferer, Protocol):
    """A PatchInferer whose model runs on a device that takes tensors: a job prepares its volume, cuts its
    windows and blends their scores on the device `job_device` gives it (None: on the host, as numpy)."""

    def job_device(self) -> str | None:
        """The device for a new job's work (each call may name the next of several GPUs)."""
        ...

    def infer_tensor(
        self, job_id: str, patches: torch.Tensor, priority: Priority = Priority.ROUTINE
    ) -> torch.Tensor:
        """(n, C, *patch) on `device` -> (n, K, *patch) on `device`, blocking like `infer`."""
        ...


class ResultDelivery(Protocol):
    """Takes a job's results for delivery to every destination (radai.delivery: a persistent queue)."""

    @property
    def destinations(self) -> tuple[str, ...]: ...

    @property
    def plans(self) -> Mapping[str, OutputPlan]:
        """What each destination gets (the workflow builds their union)."""
        ...

    def submit(self, job_id: str, study_uid: str, outputs: Sequence[Output]) -> None: ...
