"""The demonstration CT lesion detector (`model_zoo/catalogue/ct_lesion_demo`) and its lesion synthesis.

Real CT: TCIA Colorectal-Liver-Metastases CRLM-CT-1004 (CC BY 4.0), held out from training, read with
pydicom from `../shared/data/dicom/ct_abdomen_crlm/`. Inference goes through radai's own path: build_volume ->
prepare -> sliding_window (the ONNX runner radai uses) -> decode_centers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from model_zoo.lesion_detector_eval import HELDOUT_SERIES, MATCH_MM, detections_lps
from model_zoo.lesion_synth import Anatomy, analyse, insert_lesions, load_series, write_series
from radai.app import make_runner_factory
from radai.detection import decode_centers, match_findings
from radai.imaging.resample import prepare
from radai.imaging.volume import Volume, build_volume
from radai.models.manifest import CentersPost
from radai.models.registry import ModelPackage, open_package, reference_check
from radai.scheduling.inferer import sliding_window

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
SERIES = SHARED / "data" / "dicom" / HELDOUT_SERIES
PACKAGE = ROOT / "model_zoo" / "catalogue" / "ct_lesion_demo"
# insert_lesions(CRLM-CT-1004, seed 0, count 1): a 23 mm lung-base nodule, found (score 0.92, 3 mm off)
DEMO_SEED = 0
MAX_FALSE_POSITIVES = 1

pytestmark = pytest.mark.skipif(not SERIES.is_dir(), reason="shared CT test data not present")


@pytest.fixture(scope="module")
def datasets() -> list[Dataset]:
    return load_series(SERIES)


@pytest.fixture(scope="module")
def volume(datasets: list[Dataset]) -> Volume:
    return build_volume(datasets)


@pytest.fixture(scope="module")
def anatomy(volume: Volume) -> Anatomy:
    return analyse(volume)


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return open_package(PACKAGE)


def test_package_validates_and_reproduces_its_reference_output(package: ModelPackage) -> None:
    card = package.card
    assert (card.id, card.task, card.kind) == ("ct-lesion-demo", "detection", "trained-demo")
    assert [(lab.value, lab.type.value, lab.category.value) for lab in card.labels] == [
        (1, "52988006", "49755003")
    ]
    assert package.weights.stat().st_size < 5 * 1024 * 1024
    assert reference_check(package, make_runner_factory("cpu")) <= card.reference.atol


def test_synthesis_is_deterministic_per_seed(volume: Volume, anatomy: Anatomy) -> None:
    a, lesions_a = insert_lesions(volume, 11, 3, anatomy=anatomy)
    b, lesions_b = insert_lesions(volume, 11, 3, anatomy=anatomy)
    c, lesions_c = insert_lesions(volume, 12, 3, anatomy=anatomy)
    assert lesions_a == lesions_b and len(lesions_a) == 3
    assert np.array_equal(a.array, b.array)
    assert lesions_c != lesions_a
    assert not np.array_equal(a.array, c.array)
    assert np.array_equal(a.affine, volume.affine)


def test_lesions_land_inside_the_body_with_the_intended_contrast(volume: Volume, anatomy: Anatomy) -> None:
    synth, lesions = insert_lesions(volume, 5, 6, anatomy=anatomy, nodule_fraction=0.5)
    assert {les.kind for les in lesions} == {"hypodense", "nodule"}
    grid = np.indices(volume.array.shape[:2], dtype=np.float64)
    sp = volume.spacing
    for les in lesions:
        i, j, k = les.center_voxel
        assert anatomy.body[round(i), round(j), round(k)]
        # the central disc (half the smaller in-plane radius) of the slice through the centre
        r = 0.5 * min(les.semi_axes_mm[:2])
        disc = ((grid[0] - i) * sp[0]) ** 2 + ((grid[1] - j) * sp[1]) ** 2 <= r * r
        before = volume.array[:, :, round(k)][disc]
        after = synth.array[:, :, round(k)][disc]
        assert abs(float(np.mean(after)) - les.hu) < 15.0
        if les.kind == "hypodense":
            assert 20.0 <= float(np.median(before)) - les.hu <= 70.0  # darker than the tissue it replaced
        else:
            assert float(np.median(before)) < -500.0 and -10.0 <= les.hu <= 60.0  # solid nodule in lung
    untouched = np.ones(volume.array.shape, dtype=bool)
    for les in lesions:
        lo = [
            max(0, int(c - (h / 2 + 8) / s) - 1)
            for c, h, s in zip(les.center_voxel, les.size_mm, sp, strict=True)
        ]
        hi = [int(c + (h / 2 + 8) / s) + 2 for c, h, s in zip(les.center_voxel, les.size_mm, sp, strict=True)]
        untouched[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = False
    assert np.array_equal(synth.array[untouched], volume.array[untouched])


def test_written_series_reads_back_as_the_synthesised_volume_with_new_uids(
    datasets: list[Dataset], volume: Volume, anatomy: Anatomy, tmp_path: Path
) -> None:
    synth, _ = insert_lesions(volume, DEMO_SEED, 1, anatomy=anatomy)
    paths = write_series(datasets, synth.array, tmp_path / "a", tag="demo")
    again = write_series(datasets, synth.array, tmp_path / "b", tag="demo")
    back = load_series(tmp_path / "a")
    assert len(paths) == len(datasets)
    assert np.max(np.abs(build_volume(back).array - np.rint(synth.array))) <= 0.5
    uids = {str(ds.SOPInstanceUID) for ds in back}
    assert len(uids) == len(datasets)
    assert uids.isdisjoint(str(ds.SOPInstanceUID) for ds in datasets)
    assert uids == {str(ds.SOPInstanceUID) for ds in load_series(tmp_path / "b")}  # deterministic
    assert len(again) == len(paths)
    assert back[0].SeriesInstanceUID != datasets[0].SeriesInstanceUID
    assert back[0].StudyInstanceUID == datasets[0].StudyInstanceUID


def test_detector_finds_an_inserted_lesion_in_a_held_out_series(
    package: ModelPackage, volume: Volume, anatomy: Anatomy
) -> None:
    card = package.card
    post = card.output.postprocess
    assert isinstance(post, CentersPost)
    synth, (lesion,) = insert_lesions(volume, DEMO_SEED, 1, anatomy=anatomy)
    runner = make_runner_factory("cpu")(card.runtime.backend, package.weights, card.output.channels)
    try:
        prepared = prepare(synth, card.input)
        maps = sliding_window(prepared.image, card.input, runner.run, sw_batch_size=card.runtime.max_batch)
    finally:
        runner.close()
    found = decode_centers(maps, post, card.input.spacing)
    centres = detections_lps(prepared, found)
    pairs = match_findings([lesion.center_lps], centres, MATCH_MM)
    assert len(pairs) == 1, f"lesion at {lesion.center_lps} not found; detections at {centres}"
    assert len(found) - 1 <= MAX_FALSE_POSITIVES
