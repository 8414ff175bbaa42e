"""Import a MONAI bundle directory into a radai model package, executing nothing from the bundle's configs.

    python -m model_zoo.import_bundle BUNDLE_DIR --out PKG_DIR [--overrides overrides.yaml] [--id ID]
        [--modality CT] [--body-part ABDOMEN] [--reference-input x.npy] [--seed 0] [--trials 3]

Read (see model_zoo.bundle_config): `configs/metadata.json` (name, version, description, authors, license,
intended_use, network_data_format: channels, channel names, modality) and `configs/inference.json` (or .yaml),
of which only plain literals are used: `pixdim` (Spacingd), `axcodes` (Orientationd), `a_min`, `a_max`,
`b_min`, `b_max`, `clip` (ScaleIntensityRanged), `roi_size`, `sw_batch_size`, `overlap`, `mode`, `cval`
(SlidingWindowInferer). `$` expressions, `@` references and `%` macros are never evaluated; where the card
needs one, the import stops naming the key (give the literal in the overrides).

Weights: `models/model.onnx` is copied as is; `models/model.ts` (TorchScript) is loaded with `torch.jit.load`,
exported to ONNX with a dynamic batch axis and checked against ONNX Runtime as in `model_zoo.export_monai`.
Loading TorchScript runs the bundle's compiled code: acceptable in this offline tool, which an ML engineer runs
on a bundle they chose; the radai server never loads TorchScript (packages are ONNX only, and model.ts is not
copied). A state dict alone (`models/model.pt`) needs the network's code: use `model_zoo.export_monai`.

What a bundle cannot give comes from the overrides, a partial `model.yaml` deep-merged over what the bundle
gives, and `--id/--modality/--body-part`: `id`, `body_part` and, for every output channel the bundle names, a
label with SNOMED CT `category` and `type` codes and a `color` (`name` defaults to the bundle's channel name).
`series_selection` defaults to the modality alone. Anything missing is an error naming it.
The package (model.yaml, model.onnx, reference/input.npy + output.npy, README.md, the bundle's LICENSE) is
built in a scratch folder and moved to PKG_DIR only after radai's registration checks pass on it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import yaml
from numpy.typing import NDArray
from pydantic import ValidationError

from model_zoo.bundle_config import BundleError, CardDraft, draft_card
from model_zoo.export_monai import SEG_OUTPUT
from model_zoo.onnx_parity import (
    INPUT_NAME,
    ExportError,
    ParityReport,
    as_tuple,
    check_graph,
    export_onnx,
    parity,
)
from radai.errors import ModelPackageError
from radai.models.manifest import ModelCard, sha256_file
from radai.models.registry import validate_package
from radai.ports import ModelRunner
from radai.runtime import create_runner

__all__ = ["BundleError", "ImportResult", "import_bundle", "main"]


@dataclass(frozen=True)
class ImportResult:
    package: Path
    card: ModelCard
    parity: ParityReport | None  # None when the bundle ships ONNX (nothing to compare against)
    reference_diff: float  # radai's reference check on the finished package


@dataclass(frozen=True)
class _Weights:
    input_name: str
    output_name: str
    fixed_batch: int | None  # the batch size of an ONNX graph without a symbolic batch axis
    parity: ParityReport | None
    how: str  # for the provenance


def _copy_onnx(source: Path, target: Path) -> _Weights:
    shutil.copyfile(source, target)
    model = onnx.load(str(target))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise BundleError(f"models/model.onnx: ONNX checker: {str(exc).splitlines()[0]}") from exc
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or not model.graph.output:
        raise BundleError(f"models/model.onnx has {len(inputs)} inputs; radai feeds one and reads one output")
    dims = inputs[0].type.tensor_type.shape.dim
    fixed = int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") else None
    how = f"the bundle's models/model.onnx (sha256 {sha256_file(source)}), unchanged"
    return _Weights(inputs[0].name, model.graph.output[0].name, fixed, None, how)


def _convert_torchscript(
    source: Path,
    target: Path,
    channels: int,
    patch: tuple[int, int, int],
    trials: int,
    seed: int,
    threads: int,
) -> _Weights:
    with warnings.catch_warnings():  # "torch.jit.load is deprecated": still how a bundle's .ts is read
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(source), map_location="cpu").float().eval()  # type: ignore[no-untyped-call]
    example = torch.zeros((1, channels, *patch), dtype=torch.float32)
    with torch.no_grad():
        n_out = len(as_tuple(module(example)))
    if n_out != 1:
        raise BundleError(f"models/model.ts returns {n_out} tensors; a radai segmentation card takes one")
    shapes = [(1, channels, *patch), (2, channels, *patch)]
    try:
        # Static spatial axes: a bundle's network only promises to take its roi_size.
        export_onnx(module, example, target, (SEG_OUTPUT,), dynamic_spatial=False)
        check_graph(target)
        report = parity(module, target, shapes, (SEG_OUTPUT,), trials=trials, seed=seed, threads=threads)
    except ExportError as exc:
        raise BundleError(f"models/model.ts: {exc}") from exc
    if not report.passed:
        raise BundleError(f"models/model.ts: ONNX parity failed\n{report.summary()}")
    how = (
        f"converted from the bundle's TorchScript models/model.ts (sha256 {sha256_file(source)}) by "
        "torch.onnx.export (TorchScript exporter, opset 17, dynamic batch axis); parity PyTorch vs ONNX Runtime "
        f"on random inputs of batch 1 and 2: max abs {report.max_abs:.2g}, max rel {report.max_rel:.2g}"
    )
    return _Weights(INPUT_NAME, SEG_OUTPUT, None, report, how)


def _weights(bundle: Path, target: Path, draft: CardDraft, trials: int, seed: int, threads: int) -> _Weights:
    models = bundle / "models"
    if (models / "model.onnx").is_file():
        return _copy_onnx(models / "model.onnx", target)
    if (models / "model.ts").is_file():
        return _convert_torchscript(
            models / "model.ts", target, draft.channels, draft.patch, trials, seed, threads
        )
    if (models / "model.pt").is_file():
        raise BundleError(
            "the bundle has only models/model.pt (a state dict needs the network's code): export it with "
            "`python -m model_zoo.export_monai ARCH --checkpoint models/model.pt` first"
        )
    raise BundleError("the bundle has neither models/model.onnx nor models/model.ts")


def _reference_input(path: Path | None, draft: CardDraft, seed: int) -> NDArray[np.float32]:
    shape = (draft.channels, *draft.patch)
    if path is None:
        return np.random.default_rng(seed).random((1, *shape), dtype=np.float32)
    x = np.load(path, allow_pickle=False)
    if x.ndim != 5 or tuple(x.shape[1:]) != shape:
        raise BundleError(f"{path.name}: reference input must be (N, {', '.join(map(str, shape))})")
    return np.ascontiguousarray(x, dtype=np.float32)


def _run(model: Path, weights: _Weights, x: NDArray[np.float32], threads: int) -> NDArray[np.float32]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        out = session.run([weights.output_name], {weights.input_name: x})[0]
    except Exception as exc:  # onnxruntime's exceptions have no public common base
        raise BundleError(f"ONNX Runtime cannot run the model on the reference input: {exc}") from exc
    return np.asarray(out, dtype=np.float32)


def _cpu_runner(backend: str, path: Path, channels: int) -> ModelRunner:
    return create_runner(backend, path, output_channels=channels, device="cpu")


def _readme(card: ModelCard, meta: Mapping[str, Any], bundle_name: str) -> str:
    labels = "\n".join(
        f"| {lab.value} | {lab.name} | {lab.type.meaning} (SCT {lab.type.value}) |" for lab in card.labels
    )
    i = card.input
    intensity = ", ".join(f"{k}={v}" for k, v in i.intensity.model_dump().items() if k != "kind")
    window = "the whole volume" if i.patch_size == "whole" else f"a sliding window {list(i.patch_size)}"
    return f"""# {card.id} {card.version}: {card.name}

Imported from the MONAI bundle `{bundle_name}` by `python -m model_zoo.import_bundle`; `model.yaml` is generated.
This is a stub: say what the model is, what it is not and how it was validated before serving it.

## What it is

{meta.get("description", "(the bundle gives no description)")}

- Authors: {meta.get("authors", "(not given)")}; licence: {card.licence}
- Input: {i.channels} channel(s) resampled to {list(i.spacing)} mm in {i.orientation}, intensity {i.intensity.kind}
  ({intensity}), {window} with overlap {i.overlap}
- Output: {card.output.channels} channels, argmax

| value | name | SNOMED CT type |
|---|---|---|
{labels}

## What it is not

Not for clinical use (`not_for_clinical_use: true`). Not validated by radai for any population or scanner.

## Provenance

{card.provenance}
"""


def _finish_card(
    draft: CardDraft, weights: _Weights, model: Path, y: NDArray[np.float32], reference: str
) -> ModelCard:
    card = dict(draft.card)
    card["input"] = {**card["input"], "name": weights.input_name}
    card["output"] = {"postprocess": "argmax", **card["output"], "name": weights.output_name}
    runtime = {"backend": "onnx", "max_batch": 1, **card.get("runtime", {})}
    if weights.fixed_batch is not None:  # a graph without a symbolic batch axis takes only that many patches
        runtime["max_batch"] = weights.fixed_batch
    card["runtime"] = {**runtime, "file": "model.onnx", "sha256": sha256_file(model)}
    atol = float(f"{1e-4 * max(1.0, float(np.abs(y).max())):.1g}")  # 1e-4 relative to the outputs' scale
    card["reference"] = {"atol": atol, **card.get("reference", {})}
    card["reference"].update(input="reference/input.npy", output="reference/output.npy")
    meta = draft.metadata
    provenance = (
        f"MONAI bundle {meta.get('name')!r} version {meta.get('version')} (authors: "
        f"{meta.get('authors', 'not given')}); weights: {weights.how}. Reference input: {reference}; reference "
        "output: ONNX Runtime (CPU)."
    )
    card["provenance"] = f"{provenance} {card['provenance']}" if "provenance" in card else provenance
    try:
        return ModelCard.model_validate(card)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise BundleError(f"the card is not valid: {where}: {first['msg']}{more}") from exc


def import_bundle(
    bundle: Path,
    out: Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    reference_input: Path | None = None,
    seed: int = 0,
    trials: int = 3,
    threads: int = 1,
) -> ImportResult:
    """Build the package at `out` (which must not exist or be empty) from `bundle`; see the module docstring."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out}: exists and is not an empty folder")
    draft = draft_card(bundle, overrides or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model = work / "model.onnx"
        weights = _weights(bundle, model, draft, trials, seed, threads)
        x = _reference_input(reference_input, draft, seed)
        y = _run(model, weights, x, threads)
        (work / "reference").mkdir()
        np.save(work / "reference" / "input.npy", x)
        np.save(work / "reference" / "output.npy", y)
        source = (
            f"{reference_input.name}" if reference_input else f"seeded random uniform [0, 1) (seed {seed})"
        )
        card = _finish_card(draft, weights, model, y, source)
        card_yaml = yaml.safe_dump(
            card.model_dump(mode="json", exclude_none=True),
            sort_keys=False,
            default_flow_style=None,
            width=110,
        )
        (work / "model.yaml").write_text(card_yaml, "utf-8")
        (work / "README.md").write_text(_readme(card, draft.metadata, bundle.name), "utf-8")
        if (bundle / "LICENSE").is_file():
            shutil.copyfile(bundle / "LICENSE", work / "LICENSE")
        try:
            _, diff = validate_package(work, _cpu_runner)
        except ModelPackageError as exc:
            raise BundleError(f"the package fails radai's checks: {exc}") from exc
        if out.exists():
            out.rmdir()
        work.rename(out)
        return ImportResult(out, card, weights.parity, diff)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_zoo.import_bundle", description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path, help="the MONAI bundle folder (configs/, models/)")
    p.add_argument("--out", type=Path, required=True, help="the package folder to create")
    p.add_argument(
        "--overrides", type=Path, help="YAML: a partial model.yaml merged over what the bundle gives"
    )
    p.add_argument("--id", help="the card id (lower-case letters, digits, '-')")
    p.add_argument("--modality", help="e.g. CT or MR")
    p.add_argument("--body-part", help="DICOM body part, e.g. ABDOMEN")
    p.add_argument(
        "--reference-input", type=Path, help=".npy (N, C, X, Y, Z) float32; default: seeded random"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=3, help="random inputs per parity shape (TorchScript only)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(max(args.threads, 1))
    try:
        over: Any = {}
        if args.overrides is not None:
            over = yaml.safe_load(args.overrides.read_text(encoding="utf-8")) or {}
            if not isinstance(over, Mapping):
                raise BundleError(f"{args.overrides.name}: expected a mapping at the top level")
        cli = {"id": args.id, "modality": args.modality, "body_part": args.body_part}
        over = {**over, **{k: v for k, v in cli.items() if v is not None}}
        result = import_bundle(
            args.bundle,
            args.out,
            over,
            reference_input=args.reference_input,
            seed=args.seed,
            trials=args.trials,
            threads=args.threads,
        )
    except (BundleError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.parity is not None:
        print(result.parity.summary())
    print(
        f"wrote {result.package} ({result.card.key}); reference check max abs diff {result.reference_diff:.3g}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
