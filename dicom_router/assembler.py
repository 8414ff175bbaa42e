"""Study assembly: group instance headers into series and studies and decide when a study is complete.

Pure: no clock reads, no I/O, no threads. The caller passes ``now`` in, so the policy is unit-testable
with explicit times. A study is due when the sender released the association that carried it and a short
grace window has passed (:meth:`Assembler.association_released`), or, as the fallback for senders that
trickle, when no new instance came for ``quiet_seconds``. Other signals (required series) can call
:meth:`Assembler.pop_study` directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dicom_router.headers import InstanceHeader

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


@dataclass
class _Pending:
    study: Study
    last_activity: float
    series_of: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> Series UID
    released_due: float | None = None  # set by an association release, cleared by the next instance


class Assembler:
    """Collects instances per study until its sender's release plus a grace window, or a quiet period."""

    def __init__(self, quiet_seconds: float) -> None:
        if quiet_seconds < 0:
            raise ValueError("quiet_seconds must be >= 0")
        self._quiet = float(quiet_seconds)
        self._pending: dict[str, _Pending] = {}

    @property
    def quiet_seconds(self) -> float:
        """The quiet period after which a study counts as complete."""
        return self._quiet

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
            entry = self._pending[header.study_uid] = _Pending(study=study, last_activity=now)
        study = entry.study
        entry.last_activity = max(entry.last_activity, now)
        entry.released_due = None  # more data: wait for this association's release, or the quiet period
        study.first_received = min(study.first_received, header.received_at)
        study.last_received = max(study.last_received, header.received_at)
        self._discard_instance(entry, header.sop_instance_uid)
        entry.series_of[header.sop_instance_uid] = header.series_uid
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

    def pop_complete(self, now: float) -> list[Study]:
        """Remove and return the studies that are due at ``now`` (earliest due first)."""
        done = [uid for uid, entry in self._pending.items() if now >= self._due(entry)]
        done.sort(key=lambda uid: (self._due(self._pending[uid]), uid))
        return [self._pending.pop(uid).study for uid in done]

    def pop_study(self, study_uid: str) -> Study | None:
        """Remove and return one study now, whatever its quiet time (for other completion signals)."""
        entry = self._pending.pop(study_uid, None)
        return None if entry is None else entry.study

    def next_deadline(self) -> float | None:
        """The earliest time at which a pending study becomes complete, or None when nothing is pending."""
        return min((self._due(entry) for entry in self._pending.values()), default=None)

    def pending_study_uids(self) -> list[str]:
        """Study UIDs still being assembled."""
        return list(self._pending)

    def _due(self, entry: _Pending) -> float:
        quiet_due = entry.last_activity + self._quiet
        return quiet_due if entry.released_due is None else min(quiet_due, entry.released_due)

    @staticmethod
    def _discard_instance(entry: _Pending, sop_instance_uid: str) -> None:
        series_uid = entry.series_of.pop(sop_instance_uid, None)
        if series_uid is None:
            return
        series = entry.study.series[series_uid]
        series.instances = [h for h in series.instances if h.sop_instance_uid != sop_instance_uid]
        if not series.instances:
            del entry.study.series[series_uid]
