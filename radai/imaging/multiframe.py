"""Frames of Enhanced multi-frame images (Enhanced CT/MR, Legacy Converted Enhanced) with per-frame geometry.

Each frame's plane, pixel spacing and rescale come from its per-frame functional group, else from the
shared one (DICOM PS3.3 C.7.6.16). Frames of more than one stack, temporal position or echo are refused
by :func:`check_one_stack` with the key that differs: one volume is one stack, and nothing is picked
silently. pydicom decodes the pixels but does not resolve functional groups (its ``apply_rescale`` reads
only the top-level Rescale Slope/Intercept), hence this module.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array

from radai.errors import NotAVolumeError


@dataclass(frozen=True)
class Plane:
    """Geometry of one 2-D frame."""

    row: NDArray[np.float64]  # LPS direction of increasing column index
    col: NDArray[np.float64]  # LPS direction of increasing row index
    position: NDArray[np.float64]  # LPS centre of the first transmitted pixel
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as in PixelSpacing
    size: tuple[int, int]  # (Rows, Columns)


@dataclass(frozen=True)
class Frame:
    """One frame of a multi-frame instance: its 1-based number, geometry, rescale and stack keys."""

    number: int
    plane: Plane
    slope: float
    intercept: float
    stack_id: str | None
    temporal_index: int | None
    echo_time: float | None


def floats(item: Dataset, keyword: str, count: int, where: str = "") -> NDArray[np.float64]:
    """``count`` finite numbers from ``item.keyword``, else NotAVolumeError naming it (and ``where``)."""
    value: Any = item[keyword].value
    try:
        out = np.array([float(v) for v in (value if _many(value) else [value])])
    except (TypeError, ValueError) as exc:
        raise NotAVolumeError(f"malformed {keyword}{where}: {value!r}") from exc
    if out.shape != (count,) or not np.all(np.isfinite(out)):
        raise NotAVolumeError(f"malformed {keyword}{where}: expected {count} finite numbers")
    return out


def _many(value: Any) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes))


def plane_from(geometry: Dataset, size: tuple[int, int], where: str = "") -> Plane:
    """A plane from a data set or item holding ImageOrientation/PositionPatient and PixelSpacing."""
    iop = floats(geometry, "ImageOrientationPatient", 6, where)
    spacing = floats(geometry, "PixelSpacing", 2, where)
    if np.any(spacing <= 0):
        raise NotAVolumeError(f"malformed PixelSpacing{where}: values must be positive")
    return Plane(
        row=iop[:3],
        col=iop[3:],
        position=floats(geometry, "ImagePositionPatient", 3, where),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        size=size,
    )


def is_multiframe(ds: Dataset) -> bool:
    """True for any instance whose geometry lives in functional groups or that holds several frames."""
    return "PerFrameFunctionalGroupsSequence" in ds or number_of_frames(ds) > 1


def number_of_frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise NotAVolumeError(f"malformed NumberOfFrames: {ds.get('NumberOfFrames')!r}") from exc


def _group(per_frame: Dataset, shared: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of a functional group macro: per-frame first, then shared (PS3.3 C.7.6.16)."""
    for where in (per_frame, shared):
        if where is not None and where.get(keyword):
            item: Dataset = where[keyword].value[0]
            return item
    return None


def _required(per_frame: Dataset, shared: Dataset | None, keyword: str, number: int) -> Dataset:
    item = _group(per_frame, shared, keyword)
    if item is None:
        raise NotAVolumeError(f"frame {number}: no {keyword} (neither per-frame nor shared)")
    return item


def _rescale(ds: Dataset, per_frame: Dataset, shared: Dataset | None) -> tuple[float, float]:
    item = _group(per_frame, shared, "PixelValueTransformationSequence")
    source = item if item is not None else ds  # some converters keep the top-level Modality LUT module
    if "RescaleSlope" in source and "RescaleIntercept" in source:
        slope = floats(source, "RescaleSlope", 1)[0]
        intercept = floats(source, "RescaleIntercept", 1)[0]
        return float(slope), float(intercept)
    return 1.0, 0.0


def frames(ds: Dataset) -> list[Frame]:
    """The frames of one multi-frame instance, in stored order (frame numbers 1..NumberOfFrames)."""
    count = number_of_frames(ds)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if not per_frame:
        raise NotAVolumeError(
            f"multi-frame image without per-frame functional groups (NumberOfFrames={count}): "
            "no per-frame geometry"
        )
    if len(per_frame) != count:
        raise NotAVolumeError(
            f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for NumberOfFrames={count}"
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared: Dataset | None = shared_seq[0] if shared_seq else None
    size = (int(ds.Rows), int(ds.Columns))
    out: list[Frame] = []
    for number, item in enumerate(per_frame, start=1):
        geometry = Dataset()
        for keyword, field in (
            ("PlanePositionSequence", "ImagePositionPatient"),
            ("PlaneOrientationSequence", "ImageOrientationPatient"),
            ("PixelMeasuresSequence", "PixelSpacing"),
        ):
            group = _required(item, shared, keyword, number)
            if field not in group or group[field].is_empty:
                raise NotAVolumeError(f"frame {number}: {keyword} has no {field}")
            geometry[field] = group[field]
        content = _group(item, shared, "FrameContentSequence")
        echo = _group(item, shared, "MREchoSequence")
        slope, intercept = _rescale(ds, item, shared)
        out.append(
            Frame(
                number=number,
                plane=plane_from(geometry, size, f" of frame {number}"),
                slope=slope,
                intercept=intercept,
                stack_id=_text(content, "StackID"),
                temporal_index=_int(content, "TemporalPositionIndex"),
                echo_time=_float(echo, "EffectiveEchoTime"),
            )
        )
    return out


def _text(item: Dataset | None, keyword: str) -> str | None:
    value = None if item is None else item.get(keyword)
    return None if value is None or value == "" else str(value)


def _int(item: Dataset | None, keyword: str) -> int | None:
    text = _text(item, keyword)
    try:
        return None if text is None else int(text)
    except ValueError as exc:
        raise NotAVolumeError(f"malformed {keyword}: {text!r}") from exc


def _float(item: Dataset | None, keyword: str) -> float | None:
    text = _text(item, keyword)
    try:
        return None if text is None else round(float(text), 3)
    except ValueError as exc:
        raise NotAVolumeError(f"malformed {keyword}: {text!r}") from exc


def check_one_stack(all_frames: Sequence[Frame]) -> None:
    """Refuse frames that belong to more than one stack, temporal position or echo, naming the key."""
    keys = (
        ("stacks", "StackID", {f.stack_id for f in all_frames}),
        ("temporal positions", "TemporalPositionIndex", {f.temporal_index for f in all_frames}),
        ("echoes", "EffectiveEchoTime", {f.echo_time for f in all_frames}),
    )
    for what, keyword, values in keys:
        if len(values) > 1:
            shown = ", ".join(sorted(str(v) for v in values)[:6])
            raise NotAVolumeError(
                f"multi-frame data holds {len(values)} {what} ({keyword} {shown}); "
                "one volume needs a single stack, send each as its own series"
            )


def decode_frames(ds: Dataset) -> NDArray[Any]:
    """All stored frames of ``ds`` as (frames, rows, columns); NotAVolumeError if they cannot be decoded."""
    try:
        raw = pixel_array(ds)
    except Exception as exc:  # decoder plugins raise assorted types; translate at this boundary
        detail = " ".join(str(exc).split())[:200]
        raise NotAVolumeError(f"pixel data could not be decoded: {type(exc).__name__}: {detail}") from exc
    expected = (number_of_frames(ds), int(ds.Rows), int(ds.Columns))
    if raw.ndim == 2:
        raw = raw[np.newaxis]
    if raw.shape != expected:
        raise NotAVolumeError(f"pixel data has shape {raw.shape}, expected {expected} greyscale frames")
    return raw


def with_shared_geometry(ds: Dataset) -> Dataset:
    """A copy of a multi-frame image whose shared functional group also holds the pixel measures and plane
    orientation (from frame 1 where only per-frame). highdicom 0.28 reads these from the shared group of a
    multi-frame SEG source only; call this after :func:`build_volume` has checked they are constant.
    Elements are shared with ``ds`` (which is left unchanged), only the top level and the shared item are new.
    """
    out = Dataset()
    for element in ds:
        out.add(element)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    shared = copy.deepcopy(shared_seq[0])
    first = (ds.get("PerFrameFunctionalGroupsSequence") or [Dataset()])[0]
    for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if not shared.get(keyword) and first.get(keyword):
            setattr(shared, keyword, copy.deepcopy(first[keyword].value))
    out.SharedFunctionalGroupsSequence = [shared]
    return out
