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

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pydicom
import yaml
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from scipy import ndimage

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "scores"
SPACING = (2.5, 2.5, 5.0)  # mm, X Y Z of the card orientation
PATCH = (256, 256, 24)  # 640 mm in-plane: one window spans any standard CT field of view
ORIENTATION = "LPS"  # X, Y in-plane, Z the slice axis; the algorithm is symmetric in X and Y
REF_CORNER = (24, 56, 32)  # reference slab origin in CRLM-CT-1004 at SPACING; holds all four classes
REF_SIZE = (64, 64, 8)
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CT = ROOT.parent / "shared" / "data" / "dicom" / "ct_abdomen_crlm" / "CRLM-CT-1004" / "image"

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
    seed_min_mean_hu: float = -930.0  # ... and not pure gas (bowel/stomach gas is about -1000)
    lung_grow_steps: int = 32  # 6-connected reconstruction steps from the seeds (80 mm in-plane)
    lung_close: Kernel = (5, 5, 1)  # fills vessels narrower than 12.5 mm inside the lung
    bone_hu: float = 250.0  # cortical and dense trabecular bone (not fatty marrow)
    bone_min_neighbours: int = 4  # bone voxels in the 3x3x3 neighbourhood (itself included)
    bone_close: Kernel = (3, 3, 1)  # bridges cortex across trabecular gaps of one voxel


DEFAULT_PARAMS = CtParams()


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

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
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
                "Max",
                seed,
                self._pool(seed, (3, 1, 1)),
                self._pool(seed, (1, 3, 1)),
                self._pool(seed, (1, 1, 3)),
            )
            seed = self.op("Min", grown, within)
        return seed


def build_model(params: CtParams = DEFAULT_PARAMS) -> onnx.ModelProto:
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
    # Seeds: wide low-density regions whose mean is above pure gas (lung parenchyma holds tissue).
    mean_hu = g.op(
        "AveragePool",
        hu,
        kernel_shape=list(params.lung_seed),
        pads=[k // 2 for k in params.lung_seed] * 2,
        count_include_pad=0,
    )
    not_gas = g.threshold(mean_hu, params.seed_min_mean_hu, above=True)
    seed = g.op("Mul", g.erode(candidate, params.lung_seed), not_gas)
    lung = g.grow(seed, candidate, params.lung_grow_steps)
    lung = g.op("Mul", g.erode(g.dilate(lung, params.lung_close), params.lung_close), filled, out="lung")
    bone_raw = g.op("Mul", g.threshold(hu, params.bone_hu, above=True), filled)
    share = g.op("AveragePool", bone_raw, kernel_shape=[3, 3, 3], pads=[1] * 6, count_include_pad=1)
    enough = g.threshold(share, (params.bone_min_neighbours - 0.5) / 27.0, above=True)
    bone = g.op("Mul", bone_raw, enough)
    bone = g.op("Mul", g.erode(g.dilate(bone, params.bone_close), params.bone_close), filled)
    bone = g.op("Mul", bone, g.op("Sub", one, lung), out="bone")  # aerated lung wins over the closing
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


def load_ct_hu(series_dir: Path) -> tuple[NDArray[np.float32], tuple[float, float, float]]:
    """A single axial CT series as HU (X=columns, Y=rows, Z=slices by position) and its spacing in mm."""
    slices = [pydicom.dcmread(path) for path in sorted(series_dir.glob("*.dcm"))]
    if len(slices) < 2:
        raise ValueError(f"{series_dir}: needs at least two slices")
    iop = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    slices.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=np.float64))))
    positions = [
        float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=np.float64))) for ds in slices
    ]
    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices], axis=-1
    )  # (rows, columns, slices)
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    return hu.transpose(1, 0, 2).astype(np.float32), (col_mm, row_mm, float(np.median(np.diff(positions))))


def resample(
    hu: NDArray[np.float32], spacing: tuple[float, float, float], target: tuple[float, float, float] = SPACING
) -> NDArray[np.float32]:
    """Crude linear resampling to `target` spacing (radai itself resamples with MONAI)."""
    out: NDArray[np.float32] = ndimage.zoom(
        hu, [s / t for s, t in zip(spacing, target, strict=True)], order=1
    )
    return out


def normalise(hu: NDArray[np.float32], params: CtParams = DEFAULT_PARAMS) -> NDArray[np.float32]:
    """The card's intensity normalisation: [hu_min, hu_max] -> [0, 1], clipped."""
    scaled = (hu - np.float32(params.hu_min)) / np.float32(params.hu_max - params.hu_min)
    out: NDArray[np.float32] = np.clip(scaled, 0.0, 1.0).astype(np.float32)
    return out


def run_model(model_bytes: bytes, batch: NDArray[np.float32]) -> NDArray[np.float32]:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    out: NDArray[np.float32] = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    return out


def card(sha256: str, params: CtParams = DEFAULT_PARAMS) -> dict[str, Any]:
    """The model.yaml content (validated by radai.models.manifest.ModelCard)."""

    def label(value: int, name: str, code: str, meaning: str, color: list[int]) -> dict[str, Any]:
        return {
            "value": value,
            "name": name,
            "category": {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"},
            "type": {"scheme": "SCT", "value": code, "meaning": meaning},
            "color": color,
        }

    return {
        "id": "ct-body-classical",
        "version": "1.0.0",
        "name": "CT body, lung and bone (classical thresholds and morphology, not a trained network)",
        "task": "segmentation",
        "kind": "classical-algorithm",
        "modality": "CT",
        "body_part": "CHEST/ABDOMEN/PELVIS",
        "series_selection": [{"modality": ["CT"], "orientation": "axial", "min_slices": 10}],
        "input": {
            "name": INPUT_NAME,
            "channels": 1,
            "spacing": list(SPACING),
            "orientation": ORIENTATION,
            "intensity": {
                "kind": "range",
                "a_min": params.hu_min,
                "a_max": params.hu_max,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
            # The body fill looks for tissue on both sides along X and Y, so one window must span the
            # whole in-plane field of view: 256 x 2.5 mm = 640 mm (wider than any standard CT FOV).
            "patch_size": list(PATCH),
            "overlap": 0.25,
            "blend": "gaussian",
            "pad_value": 0.0,
        },
        "output": {"name": OUTPUT_NAME, "channels": 4, "postprocess": "argmax"},
        "labels": [
            label(1, "Body (soft tissue)", "87784001", "Soft tissue", [222, 184, 135]),
            label(2, "Lung", "39607008", "Lung", [70, 140, 230]),
            label(3, "Bone", "272673000", "Bone", [241, 214, 145]),
        ],
        "runtime": {
            "backend": "onnx",
            "file": "model.onnx",
            "sha256": sha256,
            "max_batch": 4,
            "precision": "fp32",
        },
        "reference": {"input": "reference/input.npy", "output": "reference/output.npy", "atol": 1e-4},
        "intended_use": (
            "Demonstration and integration testing of radai on real CT: coarse overlays of the body "
            "outline, aerated lung and dense bone on axial CT of the trunk. A classical algorithm "
            "(Hounsfield thresholds and morphology), not a trained network. Not a medical device; not for "
            "clinical use. Known confusions: large bowel or stomach gas with lung tissue-like density may be "
            "labelled lung; oral or excreted contrast, dense vessels, calcifications and metal are "
            "labelled bone; a thick patient table may be labelled body."
        ),
        "not_for_clinical_use": True,
        "licence": (
            "Apache-2.0 (algorithm and generated ONNX graph). Reference arrays derive from TCIA "
            "Colorectal-Liver-Metastases CRLM-CT-1004, CC BY 4.0 (Simpson et al. 2023, "
            "doi:10.7937/QXK2-QG03)."
        ),
        "provenance": (
            "No training and no learned weights. ONNX graph (opset 17) written node by node with onnx.helper "
            "by `python -m model_zoo.ct_classical --out model_zoo/ct_body_classical`; checked against an "
            "independent scipy.ndimage implementation (model_zoo/ct_reference.py) on real CT. Reference "
            f"input: a {'x'.join(map(str, REF_SIZE))} slab of CRLM-CT-1004 resampled to {SPACING} mm and "
            "normalised; reference output: ONNX Runtime (CPU) on that slab."
        ),
    }


def write_package(out_dir: Path, ct_dir: Path = DEFAULT_CT) -> None:
    """Write model.onnx, reference/input.npy, reference/output.npy and model.yaml into `out_dir`."""
    model_bytes = build_model().SerializeToString()
    (out_dir / "reference").mkdir(parents=True, exist_ok=True)
    (out_dir / "model.onnx").write_bytes(model_bytes)
    hu, spacing = load_ct_hu(ct_dir)
    volume = normalise(resample(hu, spacing))
    x, y, z = REF_CORNER
    sx, sy, sz = REF_SIZE
    slab = np.ascontiguousarray(volume[None, None, x : x + sx, y : y + sy, z : z + sz])
    np.save(out_dir / "reference" / "input.npy", slab)
    np.save(out_dir / "reference" / "output.npy", run_model(model_bytes, slab))
    text = yaml.safe_dump(
        card(hashlib.sha256(model_bytes).hexdigest()), sort_keys=False, width=110, default_flow_style=None
    )
    (out_dir / "model.yaml").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="package directory to (re)write")
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT, help="CT series for the reference slab")
    args = parser.parse_args(argv)
    write_package(args.out, args.ct)


if __name__ == "__main__":
    main()
