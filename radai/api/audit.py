"""The audit log over HTTP: `GET /api/v1/audit` (read scope), and the middleware that audits every write.

A write is any POST, PUT, PATCH or DELETE, answered or refused: one `api.write` record naming the route's
template (never the path as sent, which may carry a Study UID or hostile text), the method, the answer's
status code and the scope of the token presented.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from radai.api.auth import Tokens, require_read, scope_of
from radai.audit import AuditLog, Auditor, AuditQuery, Event

_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _epoch(value: dt.datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def audit_router(log: AuditLog, tokens: Tokens) -> APIRouter:
    router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

    @router.get("", dependencies=[Depends(require_read(tokens))])
    def list_audit(
        event: Annotated[Event | None, Query(description="Only this event")] = None,
        after: Annotated[int, Query(ge=0, le=2**62, description="Records after this sequence number")] = 0,
        since: Annotated[dt.datetime | None, Query(description="ISO 8601; naive means UTC")] = None,
        until: Annotated[dt.datetime | None, Query(description="ISO 8601; naive means UTC")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        """Audit records, oldest first; page on with `after` = the last `seq` received."""
        query = AuditQuery(
            event=event.value if event else None,
            after=after,
            since=_epoch(since),
            until=_epoch(until),
            limit=limit,
        )
        return [asdict(r) for r in log.records(query)]

    return router


def _route_template(request: Request) -> str:
    """The matched route's path template (the router records the route in the scope it shares)."""
    route = request.scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else "unmatched"


def audit_writes(app: FastAPI, audit: Auditor, tokens: Tokens) -> None:
    """Add the middleware that writes one `api.write` record per write request."""

    @app.middleware("http")
    async def record_write(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        if request.method in _WRITES:
            await run_in_threadpool(  # a SQLite write: off the event loop
                audit,
                Event.API_WRITE,
                f"api:{scope_of(tokens, request.headers.get('authorization'))}",
                _route_template(request),
                str(response.status_code),
                method=request.method,
            )
        return response
