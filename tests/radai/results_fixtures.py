"""Shared inputs of the SEG/SR encoder tests: 10 slices of a real CT and HU-threshold label maps."""

from __future__ import annotations

import copy
import io
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom import Dataset

from radai.results import Algorithm, CodedConcept, SegmentSpec, SegRequest, build_seg

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
CT_DIR = SHARED / "data" / "dicom" / "ct_abdomen_crlm" / "CRLM-CT-1004" / "image"
N_SLICES = 10

ALGORITHM = Algorithm(model_id="body-ct", version="1.0.0", name="Body and bone CT")
BODY = SegmentSpec(
    value=1,
    name="Body",
    category=CodedConcept("SCT", "91723000", "Anatomical Structure"),
    type=CodedConcept("SCT", "38266002", "Entire body"),
    color=(200, 150, 120),
)
FAT = SegmentSpec(
    value=2,
    name="Fat",
    category=CodedConcept("SCT", "85756007", "Tissue"),
    type=CodedConcept("SCT", "248300009", "Fat"),
    color=(255, 255, 0),
)
BONE = SegmentSpec(
    value=3,
    name="Bone",
    category=CodedConcept("SCT", "85756007", "Tissue"),
    type=CodedConcept("SCT", "272673000", "Bone"),
    color=(241, 214, 145),
)
# The model "can" produce fat (2), but the thresholds below never do: it must get no segment.
SPECS = (BODY, FAT, BONE)


@cache
def _ct() -> tuple[tuple[Dataset, ...], NDArray[np.float64]]:
    files = sorted(CT_DIR.glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    datasets.sort(key=lambda ds: float(normal @ np.asarray(ds.ImagePositionPatient, dtype=float)))
    middle = len(datasets) // 2
    chosen = datasets[middle - N_SLICES // 2 : middle - N_SLICES // 2 + N_SLICES]
    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in chosen]
    )  # (Z, Y, X)
    return tuple(chosen), hu.transpose(2, 1, 0)  # (X, Y, Z), as the encoders take label maps


def ct_source() -> list[Dataset]:
    """The source slices in slice order (deep copies: a test may not disturb another)."""
    return [copy.deepcopy(ds) for ds in _ct()[0]]


def ct_hu() -> NDArray[np.float64]:
    """Hounsfield units of the source, shape (X, Y, Z)."""
    return _ct()[1].copy()


def threshold_labels() -> NDArray[np.uint8]:
    """Body (HU > -300) = 1, bone (HU > 300) = 3, shape (X, Y, Z)."""
    hu = ct_hu()
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[hu > -300] = BODY.value
    labels[hu > 300] = BONE.value
    return labels


def seg_request(**changes: object) -> SegRequest:
    """The standard SEG request, with fields replaced by ``changes``."""
    fields: dict[str, object] = {
        "source": ct_source(),
        "labels": threshold_labels(),
        "segments": SPECS,
        "algorithm": ALGORITHM,
    }
    fields.update(changes)
    return SegRequest(**fields)  # type: ignore[arg-type]


@cache
def _standard_seg_bytes() -> bytes:
    return to_bytes(build_seg(seg_request()))


def standard_seg() -> Dataset:
    """The SEG of :func:`seg_request`, built once per test run and read back from bytes."""
    return pydicom.dcmread(io.BytesIO(_standard_seg_bytes()))


def to_bytes(ds: Dataset) -> bytes:
    """Encode ``ds`` as a DICOM file in memory."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def reread(ds: Dataset) -> Dataset:
    """Write ``ds`` and read it back with pydicom, as a receiver would."""
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))
