"""Study assembly: group instance headers into series and studies and decide when a study is complete.

Pure: no clock reads, no I/O, no threads. The caller passes ``now`` in, so the policy is unit-testable
with explicit times. Completion here is the quiet-period rule (no new instance for ``quiet_seconds``);
other signals (association release, required series) can call :meth:`Assembler.pop_study` directly.
"""

from __future__ import annotations

from collections.abc import Sequence
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


class Assembler:
    """Collects instances per study until the study has been quiet for ``quiet_seconds``."""

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

    def pop_complete(self, now: float) -> list[Study]:
        """Remove and return studies with no new instance for ``quiet_seconds`` (oldest activity first)."""
        done = [uid for uid, entry in self._pending.items() if now - entry.last_activity >= self._quiet]
        done.sort(key=lambda uid: (self._pending[uid].last_activity, uid))
        return [self._pending.pop(uid).study for uid in done]

    def pop_study(self, study_uid: str) -> Study | None:
        """Remove and return one study now, whatever its quiet time (for other completion signals)."""
        entry = self._pending.pop(study_uid, None)
        return None if entry is None else entry.study

    def next_deadline(self) -> float | None:
        """The earliest time at which a pending study becomes complete, or None when nothing is pending."""
        if not self._pending:
            return None
        return min(entry.last_activity for entry in self._pending.values()) + self._quiet

    def pending_study_uids(self) -> list[str]:
        """Study UIDs still being assembled."""
        return list(self._pending)

    @staticmethod
    def _discard_instance(entry: _Pending, sop_instance_uid: str) -> None:
        series_uid = entry.series_of.pop(sop_instance_uid, None)
        if series_uid is None:
            return
        series = entry.study.series[series_uid]
        series.instances = [h for h in series.instances if h.sop_instance_uid != sop_instance_uid]
        if not series.instances:
            del entry.study.series[series_uid]
