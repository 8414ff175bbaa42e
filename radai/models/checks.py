"""Registration checks of a model package beyond its card: the ONNX graph (checker, tensor names, ranks, channel
counts, element types, batch axis) against what the card declares.

Only the graph's structure is read here (`onnx.load` parses protobuf; nothing is executed or unpickled); the
test inference on the reference input is `registry.reference_check`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from radai.errors import ModelPackageError
from radai.models.manifest import ModelCard

_FLOAT_TYPES = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16}


def _dims(value_info: Any) -> list[int | str]:
    """Each dimension as an int, its symbolic name, or "?" when unnamed."""
    dims: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return dims


def _load(path: Path, key: str) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have no common base class
        raise ModelPackageError(f"{key}: {path.name} is not an ONNX model ({exc})") from exc
    if model.graph.ByteSize() == 0:
        raise ModelPackageError(f"{key}: {path.name} is not an ONNX model (empty graph)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ModelPackageError(
            f"{key}: {path.name} keeps weights in external files; embed them in the model"
        )
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ModelPackageError(f"{key}: ONNX checker: {str(exc).splitlines()[0]}") from exc
    return model


def check_onnx(path: Path, card: ModelCard) -> None:
    """The graph passes the ONNX checker and its one real input and named output match the card:
    (N, C, X, Y, Z) with C = input.channels, K = output.channels, the card's precision, a batch axis that
    takes `runtime.max_batch` patches, spatial axes that take the card's patch (or any size for `whole`)."""
    key = card.key
    model = _load(path, key)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelPackageError(f"{key}: the graph must have exactly one input, has {len(inputs)}")
    (graph_in,) = inputs
    if graph_in.name != card.input.name:
        raise ModelPackageError(f"{key}: input is named {graph_in.name!r}, the card says {card.input.name!r}")
    outputs = {o.name: o for o in model.graph.output}
    if card.output.name not in outputs:
        raise ModelPackageError(
            f"{key}: no output named {card.output.name!r} (graph outputs: {', '.join(outputs)})"
        )
    graph_out = outputs[card.output.name]
    want_type = _FLOAT_TYPES[card.runtime.precision]
    for what, info in (("input", graph_in), ("output", graph_out)):
        elem = info.type.tensor_type.elem_type
        if elem != want_type:
            raise ModelPackageError(
                f"{key}: {what} {info.name!r} has element type {onnx.TensorProto.DataType.Name(elem)}, "
                f"the card's precision {card.runtime.precision} needs "
                f"{onnx.TensorProto.DataType.Name(want_type)}"
            )
    in_dims, out_dims = _dims(graph_in), _dims(graph_out)
    for what, dims, channels in (
        ("input", in_dims, card.input.channels),
        ("output", out_dims, card.output.channels),
    ):
        if len(dims) != 5:
            raise ModelPackageError(f"{key}: {what} must be 5-D (N, C, X, Y, Z), the graph has shape {dims}")
        if isinstance(dims[1], int) and dims[1] != channels:
            raise ModelPackageError(
                f"{key}: {what} has {dims[1]} channels, the card says {channels} (shape {dims})"
            )
        batch = dims[0]
        if isinstance(batch, int) and batch < card.runtime.max_batch:
            raise ModelPackageError(
                f"{key}: {what} batch axis is fixed at {batch}, below runtime.max_batch "
                f"{card.runtime.max_batch}; export with a dynamic batch axis"
            )
    patch = card.input.patch_size
    for axis, dim in enumerate(in_dims[2:]):
        if not isinstance(dim, int):
            continue
        if patch == "whole":
            raise ModelPackageError(
                f"{key}: input spatial axes are fixed ({in_dims[2:]}), a `whole`-volume card needs dynamic ones"
            )
        if dim != patch[axis]:
            raise ModelPackageError(
                f"{key}: input shape {in_dims} does not take the card's patch {list(patch)}"
            )
