"""Build the `brain-tissue` package from brainchop's published MeshNet weights (model5_gw_ae, MIT).

    python -m model_zoo.build_brain_tissue [--source DIR] [--sample NIFTI] [--out DIR] [--full-check]

Writes model.onnx (converted by `model_zoo.tfjs`), model.yaml (validated against the card schema),
reference/input.npy + reference/output.npy (a 32^3 crop of the real sample T1 and the ONNX output for it) and
LICENSE. `--full-check` also runs the whole conformed sample through ONNX Runtime and through the independent
NumPy implementation and prints their agreement and the tissue volumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import onnxruntime as ort
import yaml
from nibabel.processing import conform
from numpy.typing import NDArray
from pydicom.sr.codedict import codes

from model_zoo.meshnet_reference import MeshNetReference, brainchop_layout, from_brainchop_layout
from model_zoo.tfjs import convert
from radai.models.manifest import ModelCard, QuantileNorm, sha256_file

ROOT = Path(__file__).resolve().parents[1]
BRAINCHOP = ROOT.parent / "shared" / "models" / "brainchop"
DEFAULT_SOURCE = BRAINCHOP / "model5_gw_ae"
DEFAULT_SAMPLE = BRAINCHOP / "t1_crop.nii.gz"
DEFAULT_OUT = ROOT / "model_zoo" / "brain_tissue"
UPSTREAM = "neuroneural/brainchop @4c87885, public/models/model5_gw_ae"

CONFORM_SHAPE = (256, 256, 256)
ORIENTATION = "LIA"
# brainchop: niivue's conform scales to uint8 with FreeSurfer's getscale (upper limit at 99.9 % of the
# histogram), then the model entry (enableQuantileNorm: false) min-max normalises to 0..1. In card terms:
# min -> 0, 99.9th percentile -> 1, clipped.
INTENSITY = QuantileNorm(kind="quantile", lower=0.0, upper=0.999, to_uint8_first=True)
# A 32^3 crop of the sample (cortex and white matter). Run alone it has too little context for a good
# segmentation (the receptive field is 93 voxels wide), but its logits are a fine numerical fingerprint.
REFERENCE_CORNER = (80, 160, 48)
REFERENCE_SIZE = 32


def conform_sample(path: Path) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Resample to 256^3, 1 mm, LIA (linear), as brainchop's conform does; returns (volume, affine)."""
    img: Any = nib.load(path)
    make_image: Any = nib.Nifti1Image  # nibabel's annotations are partial; keep its untyped calls contained
    resample: Any = conform
    as_float = make_image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    out = resample(
        as_float, out_shape=CONFORM_SHAPE, voxel_size=(1.0, 1.0, 1.0), order=1, orientation=ORIENTATION
    )
    return np.asarray(out.dataobj, dtype=np.float32), np.asarray(out.affine, dtype=np.float64)


def normalise(volume: NDArray[np.float32], norm: QuantileNorm = INTENSITY) -> NDArray[np.float32]:
    """The card's intensity step: min-max to 0..255, then (x - q_lower) / (q_upper - q_lower), clipped to 0..1
    when the card says so."""
    x = volume.astype(np.float64)
    if norm.to_uint8_first:
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12) * 255.0
    lo, hi = np.quantile(x, [norm.lower, norm.upper])
    scaled = (x - lo) / max(float(hi - lo), 1e-12)
    out: NDArray[np.float32] = (np.clip(scaled, 0.0, 1.0) if norm.clip else scaled).astype(np.float32)
    return out


def run_onnx(model_file: Path, x: NDArray[np.float32]) -> NDArray[np.float32]:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    out: NDArray[np.float32] = session.run(["logits"], {"input": x})[0]
    return out


class _CardDumper(yaml.SafeDumper):
    """Lists of scalars in flow style ([1.0, 1.0, 1.0]), everything else in block style."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(v, dict | list) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_CardDumper.add_representer(list, _represent_list)


# brainchop draws white matter white; over a T1 image, where white matter is the brightest tissue, a white
# overlay is invisible in any viewer, so the card gives it a blue that shows on it.
WHITE_MATTER_COLOUR = [64, 150, 255]


def _card(source: Path, sha256: str) -> dict[str, Any]:
    colours = json.loads((source / "colormap3.json").read_text(encoding="utf-8"))
    anatomy = codes.SCT.AnatomicalStructure

    def code(c: Any) -> dict[str, str]:
        return {"scheme": "SCT", "value": str(c.value), "meaning": str(c.meaning)}

    def rgb(i: int) -> list[int]:
        return [int(colours["R"][i]), int(colours["G"][i]), int(colours["B"][i])]

    raw = {
        "id": "brain-tissue",
        "version": "1.0.0",
        "name": "Brain tissue: white and grey matter (MeshNet, brainchop weights)",
        "task": "segmentation",
        "kind": "published-weights",
        "modality": "MR",
        "body_part": "BRAIN",
        "series_selection": [{"modality": ["MR"], "min_slices": 20}],
        "input": {
            "name": "input",
            "channels": 1,
            "spacing": [1.0, 1.0, 1.0],
            "orientation": ORIENTATION,
            "intensity": INTENSITY.model_dump(mode="json"),
            "patch_size": list(CONFORM_SHAPE),
            "overlap": 0.0,
            "blend": "constant",
            "pad_value": 0.0,
        },
        "output": {"name": "logits", "channels": 3, "postprocess": "argmax"},
        "labels": [
            {
                "value": 1,
                "name": "White matter",
                "category": code(anatomy),
                "type": code(codes.SCT.WhiteMatter),
                "color": WHITE_MATTER_COLOUR,
            },
            {
                "value": 2,
                "name": "Grey matter",
                "category": code(anatomy),
                "type": code(codes.SCT.GrayMatter),
                "color": rgb(2),
            },
        ],
        "runtime": {
            "backend": "onnx",
            "file": "model.onnx",
            "sha256": sha256,
            "max_batch": 2,
            "precision": "fp32",
        },
        "reference": {"input": "reference/input.npy", "output": "reference/output.npy", "atol": 1e-4},
        "intended_use": (
            "Research and demonstration: white and grey matter segmentation and tissue volumes of an adult "
            "T1-weighted brain MRI, resampled to 1 mm isotropic (LIA). Not validated for any clinical decision."
        ),
        "not_for_clinical_use": True,
        "licence": "MIT",
        "provenance": (
            f"Published MeshNet weights 'Tissue GWM (light)' from {UPSTREAM} (MIT), converted from TensorFlow.js "
            "to ONNX by model_zoo.tfjs keeping every weight and bias; axes as brainchop runs it "
            "(enableTranspose: true, no spatial reversal)."
        ),
    }
    return raw


def build(source: Path, sample: Path, out: Path) -> ModelCard:
    """Regenerate the package in `out` and return its validated card."""
    (out / "reference").mkdir(parents=True, exist_ok=True)
    model_file = out / "model.onnx"
    convert(
        source,
        model_file,
        reverse_spatial=False,
        doc=f"brain-tissue 1.0.0: {UPSTREAM} (MIT), via model_zoo.tfjs",
    )
    volume, _ = conform_sample(sample)
    x0, y0, z0 = REFERENCE_CORNER
    n = REFERENCE_SIZE
    crop = normalise(volume)[x0 : x0 + n, y0 : y0 + n, z0 : z0 + n][None, None].copy()
    np.save(out / "reference" / "input.npy", crop)
    np.save(out / "reference" / "output.npy", run_onnx(model_file, crop))
    shutil.copyfile(source.parent / "LICENSE", out / "LICENSE")
    raw = _card(source, sha256_file(model_file))
    card = ModelCard.model_validate(raw)  # refuse to write a card that would not load
    header = "# Generated by `python -m model_zoo.build_brain_tissue`; edit that script, not this file.\n"
    body = yaml.dump(raw, Dumper=_CardDumper, sort_keys=False, allow_unicode=True, width=110)
    (out / "model.yaml").write_text(header + body, encoding="utf-8")
    return card


def full_check(source: Path, sample: Path, model_file: Path) -> None:
    """Whole 256^3 sample: ONNX Runtime vs the NumPy reference, and the tissue volumes (slow: minutes)."""
    volume, affine = conform_sample(sample)
    x = normalise(volume)
    t0 = time.perf_counter()
    got = run_onnx(model_file, x[None, None])
    t_onnx = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = from_brainchop_layout(
        MeshNetReference.from_tfjs(source)(brainchop_layout(x, enable_transpose=True)), enable_transpose=True
    )
    t_ref = time.perf_counter() - t0
    labels = got[0].argmax(0)
    ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    print(
        f"max |logit diff| {float(np.abs(got - ref).max()):.3g}, argmax agreement "
        f"{float((labels == ref[0].argmax(0)).mean()):.6f} (onnx {t_onnx:.1f} s, reference {t_ref:.1f} s)"
    )
    print(
        f"white matter {float((labels == 1).sum()) * ml:.1f} mL, grey matter {float((labels == 2).sum()) * ml:.1f} mL"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_zoo.build_brain_tissue", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="brainchop model5_gw_ae folder")
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="T1 NIfTI for the reference crop")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="package folder to (re)write")
    parser.add_argument(
        "--full-check", action="store_true", help="also compare on the whole sample (minutes)"
    )
    args = parser.parse_args(argv)
    for path in (args.source / "model.json", args.sample):
        if not path.is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    card = build(args.source, args.sample, args.out)
    print(f"wrote {args.out} ({card.key}, sha256 {card.runtime.sha256[:12]})")
    if args.full_check:
        full_check(args.source, args.sample, args.out / card.runtime.file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
