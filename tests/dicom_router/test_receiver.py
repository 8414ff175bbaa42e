"""Receiver end to end on loopback: DCMTK storescu in, one Study per quiet period out."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_router.assembler import Study
from dicom_router.headers import read_header
from dicom_router.receiver import Receiver
from tests.dicom_router.factories import ManualClock
from tests.dicom_router.peers import PHANTOM_STUDY, echoscu, image_files, storescu

QUIET = 0.5
WAIT = 30.0  # generous upper bound for a loaded CI machine; never a timing assertion

MakeReceiver = Callable[..., Receiver]


@pytest.fixture
def make_receiver(tmp_path: Path) -> Iterator[MakeReceiver]:
    started: list[Receiver] = []

    def make(on_study: Callable[[Study], None], clock: Callable[[], float] = time.time) -> Receiver:
        receiver = Receiver("RADAI", "127.0.0.1", 0, tmp_path / "spool", QUIET, on_study, clock=clock)
        receiver.start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()


def test_two_series_sent_on_two_associations_complete_as_one_study(make_receiver: MakeReceiver) -> None:
    clock = ManualClock()
    studies: queue.Queue[Study] = queue.Queue()
    receiver = make_receiver(studies.put, clock)

    assert storescu(receiver.port, image_files(PHANTOM_STUDY / "S2010")).returncode == 0
    assert storescu(receiver.port, image_files(PHANTOM_STUDY / "S1000")).returncode == 0
    with pytest.raises(queue.Empty):
        studies.get(timeout=0.5)  # the clock has not moved: nothing may complete yet
    clock.advance(QUIET)

    study = studies.get(timeout=WAIT)
    assert len(study.series) == 2
    assert sorted(len(s.instances) for s in study.series.values()) == [1, 28]
    assert study.calling_ae == "MODALITY"
    assert all(h.path.parent == receiver.spool.root for s in study.series.values() for h in s.instances)
    assert len(receiver.spool.pending()) == 29
    clock.advance(10 * QUIET)
    with pytest.raises(queue.Empty):
        studies.get(timeout=0.5)  # exactly one study


def test_resent_instances_do_not_duplicate(make_receiver: MakeReceiver) -> None:
    clock = ManualClock()
    studies: queue.Queue[Study] = queue.Queue()
    receiver = make_receiver(studies.put, clock)
    files = image_files(PHANTOM_STUDY / "S4010")

    assert storescu(receiver.port, files).returncode == 0
    assert storescu(receiver.port, files[:3]).returncode == 0  # a PACS retrying part of the series
    clock.advance(QUIET)

    study = studies.get(timeout=WAIT)
    (series,) = study.series.values()
    assert len(series.instances) == 6
    assert len({h.sop_instance_uid for h in series.instances}) == 6
    assert len(receiver.spool.pending()) == 6


def test_study_completes_after_the_real_quiet_period(make_receiver: MakeReceiver) -> None:
    studies: queue.Queue[Study] = queue.Queue()
    receiver = make_receiver(studies.put)

    assert storescu(receiver.port, image_files(PHANTOM_STUDY / "S1000")).returncode == 0

    study = studies.get(timeout=WAIT)
    assert study.instance_count == 1


def test_a_failing_callback_is_logged_and_the_receiver_keeps_working(
    make_receiver: MakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = threading.Event(), threading.Event()

    def flaky(study: Study) -> None:
        if not first.is_set():
            first.set()
            raise RuntimeError("downstream is down")
        second.set()

    receiver = make_receiver(flaky)
    assert storescu(receiver.port, image_files(PHANTOM_STUDY / "S1000")).returncode == 0
    assert first.wait(WAIT)
    assert storescu(receiver.port, image_files(PHANTOM_STUDY / "S4010")).returncode == 0

    assert second.wait(WAIT)
    assert echoscu(receiver.port).returncode == 0
    assert "on_study_complete failed" in caplog.text
    study_uid = read_header(image_files(PHANTOM_STUDY / "S1000")[0], "X", 0.0).study_uid
    assert study_uid not in caplog.text  # the log names a fingerprint, never the Study UID


def test_start_on_a_busy_port_raises_and_leaves_nothing_running(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        receiver = Receiver("RADAI", "127.0.0.1", port, tmp_path / "spool", QUIET, lambda _: None)
        before = threading.active_count()

        with pytest.raises(OSError):
            receiver.start()

        assert threading.active_count() <= before
