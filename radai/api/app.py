"""HTTP API (FastAPI): health, Prometheus metrics, models and studies. OpenAPI at /docs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import radai
from radai.api.audit import audit_router, audit_writes
from radai.api.auth import Tokens, require_read
from radai.api.models import ModelAdmin, models_router
from radai.api.status import status_router
from radai.audit import AuditLog, Auditor
from radai.errors import NotFoundError
from radai.metrics import REGISTRY
from radai.ports import JobStore

ReadinessCheck = Callable[[], dict[str, bool]]


def create_api(
    store: JobStore,
    readiness: ReadinessCheck,
    models: ModelAdmin,
    tokens: Tokens | None = None,
    audit_log: AuditLog | None = None,
) -> FastAPI:
    """The API; with an audit log, every write request is audited and `/api/v1/audit` reads the log."""
    tokens = tokens or Tokens()
    api = FastAPI(title="radai", version=radai.__version__, description="Radiology AI inference server")
    api.include_router(models_router(models, tokens))
    api.include_router(status_router(store, models, readiness))
    if audit_log is not None:
        api.include_router(audit_router(audit_log, tokens))
        audit_writes(api, Auditor(audit_log), tokens)
    read = [Depends(require_read(tokens))]

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

    @api.get("/api/v1/studies", dependencies=read)
    def list_studies(limit: int = 100) -> list[dict[str, Any]]:
        return [asdict(s) for s in store.list_studies(limit=min(max(limit, 1), 1000))]

    @api.get("/api/v1/studies/{study_uid}", dependencies=read)
    def get_study(study_uid: str) -> dict[str, Any]:
        try:
            return asdict(store.get_study(study_uid))
        except NotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc

    return api
