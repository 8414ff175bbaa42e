"""SR encoder: a TID 1500 Measurement Report (Comprehensive 3D SR) of per-segment volumes.

Each measurement group references one segment of the SEG built by :mod:`radai.results.seg`.
Pure: builds and returns a validated :class:`pydicom.Dataset` (via highdicom); another layer sends it.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr.templates import DEFAULT_LANGUAGE
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from radai.errors import EncodingError
from radai.results.seg import (
    MANUFACTURER,
    Algorithm,
    CodedConcept,
    creation_dates,
    result_uid,
    series_description,
)
from radai.results.uids import derived_uid

NOT_VERIFIED_TEXT = "AI generated result, not verified by a physician"
UCUM_ML = Code(value="ml", scheme_designator="UCUM", meaning="milliliter")
_SOURCE = Code(value="260753009", scheme_designator="SCT", meaning="Source")
# CID 29 Acquisition Modality by DICOM Modality value (CT, MR, ...).
_MODALITIES: dict[str, Code] = {
    getattr(codes.cid29, keyword).value: getattr(codes.cid29, keyword) for keyword in codes.cid29.dir()
}
# Quantity and unit of a mean intensity (TID 1419 NUM with derivation "Mean") by modality.
_MEAN_QUANTITY: dict[str, tuple[Code, Code]] = {
    "CT": (codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit),
    "MR": (codes.DCM.MRSignalIntensity, codes.UCUM.NoUnits),
}
# TID 1500 row "Qualitative Evaluations" (a CONTAINER of CODE or TEXT items); highdicom has no
# parameter for it, so it is appended to the report's root container by hand.
QUALITATIVE_EVALUATIONS = Code(value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations")


@dataclass(frozen=True)
class KeyRegion:
    """Where a segment is largest: its bounding rectangle on one source image, in pixel coordinates
    (column, row; 0.0 is the top left corner of the top left pixel), and the frame for a multi-frame image."""

    image: Dataset
    box: tuple[float, float, float, float]  # column min, row min, column max, row max (pixel edges)
    frame_number: int | None = None


@dataclass(frozen=True)
class SegmentMeasurement:
    """Measurements of one SEG segment.

    ``mean_value`` is the mean intensity over the segment (HU for CT, signal for MR); it is
    encoded for CT and MR sources only, since other modalities have no agreed quantity here.
    """

    segment_number: int
    name: str
    type: CodedConcept
    volume_ml: float
    mean_value: float | None = None
    key_region: KeyRegion | None = None


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
    # Extra parts of the UID derivation, as the SEG variant it reports on (see SegRequest.uid_parts).
    uid_parts: tuple[str, ...] = ()


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
    return {int(v): float(sums[v] / counts[v]) for v in np.nonzero(counts)[0] if int(v) != background}


def _segment_tracking(seg: Dataset, segment_number: int) -> tuple[str, str] | None:
    """The SEG segment's (TrackingID, TrackingUID), so SR and SEG track the finding alike."""
    for item in seg.get("SegmentSequence", []):
        if int(item.SegmentNumber) == segment_number:
            if "TrackingUID" in item and "TrackingID" in item:
                return str(item.TrackingID), str(item.TrackingUID)
            return None
    raise EncodingError(f"segment {segment_number} is not in the SEG")


def _referenced_segment(seg: Dataset, segment_number: int) -> hd.sr.ReferencedSegment:
    """Reference one SEG segment and its source series (one UIDREF rather than one IMAGE item
    per source slice per segment, which ``ReferencedSegment.from_segmentation`` would write)."""
    try:
        series_uid = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError) as exc:
        raise EncodingError("SEG does not reference its source series") from exc
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
    )


def _tracking(req: SrRequest, m: SegmentMeasurement) -> tuple[str, str]:
    tracking = _segment_tracking(req.seg, m.segment_number)
    if tracking is None:
        tracking = (m.name, result_uid(req.source, req.algorithm, "sr", "segment", str(m.segment_number)))
    return tracking


def _group(
    req: SrRequest, m: SegmentMeasurement, algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    tracking = _tracking(req, m)
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Volume, value=m.volume_ml, unit=UCUM_ML, algorithm_id=algorithm_id)
    ]
    quantity = _MEAN_QUANTITY.get(str(req.source[0].get("Modality", "")))
    if m.mean_value is not None and quantity is not None:
        measurements.append(
            hd.sr.Measurement(
                name=quantity[0],
                value=m.mean_value,
                unit=quantity[1],
                derivation=codes.SCT.Mean,
                algorithm_id=algorithm_id,
            )
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking[1], identifier=tracking[0]),
        referenced_segment=_referenced_segment(req.seg, m.segment_number),
        finding_type=m.type.to_code(),
        algorithm_id=algorithm_id,
        measurements=measurements,
    )


def _planar_group(
    m: SegmentMeasurement,
    region: KeyRegion,
    tracking: tuple[str, str],
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group for the same finding (same tracking identifier and UID): the segment's bounding box on
    its largest slice. Viewers that draw measurements on images need such a planar region: OHIF 3 places
    the finding's measurements there (and, up to 3.13 at least, fails on a report with none)."""
    c0, r0, c1, r1 = region.box
    points = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float64)
    frames = [region.frame_number] if region.frame_number is not None else None
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking[1], identifier=tracking[0]),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=points,
            source_image=hd.sr.SourceImageForRegion(
                str(region.image.SOPClassUID),
                str(region.image.SOPInstanceUID),
                referenced_frame_numbers=frames,
            ),
        ),
        finding_type=m.type.to_code(),
        algorithm_id=algorithm_id,
        geometric_purpose=codes.cid219.BoundedBy,
    )


def not_verified_container() -> hd.sr.ContainerContentItem:
    item = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
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


def image_library(source: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: one group whose shared descriptors are the modality and frame of
    reference, then one IMAGE entry per source instance. A multi-frame source is one entry without
    frame numbers: every frame of it is in the volume (``radai.imaging.volume`` takes one stack whole).

    ``hd.sr.ImageLibrary`` writes the full TID 1602 descriptors for every entry, about 9 ms and
    4 kB per slice (4.6 s and 1.9 MB for a 500-slice CT); per-entry descriptors are optional
    (TID 1601), so the shared ones are written once, with highdicom's content items.
    """
    first = source[0]
    modality = _MODALITIES.get(str(first.get("Modality", "")))
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence()
    # TID 1602 descriptors need the modality first; without a known one, write none (they are optional).
    if modality is not None:
        group.ContentSequence.append(
            hd.sr.CodeContentItem(
                name=codes.DCM.Modality,
                value=modality,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
            )
        )
    if modality is not None and "FrameOfReferenceUID" in first:
        group.ContentSequence.append(
            hd.sr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID,
                value=str(first.FrameOfReferenceUID),
                relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
            )
        )
    for ds in source:
        group.ContentSequence.append(
            hd.sr.ImageContentItem(
                name=_SOURCE,
                referenced_sop_class_uid=str(ds.SOPClassUID),
                referenced_sop_instance_uid=str(ds.SOPInstanceUID),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def device_context(algo: Algorithm) -> hd.sr.ObservationContext:
    """TID 1002 observer context: the model as the observing device (id as name, version as model name)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("radai", "device", algo.model_id, algo.version),
        name=algo.model_id,
        manufacturer_name=MANUFACTURER,
        model_name=algo.version,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )


def algorithm_identification(algo: Algorithm) -> hd.sr.AlgorithmIdentification:
    """TID 4019 algorithm identification of the model (an AI algorithm by radai)."""
    return hd.sr.AlgorithmIdentification(
        name=algo.model_id,
        version=algo.version,
        parameters=list(algo.inputs) or None,
        family=codes.DCM.ArtificialIntelligence,
        manufacturer=MANUFACTURER,
    )


def report_root(source: Sequence[Dataset], algo: Algorithm) -> hd.sr.ContainerContentItem:
    """A TID 1500 root up to its Image Library (language, the model as observing device, procedure reported,
    image library), as highdicom's MeasurementReport writes it. For reports with no imaging measurement (a
    notice, no findings), which MeasurementReport refuses: TID 1500 needs Imaging Measurements *or*
    Qualitative Evaluations. The caller appends the rest."""
    root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = hd.sr.ContentSequence()
    root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    root.ContentSequence.extend(device_context(algo))
    root.ContentSequence.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=codes.SCT.ImagingProcedure,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    root.ContentSequence.append(image_library(source))
    return root


def _report(req: SrRequest) -> hd.sr.MeasurementReport:
    algo = req.algorithm
    context = device_context(algo)
    algorithm_id = algorithm_identification(algo)
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=[
            *(_group(req, m, algorithm_id) for m in req.measurements),
            *(
                _planar_group(m, m.key_region, _tracking(req, m), algorithm_id)
                for m in req.measurements
                if m.key_region is not None
            ),
        ],
        title=codes.cid7021.ImagingMeasurementReport,
    )
    root = report[0].ContentSequence
    # TID 1500 order: ..., Procedure reported, Image Library, Imaging Measurements, ...
    position = next(i for i, item in enumerate(root) if item.name == codes.DCM.ImagingMeasurements)
    root.insert(position, image_library(req.source))
    root.append(not_verified_container())
    return report


def report_attributes(
    source: Sequence[Dataset],
    algo: Algorithm,
    kind: Sequence[str],
    series_number: int,
    description: str,
    created: datetime.datetime | None,
) -> dict[str, Any]:
    """The keyword arguments every radai SR shares: deterministic series and instance UIDs from ``kind``,
    the model as manufacturer model and software version, COMPLETE and UNVERIFIED."""
    return {
        "series_instance_uid": result_uid(source, algo, *kind, "series"),
        "series_number": series_number,
        "sop_instance_uid": result_uid(source, algo, *kind, "instance"),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": algo.model_id,
        "software_versions": algo.version,
        "series_description": description,
        "is_complete": True,
        "is_final": False,
        "is_verified": False,
        **creation_dates(created),
    }


def build_sr(req: SrRequest) -> Dataset:
    """Encode the measurements as a COMPLETE, UNVERIFIED Comprehensive 3D SR (TID 1500).

    Raises :class:`EncodingError` if there is nothing to report or highdicom rejects the input.
    """
    if not req.measurements:
        raise EncodingError("SR needs at least one measurement")
    if not req.source:
        raise EncodingError("SR needs the source images")
    algo = req.algorithm
    try:
        return hd.sr.Comprehensive3DSR(
            evidence=[req.seg, *req.source],
            content=_report(req),
            **report_attributes(
                req.source,
                algo,
                ("sr", *req.uid_parts),
                req.series_number,
                series_description("SR", algo),
                req.created,
            ),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodingError(f"SR could not be built: {exc}") from exc
