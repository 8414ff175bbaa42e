"""SEG and SR for Enhanced multi-frame sources: real CT slices made one Legacy Converted Enhanced CT
(highdicom) run through the workflow with the bundled CT model, and the real Enhanced MR samples of
dicom2nifti (`edgecases/`), read back with highdicom and validated by dciodvfy."""

from __future__ import annotations

import copy
import io
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.sr.codedict import codes

from radai.config import bundled_models_dir
from radai.domain import Stage
from radai.errors import EncodingError
from radai.imaging.volume import build_volume
from radai.models.manifest import ModelCard
from radai.models.registry import open_package
from radai.pipeline import JobResult, run_pipeline
from radai.results import SegRequest, build_seg, dciodvfy_errors, segment_numbers
from radai.runtime import create_runner
from radai.scheduling.loop import Scheduler
from tests.radai.results_fixtures import ALGORITHM, CT_DIR, SHARED, SPECS, ct_source, reread, to_bytes

pytestmark = [
    pytest.mark.skipif(not CT_DIR.is_dir(), reason="../shared test data not present"),
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent"),
]
EDGE = SHARED / "data" / "dicom" / "edgecases"
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed")


@cache
def _enhanced_ct_bytes() -> bytes:
    """10 real CT slices (CRLM-CT-1004) as one Legacy Converted Enhanced CT; highdicom stores the frames
    in the reverse of the slice order along the normal, so frame numbers and slice indices differ."""
    slices = ct_source()
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        slices,
        series_instance_uid=str(slices[0].SeriesInstanceUID),
        series_number=1,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    return to_bytes(image)


def enhanced_ct() -> Dataset:
    return pydicom.dcmread(io.BytesIO(_enhanced_ct_bytes()))


def enhanced_mr(case: str, frame_of_reference: bool = True) -> Dataset:
    """A real Enhanced MR sample; both lack the (mandatory) frame of reference, added unless told."""
    (path,) = sorted((EDGE / case / "anatomical" / "001").iterdir())
    ds = pydicom.dcmread(path)
    if frame_of_reference:
        ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    return ds


def read_seg(seg: Dataset) -> Any:
    return hd.seg.segread(io.BytesIO(to_bytes(seg)))


def positions_by_frame(ds: Dataset) -> dict[int, list[float]]:
    return {
        number: [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        for number, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1)
    }


def masks_by_source_frame(seg: Any, source: Dataset, number: int) -> NDArray[np.bool_]:
    """(NumberOfFrames, rows, columns) mask of one segment over every frame of the source."""
    pixels = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=str(source.SOPInstanceUID),
        source_frame_numbers=list(range(1, int(source.NumberOfFrames) + 1)),
        segment_numbers=[number],
        assert_missing_frames_are_empty=True,
    )
    return np.asarray(pixels[..., 0] > 0)


def expected_masks(labels: NDArray[np.uint8], frame_numbers: tuple[int, ...], frames: int, value: int) -> Any:
    """The label map's (X, Y, Z) slice k placed at source frame frame_numbers[k], as (frames, rows, columns)."""
    out = np.zeros((frames, labels.shape[1], labels.shape[0]), dtype=bool)
    for k, number in enumerate(frame_numbers):
        out[number - 1] = value == labels[:, :, k].T
    return out


def assert_frames_sit_on_source_frames(seg: Any, source: Dataset) -> None:
    source_positions = positions_by_frame(source)
    for item in seg.PerFrameFunctionalGroupsSequence:
        (reference,) = item.DerivationImageSequence[0].SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(
            position, source_positions[int(reference.ReferencedFrameNumber)], atol=1e-3
        )


@dataclass(frozen=True)
class Run:
    source: Dataset
    result: JobResult
    stages: tuple[Stage, ...]
    card: ModelCard


@pytest.fixture(scope="module")
def ct_run() -> Iterator[Run]:
    """The Enhanced CT through run_pipeline with the bundled CT model on ONNX Runtime (CPU)."""
    zoo = bundled_models_dir()
    assert zoo is not None
    pkg = open_package(zoo / "ct_body_classical")
    runner = create_runner("onnx", pkg.weights, output_channels=pkg.card.output.channels, device="cpu")
    scheduler = Scheduler(pkg.card.id, runner, pkg.card.runtime.max_batch, 0.01)
    scheduler.start()
    stages: list[Stage] = []
    source = enhanced_ct()
    try:
        result = run_pipeline([source], pkg.card, scheduler, "job-mf", stages.append)
    finally:
        scheduler.stop()
        runner.close()
    yield Run(source, result, tuple(stages), pkg.card)


def test_enhanced_ct_runs_to_encoded_with_the_volume_naming_its_frames(ct_run: Run) -> None:
    assert ct_run.stages == (Stage.INFERRED, Stage.ENCODED)
    count = int(ct_run.source.NumberOfFrames)
    assert ct_run.result.volume.frame_numbers == tuple(range(count, 0, -1))  # not the identity
    assert [ds.Modality for ds in ct_run.result.datasets] == ["SEG", "SR"]


def test_enhanced_ct_seg_frames_sit_on_the_source_frames_they_reference(ct_run: Run) -> None:
    seg = read_seg(ct_run.result.datasets[0])
    assert seg.FrameOfReferenceUID == ct_run.source.FrameOfReferenceUID
    (series,) = seg.ReferencedSeriesSequence
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == [
        ct_run.source.SOPInstanceUID
    ]
    assert_frames_sit_on_source_frames(seg, ct_run.source)


def test_enhanced_ct_seg_masks_equal_the_label_map_in_each_source_frame(ct_run: Run) -> None:
    seg = read_seg(ct_run.result.datasets[0])
    labels, volume = ct_run.result.labels, ct_run.result.volume
    assert volume.frame_numbers is not None
    numbers = segment_numbers(seg)
    assert set(numbers) == {int(v) for v in np.unique(labels) if v != 0} and len(numbers) >= 2
    for value, number in numbers.items():
        expected = expected_masks(labels, volume.frame_numbers, int(ct_run.source.NumberOfFrames), value)
        np.testing.assert_array_equal(masks_by_source_frame(seg, ct_run.source, number), expected)


def test_enhanced_ct_sr_references_the_seg_and_the_multiframe_source(ct_run: Run) -> None:
    seg, sr = ct_run.result.datasets
    report = hd.sr.srread(io.BytesIO(to_bytes(sr)))
    assert isinstance(report.content, hd.sr.MeasurementReport)
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert sorted(referenced_numbers(g) for g in groups) == sorted(segment_numbers(seg).values())
    for group in groups:
        reference = group.referenced_segment
        assert reference is not None and reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        source_series = reference.source_series_for_segmentation
        assert source_series is not None and source_series.value == ct_run.source.SeriesInstanceUID
        assert len(group.get_measurements(name=codes.DCM.AttenuationCoefficient)) == 1  # a CT: mean HU
    # the image library lists the multi-frame source once (all its frames are in the volume)
    (library_root,) = [
        item
        for item in walk(report.ContentSequence)
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"
    ]
    library = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in walk(library_root.ContentSequence)
        if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeMeaning == "Source"
    ]
    assert library == [ct_run.source.SOPInstanceUID]
    # each finding is also outlined (bounding box) on one frame of the source, for viewers that draw it
    regions = [
        item
        for item in walk(report.ContentSequence)
        if item.ValueType == "SCOORD" and item.GraphicType == "POLYLINE"
    ]
    assert len(regions) == len(groups)
    for region in regions:
        (image,) = region.ContentSequence
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ct_run.source.SOPInstanceUID
        assert 1 <= int(image.ReferencedSOPSequence[0].ReferencedFrameNumber) <= ct_run.source.NumberOfFrames
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {seg.SOPInstanceUID, ct_run.source.SOPInstanceUID}


def referenced_numbers(group: Any) -> int:
    numbers = group.referenced_segment.referenced_segment_numbers
    assert numbers is not None and len(numbers) == 1
    return int(numbers[0])


def walk(items: Any) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


@needs_dciodvfy
def test_enhanced_ct_seg_and_sr_pass_dciodvfy_without_errors(ct_run: Run) -> None:
    seg, sr = ct_run.result.datasets
    assert dciodvfy_errors(seg) == []
    assert dciodvfy_errors(sr) == []


def _threshold(volume_array: NDArray[np.float32]) -> NDArray[np.uint8]:
    """Two labels from intensity percentiles (an MR has no fixed scale): 1 bright, 2 brightest."""
    labels = np.zeros(volume_array.shape, dtype=np.uint8)
    labels[volume_array > np.percentile(volume_array, 70)] = 1
    labels[volume_array > np.percentile(volume_array, 95)] = 2
    return labels


@pytest.mark.parametrize("case", ["philips_enhanced", "siemens_multiframe"])
def test_real_enhanced_mr_gives_a_seg_on_its_frames(case: str) -> None:
    # siemens_multiframe keeps orientation and pixel measures per frame only; highdicom reads them shared
    source = enhanced_mr(case)
    volume = build_volume([source])
    assert volume.frame_numbers is not None
    labels = _threshold(volume.array)
    seg_ds = build_seg(
        SegRequest(
            source=[source],
            labels=labels,
            segments=SPECS,
            algorithm=ALGORITHM,
            frame_numbers=volume.frame_numbers,
        )
    )
    seg = read_seg(seg_ds)
    # type 2 attributes the samples lack are present and empty in the SEG; the source is left unchanged
    assert seg.AccessionNumber == "" and seg.PatientSex == ""
    assert "AccessionNumber" not in source
    assert ("SharedFunctionalGroupsSequence" in source) == (case == "philips_enhanced")
    assert_frames_sit_on_source_frames(seg, source)
    for value, number in segment_numbers(seg).items():
        expected = expected_masks(labels, volume.frame_numbers, int(source.NumberOfFrames), value)
        np.testing.assert_array_equal(masks_by_source_frame(seg, source, number), expected)
    if shutil.which("dciodvfy") is not None:
        # the Philips sample's Patient's Age "0Y" is not a valid AS value; the SEG copies it unchanged
        copied = ("Patient's Age", "invalid data values for Value Representations")
        errors = dciodvfy_errors(seg_ds) or []
        assert [e for e in errors if not any(c in e for c in copied)] == []
        assert len(errors) == (2 if str(source.get("PatientAge", "")) == "0Y" else 0)


def test_shuffled_frame_numbers_put_each_slice_in_its_frame_and_keep_the_uids() -> None:
    source = enhanced_ct()
    volume = build_volume([source])
    assert volume.frame_numbers is not None
    count = int(source.NumberOfFrames)
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    for k in range(count):  # slice k: a bar at rows 10k..10k+4, label 1 or 3 by parity
        labels[100:400, 10 * k : 10 * k + 5, k] = SPECS[0].value if k % 2 else SPECS[2].value
    order = np.random.default_rng(7).permutation(count)
    shuffled = tuple(volume.frame_numbers[k] for k in order)
    requests = [
        SegRequest(
            source=[source],
            labels=labels,
            segments=SPECS,
            algorithm=ALGORITHM,
            frame_numbers=volume.frame_numbers,
        ),
        SegRequest(
            source=[source],
            labels=np.ascontiguousarray(labels[:, :, order]),
            segments=SPECS,
            algorithm=ALGORITHM,
            frame_numbers=shuffled,
        ),
    ]
    plain, permuted = (read_seg(build_seg(r)) for r in requests)
    for value, number in segment_numbers(plain).items():
        expected = expected_masks(labels, volume.frame_numbers, count, value)
        np.testing.assert_array_equal(masks_by_source_frame(plain, source, number), expected)
        np.testing.assert_array_equal(masks_by_source_frame(permuted, source, number), expected)
    assert plain.SOPInstanceUID == permuted.SOPInstanceUID
    assert plain.SeriesInstanceUID == permuted.SeriesInstanceUID


def test_frames_missing_from_the_volume_stay_empty() -> None:
    source = enhanced_ct()
    rows, columns = int(source.Rows), int(source.Columns)
    labels = np.ones((columns, rows, 3), dtype=np.uint8)
    seg = read_seg(
        build_seg(
            SegRequest(
                source=[source], labels=labels, segments=SPECS, algorithm=ALGORITHM, frame_numbers=(7, 2, 5)
            )
        )
    )
    referenced = sorted(
        int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for item in seg.PerFrameFunctionalGroupsSequence
    )
    assert referenced == [2, 5, 7]
    masks = masks_by_source_frame(seg, source, 1)
    assert [int(n) for n in np.nonzero(masks.any(axis=(1, 2)))[0] + 1] == [2, 5, 7]
    assert masks[[1, 4, 6]].all()


@pytest.mark.parametrize(
    ("frame_numbers", "message"),
    [
        ((1, 1, 2), "frame numbers must be distinct and within 1..10"),
        ((0, 1, 2), "frame numbers must be distinct and within 1..10"),
        ((9, 10, 11), "frame numbers must be distinct and within 1..10"),
    ],
)
def test_build_seg_rejects_frame_numbers_outside_the_source(
    frame_numbers: tuple[int, ...], message: str
) -> None:
    source = enhanced_ct()
    labels = np.ones((int(source.Columns), int(source.Rows), 3), dtype=np.uint8)
    request = SegRequest(
        source=[source], labels=labels, segments=SPECS, algorithm=ALGORITHM, frame_numbers=frame_numbers
    )
    with pytest.raises(EncodingError, match=message):
        build_seg(request)


def test_build_seg_rejects_a_label_map_with_more_slices_than_frame_numbers() -> None:
    source = enhanced_ct()
    labels = np.ones((int(source.Columns), int(source.Rows), 4), dtype=np.uint8)
    request = SegRequest(
        source=[source], labels=labels, segments=SPECS, algorithm=ALGORITHM, frame_numbers=(1, 2, 3)
    )
    with pytest.raises(EncodingError, match=r"does not match source \(X, Y, Z\) \(512, 512, 3\)"):
        build_seg(request)


def test_build_seg_rejects_a_multiframe_source_without_frame_numbers() -> None:
    source = enhanced_ct()
    labels = np.ones((int(source.Columns), int(source.Rows), 1), dtype=np.uint8)
    with pytest.raises(EncodingError, match="needs the frame number of each slice"):
        build_seg(SegRequest(source=[source], labels=labels, segments=SPECS, algorithm=ALGORITHM))


def _two_instances(ds: Dataset) -> list[Dataset]:
    """The frames of ``ds`` split over two instances of its series (native pixel data)."""
    frame_bytes = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
    parts = []
    for numbers in ([1, 3, 5, 7], [2, 4, 6, 8]):
        part = copy.deepcopy(ds)
        part.PixelData = b"".join(ds.PixelData[(n - 1) * frame_bytes : n * frame_bytes] for n in numbers)
        part.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[n - 1] for n in numbers]
        part.NumberOfFrames = len(numbers)
        part.SOPInstanceUID = pydicom.uid.generate_uid()
        parts.append(part)
    return parts


class _NeverCalled:
    """A PatchInferer for runs that must be refused before inference."""

    def infer(
        self, job_id: str, patches: NDArray[np.float32], priority: object = None
    ) -> NDArray[np.float32]:
        raise AssertionError("inference ran for a source that cannot be encoded")


@pytest.mark.parametrize(
    ("datasets", "message"),
    [
        (
            lambda: [enhanced_mr("philips_enhanced", frame_of_reference=False)],
            "source images have no FrameOfReferenceUID; a SEG of several planes needs one",
        ),
        (
            lambda: _two_instances(enhanced_mr("philips_enhanced")),
            "SEG of multi-frame images needs exactly one Enhanced multi-frame source, got 2 instances",
        ),
    ],
    ids=["no-frame-of-reference", "two-multiframe-instances"],
)
def test_multiframe_source_that_cannot_be_encoded_is_refused_before_inference(
    datasets: Any, message: str
) -> None:
    card = open_package(_zoo() / "ct_body_classical").card
    stages: list[Stage] = []
    with pytest.raises(EncodingError, match=message):
        run_pipeline(datasets(), card, _NeverCalled(), "job-refused", stages.append)
    assert stages == []


def _zoo() -> Any:
    zoo = bundled_models_dir()
    assert zoo is not None
    return zoo


def test_reread_enhanced_ct_is_a_valid_volume_source() -> None:
    # guards the premise of the tests above: the converted image keeps its frame of reference
    source = reread(enhanced_ct())
    assert source.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.2"
    assert source.FrameOfReferenceUID == ct_source()[0].FrameOfReferenceUID
