"""HTTP API (FastAPI): health, Prometheus metrics, models and studies. OpenAPI at /docs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import radai
from radai.api.audit import audit_router, audit_writes
from radai.api.auth import Tokens
from radai.api.destinations import DestinationAdmin, destinations_router
from radai.api.models import ModelAdmin, models_router
from radai.api.status import status_router
from radai.api.studies import StudyRetry, studies_router
from radai.audit import AuditLog, Auditor
from radai.metrics import REGISTRY
from radai.ports import JobStore

ReadinessCheck = Callable[[], dict[str, bool]]


def create_api(
    store: JobStore,
    readiness: ReadinessCheck,
    models: ModelAdmin,
    tokens: Tokens | None = None,
    audit_log: AuditLog | None = None,
    *,
    destinations: DestinationAdmin,
    retry: StudyRetry,
) -> FastAPI:
    """The API; with an audit log, every write request is audited and `/api/v1/audit` reads the log."""
    tokens = tokens or Tokens()
    api = FastAPI(title="radai", version=radai.__version__, description="Radiology AI inference server")
    api.include_router(studies_router(store, tokens, retry))
    api.include_router(destinations_router(destinations, tokens))
    api.include_router(models_router(models, tokens))
    api.include_router(status_router(store, models, readiness))
    if audit_log is not None:
        api.include_router(audit_router(audit_log, tokens))
        audit_writes(api, Auditor(audit_log), tokens)

    @api.get("/livez")
    def livez() -> dict[str, str]:
        return {"status": "alive"}

    @api.get("/readyz")
    def readyz(response: Response) -> dict[str, Any]:
        checks = readiness()
        # destination:<name> checks are reported, not required: a PACS that is down must not take radai out
        # of service (its results wait in the outbound queue).
        ready = all(ok for name, ok in checks.items() if not name.startswith("destination:"))
        response.status_code = 200 if ready else 503
        return {"ready": ready, "checks": checks}

    @api.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return api
