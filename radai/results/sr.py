"""SR encoder: a TID 1500 Measurement Report (Comprehensive 3D SR) of per-segment volumes.

Each measurement group references one segment of the SEG built by :mod:`radai.results.seg`.
Pure: builds and returns a validated :class:`pydicom.Dataset` (via highdicom); another layer sends it.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from radai.errors import EncodingError
from radai.results.seg import MANUFACTURER, Algorithm, CodedConcept, result_uid, series_description
from radai.results.uids import derived_uid

NOT_VERIFIED_TEXT = "AI generated result, not verified by a physician"
UCUM_ML = Code(value="ml", scheme_designator="UCUM", meaning="milliliter")
# TID 1500 row "Qualitative Evaluations" (a CONTAINER of CODE or TEXT items); highdicom has no
# parameter for it, so it is appended to the report's root container by hand.
_QUALITATIVE_EVALUATIONS = Code(value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations")


@dataclass(frozen=True)
class SegmentMeasurement:
    """Measurements of one SEG segment. ``mean_value`` is the mean HU for CT (optional)."""

    segment_number: int
    name: str
    type: CodedConcept
    volume_ml: float
    mean_value: float | None = None


@dataclass(frozen=True)
class SrRequest:
    """Input of :func:`build_sr`: the SEG it reports on, its source images and the measurements.

    ``created`` sets content/series date and time (highdicom uses "now" if None).
    """

    seg: Dataset
    source: Sequence[Dataset]
    measurements: Sequence[SegmentMeasurement]
    algorithm: Algorithm
    series_number: int = 902
    created: datetime.datetime | None = None


def measure_volumes(
    labels: NDArray[np.integer], voxel_volume_ml: float, *, background: int = 0
) -> dict[int, float]:
    """Volume in mL of every label value present in ``labels`` (``background`` excluded)."""
    if voxel_volume_ml <= 0:
        raise EncodingError(f"voxel volume must be positive, got {voxel_volume_ml}")
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return {
        int(v): float(int(c) * voxel_volume_ml)
        for v, c in zip(values, counts, strict=True)
        if int(v) != background
    }


def measure_means(
    labels: NDArray[np.integer], image: NDArray[np.floating], *, background: int = 0
) -> dict[int, float]:
    """Mean of ``image`` (e.g. HU) over each label value present in ``labels`` (same shape)."""
    lab = np.asarray(labels)
    img = np.asarray(image, dtype=np.float64)
    if lab.shape != img.shape:
        raise EncodingError(f"label map shape {lab.shape} does not match image shape {img.shape}")
    flat = lab.ravel().astype(np.int64)
    if flat.size and flat.min() < 0:
        raise EncodingError("label values must not be negative")
    counts = np.bincount(flat)
    sums = np.bincount(flat, weights=img.ravel())
    return {
        int(v): float(sums[v] / counts[v]) for v in np.nonzero(counts)[0] if int(v) != background
    }


def _segment_tracking(seg: Dataset, segment_number: int) -> tuple[str, str] | None:
    """The SEG segment's (TrackingID, TrackingUID), so SR and SEG track the finding alike."""
    for item in seg.get("SegmentSequence", []):
        if int(item.SegmentNumber) == segment_number:
            if "TrackingUID" in item and "TrackingID" in item:
                return str(item.TrackingID), str(item.TrackingUID)
            return None
    raise EncodingError(f"segment {segment_number} is not in the SEG")


def _group(
    req: SrRequest, m: SegmentMeasurement, algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    tracking = _segment_tracking(req.seg, m.segment_number)
    if tracking is None:
        tracking = (m.name, result_uid(req.source, req.algorithm, "sr", "segment", str(m.segment_number)))
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Volume, value=m.volume_ml, unit=UCUM_ML, algorithm_id=algorithm_id
        )
    ]
    if m.mean_value is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.Mean,
                value=m.mean_value,
                unit=codes.UCUM.HounsfieldUnit,
                algorithm_id=algorithm_id,
            )
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking[1], identifier=tracking[0]),
        referenced_segment=hd.sr.ReferencedSegment.from_segmentation(
            req.seg, segment_number=m.segment_number
        ),
        finding_type=m.type.to_code(),
        algorithm_id=algorithm_id,
        measurements=measurements,
    )


def _not_verified_container() -> hd.sr.ContainerContentItem:
    item = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    item.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=NOT_VERIFIED_TEXT,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return item


def _report(req: SrRequest) -> hd.sr.MeasurementReport:
    algo = req.algorithm
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("radai", "device", algo.model_id, algo.version),
        name=algo.model_id,
        manufacturer_name=MANUFACTURER,
        model_name=algo.version,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algo.model_id,
        version=algo.version,
        family=codes.DCM.ArtificialIntelligence,
        manufacturer=MANUFACTURER,
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=[_group(req, m, algorithm_id) for m in req.measurements],
        title=codes.cid7021.ImagingMeasurementReport,
        referenced_images=list(req.source),
    )
    report[0].ContentSequence.append(_not_verified_container())
    return report


def build_sr(req: SrRequest) -> Dataset:
    """Encode the measurements as a COMPLETE, UNVERIFIED Comprehensive 3D SR (TID 1500).

    Raises :class:`EncodingError` if there is nothing to report or highdicom rejects the input.
    """
    if not req.measurements:
        raise EncodingError("SR needs at least one measurement")
    if not req.source:
        raise EncodingError("SR needs the source images")
    dates: dict[str, datetime.date | datetime.time] = {}
    if req.created is not None:
        dates = {
            "content_date": req.created.date(),
            "content_time": req.created.time(),
            "series_date": req.created.date(),
            "series_time": req.created.time(),
        }
    algo = req.algorithm
    try:
        return hd.sr.Comprehensive3DSR(
            evidence=[req.seg, *req.source],
            content=_report(req),
            series_instance_uid=result_uid(req.source, algo, "sr", "series"),
            series_number=req.series_number,
            sop_instance_uid=result_uid(req.source, algo, "sr", "instance"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=algo.model_id,
            software_versions=algo.version,
            series_description=series_description("SR", algo),
            is_complete=True,
            is_final=False,
            is_verified=False,
            **dates,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodingError(f"SR could not be built: {exc}") from exc
