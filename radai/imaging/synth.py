"""Build an axial single-frame MR Image Storage series from a NIfTI file (test fixtures, `radai demo`).

The series is deterministic: UIDs derive from the file's SHA-256 (and the study UID, patient ID and
series description), dates are fixed, nothing reads the clock. Intensities are stored as uint16 without
rescale tags (the MR Image IOD has none): integer data within 0..65535 is stored unchanged, anything else
is mapped linearly from [min, max] onto 0..65535.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from radai.errors import NotAVolumeError

nib: Any = nibabel  # nibabel's annotations are partial: its calls are untyped for mypy --strict

_LPS = np.diag([-1.0, -1.0, 1.0])
_FIXED_DATE = "20000101"  # deterministic output; a demo study has no real acquisition date
_FIXED_TIME = "120000"
_UINT16_MAX = 65535


def _axial_lps(img: Any) -> Any:
    """Closest canonical (RAS) orientation, then L/P flipped: columns run to patient left, rows to
    posterior, slices inferior to superior: the usual layout of an axial DICOM series."""
    canonical = nib.as_closest_canonical(img)
    to_lps = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(canonical.affine), nib.orientations.axcodes2ornt(("L", "P", "S"))
    )
    return canonical.as_reoriented(to_lps)


def _to_uint16(data: NDArray[np.generic]) -> NDArray[np.uint16]:
    values = np.asarray(data, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if np.all(values == np.round(values)) and lo >= 0 and hi <= _UINT16_MAX:
        return values.astype(np.uint16)
    scale = _UINT16_MAX / (hi - lo) if hi > lo else 0.0
    return np.round((values - lo) * scale).astype(np.uint16)


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=list(parts)))


def _ds(values: list[float]) -> list[DSfloat]:
    """Decimal strings at the best precision that fits 16 characters."""
    return [DSfloat(v, auto_format=True) for v in values]


def _common(
    study_uid: str, series_uid: str, for_uid: str, patient_id: str, series_description: str
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MRImageStorage
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _FIXED_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = _FIXED_TIME
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "radai"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "radai demo"
    ds.SeriesDescription = series_description
    ds.DerivationDescription = "Converted from NIfTI by radai; synthetic demo data, not for clinical use"
    ds.PatientName = "RADAI^DEMO"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.ScanningSequence = "RM"  # research mode: the acquisition is unknown
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = ""
    ds.RepetitionTime = ""
    ds.EchoTime = ""
    ds.EchoTrainLength = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def mr_series_from_nifti(
    path: Path,
    *,
    study_uid: str | None = None,
    patient_id: str = "RADAI-DEMO",
    series_description: str = "T1 MPRAGE (from NIfTI)",
) -> list[Dataset]:
    """One axial MR Image Storage instance per slice, inferior to superior, with file meta set."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = nib.load(path)
    if not isinstance(loaded, nibabel.Nifti1Image):  # Nifti2Image is a subclass
        raise NotAVolumeError(f"{path.name}: not a NIfTI image")
    if loaded.ndim > 3 and any(n != 1 for n in loaded.shape[3:]):
        raise NotAVolumeError(f"{path.name}: a {loaded.ndim}-D image, expected one 3-D volume")
    squeezed = nib.Nifti1Image(np.asanyarray(loaded.dataobj).reshape(loaded.shape[:3]), loaded.affine)
    img = _axial_lps(squeezed)

    axes = img.affine[:3, :3]
    zooms = np.linalg.norm(axes, axis=0)
    cosines = axes / zooms
    if np.max(np.abs(cosines.T @ cosines - np.eye(3))) > 1e-4:
        raise NotAVolumeError(f"{path.name}: sheared affine, cannot be stored as a stack of slices")
    row, col, normal = (_LPS @ cosines[:, i] for i in range(3))
    pixels = _to_uint16(np.asanyarray(img.dataobj))
    lo, hi = np.percentile(pixels, [0.5, 99.5])

    study = study_uid or _uid(digest, patient_id, "study")
    series = _uid(digest, study, series_description, "series")
    base = _common(study, series, _uid(digest, study, "frame-of-reference"), patient_id, series_description)
    base.Rows, base.Columns = int(pixels.shape[1]), int(pixels.shape[0])
    base.PixelSpacing = _ds([float(zooms[1]), float(zooms[0])])  # (between rows, between columns)
    base.SliceThickness = base.SpacingBetweenSlices = _ds([float(zooms[2])])[0]
    base.ImageOrientationPatient = _ds([*row.tolist(), *col.tolist()])
    base.WindowCenter = _ds([(lo + hi) / 2.0])[0]
    base.WindowWidth = _ds([max(hi - lo, 1.0)])[0]

    out: list[Dataset] = []
    for k in range(pixels.shape[2]):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = _uid(digest, series, "instance", str(k))
        ds.InstanceNumber = k + 1
        position = _LPS @ (img.affine @ np.array([0.0, 0.0, float(k), 1.0]))[:3]
        ds.ImagePositionPatient = _ds(position.tolist())
        ds.SliceLocation = _ds([float(position @ normal)])[0]
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        out.append(ds)
    return out
