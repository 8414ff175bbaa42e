"""MONAI bundle -> radai package: literal values only (no bundle expression is ever evaluated), ONNX and
TorchScript weights, clear errors for what a bundle cannot give, and a package radai registers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from monai.networks.nets.unet import UNet

from model_zoo.import_bundle import BundleError, import_bundle, main
from model_zoo.onnx_parity import export_onnx
from radai.app import make_runner_factory
from radai.models.registry import open_package, reference_check

PATCH = [32, 32, 32]
LABEL = {
    "value": 1,
    "category": {"scheme": "SCT", "value": "123037004", "meaning": "Anatomical Structure"},
    "type": {"scheme": "SCT", "value": "78961009", "meaning": "Spleen"},
    "color": [157, 108, 162],
}
OVERRIDES: dict[str, Any] = {"id": "spleen-ct", "body_part": "ABDOMEN", "labels": [LABEL]}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _metadata() -> dict[str, Any]:
    return {
        "version": "0.5.3",
        "name": "Spleen CT segmentation",
        "description": "A test bundle shaped like MONAI's spleen_ct_segmentation.",
        "authors": "MONAI team",
        "license": "Apache-2.0",
        "intended_use": "Testing radai's bundle import only.",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": PATCH,
                    "dtype": "float32",
                },
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "spatial_shape": PATCH,
                    "dtype": "float32",
                    "channel_def": {"0": "background", "1": "spleen"},
                },
            },
        },
    }


def _inference(trap: Path) -> dict[str, Any]:
    """As MONAI bundles write it, with expressions that would create `trap` if anything evaluated them."""
    touch = f"$pathlib.Path({str(trap)!r}).touch()"
    return {
        "imports": ["$import pathlib", "$import glob"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "trap": touch,
        "network_def": {
            "_target_": "UNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "channels": [4, 8, 16],
            "strides": [2, 2],
            "num_res_units": 1,
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "reader": touch},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
                {
                    "_target_": "monai.transforms.ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -57,
                    "a_max": 164,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": PATCH,
            "sw_batch_size": 2,
            "overlap": 0.5,
            "mode": "gaussian",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
        },
        "evaluator": {"_target_": "SupervisedEvaluator", "network": "@network", "postprocessing": touch},
    }


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(4, 8, 16),
        strides=(2, 2),
        num_res_units=1,
        norm="batch",
    )
    return net.eval()


def _bundle(
    tmp_path: Path,
    weights: str,
    *,
    inference: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    bundle = tmp_path / "spleen_ct_segmentation"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata or _metadata()))
    (bundle / "configs" / "inference.json").write_text(
        json.dumps(inference or _inference(tmp_path / "pwned"))
    )
    (bundle / "LICENSE").write_text("Apache License, Version 2.0\n")
    net = _net()
    if weights == "onnx":
        export_onnx(
            net, torch.zeros(1, 1, *PATCH), bundle / "models" / "model.onnx", ["pred"], dynamic_spatial=False
        )
    elif weights == "ts":
        with warnings.catch_warnings():  # "torch.jit.script is deprecated": bundles still ship TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.script(net).save(str(bundle / "models" / "model.ts"))  # type: ignore[no-untyped-call]
    else:
        torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle


def _check_registers(pkg: Path) -> None:
    package = open_package(pkg)
    assert reference_check(package, make_runner_factory("cpu")) <= package.card.reference.atol


def test_onnx_bundle_becomes_a_package_radai_registers(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, "onnx")
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(yaml.safe_dump(OVERRIDES))
    pkg = tmp_path / "pkg"

    code = main([str(bundle), "--out", str(pkg), "--overrides", str(overrides), "--modality", "CT"])

    assert code == 0
    _check_registers(pkg)
    card = open_package(pkg).card
    assert (card.id, card.version, card.modality, card.body_part) == ("spleen-ct", "0.5.3", "CT", "ABDOMEN")
    i = card.input
    assert (i.name, i.channels, i.spacing, i.orientation, i.patch_size) == (
        "input",
        1,
        (1.5, 1.5, 2.0),
        "RAS",
        (32, 32, 32),
    )
    assert i.intensity.model_dump() == {
        "kind": "range",
        "a_min": -57.0,
        "a_max": 164.0,
        "b_min": 0.0,
        "b_max": 1.0,
        "clip": True,
    }
    assert (i.overlap, i.blend, card.runtime.max_batch) == (0.5, "gaussian", 2)
    assert (card.output.name, card.output.channels) == ("pred", 2)
    assert [(lab.value, lab.name) for lab in card.labels] == [(1, "spleen")]  # name from channel_def
    assert card.licence == "Apache-2.0" and "Spleen CT segmentation" in card.provenance
    assert (pkg / "LICENSE").is_file() and "not for clinical use" in (pkg / "README.md").read_text().lower()
    assert sorted(p.name for p in (pkg / "reference").iterdir()) == ["input.npy", "output.npy"]
    assert not (tmp_path / "pwned").exists()  # no expression of inference.json was evaluated


def test_onnx_without_a_batch_axis_gets_a_max_batch_it_can_take(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, "onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _net(), (torch.zeros(1, 1, *PATCH),), str(bundle / "models" / "model.onnx"), dynamo=False
        )
    card = import_bundle(bundle, tmp_path / "pkg", OVERRIDES).card
    assert card.runtime.max_batch == 1  # not the bundle's sw_batch_size 2, which this graph cannot take
    _check_registers(tmp_path / "pkg")


def test_torchscript_bundle_is_converted_with_parity_and_a_dynamic_batch(tmp_path: Path) -> None:
    inference = _inference(tmp_path / "pwned")
    # Transforms kept in a top-level list that the pipeline refers to with "@": found without resolving "@".
    inference["preprocessing_transforms"] = inference["preprocessing"]["transforms"]
    inference["preprocessing"]["transforms"] = "@preprocessing_transforms"
    bundle = _bundle(tmp_path, "ts", inference=inference)

    result = import_bundle(bundle, tmp_path / "pkg", OVERRIDES, trials=1)

    assert result.parity is not None and result.parity.passed
    assert [c.input_shape[0] for c in result.parity.cases] == [1, 2]
    assert not list((tmp_path / "pkg").glob("*.ts"))  # the package holds ONNX only
    assert result.card.input.spacing == (1.5, 1.5, 2.0) and result.card.input.intensity.kind == "range"
    _check_registers(result.package)
    graph = onnx.load(str(result.package / "model.onnx"))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    x = np.random.default_rng(3).random((3, 1, *PATCH), dtype=np.float32)
    session = ort.InferenceSession(str(result.package / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x})
    with torch.no_grad():
        want = _net()(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 2, *PATCH)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    assert not (tmp_path / "pwned").exists()


def test_expression_where_a_literal_is_needed_is_refused_naming_the_key(tmp_path: Path) -> None:
    trap = tmp_path / "pwned"
    inference = _inference(trap)
    inference["pixdim"] = [1.5, 1.5, 2.0]
    spacing = inference["preprocessing"]["transforms"][3]
    spacing["pixdim"] = f"$pathlib.Path({str(trap)!r}).touch() or @pixdim"
    inference["inferer"]["roi_size"] = "@patch"
    bundle = _bundle(tmp_path, "onnx", inference=inference)

    with pytest.raises(BundleError) as err:
        import_bundle(bundle, tmp_path / "pkg", OVERRIDES)

    message = str(err.value)
    assert "input.spacing" in message and "preprocessing.transforms[3].pixdim" in message
    assert "input.patch_size" in message and "inferer.roi_size" in message
    assert "never evaluated" in message
    assert not trap.exists() and not (tmp_path / "pkg").exists()
    # The same values given as literals in the overrides make the bundle importable.
    fixed = {**OVERRIDES, "input": {"spacing": [1.5, 1.5, 2.0], "patch_size": PATCH}}
    _check_registers(import_bundle(bundle, tmp_path / "pkg", fixed).package)
    assert not trap.exists()


def test_bundle_without_metadata_is_refused(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, "onnx")
    (bundle / "configs" / "metadata.json").unlink()
    with pytest.raises(BundleError, match=r"configs/metadata\.json is missing"):
        import_bundle(bundle, tmp_path / "pkg", OVERRIDES)


def test_what_the_bundle_cannot_give_is_named_not_guessed(tmp_path: Path, capsys: Any) -> None:
    metadata = _metadata()
    del metadata["license"]
    bundle = _bundle(tmp_path, "onnx", metadata=metadata)

    assert main([str(bundle), "--out", str(tmp_path / "pkg")]) == 2

    err = capsys.readouterr().err
    for key in ("id:", "body_part:", "licence:", "labels:", "1 (spleen)"):
        assert key in err
    assert "input.spacing" not in err  # read from inference.json
    assert not (tmp_path / "pkg").exists()


def test_label_for_every_named_channel_is_required(tmp_path: Path) -> None:
    metadata = _metadata()
    metadata["network_data_format"]["outputs"]["pred"]["num_channels"] = 3
    metadata["network_data_format"]["outputs"]["pred"]["channel_def"]["2"] = "liver"
    bundle = _bundle(tmp_path, "onnx", metadata=metadata)
    with pytest.raises(BundleError, match=r"no label for channel 2 \(liver\)"):
        import_bundle(bundle, tmp_path / "pkg", OVERRIDES)


def test_state_dict_only_bundle_points_to_the_exporter(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, "pt")
    with pytest.raises(BundleError, match=r"model_zoo\.export_monai"):
        import_bundle(bundle, tmp_path / "pkg", OVERRIDES)
    assert not (tmp_path / "pkg").exists() and not list(tmp_path.glob(".pkg*"))


def test_computed_card_fields_cannot_be_overridden(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, "onnx")
    with pytest.raises(BundleError, match=r"runtime\.sha256"):
        import_bundle(bundle, tmp_path / "pkg", {**OVERRIDES, "runtime": {"sha256": "0" * 64}})
