"""Where an image-pixel box lands on screen in OHIF, and how much of a screenshot region is overlay-coloured.

The box is projected with cornerstone3D's own geometry of the displayed CT image (`window.cornerstone`,
which OHIF exposes): image pixel -> patient coordinates (from the CT's position, orientation and spacing)
-> canvas. The SEG takes no part in that projection, so a misplaced overlay shows as colour outside it.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from playwright.sync_api import Page

_PROJECT_JS = """
(corners) => {
  const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
  const imageId = vp.getCurrentImageId();
  const rect = vp.canvas.getBoundingClientRect();
  const points = corners.map((p) => {
    const c = vp.worldToCanvas(window.cornerstone.utilities.imageToWorldCoords(imageId, p));
    return [c[0] + rect.left, c[1] + rect.top];
  });
  return {points, canvas: [rect.left, rect.top, rect.right, rect.bottom], imageId};
}
"""
# True once the first viewport shows an image.
IMAGE_SHOWN_JS = """
() => {
  const engines = window.cornerstone?.getRenderingEngines?.() ?? [];
  const vp = engines[0]?.getViewports?.()[0];
  return Boolean(vp && vp.getCurrentImageId && vp.getCurrentImageId());
}
"""


@dataclass(frozen=True)
class Rect:
    """A screen rectangle in CSS pixels, [left, right) x [top, bottom)."""

    left: float
    top: float
    right: float
    bottom: float

    def grown(self, by: float) -> Rect:
        """Larger by `by` on every side (smaller for a negative `by`)."""
        return Rect(self.left - by, self.top - by, self.right + by, self.bottom + by)

    def mask(self, shape: tuple[int, int]) -> NDArray[np.bool_]:
        """The pixels of a (height, width) screenshot inside the rectangle."""
        rows, cols = np.ogrid[: shape[0], : shape[1]]
        inside: NDArray[np.bool_] = (
            (cols >= self.left) & (cols < self.right) & (rows >= self.top) & (rows < self.bottom)
        )
        return inside


# Shows the next image of the first viewport's stack (wrapping round), as a mouse-wheel step would.
NEXT_IMAGE_JS = """
() => {
  const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
  const next = (vp.getCurrentImageIdIndex() + 1) % vp.getImageIds().length;
  return vp.setImageIdIndex(next).then(() => vp.getCurrentImageId());
}
"""
# The colour (RGBA) the first viewport gives segment 1 of its first segmentation.
SEGMENT_COLOUR_JS = """
() => {
  const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
  const seg = window.cornerstoneTools.segmentation.state.getSegmentations()[0];
  return window.cornerstoneTools.segmentation.config.color.getSegmentIndexColor(vp.id, seg.segmentationId, 1);
}
"""
_INSTANCE = re.compile(r"/instances/([0-9.]+)/")


@dataclass(frozen=True)
class Projection:
    """The box and the viewport canvas on screen, and the image shown (its SOPInstanceUID)."""

    box: Rect
    canvas: Rect
    sop_instance_uid: str


def shown_instance(page: Page) -> str:
    """SOPInstanceUID of the image in the first viewport (from its WADO-RS image id)."""
    return _instance(str(page.evaluate(_PROJECT_JS, [])["imageId"]))


def _instance(image_id: str) -> str:
    match = _INSTANCE.search(image_id)
    if match is None:
        raise ValueError(f"not a WADO-RS image id: {image_id}")
    return match.group(1)


def project_box(page: Page, columns: tuple[int, int], rows: tuple[int, int]) -> Projection:
    """Screen rectangle of the image-pixel box [columns) x [rows) on the image now in the first viewport.

    Pixel centres are at integer image coordinates, so the box's edges are half a pixel outside them.
    """
    corners = [[columns[0] - 0.5, rows[0] - 0.5], [columns[1] - 0.5, rows[1] - 0.5]]
    found = page.evaluate(_PROJECT_JS, corners)
    (x0, y0), (x1, y1) = found["points"]
    box = Rect(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    return Projection(box, Rect(*found["canvas"]), _instance(str(found["imageId"])))


def coloured(png: bytes, rgb: tuple[int, int, int], margin: int = 40) -> NDArray[np.bool_]:
    """Pixels whose dominant channels are those of the saturated colour `rgb` (e.g. pure green over grey).

    A grey CT pixel has equal channels; blended with the segment colour, the colour's strong channels
    rise above its weak ones by at least `margin`.
    """
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    strong = [c for c in range(3) if rgb[c] >= 128]
    weak = [c for c in range(3) if rgb[c] < 128]
    if not strong or not weak:
        raise ValueError(f"{rgb} is not a saturated colour")
    low = image[..., strong].min(axis=-1)
    high = image[..., weak].max(axis=-1)
    result: NDArray[np.bool_] = low - high >= margin
    return result


def bright(png: bytes, level: int = 60) -> NDArray[np.bool_]:
    """Pixels brighter than `level` in every channel (drawn anatomy, not the black background)."""
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    result: NDArray[np.bool_] = image.min(axis=-1) > level
    return result


def fraction(selected: NDArray[np.bool_], region: NDArray[np.bool_]) -> float:
    """Share of the `region` pixels that are `selected`."""
    total = int(region.sum())
    if total == 0:
        raise ValueError("empty region")
    return int((selected & region).sum()) / total
