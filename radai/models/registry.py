"""Finds model packages on disk, validates them, and answers which models a study should go to.

Validation that needs a runtime (the test inference) receives a runner factory, so this layer stays free
of any runtime import.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from dicom_router.selection import SeriesRule
from radai.errors import ModelPackageError
from radai.models.checks import check_onnx
from radai.models.manifest import ModelCard, check_package_files, load_card
from radai.models.unsafe import find_unsafe_files
from radai.ports import ModelRunner

log = logging.getLogger(__name__)

RunnerFactory = Callable[[str, Path, int], ModelRunner]  # (backend, model file, output channels)


@dataclass(frozen=True)
class ModelPackage:
    card: ModelCard
    directory: Path

    @property
    def key(self) -> str:
        return self.card.key

    @property
    def weights(self) -> Path:
        return self.directory / self.card.runtime.file

    def series_rules(self) -> list[SeriesRule]:
        return [
            SeriesRule(
                modality=tuple(r.modality),
                series_description=r.series_description,
                body_part=r.body_part,
                orientation=r.orientation,
                min_slices=r.min_slices,
                image_type=tuple(r.image_type),
            )
            for r in self.card.series_selection
        ]


def open_package(directory: Path) -> ModelPackage:
    """Load the card and check its files and checksum (no inference)."""
    card = load_card(directory)
    check_package_files(directory, card)
    try:
        for rule in card.series_selection:
            SeriesRule(series_description=rule.series_description, body_part=rule.body_part)
    except ValueError as exc:
        raise ModelPackageError(f"{card.key}: series_selection: {exc}") from exc
    return ModelPackage(card=card, directory=directory)


def reference_check(package: ModelPackage, make_runner: RunnerFactory) -> float:
    """Run the reference input and compare with the reference output; return the max abs difference."""
    card = package.card
    ref_in: NDArray[np.float32] = np.load(package.directory / card.reference.input).astype(np.float32)
    ref_out: NDArray[np.float32] = np.load(package.directory / card.reference.output).astype(np.float32)
    runner = make_runner(card.runtime.backend, package.weights, card.output.channels)
    try:
        got = runner.run(ref_in)
    finally:
        runner.close()
    if got.shape != ref_out.shape:
        raise ModelPackageError(
            f"{card.key}: reference output shape {got.shape}, card expects {ref_out.shape}"
        )
    diff = float(np.max(np.abs(got - ref_out)))
    if not np.isfinite(diff) or diff > card.reference.atol:
        raise ModelPackageError(
            f"{card.key}: reference check failed: max abs diff {diff:.3g} > {card.reference.atol}"
        )
    return diff


def discover(search_paths: Sequence[Path], enabled: Sequence[str] = ()) -> list[ModelPackage]:
    """Every valid package under the search paths (newest version per id); invalid ones are logged and skipped."""
    found: dict[str, ModelPackage] = {}
    for root in search_paths:
        if not root.is_dir():
            log.warning("model path %s does not exist", root)
            continue
        for card_path in sorted(root.glob("*/model.yaml")):
            try:
                pkg = open_package(card_path.parent)
            except ModelPackageError as exc:
                log.error("skipping model package: %s", exc)
                continue
            if enabled and pkg.card.id not in enabled:
                continue
            current = found.get(pkg.card.id)
            if current is None or version_key(pkg.card.version) > version_key(current.card.version):
                found[pkg.card.id] = pkg
    return [found[k] for k in sorted(found)]


def version_key(v: str) -> tuple[int, ...]:
    """A semantic version as a sortable tuple."""
    return tuple(int(p) for p in v.split("."))


def validate_package(directory: Path, make_runner: RunnerFactory) -> tuple[ModelPackage, float]:
    """Every registration check, cheapest first: nothing that could execute code on load (ONNX only), the
    card's schema, its files and the weights' checksum, the ONNX graph against the card, and a test inference
    on the reference input within the card's tolerance. Returns the package and the reference difference."""
    unsafe = find_unsafe_files(directory)
    if unsafe:
        raise ModelPackageError(
            f"{directory.name}: refused, files that could execute code when loaded (ONNX only): "
            + ", ".join(unsafe[:5])
            + (f" (+{len(unsafe) - 5} more)" if len(unsafe) > 5 else "")
        )
    package = open_package(directory)
    if package.card.runtime.backend == "fake":
        raise ModelPackageError(
            f"{package.key}: runtime.backend 'fake' is for tests; packages need a runtime"
        )
    check_onnx(package.weights, package.card)
    return package, reference_check(package, make_runner)
