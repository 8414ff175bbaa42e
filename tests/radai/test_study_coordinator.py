"""The scale-out receivers' shared assembly (radai.scaleout.StudyCoordinator) on real spooled CT files: a
study split across receivers is planned once, by the receiver whose part completes last, as one study; a
part whose receiver went away for good stops holding it back after `abandoned_part_seconds`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_router.assembler import Study
from radai.scaleout import StudyCoordinator, assemble
from radai.storage.sql_parts import StudyParts
from tests.e2e.peers import CRLM
from tests.e2e.test_scale_out import copy_series

pytestmark = pytest.mark.skipif(not CRLM.is_dir(), reason="../shared test data not present")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def part(tmp: Path, name: str, study_uid: str, source: str, count: int) -> Study:
    copy_series(CRLM / source / "image", tmp / name, study_uid, count)
    study = assemble(sorted((tmp / name).glob("*.dcm")), "MODALITY", 1000.0)
    assert study is not None
    return study


def test_a_split_study_is_planned_once_as_one_study_by_the_receiver_completing_last(tmp_path: Path) -> None:
    uid = generate_uid()
    planned: list[Study] = []
    parts = StudyParts.sqlite(tmp_path / "radai.sqlite")
    first = StudyCoordinator(parts, "receiver-1", planned.append, clock=Clock())
    second = StudyCoordinator(StudyParts.sqlite(tmp_path / "radai.sqlite"), "receiver-2", planned.append)
    a, b = part(tmp_path, "a", uid, "CRLM-CT-1004", 4), part(tmp_path, "b", uid, "CRLM-CT-1006", 3)
    for header in next(iter(b.series.values())).instances[:1]:
        second.on_instance(header)  # receiver 2 has begun receiving its series
    first.on_part_complete(a)
    assert planned == []  # receiver 2 is still receiving
    second.on_part_complete(b)
    (whole,) = planned
    assert whole.study_uid == uid and len(whole.series) == 2 and whole.instance_count == 7


def test_a_study_waiting_for_a_receiver_that_went_away_is_planned_by_the_sweep(tmp_path: Path) -> None:
    uid = generate_uid()
    planned: list[Study] = []
    clock = Clock()
    coordinator = StudyCoordinator(
        StudyParts.sqlite(tmp_path / "radai.sqlite"), "receiver-1", planned.append, clock
    )
    gone = StudyParts.sqlite(tmp_path / "radai.sqlite")
    gone.touch(uid, "receiver-2", clock.now)  # then it died for good
    coordinator.on_part_complete(part(tmp_path, "a", uid, "CRLM-CT-1004", 4))
    clock.now += 60
    assert coordinator.sweep(abandoned_after_s=3600) == 0 and planned == []
    clock.now += 3600
    assert coordinator.sweep(abandoned_after_s=3600) == 1
    (whole,) = planned
    assert whole.instance_count == 4
    assert coordinator.sweep(abandoned_after_s=3600) == 0  # planned once
