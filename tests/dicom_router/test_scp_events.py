"""The SCP tells its observer of every association (accepted, or rejected with a bounded reason) and every
C-STORE answered (status name and bytes received), with real DCMTK peers; a failing observer changes nothing
the peer is answered."""

from __future__ import annotations

import threading
from pathlib import Path

from dicom_router.events import REJECT_REASONS, Peer
from dicom_router.security import AllowedPeer
from tests.dicom_router.edge import dcmtk, serving
from tests.dicom_router.peers import CT_SERIES, dcm_files


class Recorder:
    def __init__(self) -> None:
        self.associations: list[tuple[Peer, bool, str]] = []
        self.stores: list[tuple[Peer, str, int]] = []
        self._lock = threading.Lock()

    def association(self, peer: Peer, accepted: bool, reason: str) -> None:
        with self._lock:
            self.associations.append((peer, accepted, reason))

    def stored(self, peer: Peer, outcome: str, size: int) -> None:
        with self._lock:
            self.stores.append((peer, outcome, size))


class Broken:
    def association(self, peer: Peer, accepted: bool, reason: str) -> None:
        raise RuntimeError("observer bug")

    def stored(self, peer: Peer, outcome: str, size: int) -> None:
        raise RuntimeError("observer bug")


def test_an_accepted_association_and_each_store_are_reported_with_sender_and_size(tmp_path: Path) -> None:
    files = dcm_files(CT_SERIES)[:3]
    seen = Recorder()
    with serving(tmp_path, observer=seen) as running:
        assert dcmtk("storescu", running.port, files=files).returncode == 0
    assert seen.associations == [(Peer("MODALITY", "127.0.0.1"), True, "none")]
    assert [(p.ae_title, outcome) for p, outcome, _ in seen.stores] == [("MODALITY", "success")] * 3
    # bytes as received: the data set without its file meta, so a little less than each file
    for (_, _, size), path in zip(seen.stores, files, strict=True):
        assert 0.9 * path.stat().st_size < size <= path.stat().st_size


def test_each_rejection_is_reported_once_with_its_reason(tmp_path: Path) -> None:
    seen = Recorder()
    allowed = [AllowedPeer("MODALITY", "127.0.0.0/8")]
    with serving(tmp_path, observer=seen, allowed=allowed) as running:
        assert dcmtk("echoscu", running.port, called_ae="NOT_RADAI").returncode != 0
        assert dcmtk("echoscu", running.port, calling_ae="INTRUDER").returncode != 0
        assert dcmtk("echoscu", running.port).returncode == 0
    assert [(p.ae_title, ok, why) for p, ok, why in seen.associations] == [
        ("MODALITY", False, "called_ae"),
        ("INTRUDER", False, "not_allowed"),
        ("MODALITY", True, "none"),
    ]
    assert {why for _, ok, why in seen.associations if not ok} <= set(REJECT_REASONS)


def test_a_failing_observer_changes_nothing_the_sender_is_answered(tmp_path: Path) -> None:
    files = dcm_files(CT_SERIES)[:2]
    with serving(tmp_path, observer=Broken()) as running:
        sent = dcmtk("storescu", running.port, files=files)
        assert sent.returncode == 0, sent.stderr
        assert len(running.headers) == 2
