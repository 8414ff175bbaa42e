"""Declarative completion rules with explicit times: required series, per-series quiet, hard deadline,
validation that names the bad field, and the plain-data (YAML) form."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from dicom_router.assembler import Assembler, Outcome, Study
from dicom_router.completion import CompletionRules, OnDeadline
from dicom_router.selection import SeriesRule
from tests.dicom_router.factories import header

CT_AXIAL = SeriesRule(modality=("CT",), series_description=r"\baxial\b")
DOSE_REPORT = SeriesRule(series_description="dose report")


def _uids(due: list[tuple[Study, Outcome]]) -> list[tuple[str, Outcome]]:
    return [(study.study_uid, outcome) for study, outcome in due]


def _rules(**overrides: Any) -> CompletionRules:
    values: dict[str, Any] = {"study_quiet_seconds": 30.0, "all_of": (CT_AXIAL,), "deadline_seconds": 600.0}
    values.update(overrides)
    return CompletionRules(**values)


# --- required series -----------------------------------------------------------------------------------------


def test_all_of_keeps_the_study_waiting_until_both_required_series_are_there() -> None:
    asm = Assembler(rules=_rules(all_of=(CT_AXIAL, DOSE_REPORT)))
    asm.add(header("1.1", series="9.1", description="Head axial 5mm"), now=100.0)
    asm.association_released(["1.2.3"], now=101.0, grace_seconds=1.0)

    assert asm.pop_due(now=140.0) == []  # released and quiet, but the dose report is missing
    assert asm.next_deadline() == 700.0  # only the hard deadline is left

    asm.add(header("2.1", series="9.2", modality="SR", description="Dose Report"), now=150.0)
    assert asm.next_deadline() == 180.0
    assert asm.pop_due(now=179.9) == []
    ((study, outcome),) = asm.pop_due(now=180.0)
    assert outcome is Outcome.COMPLETE
    assert sorted(study.series) == ["9.1", "9.2"]


def test_all_of_rule_needs_modality_and_description_in_the_same_series() -> None:
    asm = Assembler(rules=_rules())
    asm.add(header("1.1", series="9.1", modality="CT", description="scout"), now=0.0)
    asm.add(header("2.1", series="9.2", modality="MR", description="axial T2"), now=0.0)

    assert asm.pop_due(now=100.0) == []

    asm.add(header("3.1", series="9.3", modality="CT", description="AXIAL 1.0 B30f"), now=100.0)
    assert _uids(asm.pop_due(now=130.0)) == [("1.2.3", Outcome.COMPLETE)]


def test_any_of_is_satisfied_by_either_rule() -> None:
    t1 = SeriesRule(modality=("MR",), series_description="t1")
    flair = SeriesRule(modality=("MR",), series_description="flair")
    asm = Assembler(rules=_rules(all_of=(), any_of=(t1, flair), study_quiet_seconds=10.0))
    asm.add(header("1.1", study="5.1", modality="MR", description="localizer"), now=0.0)
    asm.add(header("2.1", study="5.2", modality="MR", description="localizer"), now=0.0)
    asm.add(header("2.2", study="5.2", series="9.2", modality="MR", description="3D T1 MPRAGE"), now=1.0)
    asm.add(header("3.1", study="5.3", modality="MR", description="AX FLAIR"), now=2.0)

    assert _uids(asm.pop_due(now=20.0)) == [("5.2", Outcome.COMPLETE), ("5.3", Outcome.COMPLETE)]
    assert asm.pending_study_uids() == ["5.1"]


def test_required_series_counts_its_slices_with_min_slices() -> None:
    asm = Assembler(
        rules=_rules(all_of=(SeriesRule(modality=("CT",), min_slices=3),), study_quiet_seconds=5.0)
    )
    asm.add(header("1.1"), now=0.0)
    asm.add(header("1.2"), now=1.0)
    assert asm.pop_due(now=10.0) == []

    asm.add(header("1.3"), now=10.0)
    ((study, outcome),) = asm.pop_due(now=15.0)
    assert (study.instance_count, outcome) == (3, Outcome.COMPLETE)


def test_release_and_grace_still_shorten_the_wait_when_requirements_are_met() -> None:
    asm = Assembler(rules=_rules())
    asm.add(header("1.1", description="axial"), now=100.0)
    asm.add(header("1.2", description="axial"), now=100.2)
    asm.association_released(["1.2.3"], now=100.5, grace_seconds=1.0)

    assert asm.next_deadline() == 101.5
    assert asm.pop_due(now=101.4) == []
    assert _uids(asm.pop_due(now=101.5)) == [("1.2.3", Outcome.COMPLETE)]


# --- per-series quiet period -----------------------------------------------------------------------------------


def test_series_quiet_period_delays_the_release_signal_until_the_required_series_settles() -> None:
    asm = Assembler(rules=_rules(series_quiet_seconds=5.0))
    asm.add(header("1.1", description="axial"), now=100.0)
    asm.add(header("1.2", description="axial"), now=101.0)
    asm.association_released(["1.2.3"], now=102.0, grace_seconds=1.0)

    assert asm.next_deadline() == 106.0  # the axial series settles 5 s after its last instance
    assert asm.pop_due(now=105.9) == []
    assert _uids(asm.pop_due(now=106.0)) == [("1.2.3", Outcome.COMPLETE)]


def test_series_quiet_period_is_per_series_not_per_study() -> None:
    asm = Assembler(rules=_rules(series_quiet_seconds=5.0))
    asm.add(header("1.1", series="9.1", description="axial"), now=100.0)
    asm.add(header("2.1", series="9.2", modality="SR", description="dose report"), now=104.0)
    asm.association_released(["1.2.3"], now=104.5, grace_seconds=1.0)

    # The unrequired report arriving at 104 does not restart the axial series' own quiet period (105).
    assert asm.next_deadline() == 105.5
    assert _uids(asm.pop_due(now=105.5)) == [("1.2.3", Outcome.COMPLETE)]


# --- hard deadline -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_deadline", "outcome"),
    [("process", Outcome.DEADLINE_PROCESS), ("discard", Outcome.DEADLINE_DISCARD)],
)
def test_a_study_missing_a_required_series_leaves_at_the_deadline(on_deadline: str, outcome: Outcome) -> None:
    asm = Assembler(rules=_rules(deadline_seconds=60.0, on_deadline=on_deadline))
    asm.add(header("1.1", description="scout"), now=100.0)
    asm.add(header("1.2", description="scout"), now=130.0)

    assert asm.next_deadline() == 160.0
    assert asm.pop_due(now=159.9) == []
    ((study, got),) = asm.pop_due(now=160.0)
    assert (study.instance_count, got) == (2, outcome)
    assert asm.next_deadline() is None


def test_pop_complete_returns_processed_studies_and_keeps_discarded_ones_apart() -> None:
    asm = Assembler(rules=_rules(deadline_seconds=60.0, on_deadline="discard"))
    asm.add(header("1.1", study="5.1", description="scout"), now=0.0)
    asm.add(header("2.1", study="5.2", description="axial"), now=0.0)

    assert [s.study_uid for s in asm.pop_complete(now=60.0)] == ["5.2"]
    assert [s.study_uid for s in asm.take_discarded()] == ["5.1"]
    assert asm.take_discarded() == []


def test_pop_complete_returns_a_study_processed_at_the_deadline() -> None:
    asm = Assembler(rules=_rules(deadline_seconds=60.0, on_deadline=OnDeadline.PROCESS))
    asm.add(header("1.1", description="scout"), now=0.0)

    assert [s.study_uid for s in asm.pop_complete(now=60.0)] == ["1.2.3"]
    assert asm.take_discarded() == []


def test_a_study_with_its_required_series_still_trickling_at_the_deadline_is_processed() -> None:
    asm = Assembler(rules=_rules(deadline_seconds=60.0, on_deadline="discard"))
    for i in range(7):  # one instance every 10 s: never 30 s quiet
        asm.add(header(f"1.{i}", description="axial"), now=10.0 * i)

    assert asm.next_deadline() == 60.0
    assert _uids(asm.pop_due(now=60.0)) == [("1.2.3", Outcome.DEADLINE_PROCESS)]


def test_a_deadline_without_requirements_bounds_a_sender_that_never_goes_quiet() -> None:
    asm = Assembler(rules=CompletionRules(study_quiet_seconds=30.0, deadline_seconds=100.0))
    for i in range(11):
        asm.add(header(f"1.{i}"), now=10.0 * i)

    assert _uids(asm.pop_due(now=100.0)) == [("1.2.3", Outcome.DEADLINE_PROCESS)]


def test_completion_before_the_deadline_is_complete_even_when_popped_late() -> None:
    asm = Assembler(rules=_rules(deadline_seconds=60.0, on_deadline="discard"))
    asm.add(header("1.1", description="axial"), now=0.0)

    assert _uids(asm.pop_due(now=1_000.0)) == [("1.2.3", Outcome.COMPLETE)]


def test_instances_after_a_discard_start_a_new_study_batch() -> None:
    asm = Assembler(rules=_rules(deadline_seconds=60.0, on_deadline="discard"))
    asm.add(header("1.1", description="scout"), now=0.0)
    asm.pop_due(now=60.0)
    asm.add(header("1.2", description="axial"), now=70.0)

    ((late, outcome),) = asm.pop_due(now=100.0)
    assert ([h.sop_instance_uid for h in late.series["1.2.3.1"].instances], outcome) == (
        ["1.2"],
        Outcome.COMPLETE,
    )


# --- defaults and the Assembler constructor -----------------------------------------------------------------


def test_rules_without_requirements_behave_like_the_plain_assembler() -> None:
    plain = Assembler(quiet_seconds=5)
    ruled = Assembler(rules=CompletionRules(study_quiet_seconds=5))
    for asm in (plain, ruled):
        asm.add(header("1.1", study="5.1"), now=0.0)
        asm.add(header("2.1", study="5.2"), now=1.0)
        asm.association_released(["5.2"], now=1.5, grace_seconds=1.0)
        asm.add(header("1.2", study="5.1"), now=3.0)

    for asm in (plain, ruled):
        assert asm.next_deadline() == 2.5
        assert [s.study_uid for s in asm.pop_complete(now=2.5)] == ["5.2"]
        assert asm.next_deadline() == 8.0
        assert _uids(asm.pop_due(now=8.0)) == [("5.1", Outcome.COMPLETE)]


def test_assembler_takes_the_quiet_period_from_the_rules() -> None:
    rules = CompletionRules(study_quiet_seconds=12)
    assert Assembler(rules=rules).quiet_seconds == 12.0
    assert Assembler(12, rules=rules).rules is rules
    with pytest.raises(ValueError, match="quiet_seconds"):
        Assembler(5, rules=rules)
    with pytest.raises(ValueError, match="quiet_seconds"):
        Assembler()


# --- validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"study_quiet_seconds": -1}, "study_quiet_seconds"),
        ({"study_quiet_seconds": float("nan")}, "study_quiet_seconds"),
        ({"study_quiet_seconds": True}, "study_quiet_seconds"),
        ({"study_quiet_seconds": "30"}, "study_quiet_seconds"),
        ({"association_grace_seconds": -0.5}, "association_grace_seconds"),
        ({"deadline_seconds": 0}, "deadline_seconds"),
        ({"deadline_seconds": float("inf")}, "deadline_seconds"),
        ({"series_quiet_seconds": 5}, "series_quiet_seconds"),  # nothing required
        ({"on_deadline": "discard"}, "on_deadline"),  # nothing required
        ({"on_deadline": "ignore"}, "on_deadline"),
        ({"all_of": (CT_AXIAL,)}, "deadline_seconds"),  # required series need a deadline
        ({"any_of": [{"modality": "CT"}]}, "any_of"),  # the constructor takes SeriesRule values
        (
            {
                "all_of": (CT_AXIAL,),
                "deadline_seconds": 60,
                "series_quiet_seconds": 31,
                "study_quiet_seconds": 30,
            },
            "series_quiet_seconds",
        ),
    ],
)
def test_invalid_rules_are_rejected_naming_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CompletionRules(**values)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"study_quiet": 30}, "unknown completion key.*study_quiet"),
        ({"deadline_seconds": 60, "all_of": [{"modality": "CT", "descr": "x"}]}, r"all_of\[0\].*descr"),
        (
            {"deadline_seconds": 60, "any_of": [{"modality": "CT"}, {"series_description": "(unclosed"}]},
            r"any_of\[1\]\.series_description",
        ),
        ({"deadline_seconds": 60, "all_of": [{"series_description": 5}]}, r"all_of\[0\]\.series_description"),
        ({"deadline_seconds": 60, "all_of": [{"orientation": "oblique"}]}, r"all_of\[0\]\.orientation"),
        ({"deadline_seconds": 60, "all_of": [{"min_slices": 0}]}, r"all_of\[0\]\.min_slices"),
        ({"deadline_seconds": 60, "all_of": [{"modality": [1]}]}, r"all_of\[0\]\.modality"),
        ({"deadline_seconds": 60, "all_of": ["CT"]}, r"all_of\[0\]"),
        ({"deadline_seconds": 60, "all_of": {"modality": "CT"}}, "all_of"),
    ],
)
def test_from_mapping_rejects_bad_data_naming_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompletionRules.from_mapping(data)


def test_from_mapping_reads_yaml_and_round_trips() -> None:
    text = """
    study_quiet_seconds: 20
    association_grace_seconds: 0.5
    series_quiet_seconds: 4
    all_of:
      - {modality: CT, series_description: '\\baxial\\b', min_slices: 50}
    any_of:
      - {modality: [MR], series_description: t1, orientation: sagittal}
      - {series_description: flair, image_type: [ORIGINAL]}
    deadline_seconds: 900
    on_deadline: discard
    """
    rules = CompletionRules.from_mapping(yaml.safe_load(text))

    assert rules == CompletionRules(
        study_quiet_seconds=20,
        association_grace_seconds=0.5,
        series_quiet_seconds=4,
        all_of=(SeriesRule(modality=("CT",), series_description=r"\baxial\b", min_slices=50),),
        any_of=(
            SeriesRule(modality=("MR",), series_description="t1", orientation="sagittal"),
            SeriesRule(series_description="flair", image_type=("ORIGINAL",)),
        ),
        deadline_seconds=900,
        on_deadline=OnDeadline.DISCARD,
    )
    assert rules.on_deadline is OnDeadline.DISCARD
    assert CompletionRules.from_mapping(rules.to_mapping()) == rules
    assert CompletionRules.from_mapping(yaml.safe_load(yaml.safe_dump(rules.to_mapping()))) == rules


def test_empty_mapping_gives_the_defaults() -> None:
    rules = CompletionRules.from_mapping({})

    assert rules == CompletionRules()
    assert (rules.study_quiet_seconds, rules.association_grace_seconds, rules.deadline_seconds) == (
        30.0,
        1.0,
        None,
    )
    assert not rules.has_requirements
