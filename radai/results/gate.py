"""The validation gate: every result object is checked before it may leave.

Checks, per object: it encodes and reads back as DICOM (pydicom), and as its kind through highdicom (SEG, SR);
dciodvfy (dicom3tools) reports no error, where it is installed; it belongs to the source study; whatever it
references (source images, series, the SEG an SR reports on) is among the objects of this job or the source
series. A SEG's frames also lie on source slices (position and orientation equal). The caller keeps objects
that fail for inspection and fails the job with the returned problems; nothing invalid is sent.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom import Dataset

from radai.results.validate import dciodvfy_errors

LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4", LABEL_MAP_SEG}  # Segmentation, Label Map Segmentation
# IODs newer than the dciodvfy of Debian 12 (it answers "Information Object Not found"): these get the
# read-back, study, reference and geometry checks only.
_UNKNOWN_TO_DCIODVFY = {LABEL_MAP_SEG}
_GEOMETRY_TOLERANCE_MM = 1e-3


def _reread(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _referenced_instances(ds: Dataset) -> Iterator[str]:
    """SOP Instance UIDs the object references (any nesting of the usual reference sequences)."""
    for element in ds.iterall():
        if element.keyword == "ReferencedSOPInstanceUID":
            yield str(element.value)


def _planes(ds: Dataset) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """(position, orientation) of a single-frame image, or of every frame of a multi-frame one."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            return []
        return [(tuple(map(float, ds.ImagePositionPatient)), tuple(map(float, ds.ImageOrientationPatient)))]
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    out = []
    for frame in ds.PerFrameFunctionalGroupsSequence:
        position = frame.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        orientation = frame.get("PlaneOrientationSequence") or shared.get("PlaneOrientationSequence")
        if not position or not orientation:
            continue
        out.append(
            (
                tuple(map(float, position[0].ImagePositionPatient)),
                tuple(map(float, orientation[0].ImageOrientationPatient)),
            )
        )
    return out


def _geometry_problems(seg: Dataset, source: Sequence[Dataset]) -> list[str]:
    """Frames of the SEG that lie on no source plane."""
    planes = [p for ds in source for p in _planes(ds)]
    if not planes:
        return []
    positions = np.array([p[0] for p in planes])
    orientations = np.array([p[1] for p in planes])
    off = 0
    for position, orientation in _planes(seg):
        near = np.all(np.abs(positions - position) <= _GEOMETRY_TOLERANCE_MM, axis=1)
        same = np.all(np.abs(orientations - orientation) <= 1e-4, axis=1)
        if not np.any(near & same):
            off += 1
    return [f"SEG: {off} frame(s) lie on no source slice"] if off else []


def _kind_problems(ds: Dataset) -> list[str]:
    sop_class = str(ds.SOPClassUID)
    try:
        if sop_class in SEG_CLASSES:
            hd.seg.Segmentation.from_dataset(ds, copy=False)
        elif str(ds.get("Modality", "")) == "SR":
            hd.sr.srread(io.BytesIO(_bytes(ds)))
    except Exception as exc:  # highdicom raises many types for what it cannot read
        return [f"highdicom cannot read it back: {type(exc).__name__}: {exc}".splitlines()[0]]
    return []


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dciodvfy_problems(ds: Dataset, inherited: set[str]) -> list[str]:
    errors = [e for e in dciodvfy_errors(ds) or [] if e not in inherited]
    if not errors:
        return []
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return [f"dciodvfy: {errors[0]}{more}"]


def problems(outputs: Sequence[Dataset], source: Sequence[Dataset], *, dciodvfy: bool = True) -> list[str]:
    """Every problem found with ``outputs`` (results of one job on ``source``); empty when all may leave.

    dciodvfy runs on the first object of each series (the images of an SC series are built alike) and an
    error the source image itself has (an attribute copied from it, e.g. a malformed Patient's Age) is not
    held against the result: the gate refuses what radai makes wrong, not what it was given."""
    found: list[str] = []
    study = str(source[0].StudyInstanceUID) if source else ""
    known = {str(ds.SOPInstanceUID) for ds in (*outputs, *source)}
    inherited: set[str] | None = None
    checked_series: set[str] = set()
    for index, original in enumerate(outputs):
        label = f"{original.get('Modality', '?')} #{index + 1}"
        try:
            ds = _reread(original)
        except Exception as exc:  # pydicom raises many types for an unwritable data set
            found.append(f"{label}: does not encode as DICOM: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        issues = _kind_problems(ds)
        if str(ds.get("StudyInstanceUID", "")) != study:
            issues.append("not in the source study")
        dangling = sorted(set(_referenced_instances(ds)) - known)
        if dangling:
            issues.append(f"{len(dangling)} reference(s) to instances outside the job's source and results")
        if str(ds.SOPClassUID) in SEG_CLASSES:
            issues.extend(_geometry_problems(ds, source))
        series = str(ds.get("SeriesInstanceUID", ""))
        if dciodvfy and str(ds.SOPClassUID) not in _UNKNOWN_TO_DCIODVFY and series not in checked_series:
            checked_series.add(series)
            if inherited is None:
                inherited = set(dciodvfy_errors(source[0]) or []) if source else set()
            issues.extend(_dciodvfy_problems(ds, inherited))
        found.extend(f"{label}: {issue}" for issue in issues)
    return found
