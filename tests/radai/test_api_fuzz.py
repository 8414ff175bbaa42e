"""Schema-driven fuzzing of the HTTP API with schemathesis: every operation of our OpenAPI document, with
generated parameters and bodies, without a token and with the read and the admin token, never answers 5xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from radai.api.app import create_api
from radai.api.auth import Tokens
from radai.api.studies import retry_dead_deliveries
from radai.app import RegistryAdmin
from radai.audit import Event
from radai.config import DestinationSettings, Settings
from radai.delivery import DestinationProbe
from radai.destination_admin import ServerDestinations
from radai.domain import JobSpec, StudyRecord, StudyState
from radai.senders import DicomSender
from radai.storage.model_store import ModelStore
from radai.storage.sqlite import SqliteJobStore
from radai.storage.sqlite_audit import SqliteAuditLog
from tests.dicom_router.peers import free_port
from tests.radai.model_packages import threshold_package

ADMIN = "Zr8Kq3Wn6Tb9Xm2Lc5Vp"
READ = "Hx4Nf7Qs2Jd9Ry6Bw3Mk"
_DIR = Path(tempfile.mkdtemp(prefix="radai-fuzz-"))


def _app() -> object:
    store = SqliteJobStore(_DIR / "db.sqlite")
    store.upsert_study(StudyRecord("1.2.3", StudyState.PROCESSING, "CT", 41, 1, 1.0, 2.0, 3.0))
    store.add_job(JobSpec("j1", "1.2.3", "1.2.3.4", "threshold@1.0.0", 1.0, 2.0, 3.0))
    registry = ModelStore(_DIR / "registry", [_DIR / "bundled"])
    threshold_package(_DIR / "bundled" / "threshold")
    settings_ = Settings.model_validate({"models": {"max_upload_bytes": 4096}})
    admin = RegistryAdmin(registry, None, settings_)
    # One destination on a closed loopback port: its echo test answers at once (connection refused).
    destination = DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port())
    sender = DicomSender(destination, "RADAI", echo_timeout_s=2.0)
    destinations = ServerDestinations([destination], [sender], DestinationProbe([sender]), store)
    audit = SqliteAuditLog(_DIR / "db.sqlite")
    audit.append(Event.MODEL_ADDED, "cli:ops", "threshold@1.0.0", "ok")
    return create_api(
        store,
        lambda: {"database": True},
        admin,
        Tokens(admin=ADMIN, read=READ),
        audit,
        destinations=destinations,
        retry=retry_dead_deliveries(store),
    )


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_operation_answers_a_server_error(case: schemathesis.Case) -> None:
    for headers in ({}, {"Authorization": f"Bearer {READ}"}, {"Authorization": f"Bearer {ADMIN}"}):
        response = case.call(headers=headers)
        case.validate_response(response, checks=[not_a_server_error])
