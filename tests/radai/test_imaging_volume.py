"""build_volume on real series: a CT, lossless codecs, and the dicom2nifti / dcm_qa_ct failure cases."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from radai.errors import NotAVolumeError
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


def test_enhanced_multiframe_is_refused_as_not_supported_yet() -> None:
    for case in ("philips_enhanced", "siemens_multiframe"):
        reason = _reasons(_read(EDGE / case / "anatomical" / "001"))
        assert reason == "multi-frame images (NumberOfFrames=8) are not supported yet"


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
