"""Protocols the application services talk to; adapters implement them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset

from radai.domain import JobSpec, JobState, Stage, StudyRecord, StudyState


class ModelRunner(Protocol):
    """Runs one model on a batch: (N, C, X, Y, Z) float32 in, (N, K, X, Y, Z) float32 scores out."""

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]: ...

    def close(self) -> None: ...


class ResultSender(Protocol):
    """Delivers result datasets to one destination; raises radai.errors.DeliveryError on failure."""

    @property
    def name(self) -> str: ...

    def send(self, datasets: Sequence[Dataset]) -> None: ...


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

    def list_studies(self, limit: int = 100) -> list[StudyRecord]: ...

    def get_study(self, study_uid: str) -> StudyRecord: ...


class PatchInferer(Protocol):
    """Runs patches of one job through a model's batching scheduler (blocking the calling job thread)."""

    def infer(self, job_id: str, patches: NDArray[np.float32]) -> NDArray[np.float32]: ...
