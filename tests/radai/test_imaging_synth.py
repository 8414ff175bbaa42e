"""mr_series_from_nifti: a valid axial MR series that reads back to the NIfTI's voxels and geometry."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from radai.errors import NotAVolumeError
from radai.imaging.synth import mr_series_from_nifti
from radai.imaging.volume import Volume, build_volume

nib: Any = nibabel  # partial annotations: untyped for mypy --strict
ROOT = Path(__file__).resolve().parents[2]
T1 = ROOT.parent / "shared" / "models" / "brainchop" / "t1_crop.nii.gz"

needs_t1 = pytest.mark.skipif(not T1.is_file(), reason="../shared brainchop data not present")


def _write_and_read(datasets: list[Dataset], folder: Path) -> list[Dataset]:
    for i, ds in enumerate(datasets):
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def _canonical(volume: Volume) -> Any:
    return nib.as_closest_canonical(nib.Nifti1Image(volume.array, volume.affine))


@pytest.fixture(scope="module")
def t1_series() -> list[Dataset]:
    return mr_series_from_nifti(T1)


@pytest.fixture(scope="module")
def t1_files(t1_series: list[Dataset], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("t1_series")
    _write_and_read(t1_series, folder)
    return folder


@needs_t1
def test_t1_series_reads_back_to_the_same_voxels_and_affine(t1_files: Path) -> None:
    volume = build_volume([pydicom.dcmread(p) for p in sorted(t1_files.glob("*.dcm"))])
    ours = _canonical(volume)
    ref = nib.as_closest_canonical(nib.load(T1))
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(ref.dataobj))  # uint8 kept as-is
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)


@needs_t1
def test_t1_series_is_an_axial_mr_stack_with_file_meta(t1_series: list[Dataset]) -> None:
    assert len(t1_series) == 256  # one axial slice per millimetre of the 256 mm S extent
    for ds in t1_series:
        assert ds.Modality == "MR"
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert [float(v) for v in ds.ImageOrientationPatient] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert ds.BodyPartExamined == "BRAIN"
        assert ds.PatientID == "RADAI-DEMO"
    z = [float(ds.ImagePositionPatient[2]) for ds in t1_series]
    assert np.allclose(np.diff(z), 1.0)
    assert len({ds.SOPInstanceUID for ds in t1_series}) == 256
    assert len({ds.SeriesInstanceUID for ds in t1_series}) == 1
    assert len({ds.FrameOfReferenceUID for ds in t1_series}) == 1


@needs_t1
def test_uids_are_deterministic_and_follow_the_given_study(t1_series: list[Dataset]) -> None:
    again = mr_series_from_nifti(T1)
    assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID for ds in t1_series]
    assert again[0].StudyInstanceUID == t1_series[0].StudyInstanceUID
    other = mr_series_from_nifti(T1, study_uid="1.2.826.0.1.3680043.8.498.1", patient_id="P2")
    assert {ds.StudyInstanceUID for ds in other} == {"1.2.826.0.1.3680043.8.498.1"}
    assert other[0].SeriesInstanceUID != t1_series[0].SeriesInstanceUID
    assert not {ds.SOPInstanceUID for ds in other} & {ds.SOPInstanceUID for ds in t1_series}
    assert other[0].PatientID == "P2"


@needs_t1
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools dciodvfy not installed")
def test_t1_instances_pass_dciodvfy_without_errors(t1_files: Path) -> None:
    for name in ("0000.dcm", "0128.dcm"):
        run = subprocess.run(
            ["dciodvfy", str(t1_files / name)], capture_output=True, text=True, timeout=60, check=False
        )
        report = run.stdout + run.stderr
        assert "MRImage" in report  # the IOD was recognised and checked
        assert [line for line in report.splitlines() if line.startswith("Error")] == []


def test_float_sagittal_nifti_becomes_an_axial_uint16_series(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    data = rng.normal(100.0, 30.0, size=(7, 9, 11)).astype(np.float32)
    affine = np.array(  # PIR: voxel axes point posterior, inferior, right
        [[0.0, 0.0, 1.3, -5.0], [-0.9, 0.0, 0.0, 20.0], [0.0, -1.1, 0.0, 30.0], [0.0, 0.0, 0.0, 1.0]]
    )
    path = tmp_path / "sag.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)

    series = mr_series_from_nifti(path, series_description="sagittal test")
    assert len(series) == 9  # one slice per inferior-superior position
    assert all(ds.pixel_array.dtype == np.uint16 for ds in series)
    volume = build_volume(_write_and_read(series, tmp_path))
    ours = _canonical(volume)
    ref = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)
    x = np.asarray(ref.dataobj, dtype=np.float64)
    expected = np.round((x - x.min()) / (x.max() - x.min()) * 65535.0)
    np.testing.assert_array_equal(np.asarray(ours.dataobj), expected)


def test_sheared_nifti_is_refused(tmp_path: Path) -> None:
    affine = np.eye(4)
    affine[0, 2] = 0.3  # slices drift in x: not a stack of parallel, aligned slices
    path = tmp_path / "sheared.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.uint8), affine), path)
    with pytest.raises(NotAVolumeError, match="sheared"):
        mr_series_from_nifti(path)
