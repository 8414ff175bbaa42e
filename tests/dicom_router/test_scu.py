"""send_datasets against real peers: DCMTK storescp, our own StoreSCP, and a closed port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_router.headers import InstanceHeader
from dicom_router.scp import StoreSCP
from dicom_router.scu import DeliveryFailed, Destination, send_datasets
from dicom_router.spool import Spool
from tests.dicom_router.peers import CT_SERIES, EDGE, dcm_files, dcmtk_storescp, free_port


def _read(files: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in files]


@pytest.fixture
def pacs_files(tmp_path: Path) -> Iterator[tuple[Destination, Path]]:
    """A DCMTK storescp accepting every transfer syntax (+xa), writing into tmp_path/pacs."""
    with dcmtk_storescp(tmp_path / "pacs", "+xa") as peer:
        yield Destination("pacs", peer.ae_title, "127.0.0.1", peer.port), peer.folder


def test_send_datasets_delivers_a_ct_series_to_dcmtk_storescp(pacs_files: tuple[Destination, Path]) -> None:
    dest, folder = pacs_files
    datasets = _read(dcm_files(CT_SERIES)[:10])

    send_datasets(datasets, dest, calling_ae="RADAI")

    received = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    assert sorted(ds.SOPInstanceUID for ds in received) == sorted(ds.SOPInstanceUID for ds in datasets)
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for ds in received:
        assert ds.PixelData == by_uid[ds.SOPInstanceUID].PixelData


def test_send_datasets_keeps_compressed_transfer_syntaxes(pacs_files: tuple[Destination, Path]) -> None:
    dest, folder = pacs_files
    datasets = _read(dcm_files(EDGE / "generic" / "compressed_jpegls" / "001")[:2])
    datasets += _read(dcm_files(CT_SERIES)[:1])

    send_datasets(datasets, dest)

    syntaxes = sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in folder.iterdir()
    )
    assert syntaxes == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.80"]


def test_send_datasets_to_a_closed_port_raises_delivery_failed_after_retries() -> None:
    dest = Destination("down", "PACS", "127.0.0.1", free_port())
    waits: list[float] = []

    with pytest.raises(DeliveryFailed) as excinfo:
        send_datasets(_read(dcm_files(CT_SERIES)[:2]), dest, retries=2, backoff_s=0.01, sleep=waits.append)

    message = str(excinfo.value)
    assert "\n" not in message
    assert "2 of 2" in message and "down" in message and "3 attempt" in message
    assert waits == [0.01, 0.02]  # exponential backoff between the three attempts


def test_send_datasets_fails_when_the_peer_refuses_the_transfer_syntax(tmp_path: Path) -> None:
    # Default storescp accepts uncompressed syntaxes only: a JPEG-LS data set cannot be sent unconverted.
    with dcmtk_storescp(tmp_path / "pacs") as peer:
        dest = Destination("pacs", peer.ae_title, "127.0.0.1", peer.port)
        batch = _read(
            dcm_files(EDGE / "generic" / "compressed_jpegls" / "001")[:1] + dcm_files(CT_SERIES)[:1]
        )
        with pytest.raises(DeliveryFailed, match=r"1 of 2 .* not sent"):
            send_datasets(batch, dest, retries=0)
        (delivered,) = peer.files()
        assert pydicom.dcmread(delivered).SOPInstanceUID == batch[1].SOPInstanceUID


def test_send_datasets_retries_only_what_the_peer_refused(tmp_path: Path) -> None:
    datasets = _read(dcm_files(CT_SERIES)[:4])
    refuse_once = {datasets[1].SOPInstanceUID, datasets[3].SOPInstanceUID}
    seen: list[str] = []

    def on_instance(header: InstanceHeader) -> None:
        seen.append(header.sop_instance_uid)
        if header.sop_instance_uid in refuse_once:
            refuse_once.discard(header.sop_instance_uid)
            raise RuntimeError("transient")  # our SCP answers PROCESSING_FAILURE

    scp = StoreSCP("PEER", "127.0.0.1", 0, Spool(tmp_path / "peer"), on_instance)
    scp.start()
    try:
        send_datasets(datasets, Destination("peer", "PEER", "127.0.0.1", scp.port), retries=1, backoff_s=0.0)
    finally:
        scp.stop()

    uids = [ds.SOPInstanceUID for ds in datasets]
    assert seen == [*uids, uids[1], uids[3]]


def test_send_datasets_reports_the_failure_status(tmp_path: Path) -> None:
    def always_fail(_: InstanceHeader) -> None:
        raise RuntimeError("broken")

    scp = StoreSCP("PEER", "127.0.0.1", 0, Spool(tmp_path / "peer"), always_fail)
    scp.start()
    try:
        with pytest.raises(DeliveryFailed, match="0x0110 PROCESSING_FAILURE"):
            send_datasets(
                _read(dcm_files(CT_SERIES)[:1]), Destination("peer", "PEER", "127.0.0.1", scp.port), retries=0
            )
    finally:
        scp.stop()


def test_send_datasets_sends_an_in_memory_dataset_without_file_meta(tmp_path: Path) -> None:
    source = pydicom.dcmread(dcm_files(CT_SERIES)[0])
    ds = Dataset()
    ds.update(source)  # same elements, no file meta: as built by an encoder in memory
    got: list[InstanceHeader] = []
    scp = StoreSCP("PEER", "127.0.0.1", 0, Spool(tmp_path / "peer"), got.append)
    scp.start()
    try:
        send_datasets([ds], Destination("peer", "PEER", "127.0.0.1", scp.port))
    finally:
        scp.stop()

    assert [h.sop_instance_uid for h in got] == [source.SOPInstanceUID]
    assert "file_meta" not in ds.__dict__ or not ds.file_meta  # the caller's object is untouched


def test_send_datasets_with_nothing_to_send_does_nothing() -> None:
    send_datasets([], Destination("down", "PACS", "127.0.0.1", free_port()))


def test_send_datasets_rejects_a_dataset_without_uids() -> None:
    with pytest.raises(ValueError):
        send_datasets([Dataset()], Destination("down", "PACS", "127.0.0.1", free_port()))
