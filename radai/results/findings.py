"""SR encoder for detection findings: a TID 1500 Measurement Report (Comprehensive 3D SR), one TID 1411
group per finding with its 3-D location (SCOORD3D), finding type, probability and optional size.

The root is that of :mod:`radai.results.sr` (device observer, procedure reported, image library,
Imaging Measurements, the "not verified" statement). A model that found nothing still reports: the root
then has no Imaging Measurements and its Qualitative Evaluations say so (TID 1500 requires Imaging
Measurements *or* Qualitative Evaluations), so a radiologist sees that the model ran. Pure: returns a
pydicom Dataset built with highdicom.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.sr.codedict import codes

from radai.errors import EncodingError
from radai.results.seg import (
    Algorithm,
    CodedConcept,
    result_uid,
    series_description,
    with_type2,
)

# Private helpers of the segmentation SR, shared so both reports have the same root.
from radai.results.sr import (
    algorithm_identification,
    not_verified_container,
    report_attributes,
    report_root,
)

NO_FINDINGS_TEXT = "AI detection found no findings"
# A detection's probability is written as the CAD templates write a finding's confidence: (111012, DCM,
# "Certainty of Finding") in percent, 0-100 (PS3.16 TID 4104 row 12, TID 4127 row 8; CID 6048). It is the
# one standard concept for this; the generic (122157, DCM, "Probability") is in no context group.
CERTAINTY = codes.DCM.CertaintyOfFinding
PERCENT = codes.UCUM.Percent

Point3D = tuple[float, float, float]


@dataclass(frozen=True)
class DetectionFinding:
    """One detected finding, in patient coordinates (LPS, mm) of the source's frame of reference.

    ``box_mm`` is the axis-aligned bounding box (min corner, max corner); when given, the location
    is written as the ellipsoid inscribed in it, else as the point ``center_mm``. ``size_mm`` is the
    longest diameter. Raises :class:`EncodingError` on values no report can carry.
    """

    label: str
    type: CodedConcept
    center_mm: Point3D
    box_mm: tuple[Point3D, Point3D] | None
    probability: float
    size_mm: float | None = None

    def __post_init__(self) -> None:
        if not self.label.strip():
            raise EncodingError("a finding needs a label")
        if not (math.isfinite(self.probability) and 0.0 <= self.probability <= 1.0):
            raise EncodingError(f"probability of {self.label!r} must be in [0, 1], got {self.probability}")
        if len(self.center_mm) != 3 or not all(math.isfinite(v) for v in self.center_mm):
            raise EncodingError(f"centre of {self.label!r} must be 3 finite coordinates")
        if self.size_mm is not None and not (math.isfinite(self.size_mm) and self.size_mm > 0):
            raise EncodingError(f"size of {self.label!r} must be positive, got {self.size_mm}")
        if self.box_mm is not None:
            low, high = (np.asarray(corner, dtype=np.float64) for corner in self.box_mm)
            if low.shape != (3,) or high.shape != (3,) or not np.all(np.isfinite([low, high])):
                raise EncodingError(f"box of {self.label!r} must be 2 corners of 3 finite coordinates")
            if not np.all(low < high):
                raise EncodingError(f"box of {self.label!r} must have min < max on every axis")
            if not np.all((low <= self.center_mm) & (np.asarray(self.center_mm) <= high)):
                raise EncodingError(f"centre of {self.label!r} lies outside its box")


@dataclass(frozen=True)
class FindingsRequest:
    """Input of :func:`build_findings_sr`: the series the model saw (headers suffice), its findings
    (possibly none) and the model. ``created`` sets content/series date and time (None: now)."""

    source: Sequence[Dataset]
    findings: Sequence[DetectionFinding]
    algorithm: Algorithm
    series_number: int = 905
    created: datetime.datetime | None = None


def ellipsoid_in_box(box: tuple[Point3D, Point3D]) -> NDArray[np.float64]:
    """The 6 SCOORD3D ELLIPSOID points of the ellipsoid inscribed in an axis-aligned box: the ends of
    its three axes. PS3.3 C.18.9.1.2 names the axes a, b, c in no order; longest first also reads right
    for a viewer that takes the first pair as the major axis (as ELLIPSE requires)."""
    low, high = (np.asarray(corner, dtype=np.float64) for corner in box)
    centre = (low + high) / 2.0
    points = []
    for axis in sorted(range(3), key=lambda a: -(high[a] - low[a])):  # stable: ties keep x, y, z order
        for end in (low[axis], high[axis]):
            point = centre.copy()
            point[axis] = end
            points.append(point)
    return np.array(points)


def _frame_of_reference(source: Sequence[Dataset]) -> str:
    uids = {str(ds.get("FrameOfReferenceUID", "")) for ds in source}
    if len(uids) != 1 or "" in uids:
        raise EncodingError("findings need a source series with one Frame of Reference UID")
    return uids.pop()


def _group(
    req: FindingsRequest,
    index: int,
    finding: DetectionFinding,
    frame_of_reference: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    if finding.box_mm is None:
        graphic_type = hd.sr.GraphicTypeValues3D.POINT
        graphic_data = np.array([finding.center_mm], dtype=np.float64)
    else:
        graphic_type = hd.sr.GraphicTypeValues3D.ELLIPSOID
        graphic_data = ellipsoid_in_box(finding.box_mm)
    surface = hd.sr.VolumeSurface(
        graphic_type=graphic_type,
        graphic_data=graphic_data,
        frame_of_reference_uid=frame_of_reference,
        source_series=hd.sr.SourceSeriesForSegmentation(str(req.source[0].SeriesInstanceUID)),
    )
    measurements = [
        hd.sr.Measurement(
            name=CERTAINTY, value=100.0 * finding.probability, unit=PERCENT, algorithm_id=algorithm_id
        )
    ]
    if finding.size_mm is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.Diameter,
                value=finding.size_mm,
                unit=codes.UCUM.Millimeter,
                derivation=codes.SCT.Maximum,
                algorithm_id=algorithm_id,
            )
        )
    uid = result_uid(req.source, req.algorithm, "findings", "finding", str(index), finding.label)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=finding.label),
        referenced_volume_surface=surface,
        finding_type=finding.type.to_code(),
        algorithm_id=algorithm_id,
        measurements=measurements,
    )


def _content(req: FindingsRequest) -> hd.sr.ContentSequence:
    """The TID 1500 root, assembled from highdicom's content items because ``hd.sr.MeasurementReport``
    insists on at least one measurement group, which a report of no findings has not."""
    algo = req.algorithm
    frame_of_reference = _frame_of_reference(req.source)
    algorithm_id = algorithm_identification(algo)
    root = report_root(req.source, algo)
    statement = not_verified_container()
    if req.findings:
        measurements = hd.sr.ContainerContentItem(
            name=codes.DCM.ImagingMeasurements, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        measurements.ContentSequence = hd.sr.ContentSequence()
        for index, finding in enumerate(req.findings, start=1):
            measurements.ContentSequence.extend(_group(req, index, finding, frame_of_reference, algorithm_id))
        root.ContentSequence.append(measurements)
    else:
        statement.ContentSequence.insert(
            0,
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=NO_FINDINGS_TEXT,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        )
    root.ContentSequence.append(statement)
    return hd.sr.ContentSequence([root], is_root=True)


def build_findings_sr(req: FindingsRequest) -> Dataset:
    """Encode the findings (possibly none) as a COMPLETE, UNVERIFIED Comprehensive 3D SR (TID 1500).

    UIDs derive from the study, series and model, so a re-run replaces the report at the PACS; tracking
    UIDs also from each finding's position and label. Raises :class:`EncodingError` on unusable input."""
    if not req.source:
        raise EncodingError("the findings SR needs the headers of the series the model saw")
    labels = [f.label for f in req.findings]
    if len(set(labels)) != len(labels):
        raise EncodingError("finding labels must be unique (they are the tracking identifiers)")
    algo = req.algorithm
    try:
        return hd.sr.Comprehensive3DSR(
            # highdicom copies patient and study from the first and raises on an absent type 2 attribute.
            evidence=[with_type2(req.source[0]), *req.source[1:]],
            content=_content(req),
            **report_attributes(
                req.source,
                algo,
                ("findings",),
                req.series_number,
                series_description("findings", algo),
                req.created,
            ),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodingError(f"findings SR could not be built: {exc}") from exc
