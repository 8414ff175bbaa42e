"""`/api/v1/studies`: studies with their jobs (stage timestamps, outcome, reason, result UIDs, deliveries),
filtered by state, model and time, and the re-queueing of a study's dead-lettered deliveries.

Reads need the read or admin token once auth is on; the retry is a write and needs the admin token
(radai.api.auth).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query

from radai.api.auth import Tokens, require_admin, require_read
from radai.domain import JobState, StudyState
from radai.errors import NotFoundError
from radai.ports import Clock, DeliveryQueue, JobStore

StudyRetry = Callable[[str], int]
"""Re-queues a study's dead-lettered deliveries; returns how many (0: nothing to retry). Raises
radai.errors.NotFoundError for an unknown study."""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def retry_dead_deliveries(store: DeliveryQueue, clock: Clock = time.time) -> StudyRetry:
    """The StudyRetry of a running server: the queue rows go back to queued with their attempts reset (the
    study to processing); each destination's worker picks them up on its next poll (`delivery.poll_seconds`)."""

    def retry(study_uid: str) -> int:
        return store.retry_dead(study_uid, clock())

    return retry


def epoch_seconds(when: dt.datetime) -> float:
    """Seconds since the epoch; a datetime without a timezone is read as UTC (as the CLI prints times).
    Computed by subtraction, which never overflows for datetimes near year 1 or 9999."""
    aware = when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
    return (aware - _EPOCH).total_seconds()


def studies_router(store: JobStore, tokens: Tokens, retry: StudyRetry) -> APIRouter:
    router = APIRouter(
        prefix="/api/v1/studies", tags=["studies"], dependencies=[Depends(require_read(tokens))]
    )

    @router.get("")
    def list_studies(
        state: Annotated[StudyState | None, Query(description="Only studies in this state.")] = None,
        job_state: Annotated[
            JobState | None, Query(description="Only studies with a job in this state (of `model` if given).")
        ] = None,
        model: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=200,
                description="Only studies with a job of this model id (every version) or id@version.",
            ),
        ] = None,
        since: Annotated[
            dt.datetime | None,
            Query(description="Only studies complete at or after this ISO 8601 time (no timezone: UTC)."),
        ] = None,
        until: Annotated[
            dt.datetime | None, Query(description="Only studies complete before this ISO 8601 time.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="At most this many, newest first.")] = 100,
    ) -> list[dict[str, Any]]:
        """Studies newest first (by the time they were complete), each with its jobs: stage timestamps,
        state, reason, result UIDs and each delivery's state per destination."""
        found = store.list_studies(
            limit,
            state=state,
            job_state=job_state,
            model=model,
            since=epoch_seconds(since) if since is not None else None,
            until=epoch_seconds(until) if until is not None else None,
        )
        return [asdict(s) for s in found]

    @router.get("/{study_uid}")
    def get_study(study_uid: str) -> dict[str, Any]:
        """One study with its jobs and deliveries."""
        try:
            return asdict(store.get_study(study_uid))
        except NotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc

    @router.post("/{study_uid}/retry", status_code=202, dependencies=[Depends(require_admin(tokens))])
    def retry_study(study_uid: str) -> dict[str, Any]:
        """Queue the study's dead-lettered deliveries again (attempts reset); the running server sends them
        within `delivery.poll_seconds`. 409 when the study has none."""
        try:
            count = retry(study_uid)
        except NotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        if count == 0:
            raise HTTPException(status_code=409, detail=f"study {study_uid} has no dead-lettered deliveries")
        return {"study_uid": study_uid, "deliveries_requeued": count}

    return router
