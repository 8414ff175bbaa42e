"""Durability of the spool: disk watermark and free-space floor answered with 0xA700 and no partial files,
recovery of spooled instances at start-up (unreadable files quarantined), idempotent re-sends."""

from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from dicom_router.assembler import Study
from dicom_router.headers import read_header
from dicom_router.receiver import Receiver
from dicom_router.spool import Spool, SpoolFullError
from dicom_router.statuses import Status
from tests.dicom_router.factories import ManualClock
from tests.dicom_router.peers import CT_SERIES, LOOPBACK, dcm_files, echoscu, storescu

QUIET = 0.5
WAIT = 30.0  # generous upper bound for a loaded machine; never a timing assertion
MIB = 1024 * 1024
CT_FILES = dcm_files(CT_SERIES)

MakeReceiver = Callable[..., Receiver]


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs root and mount rights; skipped elsewhere), unmounted after the test."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    run = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True, timeout=30
    )
    if run.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


@pytest.fixture
def make_receiver(tmp_path: Path) -> Iterator[MakeReceiver]:
    started: list[Receiver] = []

    def make(
        on_study: Callable[[Study], None],
        clock: Callable[[], float] = time.time,
        spool_dir: Path | None = None,
        spool_max_used_fraction: float = 1.0,
        spool_min_free_bytes: int = 0,
        recovery_delay_seconds: float | None = None,
    ) -> Receiver:
        receiver = Receiver(
            "RADAI",
            LOOPBACK,
            0,
            tmp_path / "spool" if spool_dir is None else spool_dir,
            QUIET,
            on_study,
            clock=clock,
            spool_max_used_fraction=spool_max_used_fraction,
            spool_min_free_bytes=spool_min_free_bytes,
            recovery_delay_seconds=recovery_delay_seconds,
        )
        receiver.start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()


def _spool_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file())


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _prefill(spool_dir: Path, files: list[Path]) -> list[str]:
    """Spool files as a crashed server would have left them (named by SOP Instance UID)."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    uids = []
    for src in files:
        uid = _sop_uid(src)
        shutil.copyfile(src, spool_dir / f"{uid}.dcm")
        uids.append(uid)
    return uids


# --- Spool: watermark, floor, partial writes ----------------------------------------------------------------


def test_store_under_the_free_space_floor_raises_spool_full_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    free = shutil.disk_usage(tmp_path).free
    spool = Spool(root, min_free_bytes=free + 1024 * MIB)

    with pytest.raises(SpoolFullError) as refused:
        spool.store("1.2.3.4", b"x" * 1024)

    assert isinstance(refused.value, OSError) and refused.value.errno == errno.ENOSPC
    assert "floor" in str(refused.value) and "\n" not in str(refused.value)
    assert "1.2.3.4" not in str(refused.value)
    assert list(root.iterdir()) == []


def test_store_above_the_usage_watermark_raises_spool_full(tmp_path: Path) -> None:
    usage = shutil.disk_usage(tmp_path)
    fraction = usage.used / (usage.used + usage.free)
    if fraction < 0.01:
        pytest.skip("the test file system is almost empty")
    spool = Spool(tmp_path / "spool", max_used_fraction=fraction / 2, min_free_bytes=0)

    with pytest.raises(SpoolFullError, match="watermark"):
        spool.store("1.2.3.4", b"x")

    assert list((tmp_path / "spool").iterdir()) == []


def test_store_within_the_limits_succeeds(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_used_fraction=1.0, min_free_bytes=0)

    assert spool.store("1.2.3.4", b"abc").read_bytes() == b"abc"


@pytest.mark.parametrize(
    "options", [{"max_used_fraction": 0.0}, {"max_used_fraction": 1.5}, {"min_free_bytes": -1}]
)
def test_spool_rejects_nonsense_limits(tmp_path: Path, options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Spool(tmp_path, **options)  # type: ignore[arg-type]


def test_floor_counts_the_incoming_bytes_on_a_small_file_system(tiny_fs: Path) -> None:
    spool = Spool(tiny_fs, max_used_fraction=1.0, min_free_bytes=1 * MIB)

    spool.store("1.1", b"a" * MIB)  # 4 MiB free -> 3 MiB after: fine
    with pytest.raises(SpoolFullError):
        spool.store("1.2", b"b" * (2 * MIB + MIB // 2))  # would leave 0.5 MiB: refused before writing

    assert _spool_files(tiny_fs) == ["1.1.dcm"]


def test_write_failing_midway_for_a_full_disk_leaves_no_partial_file(tiny_fs: Path) -> None:
    spool = Spool(tiny_fs, max_used_fraction=1.0, min_free_bytes=0)  # checks off: the real ENOSPC

    with pytest.raises(OSError) as failed:
        spool.store("1.2.3", b"x" * (8 * MIB))

    assert failed.value.errno == errno.ENOSPC
    assert _spool_files(tiny_fs) == []
    assert shutil.disk_usage(tiny_fs).used < MIB  # the temporary file's blocks were given back


def test_quarantine_moves_the_file_aside_and_refuses_foreign_paths(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    bad = spool.store("1.2.3", b"garbage")

    moved = spool.quarantine(bad)

    assert moved == tmp_path / "spool" / "quarantine" / "1.2.3.dcm" and moved.read_bytes() == b"garbage"
    assert spool.pending() == []
    outside = tmp_path / "x.dcm"
    outside.write_bytes(b"x")
    with pytest.raises(ValueError):
        spool.quarantine(outside)


def test_remove_keeps_a_file_rewritten_after_the_hand_off(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.store("1.2.3", b"re-sent while the first copy was being processed")
    os.utime(path, (2_000.0, 2_000.0))

    assert spool.remove(path, unless_written_after=1_999.0) is False
    assert path.is_file()
    assert spool.remove(path, unless_written_after=2_000.0) is True
    assert not path.exists()
    assert spool.remove(path) is False


# --- Through the real SCP -------------------------------------------------------------------------------------


def test_full_spool_answers_out_of_resources_leaves_nothing_and_keeps_serving(
    make_receiver: MakeReceiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    free = shutil.disk_usage(tmp_path).free
    receiver = make_receiver(
        lambda _s: None, spool_max_used_fraction=0.95, spool_min_free_bytes=free + 1024 * MIB
    )

    sent = storescu(receiver.port, CT_FILES[:3], "-v")

    assert sent.returncode != 0
    assert "Refused: OutOfResources" in sent.stderr
    assert _spool_files(receiver.spool.root) == []
    ae = AE(ae_title="SCU")
    ae.add_requested_context(pydicom.dcmread(CT_FILES[0]).SOPClassUID)
    assoc = ae.associate(LOOPBACK, receiver.port, ae_title="RADAI")
    try:
        assert assoc.is_established
        status = assoc.send_c_store(pydicom.dcmread(CT_FILES[1]))
        assert status.Status == Status.OUT_OF_RESOURCES
    finally:
        assoc.release()
        ae.shutdown()
    assert echoscu(receiver.port).returncode == 0
    assert "under the floor" in caplog.text
    assert _sop_uid(CT_FILES[0]) not in caplog.text


def test_disk_filling_mid_study_refuses_then_serves_again_once_space_is_freed(
    make_receiver: MakeReceiver, tiny_fs: Path
) -> None:
    receiver = make_receiver(
        lambda _s: None, spool_dir=tiny_fs, spool_max_used_fraction=1.0, spool_min_free_bytes=MIB
    )
    ae = AE(ae_title="SCU")
    ae.add_requested_context(pydicom.dcmread(CT_FILES[0]).SOPClassUID)
    assoc = ae.associate(LOOPBACK, receiver.port, ae_title="RADAI")
    statuses: list[int] = []
    try:
        assert assoc.is_established
        for path in CT_FILES[:12]:  # ~0.5 MiB each: the 3 MiB above the floor fill after a few
            statuses.append(int(assoc.send_c_store(path).Status))
    finally:
        assoc.release()
    accepted = statuses.count(Status.SUCCESS)
    assert 0 < accepted < len(statuses)
    assert set(statuses) == {Status.SUCCESS, Status.OUT_OF_RESOURCES}
    assert statuses[accepted:] == [Status.OUT_OF_RESOURCES] * (len(statuses) - accepted)
    stored = receiver.spool.pending()
    assert len(stored) == accepted and _spool_files(tiny_fs) == sorted(p.name for p in stored)

    for path in stored:  # the operator (or the workflow) frees space
        receiver.spool.remove(path)
    assoc = ae.associate(LOOPBACK, receiver.port, ae_title="RADAI")
    try:
        assert assoc.send_c_store(CT_FILES[-1]).Status == Status.SUCCESS
    finally:
        assoc.release()
        ae.shutdown()


def test_resent_instance_with_new_bytes_replaces_the_file_atomically(
    make_receiver: MakeReceiver, tmp_path: Path
) -> None:
    receiver = make_receiver(lambda _s: None, clock=ManualClock())
    changed = pydicom.dcmread(CT_FILES[0])
    changed.SeriesDescription = "re-sent with a correction"
    path = tmp_path / "changed.dcm"
    changed.save_as(path, enforce_file_format=True)

    assert storescu(receiver.port, [CT_FILES[0]]).returncode == 0
    assert storescu(receiver.port, [path]).returncode == 0

    (spooled,) = receiver.spool.pending()
    assert spooled.name == f"{changed.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(spooled).SeriesDescription == "re-sent with a correction"
    assert _spool_files(receiver.spool.root) == [spooled.name]


# --- Recovery at start-up ---------------------------------------------------------------------------------------


def test_start_recovers_spooled_instances_and_completes_their_study_after_the_quiet_period(
    make_receiver: MakeReceiver, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    uids = _prefill(spool_dir, CT_FILES[:20])
    clock = ManualClock()
    studies: queue.Queue[Study] = queue.Queue()

    receiver = make_receiver(studies.put, clock=clock)

    with pytest.raises(queue.Empty):
        studies.get(timeout=0.5)  # the sender may be re-sending: wait for the quiet period
    clock.advance(QUIET)
    study = studies.get(timeout=WAIT)
    (series,) = study.series.values()
    assert sorted(h.sop_instance_uid for h in series.instances) == sorted(uids)
    assert all(h.path.parent == spool_dir for h in series.instances)
    assert study.study_uid == read_header(CT_FILES[0], "X", 0.0).study_uid
    assert receiver.recovery is not None and (receiver.recovery.instances, receiver.recovery.studies) == (
        20,
        1,
    )


def test_recovered_study_merges_with_the_senders_retry(make_receiver: MakeReceiver, tmp_path: Path) -> None:
    _prefill(tmp_path / "spool", CT_FILES[:15])
    clock = ManualClock()
    studies: queue.Queue[Study] = queue.Queue()
    receiver = make_receiver(studies.put, clock=clock)

    assert storescu(receiver.port, CT_FILES).returncode == 0  # the PACS re-sends the whole series
    clock.advance(QUIET)

    study = studies.get(timeout=WAIT)
    assert study.instance_count == len(CT_FILES)
    assert len(receiver.spool.pending()) == len(CT_FILES)
    clock.advance(10 * QUIET)
    with pytest.raises(queue.Empty):
        studies.get(timeout=0.5)  # exactly one study


def test_recovery_delay_makes_recovered_studies_due_promptly(
    make_receiver: MakeReceiver, tmp_path: Path
) -> None:
    _prefill(tmp_path / "spool", CT_FILES[:5])
    studies: queue.Queue[Study] = queue.Queue()

    make_receiver(studies.put, clock=ManualClock(), recovery_delay_seconds=0.0)

    assert studies.get(timeout=WAIT).instance_count == 5  # the manual clock never moved


def test_recovery_quarantines_unreadable_files_removes_partial_writes_and_never_crashes(
    make_receiver: MakeReceiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool_dir = tmp_path / "spool"
    good = _prefill(spool_dir, CT_FILES[:3])
    (spool_dir / "1.2.826.0.1.3680043.99.1.dcm").write_bytes(b"not DICOM at all" * 10)
    truncated = CT_FILES[3].read_bytes()[:200]
    (spool_dir / "1.2.826.0.1.3680043.99.2.dcm").write_bytes(truncated)
    shutil.copyfile(CT_FILES[4], spool_dir / "1.2.826.0.1.3680043.99.3.dcm")  # name and UID disagree
    (spool_dir / ".incoming-x1.part").write_bytes(b"half a write")
    studies: queue.Queue[Study] = queue.Queue()
    caplog.set_level(logging.INFO)

    receiver = make_receiver(studies.put, recovery_delay_seconds=0.0)

    study = studies.get(timeout=WAIT)
    assert sorted(h.sop_instance_uid for s in study.series.values() for h in s.instances) == sorted(good)
    assert _spool_files(spool_dir / "quarantine") == [
        "1.2.826.0.1.3680043.99.1.dcm",
        "1.2.826.0.1.3680043.99.2.dcm",
        "1.2.826.0.1.3680043.99.3.dcm",
    ]
    assert _spool_files(spool_dir) == sorted(f"{u}.dcm" for u in good)
    assert receiver.recovery is not None
    assert (receiver.recovery.quarantined, receiver.recovery.partial_removed) == (3, 1)
    assert "1.2.826.0.1.3680043.99" not in caplog.text and good[0] not in caplog.text
    assert storescu(receiver.port, CT_FILES[5:6]).returncode == 0  # serving


def test_instances_survive_a_stop_and_are_recovered_by_the_next_receiver(
    make_receiver: MakeReceiver, tmp_path: Path
) -> None:
    clock = ManualClock()
    early: queue.Queue[Study] = queue.Queue()
    first = make_receiver(early.put, clock=clock)
    assert storescu(first.port, CT_FILES[:10]).returncode == 0
    first.stop()  # before the study was due: it stays in the spool
    studies: queue.Queue[Study] = queue.Queue()

    second = make_receiver(studies.put, clock=clock, recovery_delay_seconds=0.0)

    assert studies.get(timeout=WAIT).instance_count == 10
    assert early.empty()
    assert len(second.spool.pending()) == 10


def test_recovered_study_keeps_the_calling_ae_of_its_sender(
    make_receiver: MakeReceiver, tmp_path: Path
) -> None:
    """The SCP records the sender's AE title in each spooled file's meta, so a study recovered after a restart
    is still attributed to its sender."""
    first_spool = tmp_path / "first"
    clock = ManualClock()
    unused: queue.Queue[Study] = queue.Queue()
    sender = make_receiver(unused.put, clock=clock, spool_dir=first_spool)
    assert storescu(sender.port, CT_FILES[:3], calling_ae="CT_SCANNER_7").returncode == 0
    spooled = sorted(first_spool.glob("*.dcm"))
    assert len(spooled) == 3
    assert {pydicom.dcmread(p).file_meta.SourceApplicationEntityTitle for p in spooled} == {"CT_SCANNER_7"}

    second_spool = tmp_path / "second"
    second_spool.mkdir()
    for path in spooled:
        shutil.copy2(path, second_spool / path.name)
    studies: queue.Queue[Study] = queue.Queue()
    make_receiver(studies.put, spool_dir=second_spool, recovery_delay_seconds=0.0)
    study = studies.get(timeout=WAIT)
    assert study.calling_ae == "CT_SCANNER_7"
