"""Where a SEG mask of the displayed image lands on screen in OHIF, and which screenshot pixels are overlay.

The mask is projected with cornerstone3D's own geometry of the displayed image (`window.cornerstone`):
three image points (pixel centres are at integer column/row coordinates) go through
`imageToWorldCoords` and `worldToCanvas`, which fixes the affine map from image pixels to screen pixels.
The overlay is found as what changes on screen when the segmentation's visibility is switched on, with
the camera untouched, and whose change is a blend of the grey image towards one of the segment colours.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from playwright.sync_api import Page
from scipy import ndimage

from tests.viewer.overlay import Rect

_GEOMETRY_JS = """
() => {
  const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
  const imageId = vp.getCurrentImageId();
  const rect = vp.canvas.getBoundingClientRect();
  const points = [[0, 0], [1, 0], [0, 1]].map((p) => {
    const c = vp.worldToCanvas(window.cornerstone.utilities.imageToWorldCoords(imageId, p));
    return [c[0] + rect.left, c[1] + rect.top];
  });
  return {points, canvas: [rect.left, rect.top, rect.right, rect.bottom], imageId};
}
"""
# Shows the image of the first viewport's stack whose WADO-RS id names the instance; resolves to its index.
SHOW_INSTANCE_JS = """
(uid) => {
  const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
  const index = vp.getImageIds().findIndex((id) => id.includes(`/instances/${uid}/`));
  if (index < 0) return Promise.resolve(-1);
  return vp.setImageIdIndex(index).then(() => index);
}
"""
# Shows or hides every segmentation of the first viewport, then renders it.
SEGMENTATIONS_VISIBLE_JS = """
(visible) => {
  const tools = window.cornerstoneTools;
  const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
  const segmentations = tools.segmentation.state.getSegmentations();
  for (const seg of segmentations) {
    tools.segmentation.config.visibility.setSegmentationRepresentationVisibility(
      vp.id, {segmentationId: seg.segmentationId}, visible);
  }
  vp.render();
  return segmentations.length;
}
"""
# Segment number -> RGBA colour the first viewport gives it, for the first segmentation.
SEGMENT_COLOURS_JS = """
() => {
  const tools = window.cornerstoneTools;
  const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
  const seg = tools.segmentation.state.getSegmentations()[0];
  const out = {};
  for (const index of Object.keys(seg.segments)) {
    out[index] = tools.segmentation.config.color.getSegmentIndexColor(vp.id, seg.segmentationId, Number(index));
  }
  return out;
}
"""


@dataclass(frozen=True)
class ScreenGeometry:
    """The affine map of the displayed image's pixel (column, row) to screen (x, y), and the canvas."""

    origin: tuple[float, float]  # screen position of the centre of pixel (0, 0)
    column_step: tuple[float, float]  # screen displacement of one column
    row_step: tuple[float, float]  # screen displacement of one row
    canvas: Rect
    image_id: str

    def project(self, mask: NDArray[np.bool_], shape: tuple[int, int]) -> NDArray[np.bool_]:
        """The (height, width) screenshot pixels whose centre falls on a true pixel of `mask` (rows, columns)."""
        height, width = shape
        ys, xs = np.mgrid[:height, :width].astype(np.float64)
        # Screenshot pixel (y, x) covers the CSS square [x, x+1) x [y, y+1): its centre is at +0.5.
        dx, dy = xs + 0.5 - self.origin[0], ys + 0.5 - self.origin[1]
        basis = np.array([self.column_step, self.row_step], dtype=np.float64).T  # columns: the two steps
        inverse = np.linalg.inv(basis)
        column = np.rint(inverse[0, 0] * dx + inverse[0, 1] * dy).astype(np.int64)
        row = np.rint(inverse[1, 0] * dx + inverse[1, 1] * dy).astype(np.int64)
        inside = (column >= 0) & (column < mask.shape[1]) & (row >= 0) & (row < mask.shape[0])
        inside &= self.canvas.mask(shape)
        projected = np.zeros(shape, dtype=bool)
        projected[inside] = mask[row[inside], column[inside]]
        return projected

    @property
    def scale(self) -> float:
        """Screen pixels per image column."""
        return float(np.hypot(*self.column_step))


def screen_geometry(page: Page) -> ScreenGeometry:
    """The geometry of the image now shown in the first viewport."""
    found = page.evaluate(_GEOMETRY_JS)
    (x0, y0), (x1, y1), (x2, y2) = found["points"]
    return ScreenGeometry(
        origin=(x0, y0),
        column_step=(x1 - x0, y1 - y0),
        row_step=(x2 - x0, y2 - y0),
        canvas=Rect(*found["canvas"]),
        image_id=str(found["imageId"]),
    )


def rgb(png: bytes) -> NDArray[np.float64]:
    """A screenshot as (height, width, 3) floats."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def overlay_colours(
    without: NDArray[np.float64],
    with_overlay: NDArray[np.float64],
    colours: Sequence[tuple[int, int, int]],
    *,
    min_change: float = 12.0,
    tolerance: float = 10.0,
) -> NDArray[np.int64]:
    """Per pixel, the index in `colours` of the colour the overlay blended it towards, or -1 (no overlay).

    A labelmap is drawn as `(1 - a) * image + a * colour`: the change of an overlay pixel is, up to
    rounding (`tolerance`, per channel), a multiple 0 < a <= 1 of (colour - image pixel). A pixel counts
    when some channel changed by at least `min_change`; the colour that explains it best is taken.
    """
    change = with_overlay - without
    changed = np.abs(change).max(axis=-1) >= min_change
    best = np.full(changed.shape, np.inf)
    found = np.full(changed.shape, -1, dtype=np.int64)
    for index, colour in enumerate(colours):
        direction = np.asarray(colour, dtype=np.float64) - without
        norm2 = np.maximum((direction**2).sum(axis=-1), 1e-9)
        alpha = (change * direction).sum(axis=-1) / norm2
        residual = np.abs(change - alpha[..., None] * direction).max(axis=-1)
        fits = changed & (alpha > 0) & (alpha <= 1.05) & (residual <= tolerance) & (residual < best)
        found[fits] = index
        best[fits] = residual[fits]
    return found


# Gives the first viewport a window of twice the displayed image's value range, starting at its minimum:
# no pixel is drawn brighter than mid-grey, so that an overlay of any colour (white included) shows as a
# change. Resolves to the range set.
DIM_WINDOW_JS = """
() => {
  const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
  const image = vp.csImage;
  const lower = image.minPixelValue;
  const upper = lower + 2 * Math.max(image.maxPixelValue - lower, 1);
  vp.setProperties({voiRange: {lower, upper}});
  vp.render();
  return [lower, upper];
}
"""


@dataclass(frozen=True)
class GroupFit:
    """How one colour group's overlay matches its segments' projected mask."""

    segments: tuple[str, ...]
    on_mask: float  # share of the pixels coloured towards the group that lie on its (grown) mask
    coloured: float  # share of its mask pixels where the overlay can show that are coloured
    visible_px: int  # how many mask pixels those are


@dataclass(frozen=True)
class OverlayFit:
    """How the overlay on screen matches the projected masks."""

    changed_px: int  # pixels that the overlay changed
    on_mask: float  # share of them on the (grown) union of the masks
    groups: tuple[GroupFit, ...]  # the groups present on the image


def colour_groups(colours: dict[str, tuple[int, int, int]], apart: int) -> list[tuple[str, ...]]:
    """Segment names grouped by colour: colours closer than `apart` (max channel) cannot be told apart."""
    groups: list[list[str]] = []
    for name, colour in colours.items():
        near = [
            g for g in groups if max(abs(a - b) for a, b in zip(colours[g[0]], colour, strict=True)) < apart
        ]
        if near:
            near[0].append(name)
        else:
            groups.append([name])
    return [tuple(g) for g in groups]


def fit_overlay(
    masks: dict[str, NDArray[np.bool_]],
    colours: dict[str, tuple[int, int, int]],
    geometry: ScreenGeometry,
    without: NDArray[np.float64],
    with_overlay: NDArray[np.float64],
    *,
    grow_px: int,
    same_colour: int,
    visible_change: int,
    min_change: float = 12.0,
) -> OverlayFit:
    """Match the overlay (what changed between the two screenshots) against the masks (rows, columns) of
    the displayed image, projected to screen; a mask pixel can show the overlay where its segment's colour
    differs from the image by at least `visible_change` (in some channel)."""
    shape = (without.shape[0], without.shape[1])
    names = list(masks)
    labels = overlay_colours(without, with_overlay, [colours[n] for n in names], min_change=min_change)
    changed = np.abs(with_overlay - without).max(axis=-1) >= min_change
    union = ndimage.binary_dilation(
        geometry.project(np.logical_or.reduce(list(masks.values())), shape), iterations=grow_px
    )
    fits = []
    for group in colour_groups({n: colours[n] for n in names}, same_colour):
        mask = geometry.project(np.logical_or.reduce([masks[n] for n in group]), shape)
        if mask.sum() < 100:
            continue  # (almost) absent on this image
        drawn = np.isin(labels, [names.index(n) for n in group])
        grown = ndimage.binary_dilation(mask, iterations=grow_px)
        distance = np.stack(
            [np.abs(np.asarray(colours[n], dtype=np.float64) - without).max(axis=-1) for n in group]
        ).min(axis=0)
        visible = mask & (distance >= visible_change)
        fits.append(
            GroupFit(
                group, _share(drawn & grown, drawn), _share(drawn & visible, visible), int(visible.sum())
            )
        )
    return OverlayFit(int(changed.sum()), _share(changed & union, changed), tuple(fits))


def _share(part: NDArray[np.bool_], whole: NDArray[np.bool_]) -> float:
    return int(part.sum()) / max(int(whole.sum()), 1)
