"""Declarative series-selection rules: plain data, validated at construction, never evaluated as code."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from dicom_router.assembler import ORIENTATIONS, Series, Study


@dataclass(frozen=True)
class SeriesRule:
    """What a series must look like for a model. Empty or None fields match anything.

    modality: any of these (case-insensitive); series_description: regex, case-insensitive search;
    body_part: equal, case-insensitive; orientation: 'axial' | 'sagittal' | 'coronal';
    min_slices: at least this many slices (frames count for multi-frame instances);
    image_type: every listed value present in the series' ImageType (case-insensitive).
    """

    modality: tuple[str, ...] = ()
    series_description: str | None = None
    body_part: str | None = None
    orientation: str | None = None
    min_slices: int = 1
    image_type: tuple[str, ...] = ()
    _description_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Normalise once so that matching is cheap; object.__setattr__ because the dataclass is frozen.
        object.__setattr__(self, "modality", _upper_tuple(self.modality, "modality"))
        object.__setattr__(self, "image_type", _upper_tuple(self.image_type, "image_type"))
        if self.series_description is not None:
            try:
                pattern = re.compile(self.series_description, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"series_description is not a valid regex: {exc}") from exc
            object.__setattr__(self, "_description_re", pattern)
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)} or None")
        if isinstance(self.min_slices, bool) or not isinstance(self.min_slices, int) or self.min_slices < 1:
            raise ValueError("min_slices must be an integer >= 1")

    def matches(self, series: Series) -> bool:
        """True when the series satisfies every constraint of this rule."""
        if self.modality and series.modality.upper() not in self.modality:
            return False
        if self._description_re is not None and not self._description_re.search(series.description):
            return False
        if self.body_part is not None and series.body_part.casefold() != self.body_part.casefold():
            return False
        if self.orientation is not None and series.orientation != self.orientation:
            return False
        if series.slice_count < self.min_slices:
            return False
        present = {v.upper() for v in series.image_type}
        return all(v in present for v in self.image_type)


def select_series(study: Study, rules: Sequence[SeriesRule]) -> Series | None:
    """The series matching any rule with the most slices (ties: lowest Series UID); None if none match."""
    candidates = [s for s in study.series.values() if any(rule.matches(s) for rule in rules)]
    if not candidates:
        return None
    return min(candidates, key=lambda s: (-s.slice_count, s.series_uid))


def _upper_tuple(values: object, name: str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)  # a lone string from a config file means one value, not its characters
    if not isinstance(values, tuple | list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a sequence of strings")
    return tuple(v.strip().upper() for v in values)
