"""build_volume on real series: a CT, lossless codecs, and the dicom2nifti / dcm_qa_ct failure cases."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from radai.errors import NotAVolumeError
from radai.imaging.multiframe import with_shared_geometry
from radai.imaging.volume import Volume, build_volume

nib: Any = nibabel  # partial annotations: untyped for mypy --strict
ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
DICOM = SHARED / "data" / "dicom"
CRLM_1004 = DICOM / "ct_abdomen_crlm" / "CRLM-CT-1004" / "image"
EDGE = DICOM / "edgecases"
GE_TILT = DICOM / "ct_head_tilt_and_phantom" / "GE_headCT_tilt"

pytestmark = pytest.mark.skipif(not DICOM.is_dir(), reason="../shared test data not present")


def _read(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".gz"]


@pytest.fixture(scope="module")
def ct_datasets() -> list[Dataset]:
    return _read(CRLM_1004)


@pytest.fixture(scope="module")
def ct(ct_datasets: list[Dataset]) -> Volume:
    return build_volume(ct_datasets)


def _reasons(datasets: list[Dataset]) -> str:
    with pytest.raises(NotAVolumeError) as info:
        build_volume(datasets)
    return str(info.value)


def test_ct_volume_has_columns_rows_slices_and_dicom_spacing(ct: Volume, ct_datasets: list[Dataset]) -> None:
    assert ct.array.shape == (512, 512, 41)
    assert ct.array.dtype == np.float32
    row_spacing, col_spacing = (float(v) for v in ct_datasets[0].PixelSpacing)
    assert ct.spacing == pytest.approx((col_spacing, row_spacing, 5.0))
    assert ct.voxel_volume_ml == pytest.approx(col_spacing * row_spacing * 5.0 / 1000.0)
    assert len(ct.sop_instance_uids) == 41


def test_ct_values_are_hounsfield_units_after_rescale(ct: Volume) -> None:
    # stored values are >= 0 with intercept -1024: air only reads about -1000 if the rescale was applied
    air = np.count_nonzero((ct.array > -1050) & (ct.array < -950))
    assert air > 0.1 * ct.array.size
    assert ct.array.min() >= -3024
    assert ct.array.max() < 3100
    soft_tissue = np.count_nonzero((ct.array > 0) & (ct.array < 100))
    assert soft_tissue > 0.05 * ct.array.size


def test_ct_affine_maps_each_slice_origin_to_its_image_position(
    ct: Volume, ct_datasets: list[Dataset]
) -> None:
    by_uid = {str(ds.SOPInstanceUID): ds for ds in ct_datasets}
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    for k, uid in enumerate(ct.sop_instance_uids):
        ras = (ct.affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        expected = np.array([float(v) for v in by_uid[uid].ImagePositionPatient]) * lps_to_ras
        np.testing.assert_allclose(ras, expected, atol=1e-4)


def test_ct_slice_pixels_come_from_the_instance_named_for_that_slice(
    ct: Volume, ct_datasets: list[Dataset]
) -> None:
    by_uid = {str(ds.SOPInstanceUID): ds for ds in ct_datasets}
    for k in (0, 17, 40):
        ds = by_uid[ct.sop_instance_uids[k]]
        expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(ct.array[:, :, k], expected.T)


def test_slice_order_does_not_depend_on_input_order(ct: Volume, ct_datasets: list[Dataset]) -> None:
    shuffled = list(ct_datasets)
    random.Random(7).shuffle(shuffled)
    again = build_volume(shuffled)
    assert again.sop_instance_uids == ct.sop_instance_uids
    np.testing.assert_array_equal(again.array, ct.array)
    np.testing.assert_allclose(again.affine, ct.affine)


def test_rescale_is_applied_per_slice(ct_datasets: list[Dataset]) -> None:
    subset = [copy.deepcopy(ds) for ds in ct_datasets[:5]]
    base = build_volume(subset)
    target = subset[2].SOPInstanceUID
    subset[2].RescaleIntercept = -1000
    shifted = build_volume(subset)
    k = shifted.sop_instance_uids.index(target)
    np.testing.assert_array_equal(shifted.array[:, :, k], base.array[:, :, k] + 24)
    others = [i for i in range(5) if i != k]
    np.testing.assert_array_equal(shifted.array[:, :, others], base.array[:, :, others])


def test_j2k_ct_without_uids_builds_on_the_totalsegmentator_reference_grid() -> None:
    folder = DICOM / "ct_abdomen_j2k_nouids"
    vol = build_volume(_read(folder / "dicom"))
    assert vol.array.shape == (512, 512, 20)
    assert vol.sop_instance_uids == ("",) * 20  # anonymised without UIDs: the volume still builds
    assert -1100 < float(np.median(vol.array[:, :, 10][:40, :40])) < -900  # corner: air / outside the FOV
    ours = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
    ref = nib.as_closest_canonical(nib.load(folder / "reference_seg_nifti" / "example_seg_dicom.nii.gz"))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("gantrytilting/001", "gantry tilt or sheared stack: slices step 14.0 degrees off the slice normal"),
        ("notavolume/001", "duplicate slice positions: 4 instances at 1 distinct positions"),
        ("slicecount/001", "too few slices: 2 (a volume needs at least 3)"),
        (
            "sliceincrement/001",
            "non-uniform slice spacing (gaps or irregular): steps from 5.000 to 10.000 mm",
        ),
        ("sliceincrement/002", "non-uniform slice spacing (gaps or irregular): steps from 0.750 to 1.499 mm"),
        ("sliceorientation/001", "mixed orientations: 2 distinct ImageOrientationPatient values"),
    ],
)
def test_dicom2nifti_failing_cases_are_refused_with_a_reason(case: str, reason: str) -> None:
    assert _reasons(_read(EDGE / "failing" / case)).startswith(reason)


def test_ge_head_ct_with_variable_tilt_and_spacing_is_refused_for_its_gaps() -> None:
    assert _reasons(_read(GE_TILT)).startswith(
        "non-uniform slice spacing (gaps or irregular): steps from 1.081"
    )


def test_ge_head_ct_uniform_part_is_refused_for_its_tilt() -> None:
    uniform = [ds for ds in _read(GE_TILT) if float(ds.SliceThickness) == 7.0]  # 14 slices, 7.38 mm apart
    assert len(uniform) == 14
    assert _reasons(uniform) == "gantry tilt or sheared stack: slices step 18.5 degrees off the slice normal"


MULTIFRAME = ("philips_enhanced", "siemens_multiframe")


def _enhanced(case: str) -> Dataset:
    (ds,) = _read(EDGE / case / "anatomical" / "001")
    return ds


@pytest.mark.parametrize("case", MULTIFRAME)
def test_enhanced_multiframe_matches_highdicom_voxel_for_voxel(case: str) -> None:
    # no dicom2nifti ground truth ships for these two; highdicom's own multi-frame volume is the reference
    ds = _enhanced(case)
    vol = build_volume([ds])
    assert vol.array.shape == (256, 256, 8)
    assert vol.sop_instance_uids == (str(ds.SOPInstanceUID),) * 8
    assert vol.frame_numbers == (1, 2, 3, 4, 5, 6, 7, 8)
    ref_ds = copy.deepcopy(ds)
    ref_ds.FrameOfReferenceUID = pydicom.uid.generate_uid()  # highdicom needs one; neither file has it
    ref: Any = hd.Image.from_dataset(ref_ds).get_volume(apply_real_world_transform=False)
    grid = np.stack([*np.meshgrid(np.arange(256), np.arange(256), np.arange(8), indexing="ij")])
    ijk1 = np.vstack([grid.reshape(3, -1), np.ones((1, grid[0].size))])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine @ ijk1
    index = np.linalg.inv(ref.affine) @ lps  # highdicom: (slice, row, column) -> LPS
    np.testing.assert_allclose(index, np.round(index), atol=1e-3)
    k, r, c = np.round(index[:3]).astype(int)
    np.testing.assert_allclose(vol.array.ravel(), ref.array[k, r, c], rtol=1e-6, atol=1e-4)


def test_enhanced_frames_carry_their_own_position_and_rescale() -> None:
    ds = _enhanced("philips_enhanced")
    vol = build_volume([ds])
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    raw = ds.pixel_array
    for k, number in enumerate(vol.frame_numbers or ()):
        item = ds.PerFrameFunctionalGroupsSequence[number - 1]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        ras = (vol.affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        np.testing.assert_allclose(ras, np.array(position) * lps_to_ras, atol=1e-4)
        slope = float(item.PixelValueTransformationSequence[0].RescaleSlope)  # 4.2588..., per frame
        expected = (raw[number - 1] * slope).astype(np.float32)
        np.testing.assert_allclose(vol.array[:, :, k], expected.T, rtol=1e-6)
    changed = copy.deepcopy(ds)
    changed.PerFrameFunctionalGroupsSequence[2].PixelValueTransformationSequence[0].RescaleIntercept = 100
    shifted = build_volume([changed])
    k = (vol.frame_numbers or ()).index(3)
    np.testing.assert_allclose(shifted.array[:, :, k], vol.array[:, :, k] + 100, rtol=1e-6)
    others = [i for i in range(8) if i != k]
    np.testing.assert_array_equal(shifted.array[:, :, others], vol.array[:, :, others])


def test_shared_orientation_and_pixel_measures_give_the_same_volume() -> None:
    ds = _enhanced("siemens_multiframe")  # every group per frame: move the constant ones to shared
    moved = copy.deepcopy(ds)
    shared = Dataset()
    for keyword in ("PlaneOrientationSequence", "PixelMeasuresSequence", "PixelValueTransformationSequence"):
        setattr(shared, keyword, copy.deepcopy(moved.PerFrameFunctionalGroupsSequence[0][keyword].value))
        for item in moved.PerFrameFunctionalGroupsSequence:
            delattr(item, keyword)
    moved.SharedFunctionalGroupsSequence = [shared]
    a, b = build_volume([ds]), build_volume([moved])
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)


def _split(ds: Dataset, numbers: list[int]) -> Dataset:
    """A new instance of the same series holding the given frames (native pixel data)."""
    part = copy.deepcopy(ds)
    frame_bytes = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
    part.PixelData = b"".join(ds.PixelData[(n - 1) * frame_bytes : n * frame_bytes] for n in numbers)
    part.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[n - 1] for n in numbers]
    part.NumberOfFrames = len(numbers)
    part.SOPInstanceUID = pydicom.uid.generate_uid()
    return part


def test_a_series_of_several_multiframe_instances_names_instance_and_frame_per_slice() -> None:
    ds = _enhanced("philips_enhanced")
    whole = build_volume([ds])
    a, b = _split(ds, [1, 3, 5, 7]), _split(ds, [8, 6, 4, 2])
    parts = build_volume([b, a])
    np.testing.assert_array_equal(parts.array, whole.array)
    np.testing.assert_allclose(parts.affine, whole.affine)
    assert parts.sop_instance_uids == tuple(str(x.SOPInstanceUID) for x in (a, b, a, b, a, b, a, b))
    assert parts.frame_numbers == (1, 4, 2, 3, 3, 2, 4, 1)


def test_single_frame_volumes_have_no_frame_numbers(mr_slices: list[Dataset]) -> None:
    assert build_volume(mr_slices).frame_numbers is None


@pytest.mark.parametrize(
    ("keyword", "values", "what"),
    [
        ("StackID", ["1", "2"], "2 stacks (StackID 1, 2)"),
        ("TemporalPositionIndex", [1, 2], "2 temporal positions (TemporalPositionIndex 1, 2)"),
    ],
)
def test_multiframe_with_two_stacks_is_refused_naming_the_key(
    keyword: str, values: list[Any], what: str
) -> None:
    ds = copy.deepcopy(_enhanced("philips_enhanced"))
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        setattr(item.FrameContentSequence[0], keyword, values[i % 2])
    assert _reasons([ds]) == (
        f"multi-frame data holds {what}; one volume needs a single stack, send each as its own series"
    )


def test_multiframe_with_two_echoes_is_refused() -> None:
    ds = copy.deepcopy(_enhanced("siemens_multiframe"))
    ds.PerFrameFunctionalGroupsSequence[5].MREchoSequence[0].EffectiveEchoTime = 5.0
    assert _reasons([ds]).startswith("multi-frame data holds 2 echoes (EffectiveEchoTime 2.46, 5.0)")


def test_multiframe_with_mixed_frame_orientations_is_refused() -> None:
    ds = copy.deepcopy(_enhanced("philips_enhanced"))
    ds.PerFrameFunctionalGroupsSequence[4].PlaneOrientationSequence[0].ImageOrientationPatient = [
        1,
        0,
        0,
        0,
        1,
        0,
    ]
    assert _reasons([ds]) == "mixed orientations: 2 distinct ImageOrientationPatient values"


def test_multiframe_frame_without_position_is_refused_naming_the_frame() -> None:
    ds = copy.deepcopy(_enhanced("philips_enhanced"))
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    assert _reasons([ds]) == "frame 3: no PlanePositionSequence (neither per-frame nor shared)"


def test_multiframe_without_functional_groups_is_refused() -> None:
    ds = copy.deepcopy(_enhanced("siemens_multiframe"))
    del ds.PerFrameFunctionalGroupsSequence
    assert _reasons([ds]) == (
        "multi-frame image without per-frame functional groups (NumberOfFrames=8): no per-frame geometry"
    )


def test_multiframe_with_pixel_data_shorter_than_its_frames_is_refused() -> None:
    ds = copy.deepcopy(_enhanced("philips_enhanced"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    assert _reasons([ds]).startswith("pixel data could not be decoded")


@pytest.fixture(scope="module")
def mr_slices() -> list[Dataset]:
    return _read(EDGE / "generic" / "compressed" / "001")


def test_missing_geometry_tag_is_named(mr_slices: list[Dataset]) -> None:
    broken = [copy.deepcopy(ds) for ds in mr_slices]
    del broken[1].ImagePositionPatient
    assert _reasons(broken) == "missing geometry tag ImagePositionPatient in 1 of 4 instances"


def test_mixed_matrix_sizes_are_refused(ct_datasets: list[Dataset], mr_slices: list[Dataset]) -> None:
    mixed = [copy.deepcopy(ds) for ds in mr_slices[:3]]
    mixed[0].Rows = 512
    assert _reasons(mixed) == "mixed rows/columns: 256x256, 512x256"


def test_mixed_pixel_spacing_is_refused(mr_slices: list[Dataset]) -> None:
    mixed = [copy.deepcopy(ds) for ds in mr_slices]
    mixed[3].PixelSpacing = [0.5, 0.5]
    assert _reasons(mixed) == "mixed pixel spacing: 0.5x0.5, 1x1 mm"


def test_instances_of_two_series_are_refused(mr_slices: list[Dataset]) -> None:
    mixed = [copy.deepcopy(ds) for ds in mr_slices]
    mixed[0].SeriesInstanceUID = pydicom.uid.generate_uid()
    assert _reasons(mixed) == "mixed series: instances belong to 2 different series"


def test_small_rounding_of_positions_is_tolerated_but_a_tenth_of_a_step_is_not(
    mr_slices: list[Dataset],
) -> None:
    jittered = [copy.deepcopy(ds) for ds in mr_slices]
    x = float(jittered[2].ImagePositionPatient[0])
    jittered[2].ImagePositionPatient[0] = x + 0.004  # slices are 1 mm apart along x (sagittal)
    assert build_volume(jittered).array.shape == (256, 256, 4)
    jittered[2].ImagePositionPatient[0] = x + 0.1
    assert _reasons(jittered).startswith("non-uniform slice spacing")


@pytest.mark.parametrize(
    "variant", ["compressed", "compressed_j2k", "compressed_jpeg", "compressed_jpegls", "compressed_rle"]
)
def test_lossless_codecs_decode_to_the_dicom2nifti_reference(variant: str) -> None:
    # all five transfer syntaxes are lossless (JPEG 2000 lossless, JPEG SV1, JPEG-LS lossless, RLE)
    folder = EDGE / "generic" / variant
    datasets = _read(folder / "001")
    assert str(datasets[0].file_meta.TransferSyntaxUID) in {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.5",
    }
    vol = build_volume(datasets)
    ours = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
    ref = nib.as_closest_canonical(nib.load(folder / "001_ground_truth.nii.gz"))
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(ref.dataobj))
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)


def test_uncompressed_anatomical_series_builds_with_the_same_geometry(mr_slices: list[Dataset]) -> None:
    # a different acquisition of the same geometry (pixels differ), stored Explicit VR Little Endian
    plain = build_volume(_read(EDGE / "generic" / "anatomical" / "001"))
    compressed = build_volume(mr_slices)
    assert plain.array.shape == (256, 256, 4)
    assert 0 <= plain.array.min() < plain.array.max() <= 4095
    np.testing.assert_allclose(plain.affine, compressed.affine)


@pytest.mark.parametrize("case", MULTIFRAME)
def test_a_multiframe_volume_can_source_a_highdicom_seg_that_references_its_frames(case: str) -> None:
    # what results/seg.py needs for a multi-frame source: labels reordered by frame number, and the shared
    # geometry highdicom 0.28 reads; the samples lack a frame of reference and type 2 patient attributes
    ds = copy.deepcopy(_enhanced(case))
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber"):
        setattr(ds, keyword, ds.get(keyword, ""))
    vol = build_volume([ds])
    labels = (vol.array > np.percentile(vol.array, 80)).astype(np.uint8)  # (X, Y, Z)
    frames = np.zeros((8, 256, 256), dtype=np.uint8)
    frames[np.array(vol.frame_numbers) - 1] = labels.transpose(2, 1, 0)
    source = with_shared_geometry(ds)
    assert ("SharedFunctionalGroupsSequence" in ds) == (case == "philips_enhanced")  # ds itself unchanged
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="bright",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="test", family=codes.DCM.ArtificialIntelligence, version="1"
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=901,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
        manufacturer="radai",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    assert int(seg.NumberOfFrames) == 8
    for item in seg.PerFrameFunctionalGroupsSequence:
        (ref,) = item.DerivationImageSequence[0].SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        number = int(ref.ReferencedFrameNumber)
        source_item = ds.PerFrameFunctionalGroupsSequence[number - 1]
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in source_item.PlanePositionSequence[0].ImagePositionPatient],
            atol=1e-3,
        )
    decoded = seg.pixel_array
    assert decoded.shape == (8, 256, 256)
    k_of = {number: k for k, number in enumerate(vol.frame_numbers or ())}
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        np.testing.assert_array_equal(decoded[f], labels[:, :, k_of[number]].T)
