"""A real CT series with a SEG and a TID 1500 SR made by radai's own encoders, as a viewer test shows them.

The mask is a box on every slice, off-centre so that a flipped or transposed overlay lands visibly
elsewhere, and on the image's left on even slices but its right on odd ones, so that an overlay drawn on
the wrong slice lands elsewhere too. Its volume is what the SR reports.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom import Dataset

from radai.imaging.volume import build_volume
from radai.pipeline import key_region
from radai.results import (
    Algorithm,
    CodedConcept,
    SegmentMeasurement,
    SegmentSpec,
    SegRequest,
    SrRequest,
    build_seg,
    build_sr,
    measure_volumes,
)

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
CT_SERIES = SHARED / "data" / "dicom" / "ct_abdomen_crlm" / "CRLM-CT-1004" / "image"

ALGORITHM = Algorithm(model_id="viewer-test", version="1.0.0", name="Viewer test box")
# A saturated green that no grey CT pixel has: the overlay is found by its colour.
BOX = SegmentSpec(
    value=1,
    name="Liver",
    category=CodedConcept("SCT", "123037004", "Anatomical Structure"),
    type=CodedConcept("SCT", "10200004", "Liver"),
    color=(0, 255, 0),
)
# The box, in pixel (column, row) bounds of the 512x512 source images: [start, stop); odd slices shift it.
BOX_COLUMNS = (110, 230)
BOX_ROWS = (150, 250)
ODD_SLICE_SHIFT = 180


@dataclass(frozen=True)
class ViewerStudy:
    """The CT series, the SEG and SR made for it, and where the box lies."""

    ct: tuple[Dataset, ...]  # in slice order
    seg: Dataset
    sr: Dataset
    volume_ml: float

    @property
    def study_uid(self) -> str:
        return str(self.ct[0].StudyInstanceUID)

    def box_on(self, sop_instance_uid: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """The box's (columns, rows) bounds on the CT image `sop_instance_uid`."""
        uids = [str(ds.SOPInstanceUID) for ds in self.ct]
        if sop_instance_uid not in uids:
            raise KeyError(f"image {sop_instance_uid} is not in the CT series")
        return box_on_slice(uids.index(sop_instance_uid))


def box_on_slice(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The box's (columns, rows) bounds on slice `k`."""
    shift = ODD_SLICE_SHIFT * (k % 2)
    return (BOX_COLUMNS[0] + shift, BOX_COLUMNS[1] + shift), BOX_ROWS


def _box_labels(shape: tuple[int, int, int]) -> NDArray[np.uint8]:
    labels = np.zeros(shape, dtype=np.uint8)  # (X=columns, Y=rows, Z=slices), as the encoders take it
    for k in range(shape[2]):
        (c0, c1), (r0, r1) = box_on_slice(k)
        labels[c0:c1, r0:r1, k] = BOX.value
    return labels


def build_study(series: Path = CT_SERIES) -> ViewerStudy:
    """Read the CT series and encode the box as SEG and SR, as radai's workflow does."""
    datasets = [pydicom.dcmread(f) for f in sorted(series.glob("*.dcm"))]
    volume = build_volume(datasets)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    source = [by_uid[uid] for uid in volume.sop_instance_uids]
    labels = _box_labels(volume.array.shape)
    seg = build_seg(SegRequest(source=source, labels=labels, segments=[BOX], algorithm=ALGORITHM))
    volume_ml = measure_volumes(labels, volume.voxel_volume_ml)[BOX.value]
    measurement = SegmentMeasurement(
        segment_number=1,
        name=BOX.name,
        type=BOX.type,
        volume_ml=volume_ml,
        mean_value=float(volume.array[labels == BOX.value].mean()),
        key_region=key_region(labels, BOX.value, source, None),
    )
    sr = build_sr(SrRequest(seg=seg, source=source, measurements=[measurement], algorithm=ALGORITHM))
    return ViewerStudy(tuple(source), seg, sr, volume_ml)


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def upload(orthanc_url: str, datasets: Sequence[Dataset]) -> None:
    """Store the datasets in Orthanc through its REST API (`POST /instances`)."""
    with httpx.Client(base_url=orthanc_url, timeout=30) as client:
        for ds in datasets:
            response = client.post(
                "/instances", content=_encode(ds), headers={"Content-Type": "application/dicom"}
            )
            response.raise_for_status()
