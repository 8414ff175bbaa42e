"""Domain values shared by every layer: jobs, their states and the pipeline stages they pass."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum


class Stage(StrEnum):
    """Pipeline stages in order; each job records the time it reached each one."""

    RECEIVED = "received"  # last instance of the study received
    COMPLETE = "complete"  # study declared complete
    QUEUED = "queued"
    INFERRED = "inferred"
    ENCODED = "encoded"
    DELIVERED = "delivered"


class Priority(StrEnum):
    """Scheduling lane of a study's jobs: STAT patches go into the next batch; routine and background patches
    are promoted one lane per `scheduler.aging_seconds` of waiting, so none starves."""

    STAT = "stat"
    ROUTINE = "routine"
    BACKGROUND = "background"

    @property
    def rank(self) -> int:
        return ("stat", "routine", "background").index(self.value)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DELIVERING = "delivering"  # results encoded, waiting in the outbound queue of at least one destination
    DELIVERED = "delivered"  # every destination acknowledged every result
    FAILED = "failed"
    DEAD_LETTER = "dead-letter"  # a destination refused or was unreachable past its retry limit


class DeliveryState(StrEnum):
    """One (job, destination) delivery in the outbound queue."""

    QUEUED = "queued"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"  # past the retry limit; `radai studies retry UID` queues it again


class StudyState(StrEnum):
    COMPLETE = "complete"  # assembled, jobs being created
    PROCESSING = "processing"
    DONE = "done"  # every job delivered
    FAILED = "failed"  # at least one job failed
    DEAD_LETTER = "dead-letter"  # results computed, a destination past its retry limit (re-triable)
    NO_MATCH = "no-match"  # no model accepted any series


def hashed(uid: str) -> str:
    """A short, stable, non-reversible token for a UID, for logs (never log the UID itself)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def job_id_for(study_uid: str, series_uid: str, model_key: str) -> str:
    """Deterministic job id: the same study, series and model always give the same job (no duplicates)."""
    return hashlib.sha256(f"{study_uid}|{series_uid}|{model_key}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    study_uid: str
    series_uid: str
    model_key: str  # id@version
    first_received: float
    last_received: float
    completed_at: float
    priority: Priority = Priority.ROUTINE


@dataclass(frozen=True)
class DeliveryRecord:
    """The state of one job's results towards one destination."""

    job_id: str
    destination: str
    study_uid: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str = ""
    files: tuple[str, ...] = ()
    updated_at: float = 0.0


@dataclass(frozen=True)
class ShadowRecord:
    """A shadow version's run beside a job: its results were not sent, its agreement with the active
    version's was measured (Dice per label for segmentation; matched findings for detection)."""

    job_id: str  # the active version's job
    model_key: str  # the shadow version, id@version
    outcome: str  # "compared" or "failed"
    agreement: dict[str, float] = field(default_factory=dict)  # e.g. {"dice:Lung": 0.97} or {"f1": 1.0}
    reason: str = ""
    at: float = 0.0


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    study_uid: str
    series_uid: str
    model_key: str
    state: JobState
    reason: str
    stages: dict[str, float] = field(default_factory=dict)
    batches: int = 0
    shared_batches: int = 0  # batches that also held patches of other jobs
    outputs: tuple[str, ...] = ()
    deliveries: tuple[DeliveryRecord, ...] = ()
    shadow: tuple[ShadowRecord, ...] = ()
    priority: Priority = Priority.ROUTINE


@dataclass(frozen=True)
class StudyRecord:
    study_uid: str
    state: StudyState
    calling_ae: str
    instances: int
    series: int
    first_received: float
    last_received: float
    completed_at: float
    jobs: tuple[JobRecord, ...] = ()
