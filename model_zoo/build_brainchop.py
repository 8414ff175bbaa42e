"""Build the catalogue packages of brainchop's larger MeshNet weights (MIT): subcortical, parcellation, brain mask.

    python -m model_zoo.build_brainchop [--only NAME] [--source DIR] [--sample NIFTI] [--out DIR] [--full-check]

For each model writes `<out>/<package>/`: model.onnx (converted by `model_zoo.tfjs`), model.yaml (validated
against the card schema), reference/input.npy + reference/output.npy (a 32^3 crop of the real sample T1,
conformed and normalised as the card says, and the ONNX output for it), LICENSE and README.md.
`--full-check` also compares ONNX Runtime with the independent float64 NumPy implementation
(`model_zoo.meshnet_reference`) on the reference crop and on the centred 128^3 of the conformed sample, and
prints the figures that README.md quotes (minutes: one thread, float64 reference).
These packages are shipped but not served by default: `radai models add model_zoo/catalogue/<package>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import yaml
from numpy.typing import NDArray

from model_zoo.brainchop_labels import BRAIN_MASK, PARCELLATION, SUBCORTICAL, LabelSpec, coded
from model_zoo.brainchop_readme import readme
from model_zoo.build_brain_tissue import (
    BRAINCHOP,
    CONFORM_SHAPE,
    DEFAULT_SAMPLE,
    INTENSITY,
    ORIENTATION,
    WHITE_MATTER_COLOUR,
    _CardDumper,
    conform_sample,
    normalise,
)
from model_zoo.meshnet_reference import MeshNetReference, brainchop_layout, from_brainchop_layout
from model_zoo.tfjs import convert
from radai.models.manifest import ModelCard, QuantileNorm, sha256_file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "model_zoo" / "catalogue"
COMMIT = "4c87885"
REFERENCE_SIZE = 32
PARITY_CROP = (slice(64, 192),) * 3  # centred 128^3 of the conformed 256^3 sample
F32 = NDArray[np.float32]

# brainchop's `enableQuantileNorm: true` maps the uint8-conformed volume's 5th..95th percentile to 0..1
# WITHOUT clipping (quantileNormalizeVolumeData); the card says the same with `clip: false`.
QUANTILE_5_95 = QuantileNorm(kind="quantile", lower=0.05, upper=0.95, to_uint8_first=True, clip=False)


@dataclass(frozen=True)
class ModelSpec:
    """One brainchop model and the package built from it."""

    folder: str  # under public/models/ upstream and under ../shared/models/brainchop here
    package: str  # folder under model_zoo/catalogue/
    model_id: str
    name: str
    upstream_name: str  # the entry's modelName in brainchop's model list
    labels: tuple[LabelSpec, ...]
    intensity: QuantileNorm
    reference_corner: tuple[int, int, int]
    intended_use: str
    provenance_note: str
    largest_component: bool = False  # keep only the largest connected component of each label


SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        folder="model30chan18cls",
        package="brain_subcortical",
        model_id="brain-subcortical",
        name="Brain subcortical structures, 17 classes (MeshNet, brainchop weights)",
        upstream_name="Subcortical + GWM",
        labels=SUBCORTICAL,
        intensity=INTENSITY,  # entry has enableQuantileNorm: false -> min-max of the uint8 volume
        reference_corner=(96, 72, 64),  # cortex and white matter: classes even without context
        intended_use=(
            "Research and demonstration: cerebral white matter, cortex, ventricles and deep grey matter "
            "structures of an adult T1-weighted brain MRI, resampled to 1 mm isotropic (LIA). Not validated "
            "for any clinical decision."
        ),
        provenance_note="entry enableQuantileNorm: false",
    ),
    ModelSpec(
        folder="model30chan50cls",
        package="brain_parcellation",
        model_id="brain-parcellation",
        name="Brain parcellation, 49 classes, Desikan-Killiany (MeshNet, brainchop weights)",
        upstream_name="Aparc+Aseg 50",
        labels=PARCELLATION,
        intensity=QUANTILE_5_95,  # entry has enableQuantileNorm: true (5th..95th percentile)
        reference_corner=(72, 144, 112),  # white matter, cerebellum and several cortical parcels
        intended_use=(
            "Research and demonstration: parcellation of an adult T1-weighted brain MRI, resampled to 1 mm "
            "isotropic (LIA), into FreeSurfer aparc+aseg regions with left and right merged. Not validated "
            "for any clinical decision."
        ),
        provenance_note="entry enableQuantileNorm: true (5th..95th percentile, not clipped)",
    ),
    ModelSpec(
        folder="mindgrab",
        package="brain_mask",
        model_id="brain-mask",
        name="Brain mask / skull stripping (MindGrab MeshNet, brainchop weights)",
        upstream_name="omnimodal Skull Stripping (mindgrab)",
        labels=BRAIN_MASK,
        # Every convolution is followed by an instance norm, so an affine intensity map makes no difference;
        # this is brainchop's uint8 conform without its quantile step, which clipping would distort.
        intensity=INTENSITY,
        reference_corner=(80, 160, 48),  # cortex and white matter (the brain-tissue package's crop)
        intended_use=(
            "Research and demonstration: brain mask (skull stripping) of an adult T1-weighted brain MRI, "
            "resampled to 1 mm isotropic (LIA). Not validated for any clinical decision."
        ),
        provenance_note="the final layer's bias kept, unlike brainchop-cli's Python loader",
        largest_component=True,  # brainchop keeps the largest component: one brain, no islands in the skull
    ),
)


def upstream(spec: ModelSpec) -> str:
    return f"neuroneural/brainchop @{COMMIT}, public/models/{spec.folder}"


def doc_string(spec: ModelSpec) -> str:
    """The ONNX doc string; a fresh conversion with it reproduces model.onnx byte for byte."""
    return f"{spec.model_id} 1.0.0: {upstream(spec)} (MIT), via model_zoo.tfjs"


def _colour(rgb: list[int]) -> list[int]:
    # brainchop draws white matter (and the mask) near-white: invisible over a T1 image, where white matter is
    # the brightest tissue. Same choice as the brain-tissue package: that blue instead.
    return list(WHITE_MATTER_COLOUR) if min(rgb) >= 240 else rgb


def labels(spec: ModelSpec, source: Path) -> list[dict[str, Any]]:
    """Card labels in output-channel order, checked against colormap.json's names (channel 0 = background)."""
    colours = json.loads((source / "colormap.json").read_text(encoding="utf-8"))
    names = [str(n) for n in colours["labels"]]
    if names[1:] != [lab.source for lab in spec.labels]:
        raise ValueError(f"{spec.folder}: colormap.json labels {names[1:]} do not match the label table")
    out: list[dict[str, Any]] = []
    for value, lab in enumerate(spec.labels, start=1):
        category, kind = coded(lab)
        rgb = [int(colours[c][value]) for c in ("R", "G", "B")]
        out.append(
            {"value": value, "name": lab.name, "category": category, "type": kind, "color": _colour(rgb)}
        )
    return out


def card(spec: ModelSpec, source: Path, sha256: str) -> dict[str, Any]:
    return {
        "id": spec.model_id,
        "version": "1.0.0",
        "name": spec.name,
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
            "intensity": spec.intensity.model_dump(mode="json"),
            "patch_size": list(CONFORM_SHAPE),
            "overlap": 0.0,
            "blend": "constant",
            "pad_value": 0.0,
        },
        "output": {
            "name": "logits",
            "channels": len(spec.labels) + 1,
            "postprocess": "argmax",
            **({"components": {"largest_only": True}} if spec.largest_component else {}),
        },
        "labels": labels(spec, source),
        "runtime": {
            "backend": "onnx",
            "file": "model.onnx",
            "sha256": sha256,
            "max_batch": 1,
            "precision": "fp32",
        },
        "reference": {"input": "reference/input.npy", "output": "reference/output.npy", "atol": 1e-3},
        "intended_use": spec.intended_use,
        "not_for_clinical_use": True,
        "licence": "MIT",
        "provenance": (
            f"Published MeshNet weights '{spec.upstream_name}' from {upstream(spec)} (MIT), converted from "
            "TensorFlow.js to ONNX by model_zoo.tfjs keeping every weight and bias; axes as brainchop runs it "
            f"(enableTranspose: true, no spatial reversal); {spec.provenance_note}."
        ),
    }


def run_onnx(model_file: Path, x: F32, threads: int = 0) -> F32:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    out: F32 = session.run(["logits"], {"input": x})[0]
    return out


def reference_crop(spec: ModelSpec, normalised: F32) -> F32:
    x0, y0, z0 = spec.reference_corner
    n = REFERENCE_SIZE
    crop: F32 = normalised[x0 : x0 + n, y0 : y0 + n, z0 : z0 + n][None, None].copy()
    return crop


def build(spec: ModelSpec, source_root: Path, volume: F32, out_root: Path) -> ModelCard:
    """Regenerate one package in `out_root/spec.package` from the conformed sample; return its validated card."""
    source, out = source_root / spec.folder, out_root / spec.package
    (out / "reference").mkdir(parents=True, exist_ok=True)
    model_file = out / "model.onnx"
    convert(source, model_file, reverse_spatial=False, doc=doc_string(spec))
    crop = reference_crop(spec, normalise(volume, spec.intensity))
    np.save(out / "reference" / "input.npy", crop)
    np.save(out / "reference" / "output.npy", run_onnx(model_file, crop))
    shutil.copyfile(source_root / "LICENSE", out / "LICENSE")
    raw = card(spec, source, sha256_file(model_file))
    validated = ModelCard.model_validate(raw)  # refuse to write a card that would not load
    header = "# Generated by `python -m model_zoo.build_brainchop`; edit that script, not this file.\n"
    body = yaml.dump(raw, Dumper=_CardDumper, sort_keys=False, allow_unicode=True, width=110)
    (out / "model.yaml").write_text(header + body, encoding="utf-8")
    (out / "README.md").write_text(
        readme(spec, raw, model_file.stat().st_size, source, upstream(spec)), encoding="utf-8"
    )
    return validated


@dataclass(frozen=True)
class Parity:
    max_abs: float
    agreement: float  # fraction of voxels with the same argmax
    voxels: int


def parity(source: Path, model_file: Path, x: F32, threads: int = 1) -> Parity:
    """ONNX Runtime vs the float64 NumPy MeshNet, fed through brainchop's own voxel-to-tensor path."""
    got = run_onnx(model_file, x[None, None].copy() if x.ndim == 3 else x, threads)
    vol = x if x.ndim == 3 else x[0, 0]
    ref = from_brainchop_layout(
        MeshNetReference.from_tfjs(source)(brainchop_layout(vol, enable_transpose=True)),
        enable_transpose=True,
    )
    same = got[0].argmax(0) == ref[0].argmax(0)
    return Parity(float(np.abs(got - ref).max()), float(same.mean()), int(same.size))


def full_check(
    spec: ModelSpec, source_root: Path, conformed: tuple[F32, NDArray[np.float64]], out_root: Path
) -> None:
    """Print parity on the reference crop and on the centred 128^3, and label volumes of the whole sample."""
    source, out = source_root / spec.folder, out_root / spec.package
    model_file = out / "model.onnx"
    volume, affine = conformed
    x = normalise(volume, spec.intensity)
    small = parity(source, model_file, np.load(out / "reference" / "input.npy"))
    print(
        f"{spec.model_id}: reference 32^3: max |logit diff| {small.max_abs:.3g}, argmax agreement {small.agreement:.6f}"
    )
    t0 = time.perf_counter()
    big = parity(source, model_file, x[PARITY_CROP])
    print(
        f"{spec.model_id}: centred 128^3: max |logit diff| {big.max_abs:.3g}, argmax agreement "
        f"{100 * big.agreement:.4f} % of {big.voxels} voxels ({time.perf_counter() - t0:.0f} s)"
    )
    t0 = time.perf_counter()
    whole = run_onnx(model_file, x[None, None], threads=1)[0].argmax(0)
    ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    volumes = ", ".join(
        f"{lab.name} {float((whole == v).sum()) * ml:.1f}" for v, lab in enumerate(spec.labels, 1)
    )
    print(f"{spec.model_id}: whole sample (ONNX, 1 thread, {time.perf_counter() - t0:.0f} s), mL: {volumes}")


def _select(only: str | None) -> list[ModelSpec]:
    if only is None:
        return list(SPECS)
    chosen = [s for s in SPECS if only in (s.folder, s.package, s.model_id)]
    if not chosen:
        raise SystemExit(f"error: --only {only!r}: not one of {[s.model_id for s in SPECS]}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_zoo.build_brainchop", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--only", help="one model: package id, package folder or brainchop folder")
    parser.add_argument(
        "--source", type=Path, default=BRAINCHOP, help="brainchop models folder (with LICENSE)"
    )
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="T1 NIfTI for the reference crop")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="catalogue folder to (re)write packages in"
    )
    parser.add_argument(
        "--full-check", action="store_true", help="also compare with the NumPy reference (slow)"
    )
    args = parser.parse_args(argv)
    specs = _select(args.only)
    for path in [
        args.sample,
        args.source / "LICENSE",
        *(args.source / s.folder / "model.json" for s in specs),
    ]:
        if not path.is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    conformed = conform_sample(args.sample)
    for spec in specs:
        built = build(spec, args.source, conformed[0], args.out)
        print(f"wrote {args.out / spec.package} ({built.key}, sha256 {built.runtime.sha256[:12]})")
        if args.full_check:
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            full_check(spec, args.source, conformed, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
