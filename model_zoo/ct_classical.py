"""Classical CT body / lung / bone segmentation expressed as an ONNX graph.

Not a trained network: Hounsfield thresholds plus binary morphology, built node by node with
`onnx.helper` so that radai runs it through the same runtime, scheduler and sliding window as neural
networks. Masks are float 0/1 tensors; dilation is MaxPool, erosion is -MaxPool(-x) (MaxPool ignores its
pads, so the array border neither erodes nor dilates), AND is Mul, OR is Max, "inside the body" is CumSum
forward and backward along both in-plane axes. `model_zoo.ct_reference` is the scipy twin used by tests.

Regenerate the package (model, card, reference I/O) with
`python -m model_zoo.ct_classical --out model_zoo/ct_body_classical`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "scores"

Kernel = tuple[int, int, int]


@dataclass(frozen=True)
class CtParams:
    """Thresholds (HU) and structuring-element sizes (voxels at the card spacing, X, Y, Z)."""

    hu_min: float = -1024.0  # input 0.0 (card normalisation a_min)
    hu_max: float = 3071.0  # input 1.0 (card normalisation a_max)
    tissue_hu: float = -500.0  # anything denser is patient (or table, blanket...)
    body_open: Kernel = (5, 5, 1)  # 12.5 mm: drops the table shell, blankets, lines
    wall_erode: Kernel = (7, 7, 1)  # lungs lie >= 7.5 mm inside the body outline
    lung_hu: float = -400.0  # aerated lung (parenchyma about -850)
    lung_seed: Kernel = (9, 9, 3)  # a lung seed is >= 22.5 mm wide in-plane over 3 slices
    lung_grow_steps: int = 32  # 6-connected reconstruction steps from the seeds (80 mm in-plane)
    lung_close: Kernel = (5, 5, 1)  # fills vessels narrower than 12.5 mm inside the lung
    bone_hu: float = 250.0  # cortical and most trabecular bone
    bone_min_neighbours: int = 4  # bone voxels in the 3x3x3 neighbourhood (itself included)


class _Graph:
    """Collects nodes and constants; every helper returns the name of its output tensor."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, value: float | int, dtype: type = np.float32) -> str:
        name = self._name("c")
        self.inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: object) -> str:
        result = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [result], **attrs))
        return result

    def threshold(self, x: str, value: float, above: bool) -> str:
        cmp = self.op("Greater" if above else "Less", x, self.const(value))
        return self.op("Cast", cmp, to=TensorProto.FLOAT)

    def _pool(self, x: str, kernel: Kernel) -> str:
        pads = [k // 2 for k in kernel] * 2
        return self.op("MaxPool", x, kernel_shape=list(kernel), pads=pads, strides=[1, 1, 1])

    def dilate(self, x: str, kernel: Kernel) -> str:
        """Box dilation, separable: one MaxPool per axis whose size is above 1."""
        for axis, size in enumerate(kernel):
            if size > 1:
                one = [1, 1, 1]
                one[axis] = size
                x = self._pool(x, (one[0], one[1], one[2]))
        return x

    def erode(self, x: str, kernel: Kernel) -> str:
        return self.op("Neg", self.dilate(self.op("Neg", x), kernel))

    def between(self, x: str, axis: int) -> str:
        """1 where the mask holds somewhere at or before and at or after along `axis`."""
        ax = self.const(axis, np.int64)
        fwd = self.threshold(self.op("CumSum", x, ax), 0.5, above=True)
        rev = self.threshold(self.op("CumSum", x, ax, reverse=1), 0.5, above=True)
        return self.op("Mul", fwd, rev)

    def grow(self, seed: str, within: str, steps: int) -> str:
        """Geodesic dilation (6-connected) of `seed` inside `within`, a fixed number of steps."""
        for _ in range(steps):
            grown = self.op(
                "Max", seed, self._pool(seed, (3, 1, 1)), self._pool(seed, (1, 3, 1)), self._pool(seed, (1, 1, 3))
            )
            seed = self.op("Min", grown, within)
        return seed


def build_model(params: CtParams = CtParams()) -> onnx.ModelProto:
    """The ONNX model: input (N, 1, X, Y, Z) normalised CT -> scores (N, 4, X, Y, Z), one-hot."""
    g = _Graph()
    one = g.const(1.0)
    # Undo the card normalisation: HU = x * (a_max - a_min) + a_min.
    hu = g.op("Add", g.op("Mul", INPUT_NAME, g.const(params.hu_max - params.hu_min)), g.const(params.hu_min))
    tissue = g.threshold(hu, params.tissue_hu, above=True)
    body = g.dilate(g.erode(tissue, params.body_open), params.body_open)
    # Inside the body = body tissue on both sides along both in-plane axes (fills lungs, bowel...).
    filled = g.op("Mul", g.between(body, 2), g.between(body, 3), out="body_filled")
    inner = g.erode(filled, params.wall_erode)
    candidate = g.op("Mul", g.threshold(hu, params.lung_hu, above=False), inner)
    seed = g.erode(candidate, params.lung_seed)
    lung = g.grow(seed, candidate, params.lung_grow_steps)
    lung = g.op("Mul", g.erode(g.dilate(lung, params.lung_close), params.lung_close), filled)
    bone_raw = g.op("Mul", g.threshold(hu, params.bone_hu, above=True), filled)
    share = g.op("AveragePool", bone_raw, kernel_shape=[3, 3, 3], pads=[1] * 6, count_include_pad=1)
    enough = g.threshold(share, (params.bone_min_neighbours - 0.5) / 27.0, above=True)
    bone = g.op("Mul", bone_raw, enough, out="bone")
    lung = g.op("Mul", lung, g.op("Sub", one, bone), out="lung")
    soft = g.op("Sub", g.op("Sub", filled, bone), lung, out="body")
    background = g.op("Sub", one, filled, out="background")
    g.op("Concat", background, soft, lung, bone, out=OUTPUT_NAME, axis=1)

    x_info = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 1, "X", "Y", "Z"])
    y_info = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 4, "X", "Y", "Z"])
    graph = helper.make_graph(g.nodes, "ct_body_classical", [x_info], [y_info], initializer=g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="radai.model_zoo.ct_classical",
        doc_string="Classical CT body/lung/bone segmentation (thresholds + morphology). Not a trained "
        "network. Not for clinical use.",
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
