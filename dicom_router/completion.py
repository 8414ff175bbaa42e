"""Declarative study-completion rules: plain data, validated at construction, never evaluated as code.

A study is due when its sender released the association (plus a grace window) or no instance came for
``study_quiet_seconds``, AND the required series are there: every rule of ``all_of`` matched by some
series and, when ``any_of`` is not empty, at least one of its rules matched. With ``series_quiet_seconds``
a required series counts only once it has itself been quiet that long (so a sender that opens an
association per instance cannot make the release signal fire mid-series). A study missing a required
series keeps waiting (more series may come) until ``deadline_seconds`` after its first instance; then it
is processed or discarded as ``on_deadline`` says. A study that has its required series but is still
receiving at the deadline is processed. The :class:`~dicom_router.assembler.Assembler` applies the rules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dicom_router.assembler import Outcome, Series
from dicom_router.selection import SeriesRule

__all__ = ["CompletionRules", "OnDeadline", "Outcome", "SeriesRule"]


class OnDeadline(StrEnum):
    """What happens to a study still missing a required series at its hard deadline."""

    PROCESS = "process"
    DISCARD = "discard"


_SERIES_RULE_KEYS = tuple(f.name for f in dataclasses.fields(SeriesRule) if f.init)


@dataclass(frozen=True)
class CompletionRules:
    """When a study counts as complete. All times in seconds; see the module docstring for semantics.

    study_quiet_seconds: a study with no new instance for this long is due (the fallback signal).
    association_grace_seconds: after the sender releases an association, wait this long for a follow-up
    association of the same study; None ignores releases. Not read by the Assembler: its caller passes it
    to :meth:`Assembler.association_released`.
    series_quiet_seconds: a required series counts only after this long without a new instance of its own
    (needs ``all_of`` or ``any_of``; at most ``study_quiet_seconds``).
    all_of / any_of: required series as :class:`SeriesRule` values (modality list, SeriesDescription regex,
    body part, orientation, minimum slices, ImageType).
    deadline_seconds: hard limit after the first instance of a study (required with ``all_of``/``any_of``).
    on_deadline: ``process`` or ``discard`` a study still missing a required series at the deadline
    (``discard`` needs ``all_of`` or ``any_of``).
    """

    study_quiet_seconds: float = 30.0
    association_grace_seconds: float | None = 1.0
    series_quiet_seconds: float | None = None
    all_of: tuple[SeriesRule, ...] = ()
    any_of: tuple[SeriesRule, ...] = ()
    deadline_seconds: float | None = None
    on_deadline: OnDeadline = OnDeadline.PROCESS

    def __post_init__(self) -> None:
        # object.__setattr__ because the dataclass is frozen: normalise once, then validate.
        object.__setattr__(
            self, "study_quiet_seconds", _seconds(self.study_quiet_seconds, "study_quiet_seconds")
        )
        for name in ("association_grace_seconds", "series_quiet_seconds"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else _seconds(value, name))
        if self.deadline_seconds is not None:
            deadline = _seconds(self.deadline_seconds, "deadline_seconds")
            if deadline == 0:
                raise ValueError("deadline_seconds must be > 0 (or null for no deadline)")
            object.__setattr__(self, "deadline_seconds", deadline)
        object.__setattr__(self, "all_of", _rules(self.all_of, "all_of"))
        object.__setattr__(self, "any_of", _rules(self.any_of, "any_of"))
        try:
            object.__setattr__(self, "on_deadline", OnDeadline(self.on_deadline))
        except ValueError:
            choices = ", ".join(repr(v.value) for v in OnDeadline)
            raise ValueError(f"on_deadline must be one of {choices}, got {self.on_deadline!r}") from None
        self._check_combination()

    def _check_combination(self) -> None:
        if self.series_quiet_seconds is not None:
            if not self.has_requirements:
                raise ValueError("series_quiet_seconds applies to required series: set all_of or any_of")
            if self.series_quiet_seconds > self.study_quiet_seconds:
                raise ValueError("series_quiet_seconds must not exceed study_quiet_seconds")
        if self.has_requirements and self.deadline_seconds is None:
            raise ValueError(
                "deadline_seconds is required with all_of or any_of "
                "(a study missing a required series would otherwise wait forever)"
            )
        if self.on_deadline is OnDeadline.DISCARD and not self.has_requirements:
            raise ValueError(
                "on_deadline 'discard' applies to studies missing required series: set all_of or any_of"
            )

    @property
    def has_requirements(self) -> bool:
        """True when some series are required (``all_of`` or ``any_of`` not empty)."""
        return bool(self.all_of or self.any_of)

    def requirements_met_at(self, series: Iterable[tuple[Series, float]]) -> float | None:
        """The earliest time at which the required series are there and settled, given each series with
        the time of its last instance; ``-inf`` when nothing is required or no series quiet period is set
        and they are all there; None when the series present cannot satisfy the rules."""
        settle = self.series_quiet_seconds
        present = list(series)

        def first_settled(rule: SeriesRule) -> float | None:
            times = [last for s, last in present if rule.matches(s)]
            if not times:
                return None
            return -math.inf if settle is None else min(times) + settle

        met = -math.inf
        for rule in self.all_of:
            at = first_settled(rule)
            if at is None:
                return None
            met = max(met, at)
        if self.any_of:
            candidates = [at for at in map(first_settled, self.any_of) if at is not None]
            if not candidates:
                return None
            met = max(met, min(candidates))
        return met

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CompletionRules:
        """Build from plain data (what a YAML file gives); unknown keys and bad values raise ValueError
        naming the key (``all_of[1].series_description`` for a series rule)."""
        if not isinstance(data, Mapping):
            raise ValueError("completion rules must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(
                f"unknown completion key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        values = dict(data)
        for name in ("all_of", "any_of"):
            if name in values:
                values[name] = _rules_from_data(values[name], name)
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        """Plain data that :meth:`from_mapping` turns back into an equal value."""
        return {
            "study_quiet_seconds": self.study_quiet_seconds,
            "association_grace_seconds": self.association_grace_seconds,
            "series_quiet_seconds": self.series_quiet_seconds,
            "all_of": [_rule_to_data(r) for r in self.all_of],
            "any_of": [_rule_to_data(r) for r in self.any_of],
            "deadline_seconds": self.deadline_seconds,
            "on_deadline": self.on_deadline.value,
        }


def _seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _rules(value: object, name: str) -> tuple[SeriesRule, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(r, SeriesRule) for r in value):
        raise ValueError(f"{name} must be a sequence of SeriesRule")
    return tuple(value)


def _rules_from_data(value: object, name: str) -> tuple[SeriesRule, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{name} must be a list of series rules")
    rules = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if isinstance(item, SeriesRule):
            rules.append(item)
            continue
        if not isinstance(item, Mapping):
            raise ValueError(f"{where} must be a mapping of series-rule keys")
        unknown = sorted(str(k) for k in item if k not in _SERIES_RULE_KEYS)
        if unknown:
            raise ValueError(
                f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(_SERIES_RULE_KEYS)})"
            )
        for key in ("series_description", "body_part", "orientation"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise ValueError(f"{where}.{key} must be a string, got {item[key]!r}")
        try:
            rules.append(SeriesRule(**item))
        except ValueError as exc:  # SeriesRule's messages start with the field name
            raise ValueError(f"{where}.{exc}") from exc
    return tuple(rules)


def _rule_to_data(rule: SeriesRule) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key in _SERIES_RULE_KEYS:
        value = getattr(rule, key)
        data[key] = list(value) if isinstance(value, tuple) else value
    return data
