"""DICOM edge security: the sender allow-list, the called AE check and DICOM TLS with real DCMTK peers."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import warnings
from pathlib import Path

import pydicom
import pytest

from dicom_router.scu import DeliveryFailed, Destination, send_datasets
from dicom_router.security import AllowedPeer, TlsSettings, client_context, is_allowed, server_context
from tests.dicom_router.certs import Pki, make_pki
from tests.dicom_router.edge import association_answer, dcmtk, serving, tls_args
from tests.dicom_router.peers import CT_SERIES, LOOPBACK, dcm_files, dcmtk_storescp

CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_tls(pki: Pki, require_client_cert: bool = True) -> TlsSettings:
    return TlsSettings(pki.server.cert, pki.server.key, pki.ca, require_client_cert=require_client_cert)


# --- allow-list --------------------------------------------------------------------------------------------


def test_allowed_peer_matches_its_ae_title_inside_its_network_only() -> None:
    peer = AllowedPeer("CT_SCANNER", "10.20.0.0/16")

    assert peer.matches("CT_SCANNER", "10.20.3.4")
    assert peer.matches("CT_SCANNER  ", "::ffff:10.20.3.4")  # padded AE, IPv4-mapped (dual-stack listener)
    assert not peer.matches("ct_scanner", "10.20.3.4")  # AE titles are case-sensitive
    assert not peer.matches("CT_SCANNER", "10.21.3.4")
    assert not peer.matches("OTHER", "10.20.3.4")
    assert AllowedPeer("PACS", "192.168.1.7").matches("PACS", "192.168.1.7")
    assert not AllowedPeer("PACS", "192.168.1.7").matches("PACS", "192.168.1.8")
    assert is_allowed(None, "ANYONE", "203.0.113.9")
    assert not is_allowed([], "ANYONE", "203.0.113.9")


@pytest.mark.parametrize(
    ("ae_title", "network"), [("CT", "10.0.0.300"), ("", "10.0.0.0/8"), ("X" * 17, "::1")]
)
def test_allowed_peer_refuses_invalid_entries(ae_title: str, network: str) -> None:
    with pytest.raises(ValueError):
        AllowedPeer(ae_title, network)


def test_sender_on_the_allow_list_stores(tmp_path: Path) -> None:
    with serving(tmp_path, allowed=[AllowedPeer("MODALITY", "127.0.0.0/8")]) as running:
        result = dcmtk("storescu", running.port, files=dcm_files(CT_SERIES)[:3])

        assert result.returncode == 0, result.stderr
        assert len(running.headers) == 3


def test_unknown_calling_ae_is_rejected_and_logged_with_ae_and_ip(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_router.scp")
    with serving(tmp_path, allowed=[AllowedPeer("MODALITY", "127.0.0.1")]) as running:
        answer = association_answer(running.port, calling_ae="INTRUDER")
        result = dcmtk("storescu", running.port, files=dcm_files(CT_SERIES)[:1], calling_ae="INTRUDER")

        assert answer == CALLING_AE_NOT_RECOGNISED
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stderr
        assert running.headers == []
        refusals = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
        assert refusals and all("INTRUDER" in m and "127.0.0.1" in m for m in refusals)


def test_known_ae_from_an_address_outside_its_network_is_rejected(tmp_path: Path) -> None:
    with serving(tmp_path, allowed=[AllowedPeer("MODALITY", "10.0.0.0/8")]) as running:
        assert association_answer(running.port) == CALLING_AE_NOT_RECOGNISED


def test_wrong_called_ae_is_rejected_unless_the_check_is_off(tmp_path: Path) -> None:
    with serving(tmp_path / "strict") as running:
        result = dcmtk("echoscu", running.port, called_ae="NOT_RADAI")

        assert association_answer(running.port, called_ae="NOT_RADAI") == CALLED_AE_NOT_RECOGNISED
        assert result.returncode != 0
        assert "Called AE Title Not Recognized" in result.stderr
        assert association_answer(running.port) == ()
    with serving(tmp_path / "lax", require_called_ae=False) as running:
        assert association_answer(running.port, called_ae="NOT_RADAI") == ()


# --- TLS ---------------------------------------------------------------------------------------------------


def test_tls_storescu_with_a_good_certificate_stores_every_instance(tmp_path: Path, pki: Pki) -> None:
    files = dcm_files(CT_SERIES)[:5]
    with serving(tmp_path, tls=_server_tls(pki)) as running:
        echo = dcmtk("echoscu", running.port, *tls_args(pki.client, pki.ca))
        store = dcmtk("storescu", running.port, *tls_args(pki.client, pki.ca), files=files)

        assert echo.returncode == 0, echo.stderr
        assert store.returncode == 0, store.stderr
        by_uid = {h.sop_instance_uid: h for h in running.headers}
        for source in files:
            original = pydicom.dcmread(source)
            assert pydicom.dcmread(by_uid[original.SOPInstanceUID].path).PixelData == original.PixelData


def test_tls_client_certificate_from_an_unknown_ca_is_refused(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_router.netguard")
    with serving(tmp_path, tls=_server_tls(pki)) as running:
        rogue = dcmtk(
            "storescu", running.port, *tls_args(pki.rogue_client, pki.ca), files=dcm_files(CT_SERIES)[:1]
        )

        assert rogue.returncode != 0
        assert running.headers == []
        assert any("TLS handshake with 127.0.0.1 failed" in r.getMessage() for r in caplog.records)
        good = dcmtk("echoscu", running.port, *tls_args(pki.client, pki.ca))
        assert good.returncode == 0, good.stderr


def test_tls_without_client_verification_accepts_any_client(tmp_path: Path, pki: Pki) -> None:
    with serving(tmp_path, tls=_server_tls(pki, require_client_cert=False)) as running:
        result = dcmtk("echoscu", running.port, *tls_args(pki.rogue_client, pki.ca))

        assert result.returncode == 0, result.stderr


def test_plain_tcp_to_the_tls_port_is_refused(tmp_path: Path, pki: Pki) -> None:
    with serving(tmp_path, tls=_server_tls(pki)) as running:
        plain = dcmtk("storescu", running.port, files=dcm_files(CT_SERIES)[:1])

        assert plain.returncode != 0
        assert running.headers == []


def _old_tls_client(pki: Pki) -> ssl.SSLContext:
    """A client that offers only TLS 1.0/1.1 (with the legacy ciphers those need)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    return ctx


def _handshake(ctx: ssl.SSLContext, port: int) -> str:
    with socket.create_connection((LOOPBACK, port), timeout=30) as raw, ctx.wrap_socket(raw) as tls:
        return str(tls.version())


def test_tls_below_1_2_is_refused(tmp_path: Path, pki: Pki) -> None:
    client = _old_tls_client(pki)
    # Control: this OpenSSL can still speak TLS 1.1 with a server that allows it, so a refusal below is ours.
    permissive = server_context(_server_tls(pki, require_client_cert=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_server((LOOPBACK, 0)) as listener:
        accepted: list[str] = []

        def accept() -> None:
            conn, _ = listener.accept()
            try:
                with permissive.wrap_socket(conn, server_side=True) as tls:
                    accepted.append(str(tls.version()))
            except (ssl.SSLError, OSError):
                conn.close()

        thread = threading.Thread(target=accept)
        thread.start()
        try:
            control = _handshake(client, listener.getsockname()[1])
        except ssl.SSLError:
            control = ""
        thread.join(30)
    if control != "TLSv1.1":
        pytest.skip("this OpenSSL build cannot negotiate TLS 1.1 at all")

    with serving(tmp_path, tls=_server_tls(pki)) as running:
        with pytest.raises(ssl.SSLError):
            _handshake(client, running.port)
        assert dcmtk("echoscu", running.port, *tls_args(pki.client, pki.ca)).returncode == 0


def test_server_context_is_tls_1_2_or_later_and_verifies_clients_when_asked(pki: Pki) -> None:
    strict = server_context(_server_tls(pki))
    lax = server_context(_server_tls(pki, require_client_cert=False))
    client = client_context(TlsSettings(pki.client.cert, pki.client.key, pki.ca))

    assert strict.minimum_version == lax.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert strict.verify_mode == ssl.CERT_REQUIRED
    assert lax.verify_mode == ssl.CERT_NONE
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    with pytest.raises(ValueError):
        TlsSettings(pki.server.cert, pki.server.key, None, require_client_cert=True)


def test_scu_delivers_over_tls_to_dcmtk_storescp(tmp_path: Path, pki: Pki) -> None:
    datasets = [pydicom.dcmread(p) for p in dcm_files(CT_SERIES)[:3]]
    server_args = ("+tls", str(pki.server.key), str(pki.server.cert), "+cf", str(pki.ca))
    with dcmtk_storescp(tmp_path / "pacs", *server_args) as pacs:
        dest = Destination("pacs", pacs.ae_title, LOOPBACK, pacs.port)
        tls = TlsSettings(pki.client.cert, pki.client.key, pki.ca)

        send_datasets(datasets, dest, tls=tls, retries=0)

        assert len(pacs.files()) == 3
        with pytest.raises(DeliveryFailed):  # the server's certificate is not from the CA we trust
            send_datasets(
                datasets, dest, tls=TlsSettings(pki.client.cert, pki.client.key, pki.rogue_ca), retries=0
            )
        with pytest.raises(DeliveryFailed):  # plain TCP to a TLS-only peer
            send_datasets(datasets, dest, retries=0, timeout_s=5)


def test_scu_and_scp_talk_tls_to_each_other_with_client_verification(tmp_path: Path, pki: Pki) -> None:
    datasets = [pydicom.dcmread(p) for p in dcm_files(CT_SERIES)[:2]]
    with serving(tmp_path, tls=_server_tls(pki)) as running:
        dest = Destination("radai", "RADAI", LOOPBACK, running.port)

        send_datasets(datasets, dest, tls=TlsSettings(pki.client.cert, pki.client.key, pki.ca), retries=0)
        with pytest.raises(DeliveryFailed):
            rogue = TlsSettings(pki.rogue_client.cert, pki.rogue_client.key, pki.ca)
            send_datasets(datasets, dest, tls=rogue, retries=0, timeout_s=5)

        assert len(running.headers) == 2
