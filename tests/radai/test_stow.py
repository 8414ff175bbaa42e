"""DICOMweb STOW-RS destinations against a real Orthanc with its DICOMweb plugin on loopback: SEG and SR
stored (and stored again), partial and total failures, a stopped server, a wrong path, basic
authentication, https verified against a CA, and a delivery through the outbound queue."""

from __future__ import annotations

import copy
import logging
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import httpx
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radai.config import DestinationSettings
from radai.delivery import DeliveryService, Outbox
from radai.domain import DeliveryState, JobSpec, JobState, StudyRecord, StudyState
from radai.errors import ConfigError, DeliveryError
from radai.outputs import Output
from radai.results import SegmentMeasurement, SrRequest, build_sr, measure_volumes, segment_numbers
from radai.storage.sqlite import SqliteJobStore
from radai.stow import StowSender, failed_instances, multipart_related
from tests.dicom_router.certs import make_pki
from tests.dicom_router.peers import LOOPBACK
from tests.orthanc import OrthancServer, missing_reason, run_orthanc
from tests.radai.results_fixtures import ALGORITHM, SPECS, ct_source, standard_seg, threshold_labels, to_bytes

pytestmark = [
    pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or ""),
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent"),
]

SECRET = "s3cret-Pa55"


@cache
def _results() -> tuple[Dataset, Dataset]:
    seg = standard_seg()
    volumes = measure_volumes(threshold_labels(), 0.5)
    by_value = {spec.value: spec for spec in SPECS}
    measurements = [
        SegmentMeasurement(number, by_value[value].name, by_value[value].type, volumes[value])
        for value, number in sorted(segment_numbers(seg).items())
    ]
    sr = build_sr(SrRequest(seg=seg, source=ct_source(), measurements=measurements, algorithm=ALGORITHM))
    return seg, sr


def seg_and_sr() -> list[Dataset]:
    """A real SEG of 10 CT slices and the SR measuring it (copies: a test may not disturb another)."""
    return [copy.deepcopy(ds) for ds in _results()]


def unstorable() -> Dataset:
    """A SEG header without any of its modules: Orthanc refuses to store it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SEG"
    return ds


def stow(url: str, name: str = "orthanc-web", **keys: object) -> StowSender:
    return StowSender(
        DestinationSettings(name=name, type="stow", url=url, **keys),  # type: ignore[arg-type]
        timeout_s=10.0,
        echo_timeout_s=2.0,
    )


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def test_seg_and_sr_are_stored_and_sending_them_again_is_harmless(orthanc: OrthancServer) -> None:
    sender = stow(orthanc.dicomweb_url)
    results = seg_and_sr()
    uids = {str(ds.SOPInstanceUID) for ds in results}
    assert sender.echo()
    sender.send(results)
    assert uids <= orthanc.instance_uids()
    study = str(results[0].StudyInstanceUID)
    found = httpx.get(f"{orthanc.dicomweb_url}/studies/{study}/instances", timeout=10).json()
    classes = {item["00080018"]["Value"][0]: item["00080016"]["Value"][0] for item in found}  # QIDO-RS
    assert {classes.get(str(ds.SOPInstanceUID)) for ds in results} == {
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR Storage
    }
    before = len(orthanc.get("/instances"))
    sender.send(seg_and_sr())  # a retry after a lost answer: the same UIDs, no duplicate
    assert len(orthanc.get("/instances")) == before


def test_an_instance_the_server_refuses_fails_the_delivery_with_the_count(orthanc: OrthancServer) -> None:
    sender = stow(orthanc.dicomweb_url)
    seg, _ = seg_and_sr()
    with pytest.raises(
        DeliveryError, match=r"orthanc-web: STOW-RS answered HTTP 400.*1 of 2 instance\(s\) failed"
    ):
        sender.send([seg, unstorable()])


def test_failed_instances_are_read_from_an_xml_answer_too(orthanc: OrthancServer) -> None:
    seg, _ = seg_and_sr()
    body, content_type = multipart_related([to_bytes(seg), to_bytes(unstorable())])
    for accept in ("application/dicom+xml", "application/dicom+json"):
        response = httpx.post(
            f"{orthanc.dicomweb_url}/studies",
            content=body,
            headers={"Content-Type": content_type, "Accept": accept},
            timeout=10,
        )
        assert response.status_code == 400
        assert len(failed_instances(response)) == 1


def test_a_wrong_path_is_a_delivery_error_with_the_status_and_echo_is_false(orthanc: OrthancServer) -> None:
    sender = stow(f"{orthanc.http_url}/no-dicom-web")
    with pytest.raises(DeliveryError, match=r"STOW-RS answered HTTP 404"):
        sender.send(seg_and_sr())
    assert not sender.echo()


def test_a_stopped_server_is_a_delivery_error_and_echo_is_false(tmp_path: Path) -> None:
    with run_orthanc(tmp_path) as server:
        sender = stow(server.dicomweb_url)
        assert sender.echo()
        server.stop()
        with pytest.raises(DeliveryError, match=r"orthanc-web: STOW-RS request failed: ConnectError"):
            sender.send(seg_and_sr())
        assert not sender.echo()


def test_basic_authentication_is_sent_and_a_wrong_password_is_refused_without_logging_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = {"AuthenticationEnabled": True, "RegisteredUsers": {"radai": SECRET}}
    caplog.set_level(logging.DEBUG)
    with run_orthanc(tmp_path, extra=extra) as server:
        wrong = stow(server.dicomweb_url, username="radai", password="not-it")
        assert not wrong.echo()
        with pytest.raises(DeliveryError, match=r"HTTP 401") as refused:
            wrong.send(seg_and_sr())
        assert "not-it" not in str(refused.value)
        right = stow(server.dicomweb_url, username="radai", password=SECRET)
        assert right.echo()
        results = seg_and_sr()
        right.send(results)
        assert {str(ds.SOPInstanceUID) for ds in results} <= server.instance_uids()
    assert SECRET not in caplog.text and "not-it" not in caplog.text


def _relay(client: socket.socket, context: ssl.SSLContext, upstream_port: int) -> None:
    """One connection: TLS handshake, then bytes both ways in this one thread (an SSL socket must not be
    read and written from two threads)."""
    with client:
        try:
            client.settimeout(10)
            tls = context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):
            return  # e.g. the client refused our certificate
        with tls, socket.create_connection((LOOPBACK, upstream_port), timeout=10) as upstream:
            peer = {tls: upstream, upstream: tls}
            while True:
                ready = [tls] if tls.pending() else select.select([tls, upstream], [], [], 10)[0]
                if not ready:
                    return
                for src in ready:
                    try:
                        data = src.recv(65536)
                        if not data:
                            return
                        peer[src].sendall(data)
                    except OSError:
                        return


@contextmanager
def tls_front(upstream_port: int, cert: Path, key: Path) -> Iterator[int]:
    """A TLS terminator on a free loopback port in front of a plain HTTP server; yields its port.
    (Orthanc 1.10 of Debian 12 crashes at its own first TLS handshake.)"""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    stop = threading.Event()
    with socket.create_server((LOOPBACK, 0)) as listener:
        listener.settimeout(0.1)

        def serve() -> None:
            while not stop.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=_relay, args=(client, context, upstream_port), daemon=True).start()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield int(listener.getsockname()[1])
        finally:
            stop.set()
            thread.join()


def test_https_is_verified_against_the_configured_ca(orthanc: OrthancServer, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    http_port = int(orthanc.http_url.rsplit(":", 1)[1])
    with tls_front(http_port, pki.server.cert, pki.server.key) as port:
        url = f"https://127.0.0.1:{port}/dicom-web"
        trusted = stow(url, ca_file=pki.ca)
        assert trusted.echo()
        results = seg_and_sr()
        trusted.send(results)
        assert {str(ds.SOPInstanceUID) for ds in results} <= orthanc.instance_uids()
        untrusted = stow(url, ca_file=pki.rogue_ca)
        assert not untrusted.echo()
        with pytest.raises(DeliveryError, match=r"STOW-RS request failed: ConnectError.*certificate verify"):
            untrusted.send(results)


def test_an_unreadable_ca_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"destination web: cannot load ca_file .*missing\.pem"):
        stow("https://127.0.0.1:1/dicom-web", name="web", ca_file=tmp_path / "missing.pem")


def test_the_outbound_queue_delivers_to_a_stow_destination(orthanc: OrthancServer, tmp_path: Path) -> None:
    study, job = "1.2.826.0.1.3680043.8.498.77", "stow1"
    store = SqliteJobStore(tmp_path / "radai.sqlite")
    try:
        store.upsert_study(StudyRecord(study, StudyState.PROCESSING, "CT", 10, 1, 1.0, 2.0, 3.0))
        store.add_job(JobSpec(job, study, study + ".1", "m@1", 1.0, 2.0, 3.0))
        store.finish_job(job, JobState.DELIVERING)
        sender = stow(orthanc.dicomweb_url, name="web")
        service = DeliveryService(store, [sender], Outbox(tmp_path / "outbox"))
        results = seg_and_sr()
        service.submit(job, study, [Output(str(ds.Modality).lower(), ds) for ds in results])
        done = service.process_due("web")
        assert done is not None and done.state is DeliveryState.DELIVERED and done.last_error == ""
        assert {str(ds.SOPInstanceUID) for ds in results} <= orthanc.instance_uids()
        assert store.settle_job(job, 4.0) is JobState.DELIVERED
    finally:
        store.close()


def test_a_refused_delivery_is_retried_with_the_reason_recorded(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    study, job = "1.2.826.0.1.3680043.8.498.78", "stow2"
    store = SqliteJobStore(tmp_path / "radai.sqlite")
    try:
        store.upsert_study(StudyRecord(study, StudyState.PROCESSING, "CT", 10, 1, 1.0, 2.0, 3.0))
        store.add_job(JobSpec(job, study, study + ".1", "m@1", 1.0, 2.0, 3.0))
        store.finish_job(job, JobState.DELIVERING)
        sender = stow(f"{orthanc.http_url}/no-dicom-web", name="web")
        service = DeliveryService(store, [sender], Outbox(tmp_path / "outbox"))
        service.submit(job, study, [Output(str(ds.Modality).lower(), ds) for ds in seg_and_sr()])
        rec = service.process_due("web")
        assert rec is not None and rec.state is DeliveryState.QUEUED and rec.attempts == 1
        assert "HTTP 404" in rec.last_error
    finally:
        store.close()
