"""The model registry: add (with every registration check), list, show, activate, shadow, remove; by API
calls on the store, and as a user runs it with the `radai models` command."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from radai.app import make_runner_factory, make_validator
from radai.errors import ModelPackageError, NotFoundError
from radai.models.archive import extract_package
from radai.models.registry import RunnerFactory, validate_package
from radai.storage.model_store import ModelStore
from tests.radai.model_packages import edit_card, rehash, threshold_graph, threshold_package
from tests.radai.test_cli import radai_cli

VALIDATE = make_validator("cpu")


def store(tmp_path: Path, bundled: list[Path] | None = None) -> ModelStore:
    return ModelStore(tmp_path / "registry", bundled or [])


def test_the_first_version_added_is_active_and_later_ones_wait_for_activation(tmp_path: Path) -> None:
    reg = store(tmp_path)
    first = reg.add(threshold_package(tmp_path / "v1", version="1.0.0"), VALIDATE)
    second = reg.add(threshold_package(tmp_path / "v2", version="1.1.0", thresholds_hu=(-150.0,)), VALIDATE)
    assert first.new and first.entry.active and first.entry.source == "installed"
    assert second.new and not second.entry.active
    listed = {e.key: e.active for e in reg.entries()}
    assert listed == {"threshold@1.0.0": True, "threshold@1.1.0": False}
    assert reg.selection().active["threshold"].card.version == "1.0.0"
    # installed copies, side by side, independent of the folders they came from
    assert (tmp_path / "registry" / "packages" / "threshold" / "1.1.0" / "model.onnx").is_file()


def test_activate_switches_the_selected_version_and_show_finds_it(tmp_path: Path) -> None:
    reg = store(tmp_path)
    reg.add(threshold_package(tmp_path / "v1"), VALIDATE)
    reg.add(threshold_package(tmp_path / "v2", version="2.0.0", thresholds_hu=(-150.0,)), VALIDATE)
    assert reg.activate("threshold@2.0.0").active
    assert reg.find("threshold").package.card.version == "2.0.0"
    assert reg.find("threshold@1.0.0").active is False
    with pytest.raises(NotFoundError, match=r"no version 9\.9\.9 \(registered: 1\.0\.0, 2\.0\.0\)"):
        reg.activate("threshold@9.9.9")
    with pytest.raises(ModelPackageError, match="needs ID@VERSION"):
        reg.activate("threshold")


def test_adding_the_same_version_again_changes_nothing_but_different_weights_are_refused(
    tmp_path: Path,
) -> None:
    reg = store(tmp_path)
    reg.add(threshold_package(tmp_path / "a"), VALIDATE)
    again = reg.add(threshold_package(tmp_path / "b"), VALIDATE)
    assert not again.new
    with pytest.raises(ModelPackageError, match="already registered with different weights"):
        reg.add(threshold_package(tmp_path / "c", thresholds_hu=(0.0,)), VALIDATE)


def test_remove_refuses_the_active_version_while_others_exist_then_removes_the_model(tmp_path: Path) -> None:
    reg = store(tmp_path)
    reg.add(threshold_package(tmp_path / "v1"), VALIDATE)
    reg.add(threshold_package(tmp_path / "v2", version="2.0.0", thresholds_hu=(-150.0,)), VALIDATE)
    with pytest.raises(ModelPackageError, match="active version; activate another version first"):
        reg.remove("threshold@1.0.0")
    assert reg.remove("threshold@2.0.0") == ["threshold@2.0.0"]
    assert reg.remove("threshold") == ["threshold@1.0.0"]
    assert reg.entries() == [] and reg.selection().active == {}
    assert not (tmp_path / "registry" / "packages" / "threshold").exists()
    with pytest.raises(NotFoundError):
        reg.remove("threshold")


def test_removing_a_bundled_model_disables_it_and_adding_a_version_enables_it_again(tmp_path: Path) -> None:
    bundled = tmp_path / "bundled"
    threshold_package(bundled / "threshold")
    reg = store(tmp_path, [bundled])
    assert reg.find("threshold").source == "bundled"
    assert reg.remove("threshold") == ["threshold (bundled: disabled)"]
    assert reg.selection().active == {} and (bundled / "threshold" / "model.onnx").is_file()
    reg.add(threshold_package(tmp_path / "v2", version="2.0.0", thresholds_hu=(-150.0,)), VALIDATE)
    assert reg.selection().active["threshold"].card.version == "2.0.0"


def test_shadow_needs_a_version_other_than_the_active_one(tmp_path: Path) -> None:
    reg = store(tmp_path)
    reg.add(threshold_package(tmp_path / "v1"), VALIDATE)
    reg.add(threshold_package(tmp_path / "v2", version="2.0.0", thresholds_hu=(-150.0,)), VALIDATE)
    with pytest.raises(ModelPackageError, match="is the active version"):
        reg.set_shadow("threshold@1.0.0")
    assert reg.set_shadow("threshold@2.0.0").shadow
    assert reg.selection().shadow["threshold"].card.version == "2.0.0"
    reg.activate("threshold@2.0.0")  # activating the shadowed version ends its shadow run
    assert reg.selection().shadow == {}
    assert reg.clear_shadow("threshold") is False


# -- every registration check refuses with its reason ------------------------------------------------------


def test_a_weights_file_that_does_not_match_its_checksum_is_refused(tmp_path: Path) -> None:
    pkg = threshold_package(tmp_path / "p")
    (pkg / "model.onnx").write_bytes(threshold_graph([0.3]))
    with pytest.raises(ModelPackageError, match=r"runtime\.sha256 mismatch"):
        store(tmp_path).add(pkg, VALIDATE)
    assert store(tmp_path).entries() == []


def test_a_graph_whose_output_shape_differs_from_the_card_is_refused(tmp_path: Path) -> None:
    pkg = threshold_package(tmp_path / "p")
    (pkg / "model.onnx").write_bytes(threshold_graph([0.2], channels=3))
    rehash(pkg)
    with pytest.raises(ModelPackageError, match="output has 3 channels, the card says 2"):
        validate_package(pkg, make_runner_factory_cpu())


def test_a_graph_with_a_fixed_batch_of_one_is_refused_for_a_card_batching_two(tmp_path: Path) -> None:
    pkg = threshold_package(tmp_path / "p")
    (pkg / "model.onnx").write_bytes(threshold_graph([0.2], batch=1))
    rehash(pkg)
    with pytest.raises(ModelPackageError, match=r"batch axis is fixed at 1, below runtime\.max_batch 2"):
        validate_package(pkg, make_runner_factory_cpu())


def test_a_card_naming_another_input_tensor_is_refused(tmp_path: Path) -> None:
    pkg = threshold_package(tmp_path / "p")
    edit_card(pkg, **{"input.name": "image"})
    with pytest.raises(ModelPackageError, match="input is named 'input', the card says 'image'"):
        validate_package(pkg, make_runner_factory_cpu())


def test_a_package_holding_a_pickle_is_refused_before_anything_is_loaded(tmp_path: Path) -> None:
    pkg = threshold_package(tmp_path / "p")
    (pkg / "extra_weights.bin").write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(ModelPackageError, match=r"ONNX only.*extra_weights\.bin"):
        store(tmp_path).add(pkg, VALIDATE)


def test_a_reference_output_the_model_does_not_reproduce_is_refused(tmp_path: Path) -> None:
    pkg = threshold_package(tmp_path / "p")
    out = np.load(pkg / "reference" / "output.npy")
    np.save(pkg / "reference" / "output.npy", out + 0.01)
    with pytest.raises(ModelPackageError, match=r"reference check failed: max abs diff 0\.01 > 0\.0001"):
        store(tmp_path).add(pkg, VALIDATE)


def test_a_weights_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    pkg = threshold_package(tmp_path / "p")
    (pkg / "model.onnx").write_bytes(b"\x08\x07not really a protobuf of a model" * 10)
    rehash(pkg)
    with pytest.raises(ModelPackageError, match="not an ONNX model"):
        validate_package(pkg, make_runner_factory_cpu())


def test_an_archive_entry_that_leaves_the_target_folder_is_refused(tmp_path: Path) -> None:
    pkg = threshold_package(tmp_path / "p")
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(pkg, arcname="p")
        payload = b"owned"
        info = tarfile.TarInfo("p/../../escaped.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ModelPackageError, match=r"\.\."):
        extract_package(archive, tmp_path / "unpacked")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "unpacked").exists()


def make_runner_factory_cpu() -> RunnerFactory:
    return make_runner_factory("cpu")


# -- as a user runs it ---------------------------------------------------------------------------------------


def test_radai_models_add_activate_list_show_remove_as_a_user_runs_them(tmp_path: Path) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text(f"storage: {{data_dir: {tmp_path / 'data'}}}\n")
    v1 = threshold_package(tmp_path / "v1")
    v2 = threshold_package(tmp_path / "v2", version="1.1.0", thresholds_hu=(-150.0,))
    archive = tmp_path / "v2.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(v2, arcname="threshold-1.1.0")

    run = radai_cli("models", "add", str(v1), "-c", str(cfg), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "threshold@1.0.0: registered and active" in run.stdout
    run = radai_cli("models", "add", str(archive), "-c", str(cfg), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "activate it with `radai models activate threshold@1.1.0`" in run.stdout

    run = radai_cli("models", "activate", "threshold@1.1.0", "-c", str(cfg), cwd=tmp_path)
    assert run.returncode == 0 and "threshold@1.1.0: active" in run.stdout
    listing = radai_cli("models", "list", "-c", str(cfg), cwd=tmp_path).stdout
    assert "threshold@1.1.0\tactive\tinstalled" in listing and "threshold@1.0.0\t-\tinstalled" in listing
    assert "ct-body-classical@1.0.0\tactive\tbundled" in listing
    show = radai_cli("models", "show", "threshold", "-c", str(cfg), cwd=tmp_path)
    assert '"version": "1.1.0"' in show.stdout and '"active": true' in show.stdout

    bad = radai_cli("models", "remove", "threshold@1.1.0", "-c", str(cfg), cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("error: threshold@1.1.0 is the active version")
    assert "Traceback" not in bad.stderr
    run = radai_cli("models", "remove", "threshold", "-c", str(cfg), cwd=tmp_path)
    assert run.returncode == 0 and "removed threshold@1.0.0" in run.stdout
