"""`/api/v1/destinations` with real peers: a DCMTK storescp on loopback (up), a DIMSE destination on a closed
port and a STOW-RS destination on a closed port (down); queue counts from a real SQLite store; no secret or
TLS file path in any answer; read and admin scopes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from radai.api.auth import Tokens
from radai.api.destinations import destinations_router
from radai.config import DestinationSettings
from radai.destination_admin import EchoResults, ServerDestinations
from radai.domain import DeliveryState, StudyRecord, StudyState
from radai.ports import ResultSender
from radai.senders import DicomSender
from radai.storage.sqlite import SqliteJobStore
from radai.stow import StowSender
from tests.dicom_router.peers import DcmtkStoreScp, dcmtk_storescp, free_port

ADMIN = "Mw4Hc8Zt2Rq6Jn9Fs3Dk"
READ = "Vb7Xp2Lg5Kt8Yw3Nq6Hs"
TOKEN = "stow-bearer-Qm8Rt3Zx6Wc"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[DcmtkStoreScp]:
    with dcmtk_storescp(tmp_path / "pacs", ae_title="PACS") as peer:
        yield peer


def settings(pacs: DcmtkStoreScp, tmp_path: Path) -> list[DestinationSettings]:
    closed = free_port()  # nothing listens there
    return [
        DestinationSettings.model_validate(
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.port,
                "outputs": ["seg", "sr"],
            }
        ),
        DestinationSettings.model_validate(
            {"name": "offline", "ae_title": "GONE", "host": "127.0.0.1", "port": closed}
        ),
        DestinationSettings.model_validate(
            {
                "name": "secure",
                "ae_title": "TLSPACS",
                "host": "127.0.0.1",
                "port": closed,
                "tls": {
                    "ca_file": str(tmp_path / "secret-ca.pem"),
                    "key_file": str(tmp_path / "secret-key.pem"),
                    "cert_file": str(tmp_path / "secret-cert.pem"),
                },
            }
        ),
        DestinationSettings.model_validate(
            {"name": "web", "type": "stow", "url": f"https://127.0.0.1:{closed}/dicomweb", "token": TOKEN}
        ),
    ]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    s = SqliteJobStore(tmp_path / "radai.sqlite")
    s.upsert_study(StudyRecord("1.2.3", StudyState.PROCESSING, "MODALITY", 2, 1, 1.0, 2.0, 3.0))
    for job in ("aa01", "aa02", "aa03"):
        s.enqueue_delivery(job, "1.2.3", "offline", [f"/outbox/{job}/000-SEG.dcm"], 3.0)
    s.update_delivery("aa03", "offline", DeliveryState.DEAD, 20, 3.0, "refused", 4.0)
    s.claim_delivery("offline", 5.0)  # one of the two queued is being sent now
    yield s
    s.close()


def client(pacs: DcmtkStoreScp, store: SqliteJobStore, tmp_path: Path, tokens: Tokens) -> TestClient:
    dests = settings(pacs, tmp_path)
    senders: list[ResultSender] = [
        DicomSender(dests[0], "RADAI", echo_timeout_s=5.0),
        DicomSender(dests[1], "RADAI", echo_timeout_s=5.0),
        DicomSender(dests[2], "RADAI", echo_timeout_s=5.0),
        StowSender(dests[3], echo_timeout_s=5.0),
    ]
    admin = ServerDestinations(dests, senders, EchoResults(), store)
    api = FastAPI()
    api.include_router(destinations_router(admin, tokens))
    return TestClient(api)


def test_destinations_list_their_configuration_and_queue_counts_never_checked_yet(
    pacs: DcmtkStoreScp, store: SqliteJobStore, tmp_path: Path
) -> None:
    c = client(pacs, store, tmp_path, Tokens(admin=ADMIN, read=READ))
    r = c.get("/api/v1/destinations", headers=bearer(READ))
    assert r.status_code == 200
    by_name = {d["name"]: d for d in r.json()}
    assert list(by_name) == ["pacs", "offline", "secure", "web"]
    assert by_name["pacs"] == {
        "name": "pacs",
        "type": "dimse",
        "ae_title": "PACS",
        "host": "127.0.0.1",
        "port": pacs.port,
        "url": None,
        "outputs": ["seg", "sr"],
        "tls": False,
        "up": None,
        "pending": 0,
        "dead": 0,
    }
    assert by_name["offline"]["tls"] is False and by_name["offline"]["outputs"] == ["seg", "sr", "notice"]
    assert by_name["secure"]["tls"] is True and by_name["secure"]["ae_title"] == "TLSPACS"
    assert (by_name["offline"]["pending"], by_name["offline"]["dead"]) == (2, 1)
    web = by_name["web"]
    assert web["type"] == "stow" and web["url"].endswith("/dicomweb") and web["tls"] is True
    assert web["ae_title"] is None and web["host"] is None and web["port"] is None


def test_no_secret_or_tls_file_path_appears_in_any_answer(
    pacs: DcmtkStoreScp, store: SqliteJobStore, tmp_path: Path
) -> None:
    c = client(pacs, store, tmp_path, Tokens(admin=ADMIN, read=READ))
    bodies = [c.get("/api/v1/destinations", headers=bearer(READ)).text]
    bodies += [c.get(f"/api/v1/destinations/{n}", headers=bearer(READ)).text for n in ("secure", "web")]
    bodies += [
        c.post(f"/api/v1/destinations/{n}/echo", headers=bearer(ADMIN)).text for n in ("secure", "web")
    ]
    for body in bodies:
        assert TOKEN not in body and "secret-" not in body and "pem" not in body


def test_echo_reaches_the_real_storescp_and_is_remembered_as_up(
    pacs: DcmtkStoreScp, store: SqliteJobStore, tmp_path: Path
) -> None:
    c = client(pacs, store, tmp_path, Tokens(admin=ADMIN, read=READ))
    r = c.post("/api/v1/destinations/pacs/echo", headers=bearer(ADMIN))
    assert r.status_code == 200
    body = r.json()
    assert body["name"] == "pacs" and body["ok"] is True and body["seconds"] >= 0.0
    assert c.get("/api/v1/destinations/pacs", headers=bearer(READ)).json()["up"] is True


def test_echo_of_destinations_on_a_closed_port_says_down(
    pacs: DcmtkStoreScp, store: SqliteJobStore, tmp_path: Path
) -> None:
    c = client(pacs, store, tmp_path, Tokens(admin=ADMIN, read=READ))
    for name in ("offline", "web"):
        r = c.post(f"/api/v1/destinations/{name}/echo", headers=bearer(ADMIN))
        assert r.status_code == 200 and r.json()["ok"] is False, name
        assert c.get(f"/api/v1/destinations/{name}", headers=bearer(READ)).json()["up"] is False
    assert c.get("/api/v1/destinations/pacs", headers=bearer(READ)).json()["up"] is None  # not echoed


def test_unknown_destination_is_404(pacs: DcmtkStoreScp, store: SqliteJobStore, tmp_path: Path) -> None:
    c = client(pacs, store, tmp_path, Tokens(admin=ADMIN, read=READ))
    assert c.get("/api/v1/destinations/nowhere", headers=bearer(READ)).status_code == 404
    assert c.post("/api/v1/destinations/nowhere/echo", headers=bearer(ADMIN)).status_code == 404


def test_reads_need_a_token_and_the_echo_needs_the_admin_token(
    pacs: DcmtkStoreScp, store: SqliteJobStore, tmp_path: Path
) -> None:
    c = client(pacs, store, tmp_path, Tokens(admin=ADMIN, read=READ))
    for route in ("/api/v1/destinations", "/api/v1/destinations/pacs"):
        assert c.get(route).status_code == 401
        assert c.get(route, headers=bearer(READ + "x")).status_code == 401
        assert c.get(route, headers=bearer(ADMIN)).status_code == 200
    for headers in ({}, bearer(READ)):
        assert c.post("/api/v1/destinations/pacs/echo", headers=headers).status_code == 401
    assert c.get("/api/v1/destinations/pacs", headers=bearer(READ)).json()["up"] is None  # no echo ran
    open_reads = client(pacs, store, tmp_path, Tokens())
    assert open_reads.get("/api/v1/destinations").status_code == 200
    assert open_reads.post("/api/v1/destinations/pacs/echo").status_code == 403


def test_every_destination_needs_its_sender(
    pacs: DcmtkStoreScp, store: SqliteJobStore, tmp_path: Path
) -> None:
    dests = settings(pacs, tmp_path)
    with pytest.raises(ValueError, match="exactly one sender"):
        ServerDestinations(dests, [DicomSender(dests[0], "RADAI")], EchoResults(), store)
