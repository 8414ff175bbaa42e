"""Declarative series selection: rules as data, regexes validated, deterministic choice."""

from __future__ import annotations

import pytest

from dicom_router.assembler import Assembler, Study
from dicom_router.headers import InstanceHeader, read_header
from dicom_router.selection import SeriesRule, select_series
from tests.dicom_router.factories import CORONAL_IOP, SAGITTAL_IOP, header
from tests.dicom_router.peers import PHANTOM_STUDY, TILTED_SERIES, image_files


def _study(*headers: InstanceHeader) -> Study:
    asm = Assembler(quiet_seconds=0)
    for h in headers:
        asm.add(h, now=0.0)
    (study,) = asm.pop_complete(now=0.0)
    return study


def _series(n: int, uid: str, **kwargs: object) -> list[InstanceHeader]:
    return [header(f"{uid}.{i}", series=uid, **kwargs) for i in range(1, n + 1)]  # type: ignore[arg-type]


def test_modality_rule_matches_case_insensitively() -> None:
    study = _study(*_series(3, "9.1", modality="CT"), *_series(5, "9.2", modality="MR"))

    chosen = select_series(study, [SeriesRule(modality=("ct",))])

    assert chosen is not None and chosen.series_uid == "9.1"


def test_lone_modality_string_means_one_value() -> None:
    assert SeriesRule(modality="CT").modality == ("CT",)  # type: ignore[arg-type]


def test_description_regex_is_a_case_insensitive_search() -> None:
    study = _study(*_series(3, "9.1", description="Ax T2 FLAIR"), *_series(9, "9.2", description="T1 MPRAGE"))

    chosen = select_series(study, [SeriesRule(series_description=r"flair")])

    assert chosen is not None and chosen.series_uid == "9.1"


def test_bad_regex_raises_value_error_at_construction() -> None:
    with pytest.raises(ValueError, match="regex"):
        SeriesRule(series_description="(unclosed")


@pytest.mark.parametrize(
    "kwargs", [{"orientation": "oblique"}, {"min_slices": 0}, {"min_slices": True}, {"modality": (1,)}]
)
def test_invalid_rule_values_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SeriesRule(**kwargs)  # type: ignore[arg-type]


def test_orientation_rule_uses_image_orientation_patient() -> None:
    study = _study(
        *_series(20, "9.1"),  # axial
        *_series(10, "9.2", orientation=SAGITTAL_IOP),
        *_series(15, "9.3", orientation=CORONAL_IOP),
    )

    def pick(orientation: str) -> str | None:
        chosen = select_series(study, [SeriesRule(orientation=orientation)])
        return None if chosen is None else chosen.series_uid

    assert pick("axial") == "9.1"
    assert pick("sagittal") == "9.2"
    assert pick("coronal") == "9.3"


def test_min_slices_counts_frames_of_multiframe_instances() -> None:
    study = _study(*_series(1, "9.1", frames=40), *_series(10, "9.2"))

    chosen = select_series(study, [SeriesRule(min_slices=30)])

    assert chosen is not None and chosen.series_uid == "9.1"
    assert select_series(study, [SeriesRule(min_slices=41)]) is None


def test_image_type_requires_every_listed_value() -> None:
    study = _study(
        *_series(5, "9.1", image_type=("DERIVED", "SECONDARY", "AXIAL")),
        *_series(3, "9.2", image_type=("ORIGINAL", "PRIMARY", "AXIAL")),
    )

    chosen = select_series(study, [SeriesRule(image_type=("original", "axial"))])

    assert chosen is not None and chosen.series_uid == "9.2"


def test_body_part_matches_case_insensitively() -> None:
    study = _study(*_series(3, "9.1", body_part="ABDOMEN"), *_series(9, "9.2", body_part="CHEST"))

    chosen = select_series(study, [SeriesRule(body_part="abdomen")])

    assert chosen is not None and chosen.series_uid == "9.1"


def test_largest_matching_series_wins_and_ties_break_on_lowest_uid() -> None:
    study = _study(*_series(4, "9.3"), *_series(4, "9.2"), *_series(2, "9.1"))

    chosen = select_series(study, [SeriesRule(modality=("CT",))])

    assert chosen is not None and chosen.series_uid == "9.2"


def test_any_rule_may_match() -> None:
    study = _study(*_series(3, "9.1", modality="MR"), *_series(2, "9.2", modality="CT"))

    chosen = select_series(study, [SeriesRule(modality=("PT",)), SeriesRule(modality=("CT",))])

    assert chosen is not None and chosen.series_uid == "9.2"


def test_no_rules_or_no_match_selects_nothing() -> None:
    study = _study(*_series(3, "9.1"))

    assert select_series(study, []) is None
    assert select_series(study, [SeriesRule(modality=("MR",))]) is None


def test_rules_are_frozen_hashable_values() -> None:
    a = SeriesRule(modality=("CT",), series_description="abd")
    b = SeriesRule(modality=("ct",), series_description="abd")

    assert a == b and hash(a) == hash(b)


def test_real_phantom_study_picks_the_axial_brain_series_over_localizer_and_summary() -> None:
    headers = [
        read_header(p, "MODALITY", 0.0)
        for folder in ("S1000", "S2010", "S4010")
        for p in image_files(PHANTOM_STUDY / folder)
    ]
    study = _study(*headers)
    assert len(study.series) == 3

    axial = select_series(
        study,
        [
            SeriesRule(
                modality=("CT",), orientation="axial", min_slices=10, image_type=("ORIGINAL", "PRIMARY")
            )
        ],
    )
    localizer = select_series(study, [SeriesRule(image_type=("LOCALIZER",))])
    summary = select_series(study, [SeriesRule(series_description="exam summary")])

    assert axial is not None and axial.description == "STD BRAIN 5MM" and axial.slice_count == 28
    assert localizer is not None and localizer.orientation == "sagittal" and localizer.slice_count == 1
    assert summary is not None and summary.slice_count == 6


def test_real_tilted_gantry_series_counts_as_axial() -> None:
    study = _study(*(read_header(p, "MODALITY", 0.0) for p in image_files(TILTED_SERIES)))

    chosen = select_series(study, [SeriesRule(orientation="axial", series_description="^stereotaxis$")])

    assert chosen is not None and chosen.slice_count == 54
