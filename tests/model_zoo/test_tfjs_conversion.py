"""TensorFlow.js -> ONNX conversion of brainchop's MeshNet weights, checked against an independent implementation.

Real data: brainchop's published weights and sample T1 (`../shared/models/brainchop/`, MIT). The parity
reference (`model_zoo.meshnet_reference`) parses model.json and the shards with its own code, runs the layers
in float64 on channels-last tensors, and builds its input the way brainchop's JavaScript does, so a wrong axis
order, a dropped weight or a padding slip in the converter shows up as a difference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

from model_zoo import build_brain_tissue as build
from model_zoo.meshnet_reference import MeshNetReference, brainchop_layout, from_brainchop_layout
from model_zoo.tfjs import TfjsConversionError, convert, load_tfjs_model, to_onnx
from radai.models.manifest import check_package_files, load_card

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
BRAINCHOP = SHARED / "models" / "brainchop"
PACKAGE = ROOT / "model_zoo" / "brain_tissue"
needs_shared = pytest.mark.skipif(
    not (BRAINCHOP / "model5_gw_ae" / "model.json").is_file(),
    reason="brainchop weights not present at ../shared/models/brainchop",
)
F32 = NDArray[np.float32]


def _run(model: onnx.ModelProto | Path, x: F32) -> F32:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    out: F32 = session.run(None, {session.get_inputs()[0].name: x})[0]
    return out


@pytest.fixture(scope="module")
def t1() -> F32:
    """The sample T1 conformed (256^3, 1 mm, LIA) and normalised exactly as the card says."""
    if not (BRAINCHOP / "t1_crop.nii.gz").is_file():
        pytest.skip("sample T1 not present at ../shared/models/brainchop")
    volume, _ = build.conform_sample(BRAINCHOP / "t1_crop.nii.gz")
    return build.normalise(volume)


# --- the committed package ---------------------------------------------------------------------------------


def test_committed_package_card_validates_and_files_match_their_checksum() -> None:
    card = load_card(PACKAGE)
    check_package_files(PACKAGE, card)
    assert (card.id, card.version, card.kind, card.input.orientation) == (
        "brain-tissue",
        "1.0.0",
        "published-weights",
        "LIA",
    )
    graph = onnx.load(PACKAGE / card.runtime.file).graph
    assert [i.name for i in graph.input] == [card.input.name]
    assert [o.name for o in graph.output] == [card.output.name]
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == card.output.channels
    assert [(lab.value, lab.type.value) for lab in card.labels] == [(1, "389080008"), (2, "389081007")]
    assert (PACKAGE / "LICENSE").read_text().startswith("MIT License")


def test_committed_onnx_reproduces_committed_reference_output() -> None:
    card = load_card(PACKAGE)
    x = np.load(PACKAGE / card.reference.input)
    expected = np.load(PACKAGE / card.reference.output)
    assert x.shape == (1, 1, 32, 32, 32) and x.dtype == np.float32
    got = _run(PACKAGE / card.runtime.file, x)
    assert got.shape == expected.shape == (1, 3, 32, 32, 32)
    assert float(np.abs(got - expected).max()) <= card.reference.atol
    assert float(np.abs(expected).max()) > 1.0  # real logits, not an all-zero fixture


@needs_shared
def test_converter_rebuilds_the_committed_model_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    convert(
        BRAINCHOP / "model5_gw_ae", out, doc=f"brain-tissue 1.0.0: {build.UPSTREAM} (MIT), via model_zoo.tfjs"
    )
    assert hashlib.sha256(out.read_bytes()).hexdigest() == load_card(PACKAGE).runtime.sha256


@needs_shared
def test_build_script_regenerates_the_same_package(tmp_path: Path) -> None:
    assert build.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "model.yaml").read_text() == (PACKAGE / "model.yaml").read_text()
    for rel in ("model.onnx", "LICENSE", "reference/input.npy"):
        assert (tmp_path / rel).read_bytes() == (PACKAGE / rel).read_bytes(), rel
    got, committed = np.load(tmp_path / "reference/output.npy"), np.load(PACKAGE / "reference/output.npy")
    assert float(np.abs(got - committed).max()) <= 1e-5  # ORT threading may reorder float sums


# --- parity with the independent implementation on real data ------------------------------------------------


@needs_shared
def test_onnx_matches_independent_implementation_on_real_t1(t1: F32) -> None:
    crop = t1[64:192, 64:192, 64:192]  # centred 128^3 of the conformed sample: white, grey matter and CSF
    got = _run(PACKAGE / "model.onnx", crop[None, None].copy())
    reference = MeshNetReference.from_tfjs(BRAINCHOP / "model5_gw_ae")
    expected = from_brainchop_layout(
        reference(brainchop_layout(crop, enable_transpose=True)), enable_transpose=True
    )
    assert float(np.abs(got - expected).max()) <= 1e-4
    labels = got[0].argmax(0)
    assert np.array_equal(labels, expected[0].argmax(0))
    assert min(int((labels == k).sum()) for k in (0, 1, 2)) > 10_000  # every class is really exercised


@needs_shared
@pytest.mark.parametrize("name", ["model5_gw_ae", "model30chan18cls", "model30chan50cls", "mindgrab"])
def test_every_brainchop_model_converts_and_matches_reference(name: str, t1: F32) -> None:
    crop = t1[100:124, 110:130, 90:118]  # anisotropic on purpose: an axis mix-up cannot go unnoticed
    got = _run(to_onnx(load_tfjs_model(BRAINCHOP / name)), crop[None, None].copy())
    reference = MeshNetReference.from_tfjs(BRAINCHOP / name)
    expected = from_brainchop_layout(
        reference(brainchop_layout(crop, enable_transpose=True)), enable_transpose=True
    )
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) <= 1e-4
    assert np.array_equal(got[0].argmax(0), expected[0].argmax(0))


@needs_shared
def test_reverse_spatial_runs_the_model_on_the_untransposed_brainchop_layout(t1: F32) -> None:
    crop = t1[100:124, 110:130, 90:118]
    model = load_tfjs_model(BRAINCHOP / "model30chan18cls")
    reversed_ = _run(to_onnx(model, reverse_spatial=True), crop[None, None].copy())
    reference = MeshNetReference.from_tfjs(BRAINCHOP / "model30chan18cls")
    expected = from_brainchop_layout(
        reference(brainchop_layout(crop, enable_transpose=False)), enable_transpose=False
    )
    assert float(np.abs(reversed_ - expected).max()) <= 1e-4
    plain = _run(to_onnx(model), crop[None, None].copy())
    assert float(np.abs(reversed_ - plain).max()) > 0.1  # the two layouts really are different models


# --- converter behaviour on small hand-made tfjs models -----------------------------------------------------


def _conv(name: str, filters: int, kernel: list[int], dilation: list[int], **kw: Any) -> dict[str, Any]:
    config = {
        "name": name,
        "filters": filters,
        "kernel_size": kernel,
        "strides": [1, 1, 1],
        "padding": "same",
        "data_format": "channels_last",
        "dilation_rate": dilation,
        "activation": "linear",
        "use_bias": True,
    }
    return {"class_name": "Conv3D", "config": {**config, **kw}}


def _act(name: str, activation: str) -> dict[str, Any]:
    return {"class_name": "Activation", "config": {"name": name, "activation": activation}}


def _write_tfjs(
    folder: Path, layers: list[dict[str, Any]], channels: int = 2, shards: int = 2
) -> dict[str, Any]:
    """A tfjs layers model with random weights, its weight bytes split over `shards` files mid-tensor."""
    rng = np.random.default_rng(7)
    chain: list[dict[str, Any]] = [
        {
            "class_name": "InputLayer",
            "name": "input",
            "inbound_nodes": [],
            "config": {
                "batch_input_shape": [None, 16, 16, 16, channels],
                "dtype": "float32",
                "name": "input",
            },
        }
    ]
    manifest: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    in_ch = channels
    for layer in layers:
        layer = {**layer, "name": layer["config"]["name"], "inbound_nodes": [[[chain[-1]["name"], 0, 0, {}]]]}
        chain.append(layer)
        c = layer["config"]
        if layer["class_name"] != "Conv3D":
            continue
        shape = [*c["kernel_size"], in_ch, c["filters"]]
        manifest.append({"name": f"{c['name']}/kernel", "shape": shape, "dtype": "float32"})
        blobs.append(rng.normal(0, 0.5, shape).astype("<f4").tobytes())
        if c["use_bias"]:
            manifest.append({"name": f"{c['name']}/bias", "shape": [c["filters"]], "dtype": "float32"})
            blobs.append(rng.normal(0, 0.5, c["filters"]).astype("<f4").tobytes())
        in_ch = c["filters"]
    data = b"".join(blobs)
    cuts = [
        0,
        *(len(data) * (i + 1) // shards + 2 for i in range(shards - 1)),
        len(data),
    ]  # +2: never aligned
    paths = [f"group1-shard{i + 1}of{shards}.bin" for i in range(shards)]
    folder.mkdir(parents=True, exist_ok=True)
    for path, start, end in zip(paths, cuts, cuts[1:], strict=False):
        (folder / path).write_bytes(data[start:end])
    spec = {
        "format": "layers-model",
        "modelTopology": {
            "model_config": {"class_name": "Functional", "config": {"name": "t", "layers": chain}}
        },
        "weightsManifest": [{"paths": paths, "weights": manifest}],
    }
    (folder / "model.json").write_text(json.dumps(spec))
    return spec


SYNTHETIC = [
    _conv(
        "a", 3, [3, 1, 2], [1, 2, 3], activation="relu"
    ),  # even kernel: 'same' pads the extra voxel at the end
    _act("a_act", "elu"),
    _conv("b_gn", 4, [2, 3, 1], [2, 1, 1], use_bias=False),  # brainchop's name-encoded instance norm
    _act("b_act", "gelu"),
    _conv("c", 4, [3, 3, 3], [1, 1, 1], padding="valid", activation="tanh"),
    _act("c_act", "sigmoid"),
    _conv("out", 3, [1, 1, 1], [1, 1, 1]),
]


@pytest.mark.parametrize("reverse_spatial", [False, True])
def test_synthetic_model_with_every_supported_feature_matches_reference(
    tmp_path: Path, reverse_spatial: bool
) -> None:
    _write_tfjs(tmp_path, SYNTHETIC)
    x = np.random.default_rng(1).normal(size=(2, 2, 9, 10, 11)).astype(np.float32)  # N=2, C=2, X, Y, Z
    got = _run(to_onnx(load_tfjs_model(tmp_path), reverse_spatial=reverse_spatial), x)
    perm = (0, 4, 3, 2, 1) if reverse_spatial else (0, 2, 3, 4, 1)  # radai (N, C, X, Y, Z) -> tfjs layout
    out = MeshNetReference.from_tfjs(tmp_path)(x.transpose(perm))
    expected = out.transpose((0, 4, 3, 2, 1) if reverse_spatial else (0, 4, 1, 2, 3))
    assert got.shape == expected.shape == (2, 3, 7, 8, 9)  # the 'valid' 3x3x3 layer trims one voxel per side
    assert float(np.abs(got - expected).max()) <= 1e-4


def test_unsupported_layer_class_is_refused_naming_it(tmp_path: Path) -> None:
    layers = [
        _conv("a", 2, [3, 3, 3], [1, 1, 1]),
        {"class_name": "BatchNormalization", "config": {"name": "bn", "axis": -1}},
    ]
    _write_tfjs(tmp_path, layers)
    with pytest.raises(TfjsConversionError, match="unsupported layer class 'BatchNormalization'"):
        load_tfjs_model(tmp_path)


def test_unsupported_activation_is_refused_naming_it(tmp_path: Path) -> None:
    _write_tfjs(tmp_path, [_conv("a", 2, [3, 3, 3], [1, 1, 1]), _act("s", "softplus")])
    with pytest.raises(TfjsConversionError, match="activation 'softplus'"):
        to_onnx(load_tfjs_model(tmp_path))


def test_quantised_weights_are_refused(tmp_path: Path) -> None:
    spec = _write_tfjs(tmp_path, [_conv("a", 2, [3, 3, 3], [1, 1, 1])])
    spec["weightsManifest"][0]["weights"][0]["quantization"] = {"dtype": "uint8", "scale": 0.01, "min": -1.0}
    (tmp_path / "model.json").write_text(json.dumps(spec))
    with pytest.raises(TfjsConversionError, match="quantised"):
        load_tfjs_model(tmp_path)


def test_weight_the_graph_would_drop_is_refused(tmp_path: Path) -> None:
    spec = _write_tfjs(tmp_path, [_conv("a", 2, [3, 3, 3], [1, 1, 1])])
    spec["modelTopology"]["model_config"]["config"]["layers"][1]["config"]["use_bias"] = False
    (tmp_path / "model.json").write_text(json.dumps(spec))
    with pytest.raises(TfjsConversionError, match=r"not used by any layer.*'a/bias'"):
        to_onnx(load_tfjs_model(tmp_path))


def test_shards_that_do_not_match_the_manifest_are_refused(tmp_path: Path) -> None:
    _write_tfjs(tmp_path, [_conv("a", 2, [3, 3, 3], [1, 1, 1])], shards=1)
    shard = tmp_path / "group1-shard1of1.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(TfjsConversionError, match="past the end"):
        load_tfjs_model(tmp_path)
    shard.write_bytes(shard.read_bytes() + b"\0" * 8)
    with pytest.raises(TfjsConversionError, match="manifest uses"):
        load_tfjs_model(tmp_path)


def test_committed_model_accepts_any_batch_and_volume_size() -> None:
    model = onnx.load(PACKAGE / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    out = _run(model, np.zeros((2, 1, 20, 17, 9), dtype=np.float32))
    assert out.shape == (2, 3, 20, 17, 9)
