"""Study assembly with explicit times: grouping, de-duplication and quiet-period completion."""

from __future__ import annotations

import pytest

from dicom_router.assembler import Assembler, orientation_label
from tests.dicom_router.factories import AXIAL_IOP, CORONAL_IOP, SAGITTAL_IOP, header


def test_instances_group_into_series_of_one_study() -> None:
    asm = Assembler(quiet_seconds=5)
    asm.add(header("1.1", series="9.1", received_at=100.0), now=100.0)
    asm.add(header("1.2", series="9.1", received_at=101.0), now=101.0)
    asm.add(header("1.3", series="9.2", received_at=102.0), now=102.0)

    (study,) = asm.pop_complete(now=107.0)

    assert study.study_uid == "1.2.3"
    assert sorted(study.series) == ["9.1", "9.2"]
    assert [h.sop_instance_uid for h in study.series["9.1"].instances] == ["1.1", "1.2"]
    assert study.first_received == 100.0
    assert study.last_received == 102.0
    assert study.calling_ae == "MODALITY"
    assert study.instance_count == 3


def test_study_is_not_complete_before_the_quiet_period() -> None:
    asm = Assembler(quiet_seconds=5)
    asm.add(header("1.1"), now=100.0)

    assert asm.pop_complete(now=104.99) == []
    assert len(asm.pop_complete(now=105.0)) == 1
    assert asm.pop_complete(now=200.0) == []  # popped once only


def test_a_new_instance_restarts_the_quiet_period() -> None:
    asm = Assembler(quiet_seconds=5)
    asm.add(header("1.1"), now=100.0)
    asm.add(header("1.2"), now=104.0)

    assert asm.pop_complete(now=106.0) == []
    assert asm.next_deadline() == 109.0
    assert len(asm.pop_complete(now=109.0)[0].series["1.2.3.1"].instances) == 2


def test_resent_instance_replaces_and_does_not_duplicate() -> None:
    asm = Assembler(quiet_seconds=1)
    asm.add(header("1.1", description="first"), now=0.0)
    asm.add(header("1.2"), now=0.1)
    asm.add(header("1.1", description="again", received_at=0.5), now=0.5)

    (study,) = asm.pop_complete(now=2.0)

    instances = study.series["1.2.3.1"].instances
    assert sorted(h.sop_instance_uid for h in instances) == ["1.1", "1.2"]
    assert [h.series_description for h in instances if h.sop_instance_uid == "1.1"] == ["again"]


def test_resent_instance_moved_to_another_series_leaves_no_empty_series() -> None:
    asm = Assembler(quiet_seconds=1)
    asm.add(header("1.1", series="9.1"), now=0.0)
    asm.add(header("1.1", series="9.2"), now=0.1)

    (study,) = asm.pop_complete(now=5.0)

    assert list(study.series) == ["9.2"]


def test_studies_complete_independently_oldest_first() -> None:
    asm = Assembler(quiet_seconds=2)
    asm.add(header("1.1", study="5.1"), now=10.0)
    asm.add(header("2.1", study="5.2"), now=11.0)
    asm.add(header("3.1", study="5.3"), now=20.0)

    assert [s.study_uid for s in asm.pop_complete(now=13.0)] == ["5.1", "5.2"]
    assert asm.next_deadline() == 22.0
    assert asm.pending_study_uids() == ["5.3"]


def test_next_deadline_is_none_when_idle() -> None:
    asm = Assembler(quiet_seconds=2)
    assert asm.next_deadline() is None
    asm.add(header("1.1"), now=1.0)
    asm.pop_complete(now=3.0)
    assert asm.next_deadline() is None


def test_an_instance_after_completion_starts_a_new_study_batch() -> None:
    asm = Assembler(quiet_seconds=1)
    asm.add(header("1.1"), now=0.0)
    asm.pop_complete(now=1.0)
    asm.add(header("1.2"), now=5.0)

    (late,) = asm.pop_complete(now=6.0)

    assert [h.sop_instance_uid for h in late.series["1.2.3.1"].instances] == ["1.2"]


def test_pop_study_completes_on_another_signal() -> None:
    asm = Assembler(quiet_seconds=60)
    asm.add(header("1.1"), now=0.0)

    study = asm.pop_study("1.2.3")

    assert study is not None and study.instance_count == 1
    assert asm.pop_study("1.2.3") is None
    assert asm.next_deadline() is None


def test_series_fields_and_slice_count_include_frames() -> None:
    asm = Assembler(quiet_seconds=0)
    asm.add(
        header(
            "1.1",
            modality="MR",
            description="T1 MPRAGE",
            body_part="BRAIN",
            frames=8,
            orientation=SAGITTAL_IOP,
        ),
        now=0.0,
    )
    asm.add(header("1.2", modality="MR", frames=8, orientation=SAGITTAL_IOP), now=0.0)

    series = asm.pop_complete(now=0.0)[0].series["1.2.3.1"]

    assert (series.modality, series.description, series.body_part) == ("MR", "T1 MPRAGE", "BRAIN")
    assert series.orientation == "sagittal"
    assert series.slice_count == 16


def test_negative_quiet_period_is_rejected() -> None:
    with pytest.raises(ValueError):
        Assembler(quiet_seconds=-1)


@pytest.mark.parametrize(
    ("iop", "label"),
    [
        (AXIAL_IOP, "axial"),
        (SAGITTAL_IOP, "sagittal"),
        (CORONAL_IOP, "coronal"),
        ((1.0, 0.0, 0.0, 0.0, 0.9483237, -0.3173047), "axial"),  # 18.5 degree gantry tilt
        ((0.0, 1.0, 0.0, 0.3, 0.0, -0.95), "sagittal"),  # oblique, still mostly sagittal
        ((1.0, 0.0, 0.0, 1.0, 0.0, 0.0), None),  # degenerate: row == column
        (None, None),
        ((1.0, 0.0, 0.0), None),
    ],
)
def test_orientation_label_from_the_slice_normal(iop: tuple[float, ...] | None, label: str | None) -> None:
    assert orientation_label(iop) == label
