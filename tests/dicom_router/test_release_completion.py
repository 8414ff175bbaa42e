"""Association release as the completion signal: Assembler times, the SCP's release/abort events with real
DCMTK and pynetdicom peers, and the Receiver completing a study seconds after the sender lets go."""

from __future__ import annotations

import logging
import queue
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from dicom_router.assembler import Assembler, Study
from dicom_router.headers import read_header
from dicom_router.receiver import Receiver
from dicom_router.scp import StoreSCP
from dicom_router.spool import Spool
from tests.dicom_router.factories import header
from tests.dicom_router.peers import (
    CT_SERIES,
    LOOPBACK,
    PHANTOM_STUDY,
    dcm_files,
    image_files,
    storescu,
)

WAIT = 10.0  # upper bound for events on a loaded machine; never a timing assertion
Released = tuple[str, frozenset[str]]

CT_FILES = dcm_files(CT_SERIES)


def _study_uid(path: Path) -> str:
    return read_header(path, "X", 0.0).study_uid


# --- Assembler, explicit times ------------------------------------------------------------------------------


def test_release_makes_the_study_due_after_the_grace_not_the_quiet_period() -> None:
    asm = Assembler(quiet_seconds=30)
    asm.add(header("1.1"), now=100.0)
    asm.add(header("1.2"), now=100.5)

    asm.association_released(["1.2.3"], now=101.0, grace_seconds=1.0)

    assert asm.next_deadline() == 102.0
    assert asm.pop_complete(now=101.99) == []
    (study,) = asm.pop_complete(now=102.0)
    assert study.instance_count == 2
    assert asm.next_deadline() is None


def test_an_instance_after_the_release_restores_the_quiet_period_until_the_next_release() -> None:
    asm = Assembler(quiet_seconds=30)
    asm.add(header("1.1", series="9.1"), now=100.0)
    asm.association_released(["1.2.3"], now=101.0, grace_seconds=1.0)
    asm.add(header("2.1", series="9.2"), now=101.5)  # a follow-up association within the grace

    assert asm.next_deadline() == 131.5
    assert asm.pop_complete(now=102.0) == []

    asm.association_released(["1.2.3"], now=103.0, grace_seconds=1.0)  # the follow-up's own release
    assert asm.next_deadline() == 104.0
    assert asm.pop_complete(now=103.5) == []
    (study,) = asm.pop_complete(now=104.0)
    assert sorted(study.series) == ["9.1", "9.2"]


def test_release_of_an_unknown_study_changes_nothing() -> None:
    asm = Assembler(quiet_seconds=30)
    asm.add(header("1.1"), now=100.0)

    asm.association_released(["9.9.9"], now=101.0, grace_seconds=0.0)

    assert asm.next_deadline() == 130.0
    assert asm.pop_complete(now=129.0) == []
    assert asm.pending_study_uids() == ["1.2.3"]


def test_release_of_one_of_two_pending_studies_completes_only_that_one() -> None:
    asm = Assembler(quiet_seconds=30)
    asm.add(header("1.1", study="7.1"), now=100.0)
    asm.add(header("2.1", study="7.2"), now=100.0)

    asm.association_released(["7.2"], now=101.0, grace_seconds=1.0)

    assert [s.study_uid for s in asm.pop_complete(now=102.0)] == ["7.2"]
    assert asm.pending_study_uids() == ["7.1"]
    assert asm.next_deadline() == 130.0


def test_release_never_postpones_an_earlier_deadline() -> None:
    asm = Assembler(quiet_seconds=5)
    asm.add(header("1.1", study="7.1"), now=100.0)
    asm.add(header("2.1", study="7.2"), now=100.0)

    asm.association_released(["7.1"], now=104.0, grace_seconds=3.0)  # quiet period ends first: 105
    asm.association_released(["7.2"], now=101.0, grace_seconds=1.0)
    asm.association_released(["7.2"], now=101.5, grace_seconds=5.0)  # a later, longer grace: still 102

    assert [s.study_uid for s in asm.pop_complete(now=102.0)] == ["7.2"]
    assert asm.next_deadline() == 105.0


def test_negative_grace_is_rejected() -> None:
    asm = Assembler(quiet_seconds=5)
    with pytest.raises(ValueError):
        asm.association_released(["1.2.3"], now=0.0, grace_seconds=-1.0)


# --- StoreSCP release / abort events ------------------------------------------------------------------------


class _Messages(logging.Handler):
    """Collects formatted log messages from the association threads."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.queue: queue.Queue[str] = queue.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        self.queue.put(record.getMessage())

    def wait_for(self, fragment: str) -> str:
        deadline = time.monotonic() + WAIT
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if fragment in message:
                return message
        raise AssertionError(f"no log message containing {fragment!r}")


@pytest.fixture
def scp_log() -> Iterator[_Messages]:
    messages = _Messages()
    logger = logging.getLogger("dicom_router.scp")
    logger.addHandler(messages)
    try:
        yield messages
    finally:
        logger.removeHandler(messages)


MakeScp = Callable[..., tuple[StoreSCP, "queue.Queue[Released]"]]


@pytest.fixture
def make_scp(tmp_path: Path) -> Iterator[MakeScp]:
    started: list[StoreSCP] = []

    def make(on_instance: Callable[..., None] = lambda _: None) -> tuple[StoreSCP, queue.Queue[Released]]:
        released: queue.Queue[Released] = queue.Queue()
        scp = StoreSCP(
            "RADAI",
            LOOPBACK,
            0,
            Spool(tmp_path / f"spool{len(started)}"),
            on_instance,
            on_association_released=lambda ae, uids: released.put((ae, uids)),
        )
        scp.start()
        started.append(scp)
        return scp, released

    yield make
    for scp in started:
        scp.stop()


def _drained(released: queue.Queue[Released]) -> list[Released]:
    items = []
    while True:
        try:
            items.append(released.get_nowait())
        except queue.Empty:
            return items


def test_storescu_release_reports_the_studies_of_the_association(make_scp: MakeScp) -> None:
    scp, released = make_scp()

    files = [*CT_FILES[:3], *image_files(PHANTOM_STUDY / "S1000")]
    assert storescu(scp.port, files).returncode == 0

    assert released.get(timeout=WAIT) == (
        "MODALITY",
        frozenset({_study_uid(CT_FILES[0]), _study_uid(files[-1])}),
    )


def test_storescu_abort_reports_nothing_and_logs_no_uid(make_scp: MakeScp, scp_log: _Messages) -> None:
    scp, released = make_scp()

    storescu(scp.port, CT_FILES[:2], "--abort")

    message = scp_log.wait_for("aborted")
    assert "MODALITY" in message
    assert LOOPBACK in message
    assert _study_uid(CT_FILES[0]) not in message
    assert _drained(released) == []


def test_dropped_connection_reports_nothing(make_scp: MakeScp, scp_log: _Messages) -> None:
    scp, released = make_scp()
    ds = pydicom.dcmread(CT_FILES[0])
    ae = AE(ae_title="DROPPER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(LOOPBACK, scp.port, ae_title="RADAI")
    try:
        assert assoc.is_established
        assert int(assoc.send_c_store(ds).Status) == 0
        raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        assert raw is not None
        raw.shutdown(socket.SHUT_RDWR)  # the network goes away: no A-RELEASE, no A-ABORT
        raw.close()

        assert "DROPPER" in scp_log.wait_for("aborted")
        assert _drained(released) == []
    finally:
        ae.shutdown()


def test_failed_stores_are_not_reported_on_release(make_scp: MakeScp) -> None:
    calls: list[int] = []

    def fail_first(_: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("queue is full")

    scp, released = make_scp(fail_first)
    assert storescu(scp.port, CT_FILES[:1]).returncode != 0  # answered PROCESSING_FAILURE, then released
    phantom = image_files(PHANTOM_STUDY / "S1000")
    assert storescu(scp.port, phantom).returncode == 0

    assert released.get(timeout=WAIT) == ("MODALITY", frozenset({_study_uid(phantom[0])}))
    assert _drained(released) == []


def test_a_study_still_open_on_another_association_is_reported_by_the_last_release(
    make_scp: MakeScp,
) -> None:
    scp, released = make_scp()
    first, second = (pydicom.dcmread(p) for p in CT_FILES[:2])
    ae = AE(ae_title="PARALLEL")
    ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
    try:
        a = ae.associate(LOOPBACK, scp.port, ae_title="RADAI")
        b = ae.associate(LOOPBACK, scp.port, ae_title="RADAI")
        assert a.is_established and b.is_established
        assert int(a.send_c_store(first).Status) == 0
        assert int(b.send_c_store(second).Status) == 0
        a.release()  # b still carries the study: this release must not report it
        b.release()

        assert released.get(timeout=WAIT) == ("PARALLEL", frozenset({_study_uid(CT_FILES[0])}))
        assert _drained(released) == []
    finally:
        ae.shutdown()


# --- Receiver end to end --------------------------------------------------------------------------------------

MakeReceiver = Callable[..., Receiver]
Completed = tuple[Study, float]


@pytest.fixture
def make_receiver(tmp_path: Path) -> Iterator[MakeReceiver]:
    started: list[Receiver] = []

    def make(
        on_study: Callable[[Study], None], quiet_seconds: float, release_grace_seconds: float | None
    ) -> Receiver:
        receiver = Receiver(
            "RADAI",
            LOOPBACK,
            0,
            tmp_path / f"spool{len(started)}",
            quiet_seconds,
            on_study,
            release_grace_seconds=release_grace_seconds,
        )
        receiver.start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()


def _timed(completed: queue.Queue[Completed]) -> Callable[[Study], None]:
    return lambda study: completed.put((study, time.time()))


def test_study_completes_on_release_long_before_the_quiet_period(make_receiver: MakeReceiver) -> None:
    studies: queue.Queue[Study] = queue.Queue()
    receiver = make_receiver(studies.put, quiet_seconds=30, release_grace_seconds=0.5)

    assert storescu(receiver.port, CT_FILES).returncode == 0

    study = studies.get(timeout=WAIT)  # the quiet period alone would take 30 s
    assert study.instance_count == len(CT_FILES) == 41
    assert study.study_uid == _study_uid(CT_FILES[0])
    assert len(study.series) == 1
    assert study.calling_ae == "MODALITY"


def test_two_series_in_associations_within_the_grace_complete_as_one_study(
    make_receiver: MakeReceiver,
) -> None:
    studies: queue.Queue[Study] = queue.Queue()
    receiver = make_receiver(studies.put, quiet_seconds=30, release_grace_seconds=2.0)

    assert storescu(receiver.port, image_files(PHANTOM_STUDY / "S2010")).returncode == 0
    assert storescu(receiver.port, image_files(PHANTOM_STUDY / "S1000")).returncode == 0

    study = studies.get(timeout=WAIT + 2.0)
    assert sorted(len(s.instances) for s in study.series.values()) == [1, 28]
    with pytest.raises(queue.Empty):
        studies.get(timeout=0.5)  # exactly one study


def test_aborted_association_completes_only_after_the_quiet_period(make_receiver: MakeReceiver) -> None:
    completed: queue.Queue[Completed] = queue.Queue()
    receiver = make_receiver(_timed(completed), quiet_seconds=1.5, release_grace_seconds=0.2)
    ds = pydicom.dcmread(CT_FILES[0])
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    try:
        assoc = ae.associate(LOOPBACK, receiver.port, ae_title="RADAI")
        assert assoc.is_established
        assert int(assoc.send_c_store(ds).Status) == 0
        assoc.abort()

        study, completed_at = completed.get(timeout=WAIT)
    finally:
        ae.shutdown()
    assert study.instance_count == 1
    # Lower bound only (cannot fail on a slow machine): the quiet period counts from the instance's arrival,
    # a wrongly honoured release would have completed it about grace (0.2 s) after the abort.
    assert completed_at - study.last_received >= 1.0


def test_release_is_ignored_when_the_grace_is_none(make_receiver: MakeReceiver) -> None:
    completed: queue.Queue[Completed] = queue.Queue()
    receiver = make_receiver(_timed(completed), quiet_seconds=1.5, release_grace_seconds=None)

    assert storescu(receiver.port, image_files(PHANTOM_STUDY / "S1000")).returncode == 0

    study, completed_at = completed.get(timeout=WAIT)
    assert study.instance_count == 1
    assert completed_at - study.last_received >= 1.0  # lower bound only, as above


def test_negative_release_grace_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Receiver("RADAI", LOOPBACK, 0, tmp_path / "spool", 1.0, lambda _: None, release_grace_seconds=-0.1)
