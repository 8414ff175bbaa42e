"""Secondary Capture encoder for PACS that cannot show SEG: source slices with the segments burned in.

Each chosen source slice becomes one RGB Secondary Capture image: the slice windowed for display,
each segment blended in its colour with a brighter 1-pixel outline, and a banner that labels the
image as unverified AI output. Pure: builds datasets (via highdicom); another layer sends them.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM
from scipy import ndimage

from radai.errors import EncodingError
from radai.results.seg import (
    MANUFACTURER,
    Algorithm,
    SegmentSpec,
    creation_dates,
    result_uid,
    series_description,
    with_type2,
)

AI_BANNER = "AI OUTPUT - NOT VERIFIED"
ALPHA = 0.4
SOFT_TISSUE_WINDOW = (40.0, 400.0)  # CT (center, width) in HU when the source has no window
_PERCENTILES = (1.0, 99.0)
_SAMPLE_STRIDE = 4  # percentile window from every 4th row and column: bounded memory for 500 slices
_BANNER_TEXT = (255, 220, 0)
_SOURCE_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")
# Dominant patient axis of a direction cosine -> PatientOrientation letter (LPS: +x L, +y P, +z H).
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))


@dataclass(frozen=True)
class ScRequest:
    """Input of :func:`build_sc`; ``source`` and ``labels`` as in :class:`radai.results.SegRequest`.

    ``slices``: ``"segmented"`` makes an image only for slices where a segment is present, ``"all"``
    one for every source slice. ``created`` sets content/series date and time (now if None).
    """

    source: Sequence[Dataset]
    labels: NDArray[np.uint8]
    segments: Sequence[SegmentSpec]
    algorithm: Algorithm
    series_number: int = 903
    slices: Literal["segmented", "all"] = "segmented"
    created: datetime.datetime | None = None


@dataclass(frozen=True)
class Window:
    """A linear display window on modality values (HU for CT)."""

    center: float
    width: float


def check_overlay_input(
    source: Sequence[Dataset], labels: NDArray[np.integer], segments: Sequence[SegmentSpec]
) -> list[SegmentSpec]:
    """Validate source and label map (shape (X, Y, Z)); return the present segments in value order."""
    if len(source) == 0:
        raise EncodingError("an overlay needs at least one source image")
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise EncodingError(f"label map must be a 3-D integer array, got {labels.ndim}-D {labels.dtype}")
    expected = (int(source[0].Columns), int(source[0].Rows), len(source))
    if labels.shape != expected:
        raise EncodingError(f"label map shape {labels.shape} does not match source (X, Y, Z) {expected}")
    for ds in source:
        if int(getattr(ds, "NumberOfFrames", 1)) != 1 or int(getattr(ds, "SamplesPerPixel", 1)) != 1:
            raise EncodingError("overlay sources must be single-frame grayscale images")
    by_value = {spec.value: spec for spec in segments}
    if len(by_value) != len(segments):
        raise EncodingError("segment specs repeat a label value")
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not present:
        raise EncodingError("no segment found")
    unknown = [v for v in present if v not in by_value]
    if unknown:
        raise EncodingError(f"label values {unknown} have no segment spec")
    return [by_value[v] for v in present]


def modality_values(ds: Dataset) -> NDArray[np.float64]:
    """The slice's pixels after the modality LUT (HU for CT), shape (rows, columns).

    Decoded without ``ds.pixel_array``, which would cache the array on the caller's dataset.
    """
    try:
        raw, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds)
        values = apply_modality_lut(raw, ds)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise EncodingError(f"source pixels cannot be decoded: {exc}") from exc
    return np.asarray(values, dtype=np.float64).reshape(int(ds.Rows), int(ds.Columns))


def display_window(source: Sequence[Dataset]) -> Window:
    """CT: the source's first window, else a soft-tissue window; others: 1st-99th percentile."""
    if str(source[0].get("Modality", "")) == "CT":
        for ds in source:
            if "WindowCenter" in ds and "WindowWidth" in ds:
                center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
                if width > 0:
                    return Window(center, width)
        return Window(*SOFT_TISSUE_WINDOW)
    samples = np.concatenate(
        [modality_values(ds)[::_SAMPLE_STRIDE, ::_SAMPLE_STRIDE].ravel() for ds in source]
    )
    low, high = (float(v) for v in np.percentile(samples, _PERCENTILES))
    return Window((low + high) / 2, max(high - low, 1.0))


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        return float(value)  # type: ignore[arg-type]
    return float(value[0])


def chosen_slices(labels: NDArray[np.integer], slices: Literal["segmented", "all"]) -> list[int]:
    """Source slice indices to render: those with any label, or all."""
    if slices == "all":
        return list(range(labels.shape[2]))
    if slices != "segmented":
        raise EncodingError(f"unknown slice selection {slices!r}")
    return [int(k) for k in np.flatnonzero(labels.any(axis=(0, 1)))]


def _gray(ds: Dataset, window: Window) -> NDArray[np.uint8]:
    low = window.center - window.width / 2
    scaled = np.clip((modality_values(ds) - low) / window.width, 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255).astype(np.uint8)


def _blend(
    gray: NDArray[np.uint8], plane: NDArray[np.integer], present: Sequence[SegmentSpec]
) -> Image.Image:
    """Gray (rows, columns) + label plane (rows, columns) -> RGB with tinted segments and outlines."""
    rgb = np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32)
    for spec in present:
        mask = plane == spec.value
        if not mask.any():
            continue
        color = np.asarray(spec.color, dtype=np.float32)
        rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * color
        edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
        rgb[edge] = color + (255 - color) / 2
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def banner_height(rows: int, columns: int) -> int:
    """Height in pixels of the banner strip at the top of each image (two text lines)."""
    return 2 * _font_size(columns, rows) + 8


def _font_size(columns: int, rows: int) -> int:
    return max(8, min(rows, columns) // 40)


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font (no font file needed) at ``size`` pixels."""
    return ImageFont.load_default(size=size)


def _draw_banner(image: Image.Image, title: str, present: Sequence[SegmentSpec]) -> None:
    """Black strip at the top: the AI notice in yellow, then the segment names in their colours."""
    columns, rows = image.size
    size = _font_size(columns, rows)
    draw = ImageDraw.Draw(image)
    while size > 6 and draw.textlength(title, font=_font(size)) > columns - 8:
        size -= 1
    font = _font(size)
    draw.rectangle((0, 0, columns - 1, banner_height(rows, columns) - 1), fill=(0, 0, 0))
    draw.text((4, 2), title, fill=_BANNER_TEXT, font=font)
    x = 4.0
    for spec in present:
        draw.text((x, 4 + _font_size(columns, rows)), spec.name, fill=spec.color, font=font)
        x += draw.textlength(spec.name + "   ", font=font)


def render_slice(
    ds: Dataset, plane: NDArray[np.integer], present: Sequence[SegmentSpec], window: Window, title: str
) -> NDArray[np.uint8]:
    """The burned-in RGB image (rows, columns, 3) of one slice; ``plane`` is (rows, columns)."""
    image = _blend(_gray(ds, window), plane, present)
    _draw_banner(image, title, present)
    return np.asarray(image, dtype=np.uint8)


def _orientation(ds: Dataset) -> tuple[str, str]:
    """PatientOrientation (row, column direction) from the source's ImageOrientationPatient."""
    if "ImageOrientationPatient" not in ds:
        raise EncodingError("Secondary Capture needs sources with ImageOrientationPatient")
    cosines = np.asarray(ds.ImageOrientationPatient, dtype=float).reshape(2, 3)
    letters = []
    for direction in cosines:
        axis = int(np.argmax(np.abs(direction)))
        letters.append(_AXIS_LETTERS[axis][int(direction[axis] > 0)])
    return letters[0], letters[1]


def _sc_image(req: ScRequest, k: int, pixels: NDArray[np.uint8]) -> Dataset:
    src, algo = req.source[k], req.algorithm
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=with_type2(src),
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_uid(req.source, algo, "sc", "series"),
        series_number=req.series_number,
        sop_instance_uid=result_uid(req.source, algo, "sc", "instance", str(src.SOPInstanceUID)),
        instance_number=k + 1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=_lo(algo.model_id),
        software_versions=_lo(algo.version),
        device_serial_number=_lo(f"{algo.model_id}@{algo.version}"),
        series_description=series_description("SC", algo),
        patient_orientation=_orientation(src),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **creation_dates(req.created),
    )
    sc.copy_patient_and_study_information(src)
    if "PixelSpacing" in src:  # copied, not passed: highdicom types the argument as integers
        sc.PixelSpacing = src.PixelSpacing
    # dciodvfy requires Laterality (Type 2C) when there is no ImageLaterality: follow the source, else empty.
    sc.Laterality = src.get("Laterality", "")
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = _lo("AI segmentation burned in, not verified by a physician")
    reference = Dataset()
    reference.ReferencedSOPClassUID = src.SOPClassUID
    reference.ReferencedSOPInstanceUID = src.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [_SOURCE_PURPOSE]
    sc.SourceImageSequence = [reference]
    if req.created is not None:
        sc.DateOfSecondaryCapture = DA(req.created.date())
        sc.TimeOfSecondaryCapture = TM(req.created.time())
    return sc


def _lo(text: str) -> str:
    """Clip to the 64 characters of a LO value."""
    return text if len(text) <= 64 else text[:61] + "..."


def iter_sc(req: ScRequest) -> Iterator[Dataset]:
    """Yield the Secondary Capture images one slice at a time (one image in memory at a time).

    Raises :class:`EncodingError` (when iterated) if no segment is present or the input is inconsistent.
    """
    labels = np.asarray(req.labels)
    present = check_overlay_input(req.source, labels, req.segments)
    chosen = chosen_slices(labels, req.slices)
    window = display_window(req.source)
    title = f"{AI_BANNER} - {req.algorithm.name} {req.algorithm.version}"
    for k in chosen:
        pixels = render_slice(req.source[k], labels[:, :, k].T, present, window, title)
        try:
            image = _sc_image(req, k, pixels)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise EncodingError(f"Secondary Capture could not be built: {exc}") from exc
        yield image


def build_sc(req: ScRequest) -> list[Dataset]:
    """All Secondary Capture images of :func:`iter_sc`, in source slice order.

    InstanceNumber is the source slice index + 1, so "segmented" series have gaps. Raises
    :class:`EncodingError` for an empty label map (like the SEG encoder) or inconsistent input.
    """
    return list(iter_sc(req))
