"""One job's computation, between 'queued' and 'encoded': volume -> model space -> batched sliding-window
inference -> source grid -> the result objects the destinations want (SEG variants and their SRs, Secondary
Capture, GSPS), each tagged with its output key (radai.outputs). Pure apart from the inferer it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset

from radai.domain import Stage
from radai.errors import InferenceError
from radai.imaging.resample import prepare, to_source_grid
from radai.imaging.volume import Volume, build_volume
from radai.models.manifest import ModelCard
from radai.outputs import Needed, Output, needed, seg_key, sr_key
from radai.ports import PatchInferer
from radai.results.gsps import GspsRequest, build_gsps
from radai.results.sc import ScRequest, iter_sc
from radai.results.seg import Algorithm, CodedConcept, SegmentSpec, SegRequest, build_seg, check_source
from radai.results.sr import KeyRegion, SegmentMeasurement, SrRequest, build_sr, measure_volumes
from radai.scheduling.inferer import sliding_window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    job_id: str
    outputs: tuple[Output, ...]
    labels: NDArray[np.uint8]
    volume: Volume
    source: tuple[Dataset, ...]

    @property
    def datasets(self) -> tuple[Dataset, ...]:
        """The result objects, in output order."""
        return tuple(o.dataset for o in self.outputs)


def algorithm_of(card: ModelCard) -> Algorithm:
    return Algorithm(model_id=card.id, version=card.version, name=card.name)


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


def infer_labels(volume: Volume, card: ModelCard, inferer: PatchInferer, job_id: str) -> NDArray[np.uint8]:
    """Model space, batched sliding window, back to the source grid, argmax: labels shaped like the volume."""
    prepared = prepare(volume, card.input)
    scores = sliding_window(
        prepared.image, card.input, lambda p: inferer.infer(job_id, p), sw_batch_size=card.runtime.max_batch
    )
    if scores.shape[0] != card.output.channels:
        raise InferenceError(f"model returned {scores.shape[0]} channels, card says {card.output.channels}")
    back = to_source_grid(scores, prepared)
    labels: NDArray[np.uint8] = np.argmax(back, axis=0).astype(np.uint8)
    return labels


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
) -> list[Output]:
    """The result objects ``wanted`` asks for (default: the BINARY SEG and its TID 1500 SR).

    ``source``: the single-frame images of the volume's slices in order, or its one multi-frame image. SC and
    GSPS are per-slice images and are made for single-frame sources only (logged when skipped)."""
    wanted = wanted if wanted is not None else needed([])
    algorithm, specs = algorithm_of(card), segments_of(card)
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


def run_pipeline(
    datasets: Sequence[Dataset],
    card: ModelCard,
    inferer: PatchInferer,
    job_id: str,
    mark: Callable[[Stage], None] = lambda _s: None,
    wanted: Needed | None = None,
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
    labels = infer_labels(volume, card, inferer, job_id)
    mark(Stage.INFERRED)
    outputs = encode_results(source, volume, labels, card, wanted)
    mark(Stage.ENCODED)
    return JobResult(
        job_id=job_id, outputs=tuple(outputs), labels=labels, volume=volume, source=tuple(source)
    )
