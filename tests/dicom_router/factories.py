"""Small builders of InstanceHeader values for pure unit tests (plain values, no mocks)."""

from __future__ import annotations

import threading
from pathlib import Path

from dicom_router.headers import InstanceHeader

AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL_IOP = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL_IOP = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def header(
    sop: str,
    series: str = "1.2.3.1",
    study: str = "1.2.3",
    *,
    modality: str = "CT",
    description: str = "",
    body_part: str = "",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    orientation: tuple[float, ...] | None = AXIAL_IOP,
    frames: int = 1,
    received_at: float = 0.0,
    calling_ae: str = "MODALITY",
) -> InstanceHeader:
    return InstanceHeader(
        path=Path(f"/spool/{sop}.dcm"),
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_uid=study,
        series_uid=series,
        modality=modality,
        series_description=description,
        body_part=body_part,
        image_type=image_type,
        image_orientation=orientation,
        number_of_frames=frames,
        calling_ae=calling_ae,
        received_at=received_at,
    )


class ManualClock:
    """A clock that moves only when told (thread-safe), injected where code takes ``clock=``."""

    def __init__(self, start: float = 1_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
