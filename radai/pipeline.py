"""One job's computation, between 'queued' and 'encoded': volume -> model space -> batched sliding-window
inference -> source grid -> the result objects the destinations want (SEG variants and their SRs, Secondary
Capture, GSPS), each tagged with its output key (radai.outputs). Pure apart from the inferer it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from pydicom import Dataset

from radai.detection import decode_centers
from radai.domain import Stage
from radai.errors import InferenceError
from radai.imaging.resample import Prepared, prepare, scores_to_source_grid, to_source_grid
from radai.imaging.volume import Volume, build_volume
from radai.models.manifest import CentersPost, ModelCard
from radai.outputs import Needed, Output, needed, seg_key, sr_key
from radai.ports import DeviceInferer, PatchInferer
from radai.postprocess import restrict, tensor_labels, to_labels
from radai.results.findings import DetectionFinding, FindingsRequest, build_findings_sr
from radai.results.gsps import GspsRequest, build_gsps
from radai.results.sc import ScRequest, iter_sc
from radai.results.seg import Algorithm, CodedConcept, SegmentSpec, SegRequest, build_seg, check_source
from radai.results.sr import KeyRegion, SegmentMeasurement, SrRequest, build_sr, measure_volumes
from radai.scheduling.inferer import sliding_window, sliding_window_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    job_id: str
    outputs: tuple[Output, ...]
    labels: NDArray[np.uint8]  # segmentation label map on the source grid (all zero for a detector)
    volume: Volume
    source: tuple[Dataset, ...]
    findings: tuple[DetectionFinding, ...] = ()  # a detector's findings (patient LPS mm)

    @property
    def datasets(self) -> tuple[Dataset, ...]:
        """The result objects, in output order."""
        return tuple(o.dataset for o in self.outputs)


def algorithm_of(card: ModelCard, inputs: Sequence[str] = ()) -> Algorithm:
    return Algorithm(model_id=card.id, version=card.version, name=card.name, inputs=tuple(inputs))


def segments_of(card: ModelCard) -> list[SegmentSpec]:
    """The card's labels as SEG segment specs (codes and colours from the model card)."""
    return [
        SegmentSpec(
            value=lab.value,
            name=lab.name,
            category=CodedConcept(lab.category.scheme, lab.category.value, lab.category.meaning),
            type=CodedConcept(lab.type.scheme, lab.type.value, lab.type.meaning),
            color=lab.color,
        )
        for lab in card.labels
    ]


# A STAT job hands the scheduler many windows per call (up to this much host memory for their patches and
# scores), so they queue together and fill the next batches instead of each call waiting behind a batch.
STAT_WINDOW_BYTES = 1 << 30


def window_batch(card: ModelCard, urgent: bool) -> int:
    """Windows per call to the scheduler: the card's batch, or for an urgent job as many as fit in
    STAT_WINDOW_BYTES (at most 64)."""
    if not urgent:
        return card.runtime.max_batch
    patch = card.input.patch_size
    voxels = 256**3 if patch == "whole" else int(np.prod(patch))
    per_window = voxels * (card.input.channels + card.output.channels) * 4
    return max(card.runtime.max_batch, min(64, STAT_WINDOW_BYTES // per_window))


def _device(inferer: PatchInferer) -> str | None:
    return inferer.job_device() if isinstance(inferer, DeviceInferer) else None


def _model_scores(
    volume: Volume, card: ModelCard, inferer: PatchInferer, job_id: str, urgent: bool = False
) -> tuple[torch.Tensor, Prepared]:
    """Model-space scores (K, X', Y', Z'): on the inferer's device when it has one (the volume is resampled,
    windowed and blended there), else on the host through numpy."""
    device = _device(inferer)
    sw_batch = window_batch(card, urgent)
    if isinstance(inferer, DeviceInferer) and device is not None:
        prepared = prepare(volume, card.input, device)
        scores = sliding_window_tensor(
            prepared.data, card.input, lambda p: inferer.infer_tensor(job_id, p), sw_batch_size=sw_batch
        )
    else:
        prepared = prepare(volume, card.input)
        host = sliding_window(
            prepared.image, card.input, lambda p: inferer.infer(job_id, p), sw_batch_size=sw_batch
        )
        scores = torch.from_numpy(host)
    if scores.shape[0] != card.output.channels:
        raise InferenceError(f"model returned {scores.shape[0]} channels, card says {card.output.channels}")
    return scores, prepared


def infer_labels(
    volume: Volume,
    card: ModelCard,
    inferer: PatchInferer,
    job_id: str,
    mask: NDArray[np.bool_] | None = None,
    urgent: bool = False,
) -> NDArray[np.uint8]:
    """Model space, batched sliding window, back to the source grid, the card's postprocessing (argmax or
    thresholds, connected components), restricted to ``mask``: labels shaped like the volume."""
    scores, prepared = _model_scores(volume, card, inferer, job_id, urgent)
    if scores.device.type == "cpu":
        labels = to_labels(to_source_grid(scores.numpy(), prepared), card.output)
    else:  # resampled and reduced to labels on the device: only the 8-bit map comes back
        labels = tensor_labels(scores_to_source_grid(scores, prepared), card.output)
    return labels if mask is None else restrict(labels, mask)


def _to_lps(affine: NDArray[np.float64], ijk: NDArray[np.float64]) -> NDArray[np.float64]:
    """(n, 3) voxel coordinates -> (n, 3) patient LPS mm, through a voxel -> RAS affine."""
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    lps: NDArray[np.float64] = ras * np.array([-1.0, -1.0, 1.0])
    return lps


def infer_findings(
    volume: Volume,
    card: ModelCard,
    inferer: PatchInferer,
    job_id: str,
    mask: NDArray[np.bool_] | None = None,
    urgent: bool = False,
) -> list[DetectionFinding]:
    """A detector's findings in patient coordinates: dense maps in model space, decoded there (peaks, boxes,
    NMS), each box's corners mapped to LPS. With ``mask``, findings whose centre falls outside are dropped."""
    post = card.output.postprocess
    if not isinstance(post, CentersPost):
        raise InferenceError(f"{card.key}: not a detection model")
    scores_t, prepared = _model_scores(volume, card, inferer, job_id, urgent)
    scores = np.ascontiguousarray(scores_t.cpu().numpy(), dtype=np.float32)
    spacing = tuple(float(v) for v in np.linalg.norm(prepared.affine[:3, :3], axis=0))
    detections = decode_centers(scores, post, (spacing[0], spacing[1], spacing[2]))
    by_value = {lab.value: lab for lab in card.labels}
    inverse = np.linalg.inv(prepared.source_affine)
    findings: list[DetectionFinding] = []
    for det in detections:
        center = np.asarray(det.center, dtype=np.float64)
        half = np.asarray(det.size, dtype=np.float64) / 2.0
        corners = (
            np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * half + center
        )
        lps_corners = _to_lps(prepared.affine, corners)
        center_lps = _to_lps(prepared.affine, center[None])[0]
        if mask is not None:
            ras = center_lps * np.array([-1.0, -1.0, 1.0])
            ijk = np.rint(inverse[:3, :3] @ ras + inverse[:3, 3]).astype(int)
            inside = all(0 <= ijk[a] < mask.shape[a] for a in range(3))
            if not inside or not mask[tuple(ijk)]:
                continue
        label = by_value[det.value]
        low, high = lps_corners.min(axis=0), lps_corners.max(axis=0)
        findings.append(
            DetectionFinding(
                label=label.name,
                type=CodedConcept(label.type.scheme, label.type.value, label.type.meaning),
                center_mm=(float(center_lps[0]), float(center_lps[1]), float(center_lps[2])),
                box_mm=(
                    (float(low[0]), float(low[1]), float(low[2])),
                    (float(high[0]), float(high[1]), float(high[2])),
                ),
                probability=min(max(det.score, 0.0), 1.0),
                size_mm=float(max(np.asarray(det.size) * np.asarray(spacing))),
            )
        )
    return findings


def key_region(
    labels: NDArray[np.uint8], value: int, source: Sequence[Dataset], frame_numbers: Sequence[int] | None
) -> KeyRegion | None:
    """The bounding box of label ``value`` on the slice where it covers most pixels (None if absent)."""
    mask = labels == value  # (X, Y, Z): X is the column, Y the row
    areas = mask.sum(axis=(0, 1))
    k = int(np.argmax(areas))
    if areas[k] == 0:
        return None
    columns = np.nonzero(mask[:, :, k].any(axis=1))[0]
    rows = np.nonzero(mask[:, :, k].any(axis=0))[0]
    box = (float(columns[0]), float(rows[0]), float(columns[-1] + 1), float(rows[-1] + 1))
    if frame_numbers is None:
        return KeyRegion(image=source[k], box=box)
    return KeyRegion(image=source[0], box=box, frame_number=int(frame_numbers[k]))


def _measurements(
    volume: Volume,
    labels: NDArray[np.uint8],
    card: ModelCard,
    specs: Sequence[SegmentSpec],
    source: Sequence[Dataset],
) -> list[SegmentMeasurement]:
    """Volume (and mean HU for CT) of every segment, numbered as build_seg numbers them (label order), with
    its key region (bounding box on its largest slice)."""
    volumes = measure_volumes(labels, volume.voxel_volume_ml)
    by_value = {s.value: s for s in specs}
    present = [v for v in sorted(volumes) if v in by_value and volumes[v] > 0]
    return [
        SegmentMeasurement(
            segment_number=number,
            name=by_value[value].name,
            type=by_value[value].type,
            volume_ml=volumes[value],
            mean_value=float(volume.array[labels == value].mean()) if card.modality == "CT" else None,
            key_region=key_region(labels, value, source, volume.frame_numbers),
        )
        for number, value in enumerate(present, start=1)
    ]


def encode_results(
    source: Sequence[Dataset],
    volume: Volume,
    labels: NDArray[np.uint8],
    card: ModelCard,
    wanted: Needed | None = None,
    inputs: Sequence[str] = (),
) -> list[Output]:
    """The result objects ``wanted`` asks for (default: the BINARY SEG and its TID 1500 SR).

    ``source``: the single-frame images of the volume's slices in order, or its one multi-frame image. SC and
    GSPS are per-slice images and are made for single-frame sources only (logged when skipped)."""
    wanted = wanted if wanted is not None else needed([])
    algorithm, specs = algorithm_of(card, inputs), segments_of(card)
    outputs: list[Output] = []
    measurements = _measurements(volume, labels, card, specs, source) if wanted.sr_variants else []
    for variant in wanted.seg_variants:
        seg = build_seg(
            SegRequest(
                source=source,
                labels=labels,
                segments=specs,
                algorithm=algorithm,
                frame_numbers=volume.frame_numbers,
                labelmap=variant.labelmap,
                keep_empty=variant.keep_empty,
                uid_parts=variant.uid_parts,
            )
        )
        outputs.append(Output(seg_key(variant), seg))
        if variant in wanted.sr_variants:
            request = SrRequest(
                seg=seg,
                source=source,
                measurements=measurements,
                algorithm=algorithm,
                uid_parts=variant.uid_parts,
            )
            outputs.append(Output(sr_key(variant), build_sr(request)))
    if (wanted.sc or wanted.gsps) and volume.frame_numbers is not None:
        log.warning("SC and GSPS are made for single-frame series only: skipped for a multi-frame source")
    elif wanted.sc or wanted.gsps:
        outputs.extend(_legacy(source, labels, specs, algorithm, wanted))
    return outputs


def _legacy(
    source: Sequence[Dataset],
    labels: NDArray[np.uint8],
    specs: Sequence[SegmentSpec],
    algorithm: Algorithm,
    wanted: Needed,
) -> Iterator[Output]:
    if wanted.sc:
        for image in iter_sc(ScRequest(source=source, labels=labels, segments=specs, algorithm=algorithm)):
            yield Output("sc", image)
    if wanted.gsps:
        yield Output(
            "gsps", build_gsps(GspsRequest(source=source, labels=labels, segments=specs, algorithm=algorithm))
        )


@dataclass(frozen=True)
class Upstream:
    """Another model's output a job is restricted to (multi-model pipelines): its mask on the same source
    grid and how the results name it."""

    mask: NDArray[np.bool_]
    description: str  # e.g. "restricted to lung-mask@1.0.0 labels 2"


def run_pipeline(
    datasets: Sequence[Dataset],
    card: ModelCard,
    inferer: PatchInferer,
    job_id: str,
    mark: Callable[[Stage], None] = lambda _s: None,
    wanted: Needed | None = None,
    upstream: Upstream | None = None,
    urgent: bool = False,
) -> JobResult:
    """Everything between 'queued' and 'encoded' for one job, on datasets already read."""
    volume = build_volume(datasets)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    # One source per slice, or each multi-frame instance once (SEG takes one; several are refused below).
    uids = (
        volume.sop_instance_uids if volume.frame_numbers is None else dict.fromkeys(volume.sop_instance_uids)
    )
    source = [by_uid[uid] for uid in uids]
    # Checked before inference so no GPU time is spent on a result that cannot be encoded.
    check_source(source, volume.frame_numbers)
    mask = None if upstream is None else upstream.mask
    inputs = () if upstream is None else (upstream.description,)
    if card.task == "detection":
        findings = infer_findings(volume, card, inferer, job_id, mask, urgent)
        mark(Stage.INFERRED)
        wanted = wanted if wanted is not None else needed([])
        outputs: list[Output] = []
        if wanted.sr_variants:
            report = build_findings_sr(
                FindingsRequest(source=source, findings=findings, algorithm=algorithm_of(card, inputs))
            )
            # One findings SR, offered under each SR key a destination may want (SEG variants do not apply).
            outputs.extend(Output(sr_key(v), report) for v in wanted.sr_variants)
        mark(Stage.ENCODED)
        empty = np.zeros(volume.array.shape, dtype=np.uint8)
        return JobResult(job_id, tuple(outputs), empty, volume, tuple(source), tuple(findings))
    labels = infer_labels(volume, card, inferer, job_id, mask, urgent)
    mark(Stage.INFERRED)
    outputs = encode_results(source, volume, labels, card, wanted, inputs)
    mark(Stage.ENCODED)
    return JobResult(
        job_id=job_id, outputs=tuple(outputs), labels=labels, volume=volume, source=tuple(source)
    )
