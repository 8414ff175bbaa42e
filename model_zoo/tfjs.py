"""Convert a TensorFlow.js "layers" model (model.json + weight shards) to ONNX, without TensorFlow.

Supported: a chain of `Conv3D` (channels-last, stride 1, 'same' or 'valid' padding, any dilation, with or
without bias and fused activation, and brainchop's name-encoded instance norm: see NORM_SUFFIX) and
`Activation` layers, which is what brainchop's MeshNet models use.
Any other layer class, a quantised weight or a weight the graph does not use is refused with a clear error:
a conversion that silently drops a weight (e.g. a final bias) is not a faithful one.

Axes. radai feeds models (N, C, X, Y, Z) with X, Y, Z the nibabel voxel axes (i, j, k). brainchop builds its
tfjs tensor from the flat NIfTI buffer as (k, j, i) and, for every model whose entry has
`enableTranspose: true` (all of them), reverses it to (i, j, k) before inference. The net spatial layout seen by
the tfjs model is therefore (i, j, k): `reverse_spatial=False` (the default). `reverse_spatial=True` is for a
model run on the untransposed (k, j, i) layout: the graph then transposes the input to (k, j, i) and the output
back, so radai still sees (N, C, X, Y, Z).

There is no converter for this on PyPI that works without TensorFlow (tf2onnx and tensorflowjs both need it),
hence this small hand-written one built with `onnx.helper`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
_SUPPORTED_LAYERS = ("InputLayer", "Conv3D", "Activation")
_SUPPORTED_ACTIVATIONS = ("linear", "relu", "elu", "gelu", "sigmoid", "tanh")
_SPATIAL_REVERSE = (0, 1, 4, 3, 2)  # (N, C, X, Y, Z) <-> (N, C, Z, Y, X); its own inverse
# brainchop's exporter ("PyTorch_to_TF_JS_exporter-v9-name-encoding") marks a Conv3D followed by a
# parameter-free GroupNorm(groups=channels), i.e. an instance norm, with this name suffix; its runtime applies
# `LayerNormInPlace` (tf.moments over D, H, W, epsilon 1e-5) after every such layer.
NORM_SUFFIX = "_gn"
NORM_EPSILON = 1e-5


class TfjsConversionError(ValueError):
    """The tfjs model uses something this converter does not support, or its files are inconsistent."""


@dataclass(frozen=True)
class Layer:
    """One Keras layer of the topology, in graph order."""

    class_name: str
    name: str
    config: Mapping[str, Any]
    inbound: str | None  # name of the single input layer; None for the InputLayer


@dataclass(frozen=True)
class TfjsModel:
    """A parsed tfjs layers model: layers in execution order and every weight by its manifest name."""

    layers: tuple[Layer, ...]
    input_channels: int
    weights: Mapping[str, NDArray[np.float32]]


def _read_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "model.json"
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TfjsConversionError(f"{path}: cannot read ({exc})") from exc
    if raw.get("format", "layers-model") != "layers-model" or "modelTopology" not in raw:
        raise TfjsConversionError(f"{path}: not a tfjs layers model (format={raw.get('format')!r})")
    return raw


def read_weights(model_dir: Path, manifest: Sequence[Mapping[str, Any]]) -> dict[str, NDArray[np.float32]]:
    """Weights exactly as the manifest lays them out: per group, shards concatenated, entries in order."""
    weights: dict[str, NDArray[np.float32]] = {}
    for group in manifest:
        buffer = b"".join((model_dir / p).read_bytes() for p in group["paths"])
        offset = 0
        for entry in group["weights"]:
            name = str(entry["name"])
            if "quantization" in entry:
                q = entry["quantization"].get("dtype", "?")
                raise TfjsConversionError(
                    f"weight {name!r} is quantised ({q}); only float32 weights are supported"
                )
            if entry.get("dtype", "float32") != "float32":
                raise TfjsConversionError(
                    f"weight {name!r} has dtype {entry['dtype']!r}; only float32 is supported"
                )
            shape = tuple(int(d) for d in entry["shape"])
            nbytes = 4 * math.prod(shape)
            if offset + nbytes > len(buffer):
                raise TfjsConversionError(f"weight {name!r} runs past the end of shards {group['paths']}")
            values = np.frombuffer(buffer, dtype="<f4", count=math.prod(shape), offset=offset)
            weights[name] = values.reshape(shape).astype(np.float32)
            offset += nbytes
        if offset != len(buffer):
            raise TfjsConversionError(
                f"shards {group['paths']} hold {len(buffer)} bytes, manifest uses {offset}"
            )
    return weights


def _layers(topology: Mapping[str, Any]) -> tuple[Layer, ...]:
    model_config = topology.get("model_config", topology)
    config = model_config["config"]
    raw_layers = config if isinstance(config, list) else config["layers"]  # Sequential may be a bare list
    layers: list[Layer] = []
    for i, raw in enumerate(raw_layers):
        cls = str(raw["class_name"])
        name = str(raw.get("name") or raw["config"]["name"])
        if cls not in _SUPPORTED_LAYERS:
            raise TfjsConversionError(
                f"layer {name!r}: unsupported layer class {cls!r} (supported: {', '.join(_SUPPORTED_LAYERS)})"
            )
        nodes = raw.get("inbound_nodes")
        if nodes is None:  # Sequential: each layer feeds the next
            inbound = layers[-1].name if layers else None
        elif not nodes:
            inbound = None
        else:
            if len(nodes) != 1 or len(nodes[0]) != 1:
                raise TfjsConversionError(f"layer {name!r}: only single-input layers are supported")
            inbound = str(nodes[0][0][0])
        if cls == "InputLayer" and i != 0:
            raise TfjsConversionError(f"layer {name!r}: only one InputLayer, first, is supported")
        if cls != "InputLayer" and (inbound is None or inbound != (layers[-1].name if layers else None)):
            raise TfjsConversionError(f"layer {name!r}: only a plain chain of layers is supported")
        layers.append(Layer(class_name=cls, name=name, config=dict(raw["config"]), inbound=inbound))
    if not layers or layers[0].class_name != "InputLayer":
        raise TfjsConversionError("the model must start with an InputLayer")
    return tuple(layers)


def load_tfjs_model(model_dir: Path) -> TfjsModel:
    """Parse `model_dir/model.json` and read its weight shards."""
    raw = _read_json(model_dir)
    layers = _layers(raw["modelTopology"])
    shape = layers[0].config.get("batch_input_shape") or layers[0].config.get("batch_shape")
    if not shape or len(shape) != 5:
        raise TfjsConversionError(f"input shape {shape!r}: expected a 5-D (N, D, H, W, C) volume input")
    weights = read_weights(model_dir, raw.get("weightsManifest", []))
    return TfjsModel(layers=layers, input_channels=int(shape[-1]), weights=weights)


def _same_pads(kernel: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """TensorFlow 'same' at stride 1: total (k-1)*d, the odd voxel at the end; ONNX order begins..., ends..."""
    totals = [(k - 1) * d for k, d in zip(kernel, dilation, strict=True)]
    return [t // 2 for t in totals] + [t - t // 2 for t in totals]


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: float) -> str:
        self.initializers.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    def activation(self, kind: str, x: str, out: str) -> None:
        if kind == "linear":
            self.nodes.append(helper.make_node("Identity", [x], [out], name=out))
        elif kind == "relu":
            self.nodes.append(helper.make_node("Relu", [x], [out], name=out))
        elif kind == "elu":  # Keras/tfjs elu: alpha 1
            self.nodes.append(helper.make_node("Elu", [x], [out], name=out, alpha=1.0))
        elif kind == "sigmoid":
            self.nodes.append(helper.make_node("Sigmoid", [x], [out], name=out))
        elif kind == "tanh":
            self.nodes.append(helper.make_node("Tanh", [x], [out], name=out))
        elif (
            kind == "gelu"
        ):  # tfjs 'gelu' is exact: x * 0.5 * (1 + erf(x / sqrt 2)); ONNX Gelu needs opset 20
            sqrt2 = self.const(f"{out}/sqrt2", math.sqrt(2.0))
            one = self.const(f"{out}/one", 1.0)
            half = self.const(f"{out}/half", 0.5)
            self.nodes += [
                helper.make_node("Div", [x, sqrt2], [f"{out}/scaled"], name=f"{out}/div"),
                helper.make_node("Erf", [f"{out}/scaled"], [f"{out}/erf"], name=f"{out}/erf"),
                helper.make_node("Add", [f"{out}/erf", one], [f"{out}/cdf2"], name=f"{out}/add"),
                helper.make_node("Mul", [x, f"{out}/cdf2"], [f"{out}/xcdf2"], name=f"{out}/mul"),
                helper.make_node("Mul", [f"{out}/xcdf2", half], [out], name=out),
            ]
        else:
            raise TfjsConversionError(
                f"activation {kind!r} is not supported (supported: {', '.join(_SUPPORTED_ACTIVATIONS)})"
            )

    def conv3d(self, layer: Layer, weights: Mapping[str, NDArray[np.float32]], x: str, in_ch: int) -> int:
        c = layer.config
        if c.get("data_format", "channels_last") != "channels_last":
            raise TfjsConversionError(f"layer {layer.name!r}: only channels_last Conv3D is supported")
        if list(c.get("strides", [1, 1, 1])) != [1, 1, 1] or int(c.get("groups", 1)) != 1:
            raise TfjsConversionError(f"layer {layer.name!r}: only stride 1, groups 1 Conv3D is supported")
        kernel = weights.get(f"{layer.name}/kernel")
        if kernel is None:
            raise TfjsConversionError(
                f"layer {layer.name!r}: no weight {layer.name + '/kernel'!r} in the manifest"
            )
        k_size = [int(k) for k in c["kernel_size"]]
        dilation = [int(d) for d in c.get("dilation_rate", [1, 1, 1])]
        filters = int(c["filters"])
        if kernel.shape != (*k_size, in_ch, filters):
            raise TfjsConversionError(
                f"layer {layer.name!r}: kernel shape {kernel.shape}, expected {(*k_size, in_ch, filters)}"
            )
        padding = c.get("padding", "valid")
        if padding == "same":
            pads = _same_pads(k_size, dilation)
        elif padding == "valid":
            pads = [0] * 6
        else:
            raise TfjsConversionError(f"layer {layer.name!r}: padding {padding!r} is not supported")
        w_name = f"{layer.name}/kernel"
        # tfjs kernel (kD, kH, kW, Cin, Cout) -> ONNX (Cout, Cin, kD, kH, kW); spatial axes keep their order.
        self.initializers.append(
            numpy_helper.from_array(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)), w_name)
        )
        inputs = [x, w_name]
        if c.get("use_bias", True):
            bias = weights.get(f"{layer.name}/bias")
            if bias is None or bias.shape != (filters,):
                raise TfjsConversionError(f"layer {layer.name!r}: bias missing or not of shape ({filters},)")
            self.initializers.append(numpy_helper.from_array(bias, f"{layer.name}/bias"))
            inputs.append(f"{layer.name}/bias")
        act = str(c.get("activation") or "linear")
        norm = layer.name.endswith(NORM_SUFFIX)
        act_out = f"{layer.name}/prenorm" if norm else layer.name
        conv_out = act_out if act == "linear" else f"{layer.name}/preact"
        self.nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [conv_out],
                name=f"{layer.name}/conv",
                kernel_shape=k_size,
                dilations=dilation,
                strides=[1, 1, 1],
                pads=pads,
                group=1,
            )
        )
        if act != "linear":
            self.activation(act, conv_out, act_out)
        if norm:  # brainchop's LayerNormInPlace: per-sample, per-channel z-score over D, H, W; eps 1e-5
            self.initializers += [
                numpy_helper.from_array(np.ones(filters, dtype=np.float32), f"{layer.name}/norm_scale"),
                numpy_helper.from_array(np.zeros(filters, dtype=np.float32), f"{layer.name}/norm_shift"),
            ]
            self.nodes.append(
                helper.make_node(
                    "InstanceNormalization",
                    [act_out, f"{layer.name}/norm_scale", f"{layer.name}/norm_shift"],
                    [layer.name],
                    name=f"{layer.name}/norm",
                    epsilon=NORM_EPSILON,
                )
            )
        return filters


def _used_weight_names(model: TfjsModel) -> set[str]:
    used: set[str] = set()
    for layer in model.layers:
        if layer.class_name == "Conv3D":
            used.add(f"{layer.name}/kernel")
            if layer.config.get("use_bias", True):
                used.add(f"{layer.name}/bias")
    return used


def to_onnx(
    model: TfjsModel,
    *,
    reverse_spatial: bool = False,
    input_name: str = "input",
    output_name: str = "logits",
    graph_name: str = "tfjs_model",
    doc: str = "",
) -> onnx.ModelProto:
    """Build the ONNX graph: input (N, C, X, Y, Z) -> output (N, K, X, Y, Z), both in radai axis order."""
    unused = sorted(set(model.weights) - _used_weight_names(model))
    if unused:
        raise TfjsConversionError(f"weights not used by any layer (the conversion would drop them): {unused}")
    g = _GraphBuilder()
    current = input_name
    if reverse_spatial:
        g.nodes.append(
            helper.make_node("Transpose", [input_name], ["input_kji"], name="to_kji", perm=_SPATIAL_REVERSE)
        )
        current = "input_kji"
    channels = model.input_channels
    for layer in model.layers[1:]:
        if layer.class_name == "Conv3D":
            channels = g.conv3d(layer, model.weights, current, channels)
        else:  # Activation
            g.activation(str(layer.config.get("activation") or "linear"), current, layer.name)
        current = layer.name
    if reverse_spatial:
        g.nodes.append(
            helper.make_node("Transpose", [current], [output_name], name="to_ijk", perm=_SPATIAL_REVERSE)
        )
    else:
        g.nodes.append(helper.make_node("Identity", [current], [output_name], name="output"))
    keeps_size = all(
        layer.config.get("padding") == "same" for layer in model.layers if layer.class_name == "Conv3D"
    )
    out_dims = ["X", "Y", "Z"] if keeps_size else ["X_out", "Y_out", "Z_out"]
    graph = helper.make_graph(
        g.nodes,
        graph_name,
        [
            helper.make_tensor_value_info(
                input_name, TensorProto.FLOAT, ["N", model.input_channels, "X", "Y", "Z"]
            )
        ],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", channels, *out_dims])],
        initializer=g.initializers,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="radai.model_zoo.tfjs",
        doc_string=doc,
    )
    onnx_model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def convert(
    model_dir: Path, out_file: Path, *, reverse_spatial: bool = False, doc: str = ""
) -> onnx.ModelProto:
    """Convert `model_dir` (model.json + shards) and write the ONNX model to `out_file`."""
    model = to_onnx(
        load_tfjs_model(model_dir), reverse_spatial=reverse_spatial, graph_name=model_dir.name, doc=doc
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(model.SerializeToString())
    return model
