"""GSPS encoder: segment outlines as a Grayscale Softcopy Presentation State on the source series.

An option for PACS that show presentation states but not SEG. One graphic layer per segment (in
its colour), per slice closed POLYLINE outlines in PIXEL units, an "AI OUTPUT - NOT VERIFIED"
text, and the display window. Pure: builds a dataset (via highdicom); another layer sends it.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.valuerep import DA, TM

from radai.errors import EncodingError
from radai.results.sc import AI_BANNER, check_overlay_input, chosen_slices, display_window
from radai.results.seg import (
    MANUFACTURER,
    Algorithm,
    SegmentSpec,
    creation_dates,
    result_uid,
    series_description,
    with_type2,
)

DEFAULT_MAX_POINTS = 256
_TOLERANCE_PX = 0.75  # Douglas-Peucker start: removes the staircase of diagonal pixel edges
_NOTICE_LAYER = "AI_NOTICE"
_NOTICE_BOX = (0.01, 0.01, 0.99, 0.05)  # DISPLAY units: a strip at the top of the viewport
_NOTICE_CIELAB = hd.color.CIELabColor.from_rgb(255, 220, 0)


@dataclass(frozen=True)
class GspsRequest:
    """Input of :func:`build_gsps`; ``source`` and ``labels`` as in :class:`radai.results.SegRequest`.

    ``max_points`` bounds the points of one outline (long outlines are simplified further).
    ``created`` sets content/series/presentation date and time (now if None).
    """

    source: Sequence[Dataset]
    labels: NDArray[np.uint8]
    segments: Sequence[SegmentSpec]
    algorithm: Algorithm
    series_number: int = 904
    max_points: int = DEFAULT_MAX_POINTS
    created: datetime.datetime | None = None


def outlines(mask: NDArray[np.bool_], max_points: int = DEFAULT_MAX_POINTS) -> list[NDArray[np.float64]]:
    """Closed outlines of a 2-D mask (rows, columns) along pixel edges, simplified.

    Each is an (N, 2) array of (column, row) in DICOM PIXEL units (pixel (r, c) covers
    [c, c + 1] x [r, r + 1]), first point repeated last. Outer borders run clockwise on screen,
    holes anticlockwise; diagonal neighbours are separate regions (4-connectivity).
    Hand-written crack following: scikit-image is not a dependency, and no installed library
    traces contours (highdicom, scipy and Pillow do not).
    """
    if max_points < 8:
        raise EncodingError("max_points must be at least 8")
    columns = mask.shape[1]
    padded = np.pad(mask.astype(bool), 1)
    inside = padded[1:-1, 1:-1]
    width = columns + 1  # vertex id = y * width + x, for corners x in 0..columns, y in 0..rows
    # Directed pixel edges with the inside on the right (y down): 0 east, 1 south, 2 west, 3 north.
    sides = (
        (~padded[:-2, 1:-1], (0, 0), (1, 0)),  # top edge, outside above: east
        (~padded[1:-1, 2:], (1, 0), (1, 1)),  # right edge, outside right: south
        (~padded[2:, 1:-1], (1, 1), (0, 1)),  # bottom edge, outside below: west
        (~padded[1:-1, :-2], (0, 1), (0, 0)),  # left edge, outside left: north
    )
    starts, ends, directions = [], [], []
    for direction, (outside, (sx, sy), (ex, ey)) in enumerate(sides):
        r, c = np.nonzero(inside & outside)
        starts.append((r + sy) * width + c + sx)
        ends.append((r + ey) * width + c + ex)
        directions.append(np.full(r.size, direction))
    start, end, heading = np.concatenate(starts), np.concatenate(ends), np.concatenate(directions)
    if start.size == 0:
        return []
    order = np.argsort(start, kind="stable")
    first = np.searchsorted(start[order], end)
    count = np.searchsorted(start[order], end, side="right") - first
    following = order[first]
    saddle = count == 2  # two regions touch at a corner: take the right turn
    if saddle.any():
        a, b = order[first[saddle]], order[first[saddle] + 1]
        following[saddle] = np.where(heading[a] == (heading[saddle] + 1) % 4, a, b)
    result = []
    seen = np.zeros(start.size, dtype=bool)
    nxt = following.tolist()
    for e0 in range(start.size):
        if seen[e0]:
            continue
        loop = []
        e = e0
        while not seen[e]:
            seen[e] = True
            loop.append(e)
            e = nxt[e]
        edges = np.asarray(loop)
        corners = start[edges[heading[edges] != heading[np.roll(edges, 1)]]]  # where the direction turns
        points = np.stack([corners % width, corners // width], axis=1).astype(np.float64)
        points = _bounded(points, max_points)
        result.append(np.vstack([points, points[:1]]))
    return result


def _bounded(points: NDArray[np.float64], max_points: int) -> NDArray[np.float64]:
    """Simplify a closed polygon (no repeated last point) until it has < ``max_points`` points."""
    tolerance = _TOLERANCE_PX
    simplified = _douglas_peucker(points, tolerance)
    while len(simplified) >= max_points:
        tolerance *= 2
        simplified = _douglas_peucker(points, tolerance)
    return simplified


def _douglas_peucker(points: NDArray[np.float64], tolerance: float) -> NDArray[np.float64]:
    """Douglas-Peucker on a closed polygon; keeps original vertices only."""
    n = len(points)
    if n <= 4:
        return points
    ring = np.vstack([points, points[:1]])  # index n is point 0 again
    far = int(np.argmax(np.hypot(*(points - points[0]).T)))
    keep = np.zeros(n + 1, dtype=bool)
    keep[[0, far, n]] = True
    stack = [(0, far), (far, n)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        a, b = ring[i], ring[j]
        inner = ring[i + 1 : j]
        chord = b - a
        length = float(np.hypot(*chord))
        if length == 0:
            distance = np.hypot(*(inner - a).T)
        else:
            distance = np.abs(chord[0] * (inner[:, 1] - a[1]) - chord[1] * (inner[:, 0] - a[0])) / length
        k = int(np.argmax(distance))
        if distance[k] > tolerance:
            keep[i + 1 + k] = True
            stack += [(i, i + 1 + k), (i + 1 + k, j)]
    return points[keep[:n]]


def _header(ds: Dataset) -> Dataset:
    """The source's header without pixel data, as :func:`with_type2` prepares it for highdicom (its GSPS
    reads the type 2 patient/study attributes unconditionally)."""
    header = Dataset()
    for element in with_type2(ds):
        if element.tag.group != 0x7FE0:
            header.add(element)
    return header


def _layer_name(spec: SegmentSpec) -> str:
    return f"AI_SEGMENT_{spec.value}"


def _annotations(
    req: GspsRequest,
    labels: NDArray[np.integer],
    present: Sequence[SegmentSpec],
    layers: dict[int, hd.pr.GraphicLayer],
) -> list[hd.pr.GraphicAnnotation]:
    result = []
    for k in chosen_slices(labels, "segmented"):
        plane = labels[:, :, k].T
        for spec in present:
            objects = [
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=outline,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    tracking_id=spec.name[:64],
                    tracking_uid=result_uid(req.source, req.algorithm, "seg", "segment", str(spec.value)),
                )
                for outline in outlines(plane == spec.value, req.max_points)
            ]
            if objects:
                result.append(
                    hd.pr.GraphicAnnotation(
                        referenced_images=[req.source[k]],
                        graphic_layer=layers[spec.value],
                        graphic_objects=objects,
                    )
                )
    return result


def build_gsps(req: GspsRequest) -> Dataset:
    """Encode the outlines of every present segment as one GSPS on the whole source series.

    Raises :class:`EncodingError` for an empty label map or inconsistent input.
    """
    labels = np.asarray(req.labels)
    present = check_overlay_input(req.source, labels, req.segments)
    algo = req.algorithm
    layers = {
        spec.value: hd.pr.GraphicLayer(
            layer_name=_layer_name(spec),
            order=order,
            description=spec.name[:64],
            display_color=hd.color.CIELabColor.from_rgb(*spec.color),
        )
        for order, spec in enumerate(present, start=1)
    }
    notice_layer = hd.pr.GraphicLayer(_NOTICE_LAYER, len(present) + 1, "AI notice", _NOTICE_CIELAB)
    notice = hd.pr.TextObject(
        text_value=f"{AI_BANNER} - {algo.name} {algo.version}"[:1024],
        units=hd.pr.AnnotationUnitsValues.DISPLAY,
        bounding_box=_NOTICE_BOX,
        text_justification=hd.pr.TextJustificationValues.LEFT,
    )
    window = display_window(req.source)
    headers = [_header(ds) for ds in req.source]
    try:
        annotations = _annotations(req, labels, present, layers)
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=headers, graphic_layer=notice_layer, text_objects=[notice]
            )
        )
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=headers,
            series_instance_uid=result_uid(req.source, algo, "gsps", "series"),
            series_number=req.series_number,
            sop_instance_uid=result_uid(req.source, algo, "gsps", "instance"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=algo.model_id[:64],
            software_versions=algo.version[:64],
            device_serial_number=f"{algo.model_id}@{algo.version}"[:64],
            content_label="AI_OUTLINES",
            content_description="AI segmentation outlines, not verified by a physician",
            graphic_annotations=annotations,
            graphic_layers=[*layers.values(), notice_layer],
            voi_lut_transformations=[
                hd.pr.SoftcopyVOILUTTransformation(
                    window_center=window.center,
                    window_width=window.width,
                    window_explanation="AI overlay display window",
                )
            ],
            series_description=series_description("GSPS", algo),
            # A presentation state has no content date: its creation date is set below.
            **{k: v for k, v in creation_dates(req.created).items() if k.startswith("series_")},
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodingError(f"GSPS could not be built: {exc}") from exc
    # dciodvfy requires Laterality (Type 2C) when there is no ImageLaterality: follow the source, else empty.
    gsps.Laterality = req.source[0].get("Laterality", "")
    if req.created is not None:
        gsps.PresentationCreationDate = DA(req.created.date())
        gsps.PresentationCreationTime = TM(req.created.time())
    return gsps
