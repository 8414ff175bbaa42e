"""The classical CT body/lung/bone ONNX model on real CT (TCIA Colorectal-Liver-Metastases, CC BY 4.0).

CRLM-CT-1004 (41 slices) and CRLM-CT-1006 (51 slices) are contrast-enhanced 5 mm GE scans from the lung
bases down through the abdomen, read with pydicom from `../shared/data/dicom/ct_abdomen_crlm/`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
import torch
from monai.inferers.utils import sliding_window_inference
from numpy.typing import NDArray
from pydicom.sr.codedict import codes
from scipy import ndimage

from model_zoo.ct_classical import build_model, main
from model_zoo.ct_reference import BACKGROUND, BODY, BONE, LUNG, reference_labels
from radai.models.manifest import ModelCard, RangeNorm, check_package_files, load_card

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
CRLM = SHARED / "data" / "dicom" / "ct_abdomen_crlm"
PACKAGE = ROOT / "model_zoo" / "ct_body_classical"
VOXEL_L = 2.5 * 2.5 * 5.0 / 1e6  # litres per voxel at the card spacing

pytestmark = pytest.mark.skipif(not CRLM.is_dir(), reason="shared CT test data not present")


@dataclass(frozen=True)
class Case:
    hu: NDArray[np.float32]  # (X, Y, Z) at the card spacing
    scores: NDArray[np.float32]  # ONNX output for the whole volume, (4, X, Y, Z)
    labels: NDArray[np.int64]  # its argmax
    extent_mm: float  # scanned length along the patient axis


def _card() -> ModelCard:
    return load_card(PACKAGE)


def _session() -> ort.InferenceSession:
    return ort.InferenceSession(str(PACKAGE / "model.onnx"), providers=["CPUExecutionProvider"])


def _normalise(hu: NDArray[np.float32], card: ModelCard) -> NDArray[np.float32]:
    norm = card.input.intensity
    if not isinstance(norm, RangeNorm):
        raise TypeError("the CT card must use a range normalisation")
    scaled = (hu - np.float32(norm.a_min)) / np.float32(norm.a_max - norm.a_min)
    out: NDArray[np.float32] = np.clip(scaled, 0.0, 1.0).astype(np.float32)
    return out


def _load(patient: str) -> Case:
    card = _card()
    slices = [pydicom.dcmread(p) for p in sorted((CRLM / patient / "image").glob("*.dcm"))]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    zs = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
    hu = hu.transpose(2, 1, 0).astype(np.float32)  # (Z, rows, cols) -> (X=cols, Y=rows, Z)
    dz = float(np.median(np.diff(zs)))
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    sx, sy, sz = card.input.spacing
    hu = ndimage.zoom(hu, (col_mm / sx, row_mm / sy, dz / sz), order=1)
    scores = _session().run(None, {"input": _normalise(hu, card)[None, None]})[0][0]
    return Case(hu=hu, scores=scores, labels=scores.argmax(0), extent_mm=len(slices) * dz)


@pytest.fixture(scope="module", params=["CRLM-CT-1004", "CRLM-CT-1006"])
def case(request: pytest.FixtureRequest) -> Case:
    return _load(str(request.param))


def test_onnx_labels_agree_with_scipy_reference_on_real_ct(case: Case) -> None:
    expected = reference_labels(_normalise(case.hu, _card()))
    assert (case.labels == expected).mean() >= 0.99
    for label in (BODY, LUNG, BONE):
        assert (case.labels == label).sum() > 0.9 * (expected == label).sum()


def test_scores_are_one_hot(case: Case) -> None:
    assert set(np.unique(case.scores).tolist()) <= {0.0, 1.0}
    assert np.array_equal(case.scores.sum(0), np.ones(case.labels.shape, np.float32))


def test_body_volume_is_plausible_for_the_scanned_extent(case: Case) -> None:
    # An adult trunk cross-section is about 250-1500 cm2 (waist circumference 60-150 cm): over the
    # scanned length (20.5 cm and 25.5 cm here) that bounds the body at roughly 5-40 litres.
    body_l = (case.labels != BACKGROUND).sum() * VOXEL_L
    extent_cm = case.extent_mm / 10.0
    assert extent_cm * 250 / 1000 <= body_l <= extent_cm * 1500 / 1000
    assert 5.0 <= body_l <= 40.0


def test_bone_is_dense_and_lung_is_aerated(case: Case) -> None:
    bone, lung = case.labels == BONE, case.labels == LUNG
    assert bone.sum() * VOXEL_L > 0.1
    assert lung.sum() * VOXEL_L > 0.5  # both scans include the lung bases
    assert case.hu[bone].mean() > 300
    assert case.hu[lung].mean() < -500


def test_lung_lies_in_the_upper_part_of_an_abdominal_scan(case: Case) -> None:
    lung_z = np.nonzero(case.labels == LUNG)[2]
    lower_third = case.labels.shape[2] // 3  # Z increases towards the head
    assert (lung_z < lower_third).mean() < 0.01


def test_air_around_the_patient_and_the_table_are_background(case: Case) -> None:
    edge = np.ones(case.labels.shape, bool)
    edge[5:-5, 5:-5, :] = False
    assert np.all(case.labels[edge] == BACKGROUND)
    # The table's thin shell lies below the body (larger Y) with HU above the tissue threshold.
    body_rows = np.nonzero((case.labels != BACKGROUND).any(axis=(0, 2)))[0]
    below = case.labels[:, body_rows.max() + 1 :, :]
    assert (case.hu[:, body_rows.max() + 1 :, :] > -500).sum() > 1000  # the table is really there
    assert np.all(below == BACKGROUND)


def test_sliding_window_with_card_patch_matches_whole_volume(case: Case) -> None:
    card = _card()
    session = _session()

    def predict(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])

    volume = torch.from_numpy(_normalise(case.hu, card))[None, None]
    stitched = sliding_window_inference(
        volume,
        card.input.patch_size,
        card.runtime.max_batch,
        predict,
        overlap=card.input.overlap,
        mode=card.input.blend,
        padding_mode="constant",
        cval=card.input.pad_value,
    )
    assert (stitched[0].argmax(0).numpy() == case.labels).mean() >= 0.995


def test_committed_package_validates_and_says_it_is_not_a_network() -> None:
    card = _card()
    check_package_files(PACKAGE, card)
    assert card.kind == "classical-algorithm"
    assert card.not_for_clinical_use is True
    assert "not a trained network" in card.intended_use
    assert card.output.channels == 4
    assert [lab.value for lab in card.labels] == [BODY, LUNG, BONE]


def test_card_codes_are_snomed_codes_from_pydicom_dictionary() -> None:
    wanted = {BODY: codes.SCT.SoftTissue, LUNG: codes.SCT.Lung, BONE: codes.SCT.Bone}
    for lab in _card().labels:
        assert (lab.category.value, lab.category.meaning) == (
            "91723000",
            codes.SCT.AnatomicalStructure.meaning,
        )
        assert (lab.type.scheme, lab.type.value, lab.type.meaning) == (
            "SCT",
            wanted[lab.value].value,
            wanted[lab.value].meaning,
        )


def test_runtime_on_reference_input_reproduces_reference_output() -> None:
    card = _card()
    x = np.load(PACKAGE / card.reference.input)
    expected = np.load(PACKAGE / card.reference.output)
    got = _session().run(None, {card.input.name: x})[0]
    assert x.shape == (1, 1, 64, 64, 8)
    assert np.allclose(got, expected, atol=card.reference.atol)
    assert len(np.unique(expected.argmax(1))) == 4  # the slab exercises every class


def test_committed_onnx_is_what_the_builder_produces() -> None:
    assert hashlib.sha256(build_model().SerializeToString()).hexdigest() == _card().runtime.sha256


def test_batches_and_odd_shapes_give_the_same_result_per_item() -> None:
    session = _session()
    x = np.load(PACKAGE / "reference" / "input.npy")
    a = np.ascontiguousarray(x[:, :, :45, :37, :5])
    b = np.ascontiguousarray(x[:, :, 19:, 27:, 3:])
    both = session.run(None, {"input": np.concatenate([a, b])})[0]
    assert both.shape == (2, 4, 45, 37, 5)
    assert np.array_equal(both[:1], session.run(None, {"input": a})[0])
    assert np.array_equal(both[1:], session.run(None, {"input": b})[0])


def test_cli_regenerates_the_committed_package(tmp_path: Path) -> None:
    main(["--out", str(tmp_path), "--ct", str(CRLM / "CRLM-CT-1004" / "image")])
    for rel in ("model.onnx", "model.yaml", "reference/input.npy", "reference/output.npy"):
        assert (tmp_path / rel).read_bytes() == (PACKAGE / rel).read_bytes(), rel
