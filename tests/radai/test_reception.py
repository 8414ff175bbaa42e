"""Reception metrics and audit: received instances, bytes and associations counted by the sender's configured
name (never by an AE title the network invents), and one audit record per association, with real DCMTK peers."""

from __future__ import annotations

from pathlib import Path

from dicom_router.security import AllowedPeer
from radai.audit import Auditor
from radai.metrics import REGISTRY
from radai.reception import NamedPeer, ReceptionObserver
from radai.storage.sqlite_audit import SqliteAuditLog
from tests.dicom_router.edge import dcmtk, serving
from tests.dicom_router.peers import CT_SERIES, dcm_files


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_instances_bytes_and_associations_are_counted_by_configured_sender_name(tmp_path: Path) -> None:
    files = dcm_files(CT_SERIES)[:4]
    log = SqliteAuditLog(tmp_path / "radai.sqlite")
    observer = ReceptionObserver(
        [NamedPeer("ct-room-2", AllowedPeer("MODALITY", "127.0.0.0/8"))], Auditor(log)
    )
    before = {
        "instances": value("radai_instances_received_total", sender="ct-room-2", outcome="success"),
        "bytes": value("radai_received_bytes_total", sender="ct-room-2"),
        "accepted": value("radai_associations_total", sender="ct-room-2", outcome="accepted", reason="none"),
        "rejected": value(
            "radai_associations_total", sender="unlisted", outcome="rejected", reason="called_ae"
        ),
    }
    with serving(tmp_path, observer=observer) as running:
        assert dcmtk("storescu", running.port, files=files).returncode == 0
        assert dcmtk("echoscu", running.port, calling_ae="ROGUE_AE", called_ae="NOT_US").returncode != 0
    assert (
        value("radai_instances_received_total", sender="ct-room-2", outcome="success")
        == before["instances"] + 4
    )
    received = value("radai_received_bytes_total", sender="ct-room-2") - before["bytes"]
    assert 0.9 * sum(f.stat().st_size for f in files) < received <= sum(f.stat().st_size for f in files)
    accepted = value("radai_associations_total", sender="ct-room-2", outcome="accepted", reason="none")
    assert accepted == before["accepted"] + 1
    rejected = value("radai_associations_total", sender="unlisted", outcome="rejected", reason="called_ae")
    assert rejected == before["rejected"] + 1
    # no series labelled with the unknown AE title itself
    assert "ROGUE_AE" not in str([s.labels for m in REGISTRY.collect() for s in m.samples])
    records = log.records()
    assert [(r.event, r.actor, r.subject, r.outcome) for r in records] == [
        ("association.accepted", "MODALITY@127.0.0.1", "ct-room-2", "accepted"),
        ("association.rejected", "ROGUE_AE@127.0.0.1", "unlisted", "called_ae"),
    ]
