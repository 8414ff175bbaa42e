"""An independent NumPy implementation of brainchop's MeshNet layers, for checking the ONNX conversion.

It shares no code with `model_zoo.tfjs`: it parses model.json itself, streams the weights out of the shards
with its own reader, and runs the layers the way tfjs does, on channels-last tensors (N, D, H, W, C), in
float64 so that it serves as the exact side of a parity check. Dilated 'same' convolution is written out as a
sum over kernel taps of shifted views times a (Cin, Cout) matrix: slow, but obviously right.

`brainchop_layout` / `from_brainchop_layout` reproduce how brainchop's JavaScript turns a NIfTI volume into the
tfjs input tensor and back (`getAllSlicesDataAsTF3D`, then `tensor.transpose()` when the model entry has
`enableTranspose: true`), so the parity test checks the axis convention as well as the arithmetic.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray
from scipy.special import erf

F64 = NDArray[np.float64]


def _gelu(x: F64) -> F64:
    out: F64 = x * 0.5 * (1.0 + erf(x / np.sqrt(2.0)))
    return out


ACTIVATIONS: dict[str, Callable[[F64], F64]] = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "elu": lambda x: np.where(x > 0.0, x, np.expm1(np.minimum(x, 0.0))),
    "gelu": _gelu,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
}


@dataclass(frozen=True, eq=False)
class Conv:
    kernel: F64  # (kD, kH, kW, Cin, Cout), tfjs layout
    bias: F64 | None
    dilation: tuple[int, int, int]
    same: bool
    activation: str
    instance_norm: bool  # brainchop's LayerNormInPlace after layers named "*_gn"


@dataclass(frozen=True)
class Act:
    activation: str


class _ShardStream:
    """Reads consecutive bytes across the shard files of one manifest group, in order."""

    def __init__(self, files: list[Path]) -> None:
        self._files: Iterator[Path] = iter(files)
        self._current: BinaryIO | None = None

    def read(self, n: int) -> bytes:
        chunks: list[bytes] = []
        while n > 0:
            if self._current is None:
                nxt = next(self._files, None)
                if nxt is None:
                    raise ValueError("weight shards end before the manifest does")
                self._current = nxt.open("rb")
            chunk = self._current.read(n)
            if not chunk:
                self._current.close()
                self._current = None
                continue
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def exhausted(self) -> bool:
        return self._read_rest() == b""

    def _read_rest(self) -> bytes:
        data = b""
        while True:
            if self._current is None:
                nxt = next(self._files, None)
                if nxt is None:
                    return data
                self._current = nxt.open("rb")
            data += self._current.read()
            self._current.close()
            self._current = None


def load_weights(model_dir: Path) -> dict[str, F64]:
    spec = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    out: dict[str, F64] = {}
    for group in spec["weightsManifest"]:
        stream = _ShardStream([model_dir / p for p in group["paths"]])
        for w in group["weights"]:
            if w.get("dtype") != "float32" or "quantization" in w:
                raise ValueError(f"{w['name']}: only plain float32 weights are handled")
            count = int(np.prod(w["shape"], dtype=np.int64))
            raw = stream.read(4 * count)
            out[w["name"]] = np.frombuffer(raw, dtype="<f4").astype(np.float64).reshape(w["shape"])
        if not stream.exhausted():
            raise ValueError("weight shards hold more bytes than the manifest describes")
    return out


def _conv(x: F64, layer: Conv) -> F64:
    """Dilated 3-D convolution, stride 1, channels last, TensorFlow 'same' or 'valid' padding."""
    k = layer.kernel.shape[:3]
    d = layer.dilation
    if layer.same:
        total = [(k[a] - 1) * d[a] for a in range(3)]
        pad = [(0, 0)] + [(t // 2, t - t // 2) for t in total] + [(0, 0)]
        x = np.pad(x, pad)
    out_shape = [x.shape[1 + a] - (k[a] - 1) * d[a] for a in range(3)]
    out = np.zeros((x.shape[0], *out_shape, layer.kernel.shape[4]), dtype=np.float64)
    for a in range(k[0]):
        for b in range(k[1]):
            for c in range(k[2]):
                view = x[
                    :,
                    a * d[0] : a * d[0] + out_shape[0],
                    b * d[1] : b * d[1] + out_shape[1],
                    c * d[2] : c * d[2] + out_shape[2],
                    :,
                ]
                out += view @ layer.kernel[a, b, c]
    if layer.bias is not None:
        out += layer.bias
    result: F64 = ACTIVATIONS[layer.activation](out)
    if layer.instance_norm:
        mean = result.mean(axis=(1, 2, 3), keepdims=True)
        var = ((result - mean) ** 2).mean(axis=(1, 2, 3), keepdims=True)
        result = (result - mean) / np.sqrt(var + 1e-5)
    return result


class MeshNetReference:
    """The tfjs model as a NumPy function on channels-last float64 tensors."""

    def __init__(self, layers: list[Conv | Act]) -> None:
        self.layers = layers

    @classmethod
    def from_tfjs(cls, model_dir: Path) -> MeshNetReference:
        spec: dict[str, Any] = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
        weights = load_weights(model_dir)
        layers: list[Conv | Act] = []
        for entry in spec["modelTopology"]["model_config"]["config"]["layers"]:
            cfg = entry["config"]
            if entry["class_name"] == "InputLayer":
                continue
            if entry["class_name"] == "Activation":
                layers.append(Act(cfg["activation"]))
            elif entry["class_name"] == "Conv3D":
                name = cfg["name"]
                layers.append(
                    Conv(
                        kernel=weights.pop(f"{name}/kernel"),
                        bias=weights.pop(f"{name}/bias") if cfg["use_bias"] else None,
                        dilation=tuple(cfg["dilation_rate"]),
                        same=cfg["padding"] == "same",
                        activation=cfg.get("activation") or "linear",
                        instance_norm=name.endswith("_gn"),
                    )
                )
            else:
                raise ValueError(f"reference does not implement {entry['class_name']}")
        if weights:
            raise ValueError(f"weights left unused: {sorted(weights)}")
        return cls(layers)

    def __call__(self, x: NDArray[np.floating[Any]]) -> F64:
        """(N, D, H, W, C) -> (N, D, H, W, K)."""
        out = np.asarray(x, dtype=np.float64)
        for layer in self.layers:
            out = _conv(out, layer) if isinstance(layer, Conv) else ACTIVATIONS[layer.activation](out)
        return out


def brainchop_layout(volume_ijk: NDArray[np.floating[Any]], *, enable_transpose: bool) -> F64:
    """(X, Y, Z) volume -> the tfjs input (1, D, H, W, 1) brainchop builds from the same NIfTI voxels."""
    x, y, z = volume_ijk.shape
    flat = np.asarray(volume_ijk, dtype=np.float64).ravel(order="F")  # the NIfTI buffer, i fastest
    slices = flat.reshape(z, y, x)  # getAllSlicesDataAsTF3D: stack of z slices of (rows=j, cols=i)
    if enable_transpose:
        slices = slices.transpose()  # tf.transpose without perm reverses every axis
    out: F64 = slices[None, ..., None]
    return out


def from_brainchop_layout(out: F64, *, enable_transpose: bool) -> F64:
    """tfjs output (1, D, H, W, K) -> (1, K, X, Y, Z), undoing `brainchop_layout`."""
    per_class = np.moveaxis(out[0], -1, 0)  # (K, D, H, W)
    if enable_transpose:
        per_class = per_class.transpose(0, 3, 2, 1)  # back to (K, k, j, i) as brainchop transposes back
    _, nz, ny, nx = per_class.shape
    # Each class map written out row-major over (k, j, i) is a NIfTI buffer (i fastest); read it as (X, Y, Z).
    maps = [m.ravel().reshape(nx, ny, nz, order="F") for m in per_class]
    result: F64 = np.stack(maps)[None]
    return result
