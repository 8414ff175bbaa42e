"""The header of one received instance: the fields routing and series selection need, no pixels, no PHI."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments

from dicom_router.uids import is_valid_uid


@dataclass(frozen=True)
class InstanceHeader:
    """Routing-relevant header fields of one spooled instance (deliberately no patient attributes)."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str
    series_description: str
    body_part: str
    image_type: tuple[str, ...]
    image_orientation: tuple[float, ...] | None
    number_of_frames: int
    calling_ae: str
    received_at: float


def read_header(path: Path, calling_ae: str, received_at: float) -> InstanceHeader:
    """Read the header of a DICOM file without its pixel data.

    Raises ValueError when the file is not DICOM or lacks valid SOP Class/Instance, Study or Series UIDs.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on garbage (InvalidDicomError, EOFError, ...)
        raise ValueError(f"not a readable DICOM file: {type(exc).__name__}") from exc
    return header_from_dataset(ds, Path(path), calling_ae, received_at)


def parse_encoded(encoded: bytes) -> Dataset:
    """Parse an encoded file (preamble + file meta + data set) to its end and check the pixel data's
    structure (lengths and fragments only: nothing is decoded).

    Raises ValueError when the bytes are not DICOM, are truncated, or the pixel data cannot be what the
    header says (e.g. its length does not match Rows x Columns x frames).
    """
    try:
        ds = dcmread(BytesIO(encoded))
    except Exception as exc:  # see read_header
        raise ValueError(f"not a readable DICOM data set: {type(exc).__name__}") from exc
    check_pixel_data(ds)
    return ds


def check_pixel_data(ds: Dataset) -> None:
    """Cheap structural check of Pixel Data; ValueError with the reason when it cannot be decoded later."""
    if "PixelData" not in ds:
        raise ValueError("no Pixel Data")
    raw = ds.get_item("PixelData")  # as sent: its declared length, before pydicom read what was there
    declared = raw.length if isinstance(raw, RawDataElement) else 0xFFFFFFFF
    try:
        value = ds["PixelData"].value
        if value is None:
            raise ValueError("empty Pixel Data")
        if declared != 0xFFFFFFFF and declared != len(value):
            raise ValueError(f"Pixel Data declares {declared} bytes but only {len(value)} were sent")
        syntax = ds.file_meta.TransferSyntaxUID
        frames = _frames(ds)
        if syntax.is_encapsulated:
            fragments = sum(1 for _ in generate_fragments(value))
            if fragments < 1:
                raise ValueError("encapsulated Pixel Data without fragments")
            return
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
        if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
            samples = 2  # chroma shared by two pixels: 2 values per pixel on the wire
    except ValueError:
        raise
    except Exception as exc:  # missing image attributes, malformed fragments, bad values
        raise ValueError(f"malformed pixel description: {type(exc).__name__}") from exc
    if min(rows, columns, samples, bits) < 1:
        raise ValueError("Rows, Columns, SamplesPerPixel and BitsAllocated must be positive")
    pixels = rows * columns * samples * frames
    expected = (pixels + 7) // 8 if bits == 1 else pixels * ((bits + 7) // 8)
    if len(value) < expected:  # longer is tolerated (trailing padding), as decoders do
        raise ValueError(
            f"Pixel Data has {len(value)} bytes, Rows x Columns x samples x frames x bytes needs {expected}"
        )


def header_from_encoded(encoded: bytes, path: Path, calling_ae: str, received_at: float) -> InstanceHeader:
    """Parse encoded Part 10 bytes (header only) into an InstanceHeader; ValueError when not usable."""
    return header_from_dataset(parse_encoded(encoded), path, calling_ae, received_at)


def header_from_dataset(ds: Dataset, path: Path, calling_ae: str, received_at: float) -> InstanceHeader:
    """Build an InstanceHeader from a parsed data set; ValueError on missing or invalid UIDs or bad values.

    Every value is converted here, so a malformed element surfaces as ValueError now rather than later.
    """
    try:
        sop_instance_uid = _uid(ds, "SOPInstanceUID")
        sop_class_uid = _uid(ds, "SOPClassUID")
        study_uid = _uid(ds, "StudyInstanceUID")
        series_uid = _uid(ds, "SeriesInstanceUID")
        return InstanceHeader(
            path=path,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_uid=study_uid,
            series_uid=series_uid,
            modality=_text(ds, "Modality").upper(),
            series_description=_text(ds, "SeriesDescription"),
            body_part=_text(ds, "BodyPartExamined").upper(),
            image_type=_multi_text(ds, "ImageType"),
            image_orientation=_orientation(ds),
            number_of_frames=_frames(ds),
            calling_ae=calling_ae.strip(),
            received_at=received_at,
        )
    except ValueError:
        raise
    except Exception as exc:  # malformed element values raise assorted types inside pydicom
        raise ValueError(f"malformed header: {type(exc).__name__}") from exc


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    text = "" if value is None else str(value).rstrip("\x00 ")
    if not is_valid_uid(text):
        raise ValueError(f"missing or invalid {keyword}")
    return text


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, str | bytes):
        return _decode(value).strip()
    # A multi-valued element where one value was expected: keep the values joined.
    return "\\".join(_decode(v).strip() for v in value)


def _multi_text(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None:
        return ()
    items: Iterable[Any] = [value] if isinstance(value, str | bytes) else value
    return tuple(_decode(v).strip().upper() for v in items)


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


def _frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    frames = int(value)
    if frames < 1:
        raise ValueError("invalid NumberOfFrames")
    return frames


def _orientation(ds: Dataset) -> tuple[float, ...] | None:
    """ImageOrientationPatient, else the shared functional group's, else the first frame's (Philips
    Enhanced MR puts it per frame only)."""
    found = _cosines(ds.get("ImageOrientationPatient"))
    if found is not None:
        return found
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(keyword)
        if not groups:
            continue
        planes = groups[0].get("PlaneOrientationSequence")
        if planes:
            found = _cosines(planes[0].get("ImageOrientationPatient"))
            if found is not None:
                return found
    return None


def _cosines(value: Any) -> tuple[float, ...] | None:
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        cosines = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(cosines) != 6 or not all(math.isfinite(c) for c in cosines):
        return None
    return cosines
