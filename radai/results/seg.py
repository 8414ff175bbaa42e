"""DICOM SEG encoder: a label map on a series of single-frame images -> one BINARY Segmentation.

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

from radai.errors import EncodingError
from radai.results.uids import derived_uid

MANUFACTURER = "radai"
# The source label value of each segment is kept as a per-segment algorithm parameter, so that
# ``segment_numbers`` can map label values back to segment numbers from the dataset alone.
_LABEL_PARAMETER = "output_label"
_LABEL_RE = re.compile(rf"(?:^|,){_LABEL_PARAMETER}=(\d+)(?:,|$)")
_LO_MAX = 64


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


@dataclass(frozen=True)
class SegRequest:
    """Input of :func:`build_seg`.

    ``source`` are single-frame images in slice order k = 0..Z-1; ``labels`` has shape
    (columns, rows, slices) and ``labels[c, r, k]`` is the label of pixel (row r, column c) of
    ``source[k]``. ``created`` sets content/series date and time (highdicom uses "now" if None).
    """

    source: Sequence[Dataset]
    labels: NDArray[np.uint8]
    segments: Sequence[SegmentSpec]
    algorithm: Algorithm
    series_number: int = 901
    created: datetime.datetime | None = None


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


def _check(req: SegRequest) -> tuple[NDArray[np.integer], list[SegmentSpec]]:
    """Validate the request; return the present label values' specs in value order."""
    if len(req.source) == 0:
        raise EncodingError("SEG needs at least one source image")
    labels = np.asarray(req.labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise EncodingError(f"label map must be a 3-D integer array, got {labels.ndim}-D {labels.dtype}")
    first = req.source[0]
    expected = (int(first.Columns), int(first.Rows), len(req.source))
    if labels.shape != expected:
        raise EncodingError(f"label map shape {labels.shape} does not match source (X, Y, Z) {expected}")
    for ds in req.source:
        if int(getattr(ds, "NumberOfFrames", 1)) != 1:
            raise EncodingError("SEG source images must be single-frame images")
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


def _description(number: int, spec: SegmentSpec, req: SegRequest) -> hd.seg.SegmentDescription:
    algo = req.algorithm
    identification = hd.AlgorithmIdentificationSequence(
        name=algo.model_id,
        family=codes.DCM.ArtificialIntelligence,
        version=algo.version,
        source=MANUFACTURER,
        parameters={_LABEL_PARAMETER: str(spec.value)},
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
    """Encode the label map as a BINARY Segmentation with one segment per label value present.

    Segments are numbered 1..n in order of label value; see :func:`segment_numbers`. Frames that
    are empty for a segment are omitted. Raises :class:`EncodingError` if no label is present or
    the input is inconsistent.
    """
    labels, present = _check(req)
    # Renumber label values to segment numbers 1..n with a lookup table, then (X, Y, Z) -> (Z, Y, X):
    # highdicom's label-map style wants frames down axis 0, rows then columns.
    lut = np.zeros(int(labels.max()) + 1, dtype=np.uint16)
    for number, spec in enumerate(present, start=1):
        lut[spec.value] = number
    frames = np.ascontiguousarray(lut[labels].transpose(2, 1, 0))
    if len(present) < 256:
        frames = frames.astype(np.uint8)
    algo = req.algorithm
    try:
        seg = hd.seg.Segmentation(
            source_images=list(req.source),
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_description(n, s, req) for n, s in enumerate(present, start=1)],
            series_instance_uid=result_uid(req.source, algo, "seg", "series"),
            series_number=req.series_number,
            sop_instance_uid=result_uid(req.source, algo, "seg", "instance"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=_lo(algo.model_id),
            software_versions=_lo(algo.version),
            device_serial_number=_lo(f"{algo.model_id}@{algo.version}"),
            content_label="AI_SEGMENTATION",
            content_description=_lo("AI generated segmentation, not verified by a physician"),
            series_description=series_description("SEG", algo),
            omit_empty_frames=True,
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
