"""DICOM SEG encoder: a label map on a series of single-frame images, or on the frames of one Enhanced
multi-frame image -> one BINARY Segmentation.

Pure: builds and returns a validated :class:`pydicom.Dataset` (via highdicom); another layer sends it.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from radai.errors import EncodingError, NotAVolumeError
from radai.imaging.multiframe import frames, is_multiframe, number_of_frames, with_shared_geometry
from radai.results.uids import derived_uid

MANUFACTURER = "radai"
# The source label value of each segment is kept as a per-segment algorithm parameter, so that
# ``segment_numbers`` can map label values back to segment numbers from the dataset alone.
_LABEL_PARAMETER = "output_label"
_LABEL_RE = re.compile(rf"(?:^|,){_LABEL_PARAMETER}=(\d+)(?:,|$)")
_LO_MAX = 64
# Type 2 Patient / General Study attributes highdicom copies from the source (it raises if one is absent).
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
_ORIENTATION_TOL = 1e-4  # as radai.imaging.volume


@dataclass(frozen=True)
class CodedConcept:
    """A coded concept, e.g. ``CodedConcept("SCT", "10200004", "Liver")``."""

    scheme: str
    value: str
    meaning: str

    def to_code(self) -> Code:
        """The pydicom ``Code`` for highdicom."""
        return Code(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)


@dataclass(frozen=True)
class SegmentSpec:
    """One label a model can produce: its value in the label map and how to describe it."""

    value: int
    name: str
    category: CodedConcept
    type: CodedConcept
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Algorithm:
    """The model that produced a result: stable id, version and human name."""

    model_id: str
    version: str
    name: str
    # Other models' outputs this result was computed from, e.g. "mask of lung-mask@1.0.0 labels 2"
    # (multi-model pipelines); written as algorithm parameters in the SEG and SR.
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class SegRequest:
    """Input of :func:`build_seg`.

    ``source`` are single-frame images in slice order k = 0..Z-1; ``labels`` has shape
    (columns, rows, slices) and ``labels[c, r, k]`` is the label of pixel (row r, column c) of
    ``source[k]``. For an Enhanced multi-frame source, ``source`` is that ONE instance and
    ``frame_numbers[k]`` the 1-based frame of slice k (``Volume.frame_numbers``); frames not named
    stay empty. ``created`` sets content/series date and time (highdicom uses "now" if None).
    """

    source: Sequence[Dataset]
    labels: NDArray[np.uint8]
    segments: Sequence[SegmentSpec]
    algorithm: Algorithm
    series_number: int = 901
    created: datetime.datetime | None = None
    frame_numbers: Sequence[int] | None = None
    # LABELMAP: a Label Map Segmentation (one frame per plane, pixel = segment number) instead of BINARY.
    labelmap: bool = False
    # Keep frames without any segment (BINARY: one frame per plane and segment; LABELMAP: every plane).
    keep_empty: bool = False
    # Extra parts of the UID derivation: a variant other than the default is a different object.
    uid_parts: tuple[str, ...] = ()


def _lo(text: str) -> str:
    """Clip to the 64 characters of a LO value."""
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def series_description(kind: str, algorithm: Algorithm) -> str:
    """``AI <kind> <model name> (not verified)``, clipped to fit a LO value."""
    suffix = " (not verified)"
    head = f"AI {kind} {algorithm.name}"
    if len(head) + len(suffix) > _LO_MAX:
        head = head[: _LO_MAX - len(suffix) - 3] + "..."
    return head + suffix


def result_uid(source: Sequence[Dataset], algorithm: Algorithm, *kind: str) -> str:
    """Deterministic UID of a result (study, source series, model id, version, then ``kind``)."""
    first = source[0]
    return derived_uid(
        str(first.StudyInstanceUID),
        str(first.SeriesInstanceUID),
        algorithm.model_id,
        algorithm.version,
        *kind,
    )


def creation_dates(created: datetime.datetime | None) -> dict[str, Any]:
    """Content and series date/time keyword arguments for highdicom (none: highdicom uses now)."""
    if created is None:
        return {}
    day, time = created.date(), created.time()
    return {"content_date": day, "content_time": time, "series_date": day, "series_time": time}


def check_source(source: Sequence[Dataset], frame_numbers: Sequence[int] | None = None) -> None:
    """Refuse a source no SEG can be built on, before any inference is spent on it.

    Either single-frame images (``frame_numbers`` None), or one multi-frame instance whose frames
    ``frame_numbers`` names (each once, within 1..NumberOfFrames). More than one plane needs a frame
    of reference: highdicom refuses such a SEG without one, and radai does not invent one for the source.
    """
    if len(source) == 0:
        raise EncodingError("SEG needs at least one source image")
    if frame_numbers is None:
        if any(is_multiframe(ds) for ds in source):
            raise EncodingError("SEG of a multi-frame source needs the frame number of each slice")
        planes = len(source)
    else:
        if len(source) != 1 or "PerFrameFunctionalGroupsSequence" not in source[0]:
            raise EncodingError(
                f"SEG of multi-frame images needs exactly one Enhanced multi-frame source, got "
                f"{len(source)} instances; send the frames as one instance (or as single-frame images)"
            )
        try:
            planes = number_of_frames(source[0])
        except NotAVolumeError as exc:
            raise EncodingError(str(exc)) from exc
        numbers = [int(n) for n in frame_numbers]
        if len(set(numbers)) != len(numbers) or not all(1 <= n <= planes for n in numbers):
            raise EncodingError(f"frame numbers must be distinct and within 1..{planes}")
    if planes > 1 and not str(source[0].get("FrameOfReferenceUID") or ""):
        raise EncodingError("source images have no FrameOfReferenceUID; a SEG of several planes needs one")


def _check(req: SegRequest) -> tuple[NDArray[np.integer], list[SegmentSpec]]:
    """Validate the request; return the present label values' specs in value order."""
    check_source(req.source, req.frame_numbers)
    labels = np.asarray(req.labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise EncodingError(f"label map must be a 3-D integer array, got {labels.ndim}-D {labels.dtype}")
    first = req.source[0]
    slices = len(req.source) if req.frame_numbers is None else len(req.frame_numbers)
    expected = (int(first.Columns), int(first.Rows), slices)
    if labels.shape != expected:
        raise EncodingError(f"label map shape {labels.shape} does not match source (X, Y, Z) {expected}")
    by_value = {spec.value: spec for spec in req.segments}
    if len(by_value) != len(req.segments):
        raise EncodingError("segment specs repeat a label value")
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not present:
        raise EncodingError("no segment found")
    unknown = [v for v in present if v not in by_value]
    if unknown:
        raise EncodingError(f"label values {unknown} have no segment spec")
    return labels, [by_value[v] for v in present]


def _multiframe_source(ds: Dataset) -> Dataset:
    """The multi-frame source as highdicom 0.28 takes it: orientation and pixel measures in the shared
    functional group (it reads them nowhere else). Refuses frames whose orientation or spacing differ,
    since one shared value would then misplace some of them."""
    try:
        planes = [f.plane for f in frames(ds)]
    except NotAVolumeError as exc:
        raise EncodingError(f"multi-frame source geometry: {exc}") from exc
    first = planes[0]
    for plane in planes:
        if not (
            np.allclose(plane.row, first.row, atol=_ORIENTATION_TOL)
            and np.allclose(plane.col, first.col, atol=_ORIENTATION_TOL)
            and np.allclose(plane.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-6)
        ):
            raise EncodingError("multi-frame source frames differ in orientation or pixel spacing")
    return with_shared_geometry(ds)


def with_type2(ds: Dataset) -> Dataset:
    """``ds``, or a shallow copy with its absent type 2 patient/study attributes present and empty (which is
    what an absent type 2 attribute means; results must carry them) and without an empty Specific Character
    Set (empty means the default repertoire, which highdicom, copying it, refuses as a value)."""
    missing = [keyword for keyword in _TYPE2 if keyword not in ds]
    empty_charset = "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet
    if not missing and not empty_charset:
        return ds
    out = Dataset()
    for element in ds:
        if not (empty_charset and element.keyword == "SpecificCharacterSet"):
            out.add(element)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for keyword in missing:
        setattr(out, keyword, "")
    return out


def _frames(req: SegRequest, segment_map: NDArray[np.integer]) -> NDArray[np.integer]:
    """(X, Y, Z) segment numbers -> highdicom's (frames, rows, columns): one frame per source slice,
    or for a multi-frame source one per source frame, slice k at frame ``frame_numbers[k]``."""
    zyx = segment_map.transpose(2, 1, 0)
    if req.frame_numbers is None:
        return np.ascontiguousarray(zyx)
    first = req.source[0]
    out = np.zeros((number_of_frames(first), int(first.Rows), int(first.Columns)), dtype=zyx.dtype)
    out[np.asarray(req.frame_numbers, dtype=np.intp) - 1] = zyx
    return out


def _description(number: int, spec: SegmentSpec, req: SegRequest) -> hd.seg.SegmentDescription:
    algo = req.algorithm
    identification = hd.AlgorithmIdentificationSequence(
        name=algo.model_id,
        family=codes.DCM.ArtificialIntelligence,
        version=algo.version,
        source=MANUFACTURER,
        parameters={_LABEL_PARAMETER: str(spec.value)}
        | ({"input": "; ".join(algo.inputs)[:_LO_MAX]} if algo.inputs else {}),
    )
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_lo(spec.name),
        segmented_property_category=spec.category.to_code(),
        segmented_property_type=spec.type.to_code(),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identification,
        tracking_id=_lo(spec.name),
        tracking_uid=result_uid(req.source, algo, "seg", "segment", str(spec.value)),
        display_color=hd.color.CIELabColor.from_rgb(*spec.color),
    )


def build_seg(req: SegRequest) -> Dataset:
    """Encode the label map as a BINARY (or, with ``labelmap``, a Label Map) Segmentation with one segment
    per label value present.

    Segments are numbered 1..n in order of label value; see :func:`segment_numbers`. Frames that
    are empty are omitted unless ``keep_empty``. Each SEG frame references its source image (and frame) and
    takes its plane position from it. Raises :class:`EncodingError` if no label is present or
    the input is inconsistent.
    """
    labels, present = _check(req)
    # Renumber label values to segment numbers 1..n with a lookup table, then to highdicom's label-map
    # style: frames down axis 0 (one per source frame, in the source's order), rows then columns.
    lut = np.zeros(int(labels.max()) + 1, dtype=np.uint8 if len(present) < 256 else np.uint16)
    for number, spec in enumerate(present, start=1):
        lut[spec.value] = number
    pixels = _frames(req, lut[labels])
    if req.frame_numbers is None:
        source = [with_type2(req.source[0]), *req.source[1:]]
    else:
        source = [with_type2(_multiframe_source(req.source[0]))]
    algo = req.algorithm
    try:
        seg = hd.seg.Segmentation(
            source_images=source,
            pixel_array=pixels,
            segmentation_type=(
                hd.seg.SegmentationTypeValues.LABELMAP
                if req.labelmap
                else hd.seg.SegmentationTypeValues.BINARY
            ),
            segment_descriptions=[_description(n, s, req) for n, s in enumerate(present, start=1)],
            series_instance_uid=result_uid(req.source, algo, "seg", *req.uid_parts, "series"),
            series_number=req.series_number,
            sop_instance_uid=result_uid(req.source, algo, "seg", *req.uid_parts, "instance"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=_lo(algo.model_id),
            software_versions=_lo(algo.version),
            device_serial_number=_lo(f"{algo.model_id}@{algo.version}"),
            content_label="AI_SEGMENTATION",
            content_description=_lo("AI generated segmentation, not verified by a physician"),
            series_description=series_description("SEG", algo),
            omit_empty_frames=not req.keep_empty,
            **creation_dates(req.created),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodingError(f"SEG could not be built: {exc}") from exc
    return seg


def segment_numbers(seg: Dataset) -> dict[int, int]:
    """Map each label value encoded by :func:`build_seg` to its segment number in ``seg``."""
    result: dict[int, int] = {}
    for item in seg.get("SegmentSequence", []):
        for algo in item.get("SegmentationAlgorithmIdentificationSequence", []):
            match = _LABEL_RE.search(str(algo.get("AlgorithmParameters", "")))
            if match:
                result[int(match.group(1))] = int(item.SegmentNumber)
    return result
