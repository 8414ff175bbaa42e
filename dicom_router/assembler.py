"""Study assembly: group instance headers into series and studies and decide when a study is complete.

Pure: no clock reads, no I/O, no threads. The caller passes ``now`` in, so the policy is unit-testable
with explicit times. A study is due when the sender released the association that carried it and a short
grace window has passed (:meth:`Assembler.association_released`), or, as the fallback for senders that
trickle, when no new instance came for ``quiet_seconds``. Optional
:class:`~dicom_router.completion.CompletionRules` add required series, per-series quiet periods and a hard
deadline (process or discard); :meth:`Assembler.pop_due` says which outcome each due study has. Other
signals can call :meth:`Assembler.pop_study` directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from dicom_router.headers import InstanceHeader

if TYPE_CHECKING:  # completion imports this module (via selection): no runtime import here
    from dicom_router.completion import CompletionRules

AXIAL = "axial"
SAGITTAL = "sagittal"
CORONAL = "coronal"
ORIENTATIONS = (AXIAL, SAGITTAL, CORONAL)


def orientation_label(cosines: Sequence[float] | None) -> str | None:
    """'axial', 'sagittal' or 'coronal' from ImageOrientationPatient, by the dominant direction cosine
    of the slice normal (row x column): x -> sagittal, y -> coronal, z -> axial. None when unknown or
    degenerate. Ties (exact 45 degree obliques) resolve in the order z, x, y."""
    if cosines is None or len(cosines) != 6:
        return None
    rx, ry, rz, cx, cy, cz = cosines
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    magnitudes = {AXIAL: abs(normal[2]), SAGITTAL: abs(normal[0]), CORONAL: abs(normal[1])}
    best = max(magnitudes, key=lambda k: magnitudes[k])
    if magnitudes[best] < 1e-6:
        return None
    return best


@dataclass
class Series:
    """One series of a study as received so far (descriptive fields from its first instance)."""

    series_uid: str
    modality: str
    description: str
    body_part: str
    image_type: tuple[str, ...]
    orientation: str | None
    instances: list[InstanceHeader] = field(default_factory=list)

    @property
    def slice_count(self) -> int:
        """Number of slices: instances, counting every frame of a multi-frame instance."""
        return sum(h.number_of_frames for h in self.instances)


@dataclass
class Study:
    """A study as received: its series, first/last receive times and the sending AE."""

    study_uid: str
    series: dict[str, Series]
    first_received: float
    last_received: float
    calling_ae: str

    @property
    def instance_count(self) -> int:
        """Total instances across all series."""
        return sum(len(s.instances) for s in self.series.values())


class Outcome(Enum):
    """Why a study left the assembler: complete, or its hard deadline passed (processed or discarded)."""

    COMPLETE = "complete"
    DEADLINE_PROCESS = "deadline_process"
    DEADLINE_DISCARD = "deadline_discard"

    @property
    def to_process(self) -> bool:
        """True when the study should be processed (everything but a discard)."""
        return self is not Outcome.DEADLINE_DISCARD


@dataclass
class _Pending:
    study: Study
    first_activity: float
    last_activity: float
    series_of: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> Series UID
    series_activity: dict[str, float] = field(default_factory=dict)  # Series UID -> its last instance
    released_due: float | None = None  # set by an association release, cleared by the next instance


class Assembler:
    """Collects instances per study until its sender's release plus a grace window, or a quiet period,
    and, with ``rules``, until its required series are there or its hard deadline passes.

    ``Assembler(quiet_seconds)`` keeps the plain behaviour. ``Assembler(rules=r)`` takes the study quiet
    period from ``r.study_quiet_seconds``; passing both requires them to agree."""

    def __init__(self, quiet_seconds: float | None = None, *, rules: CompletionRules | None = None) -> None:
        if rules is not None:
            if quiet_seconds is not None and float(quiet_seconds) != rules.study_quiet_seconds:
                raise ValueError("quiet_seconds differs from rules.study_quiet_seconds: pass one of them")
            quiet_seconds = rules.study_quiet_seconds
        if quiet_seconds is None:
            raise ValueError("quiet_seconds is required without rules")
        if quiet_seconds < 0:
            raise ValueError("quiet_seconds must be >= 0")
        self._quiet = float(quiet_seconds)
        self._rules = rules
        self._pending: dict[str, _Pending] = {}
        self._discarded: list[Study] = []

    @property
    def quiet_seconds(self) -> float:
        """The quiet period after which a study counts as complete."""
        return self._quiet

    @property
    def rules(self) -> CompletionRules | None:
        """The completion rules, or None for release/quiet completion only."""
        return self._rules

    def add(self, header: InstanceHeader, now: float) -> None:
        """Add an instance seen at ``now``. A re-sent SOP Instance UID replaces the earlier header."""
        entry = self._pending.get(header.study_uid)
        if entry is None:
            study = Study(
                study_uid=header.study_uid,
                series={},
                first_received=header.received_at,
                last_received=header.received_at,
                calling_ae=header.calling_ae,
            )
            entry = self._pending[header.study_uid] = _Pending(
                study=study, first_activity=now, last_activity=now
            )
        study = entry.study
        entry.last_activity = max(entry.last_activity, now)
        entry.released_due = None  # more data: wait for this association's release, or the quiet period
        study.first_received = min(study.first_received, header.received_at)
        study.last_received = max(study.last_received, header.received_at)
        self._discard_instance(entry, header.sop_instance_uid)
        entry.series_of[header.sop_instance_uid] = header.series_uid
        entry.series_activity[header.series_uid] = max(now, entry.series_activity.get(header.series_uid, now))
        series = study.series.get(header.series_uid)
        if series is None:
            series = study.series[header.series_uid] = Series(
                series_uid=header.series_uid,
                modality=header.modality,
                description=header.series_description,
                body_part=header.body_part,
                image_type=header.image_type,
                orientation=orientation_label(header.image_orientation),
            )
        elif series.orientation is None:
            series.orientation = orientation_label(header.image_orientation)
        series.instances.append(header)

    def association_released(self, study_uids: Iterable[str], now: float, grace_seconds: float) -> None:
        """The sender released an association carrying these studies: each pending one becomes due at
        ``now + grace_seconds`` (or earlier, if its quiet period ends first). An instance added later puts
        the study back on the quiet period. Study UIDs not pending are ignored."""
        if grace_seconds < 0:
            raise ValueError("grace_seconds must be >= 0")
        due = now + grace_seconds
        for uid in study_uids:
            entry = self._pending.get(uid)
            if entry is not None:
                entry.released_due = due if entry.released_due is None else min(entry.released_due, due)

    def pop_due(self, now: float) -> list[tuple[Study, Outcome]]:
        """Remove and return the studies due at ``now`` with their outcome (earliest due first).

        COMPLETE: released or quiet, with the required series. DEADLINE_PROCESS: the hard deadline passed
        first and the study has its required series, or ``on_deadline`` is ``process``. DEADLINE_DISCARD:
        the deadline passed, a required series is missing and ``on_deadline`` is ``discard`` (the caller
        drops the study). Instances arriving later start a new study batch."""
        due: list[tuple[float, str, Outcome]] = []
        for uid, entry in self._pending.items():
            when = self._schedule(entry)
            if when is not None and now >= when[0]:
                due.append((when[0], uid, when[1]))
        due.sort(key=lambda item: (item[0], item[1]))
        return [(self._pending.pop(uid).study, outcome) for _, uid, outcome in due]

    def pop_complete(self, now: float) -> list[Study]:
        """Remove and return the studies to process at ``now`` (earliest due first): those of
        :meth:`pop_due` except discarded ones, which are kept for :meth:`take_discarded`."""
        studies = []
        for study, outcome in self.pop_due(now):
            if outcome.to_process:
                studies.append(study)
            else:
                self._discarded.append(study)
        return studies

    def take_discarded(self) -> list[Study]:
        """Return and forget the studies :meth:`pop_complete` discarded at their deadline since the last
        call (oldest first). Callers of :meth:`pop_due` get discards there instead."""
        discarded, self._discarded = self._discarded, []
        return discarded

    def pop_study(self, study_uid: str) -> Study | None:
        """Remove and return one study now, whatever its quiet time (for other completion signals)."""
        entry = self._pending.pop(study_uid, None)
        return None if entry is None else entry.study

    def next_deadline(self) -> float | None:
        """The earliest time at which a pending study becomes due (complete or at its hard deadline), or
        None when nothing is pending."""
        times = (self._schedule(entry) for entry in self._pending.values())
        return min((when[0] for when in times if when is not None), default=None)

    def pending_study_uids(self) -> list[str]:
        """Study UIDs still being assembled."""
        return list(self._pending)

    def _due(self, entry: _Pending) -> float:
        quiet_due = entry.last_activity + self._quiet
        return quiet_due if entry.released_due is None else min(quiet_due, entry.released_due)

    def _schedule(self, entry: _Pending) -> tuple[float, Outcome] | None:
        """When the study becomes due and with which outcome; None when it can only wait for more data."""
        rules = self._rules
        if rules is None:
            return self._due(entry), Outcome.COMPLETE
        due: float | None = self._due(entry)
        if rules.has_requirements:
            series = entry.study.series
            met = rules.requirements_met_at((s, entry.series_activity[uid]) for uid, s in series.items())
            due = None if met is None else max(self._due(entry), met)
        if rules.deadline_seconds is None:
            return None if due is None else (due, Outcome.COMPLETE)
        deadline = entry.first_activity + rules.deadline_seconds
        if due is not None and due <= deadline:
            return due, Outcome.COMPLETE
        if due is not None or rules.on_deadline.value == "process":
            return deadline, Outcome.DEADLINE_PROCESS
        return deadline, Outcome.DEADLINE_DISCARD

    @staticmethod
    def _discard_instance(entry: _Pending, sop_instance_uid: str) -> None:
        series_uid = entry.series_of.pop(sop_instance_uid, None)
        if series_uid is None:
            return
        series = entry.study.series[series_uid]
        series.instances = [h for h in series.instances if h.sop_instance_uid != sop_instance_uid]
        if not series.instances:
            del entry.study.series[series_uid]
            entry.series_activity.pop(series_uid, None)
