"""What the status page shows, gathered from the job store, the model registry, the readiness checks and the
Prometheus registry of this process. Only aggregates, UID fingerprints and model ids: never a UID or a
patient value."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

import radai
from dicom_router.uids import uid_fingerprint
from radai.domain import Stage, StudyRecord, StudyState
from radai.metrics import REGISTRY, STAGES
from radai.ports import JobStore

ReadinessCheck = Callable[[], dict[str, bool]]
ModelView = dict[str, Any]

RECENT_STUDIES = 200
RECENT_JOBS = 20
REASON_CHARS = 80
_DESTINATION = "destination:"


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """The q-quantile of a cumulative histogram given as (upper bound, cumulative count) pairs, the
    `+Inf` bucket included, estimated the way PromQL's histogram_quantile does: linear interpolation
    within the bucket holding the rank (the first bucket starts at 0); the highest finite bound when the
    rank falls in the +Inf bucket; NaN without observations or with fewer than two buckets.

    Hand-written because prometheus_client offers no quantile estimate and PromQL is not at hand here."""
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return math.nan
    total = ordered[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    index = next(i for i, (_, count) in enumerate(ordered) if count >= rank)
    if index == len(ordered) - 1:
        return ordered[-2][0]
    upper, count = ordered[index]
    if index == 0 and upper <= 0:
        return upper
    lower, below = (0.0, 0.0) if index == 0 else ordered[index - 1]
    in_bucket = count - below
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket


@dataclass(frozen=True)
class StageLatency:
    """Jobs of one model that passed one stage, and the estimated median and 95th percentile (seconds)."""

    stage: str
    model: str
    count: int
    p50: float
    p95: float


@dataclass(frozen=True)
class JobRow:
    """One recent job, its study shown only as a fingerprint."""

    study: str
    model: str
    state: str
    priority: str
    reason: str
    completed_at: float | None
    end_to_end: float | None


@dataclass(frozen=True)
class DestinationHealth:
    """A destination's last C-ECHO (None: not checked) and its outbound queue."""

    name: str
    up: bool | None
    pending: int
    dead: int


@dataclass(frozen=True)
class Status:
    """Everything the page shows, at one moment."""

    version: str
    generated_at: float
    ready: bool
    checks: dict[str, bool]
    study_states: dict[str, int]
    studies_seen: int
    jobs: tuple[JobRow, ...]
    latencies: tuple[StageLatency, ...]
    queue_depth: dict[str, float]
    destinations: tuple[DestinationHealth, ...]
    models: tuple[ModelView, ...]


def _samples(registry: CollectorRegistry, family: str) -> Iterable[tuple[str, dict[str, str], float]]:
    for metric in registry.collect():
        if metric.name == family:
            for sample in metric.samples:
                yield sample.name, sample.labels, sample.value


def stage_latencies(registry: CollectorRegistry = REGISTRY) -> list[StageLatency]:
    """count, p50 and p95 of `radai_study_stage_seconds` per (stage, model), stages in pipeline order."""
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for name, labels, value in _samples(registry, "radai_study_stage_seconds"):
        if name.endswith("_bucket"):
            key = (labels["stage"], labels["model"])
            buckets.setdefault(key, []).append((float(labels["le"]), value))
    order = {stage: i for i, stage in enumerate(STAGES)}
    rows = [
        StageLatency(
            stage, model, int(max(c for _, c in b)), histogram_quantile(0.5, b), histogram_quantile(0.95, b)
        )
        for (stage, model), b in buckets.items()
    ]
    return sorted(rows, key=lambda r: (r.model, order.get(r.stage, len(order)), r.stage))


def gauge_values(family: str, label: str, registry: CollectorRegistry = REGISTRY) -> dict[str, float]:
    """The values of a one-label gauge, keyed by that label's value."""
    return {labels[label]: value for _, labels, value in _samples(registry, family) if label in labels}


def recent_jobs(studies: Sequence[StudyRecord], limit: int = RECENT_JOBS) -> list[JobRow]:
    """The jobs of the most recent studies (newest first), at most `limit`."""
    rows: list[JobRow] = []
    for study in studies:
        for job in study.jobs:
            delivered = job.stages.get(Stage.DELIVERED.value)
            reason = job.reason if len(job.reason) <= REASON_CHARS else job.reason[: REASON_CHARS - 1] + "…"
            rows.append(
                JobRow(
                    study=uid_fingerprint(study.study_uid),
                    model=job.model_key,
                    state=job.state.value,
                    priority=job.priority.value,
                    reason=reason,
                    completed_at=study.completed_at or None,
                    end_to_end=None if delivered is None else max(delivered - study.first_received, 0.0),
                )
            )
            if len(rows) >= limit:
                return rows
    return rows


def destination_health(
    checks: dict[str, bool], pending: dict[str, float], dead: dict[str, float]
) -> list[DestinationHealth]:
    """One row per destination named by a readiness check or by the delivery queue gauges."""
    echoed = {k.removeprefix(_DESTINATION): v for k, v in checks.items() if k.startswith(_DESTINATION)}
    names = sorted(set(echoed) | set(pending) | set(dead))
    return [DestinationHealth(n, echoed.get(n), int(pending.get(n, 0)), int(dead.get(n, 0))) for n in names]


def collect_status(
    store: JobStore,
    models: Callable[[], list[ModelView]],
    readiness: ReadinessCheck,
    registry: CollectorRegistry = REGISTRY,
) -> Status:
    """Read every source once."""
    checks = readiness()
    studies = store.list_studies(limit=RECENT_STUDIES)
    counted = Counter(s.state.value for s in studies)
    return Status(
        version=radai.__version__,
        generated_at=time.time(),
        # as /readyz: destinations are reported, not required (their results wait in the outbound queue)
        ready=all(ok for name, ok in checks.items() if not name.startswith(_DESTINATION)),
        checks=checks,
        study_states={state.value: counted.get(state.value, 0) for state in StudyState},
        studies_seen=len(studies),
        jobs=tuple(recent_jobs(studies)),
        latencies=tuple(stage_latencies(registry)),
        queue_depth=gauge_values("radai_scheduler_queue_depth", "model", registry),
        destinations=tuple(
            destination_health(
                checks,
                gauge_values("radai_deliveries_pending", "destination", registry),
                gauge_values("radai_deliveries_dead", "destination", registry),
            )
        ),
        models=tuple(models()),
    )
