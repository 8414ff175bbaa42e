"""The model card (`model.yaml`): schema, loading and package checks.

A model package is a directory with `model.yaml`, the ONNX file it names and a small reference
input/output pair. The card is data validated here (a trust boundary, hence pydantic); nothing in it is
ever executed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from radai.errors import ModelPackageError

_STRICT = ConfigDict(extra="forbid", frozen=True)


def _axcodes(value: str) -> str:
    """Three nibabel axis codes, one from each of L/R, A/P, S/I (e.g. RAS, LIA)."""
    if len(value) != 3 or any(sum(c in pair for c in value) != 1 for pair in ("LR", "AP", "SI")):
        raise ValueError("orientation must be three axis codes, one of L/R, A/P and S/I each (e.g. RAS, LIA)")
    return value


Axcodes = Annotated[str, AfterValidator(_axcodes)]


class Code(BaseModel):
    """A coded concept, e.g. SNOMED CT (`SCT`)."""

    model_config = _STRICT
    scheme: str = Field(min_length=1, max_length=16)
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)


class SeriesRuleCard(BaseModel):
    """Which series a model accepts. All given fields must hold (AND); omitted fields match anything."""

    model_config = _STRICT
    modality: list[str] = Field(default_factory=list)
    series_description: str | None = None  # regex, searched case-insensitively
    body_part: str | None = None  # regex on BodyPartExamined, case-insensitive
    orientation: Literal["axial", "sagittal", "coronal"] | None = None
    min_slices: int = Field(default=1, ge=1)
    image_type: list[str] = Field(default_factory=list)  # every value must appear in ImageType


class QuantileNorm(BaseModel):
    """brainchop-style: optional min-max to 0..255, then (x - q_lower) / (q_upper - q_lower) clipped to 0..1."""

    model_config = _STRICT
    kind: Literal["quantile"]
    lower: float = Field(ge=0.0, le=1.0)
    upper: float = Field(ge=0.0, le=1.0)
    to_uint8_first: bool = True


class RangeNorm(BaseModel):
    """MONAI ScaleIntensityRange: map [a_min, a_max] linearly onto [b_min, b_max], optionally clipped."""

    model_config = _STRICT
    kind: Literal["range"]
    a_min: float
    a_max: float
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True


class InputSpec(BaseModel):
    model_config = _STRICT
    name: str
    channels: int = Field(default=1, ge=1)
    spacing: tuple[float, float, float]
    orientation: Axcodes
    intensity: QuantileNorm | RangeNorm = Field(discriminator="kind")
    patch_size: tuple[int, int, int]
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    blend: Literal["gaussian", "constant"] = "gaussian"
    pad_value: float = 0.0


class OutputSpec(BaseModel):
    model_config = _STRICT
    name: str
    channels: int = Field(ge=2)  # class scores including background (channel 0)
    postprocess: Literal["argmax"] = "argmax"


class Label(BaseModel):
    model_config = _STRICT
    value: int = Field(ge=1, le=255)  # the output channel / argmax value
    name: str = Field(min_length=1, max_length=64)
    category: Code
    type: Code
    color: tuple[int, int, int]  # sRGB 0..255

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(c < 0 or c > 255 for c in v):
            raise ValueError("colour components must be 0..255")
        return v


class RuntimeSpec(BaseModel):
    model_config = _STRICT
    backend: Literal["onnx", "fake"] = "onnx"
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_batch: int = Field(default=4, ge=1)
    precision: Literal["fp32", "fp16"] = "fp32"


class ReferenceSpec(BaseModel):
    model_config = _STRICT
    input: str
    output: str
    atol: float = Field(default=1e-4, gt=0)


class ModelCard(BaseModel):
    model_config = _STRICT
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    version: str = Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")
    name: str
    task: Literal["segmentation"]
    kind: Literal["published-weights", "classical-algorithm", "trained-demo"]
    modality: str
    body_part: str
    series_selection: list[SeriesRuleCard] = Field(min_length=1)
    input: InputSpec
    output: OutputSpec
    labels: list[Label] = Field(min_length=1)
    runtime: RuntimeSpec
    reference: ReferenceSpec
    intended_use: str
    not_for_clinical_use: Literal[True]
    licence: str
    provenance: str

    @model_validator(mode="after")
    def _labels_fit_outputs(self) -> ModelCard:
        values = [lab.value for lab in self.labels]
        if len(set(values)) != len(values):
            raise ValueError("labels: duplicate value")
        if max(values) >= self.output.channels:
            raise ValueError(
                f"labels: value {max(values)} has no output channel (channels={self.output.channels})"
            )
        return self

    @property
    def key(self) -> str:
        return f"{self.id}@{self.version}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(root)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def load_card(package_dir: Path) -> ModelCard:
    """Read and validate `model.yaml` of a package; raise ModelPackageError naming the bad key."""
    card_path = package_dir / "model.yaml"
    if not card_path.is_file():
        raise ModelPackageError(f"{package_dir}: no model.yaml")
    try:
        raw = yaml.safe_load(card_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ModelPackageError(f"{card_path}: not valid YAML ({exc})") from exc
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise ModelPackageError(f"{card_path}: {_describe(exc)}") from exc


def check_package_files(package_dir: Path, card: ModelCard) -> None:
    """Files named by the card exist, stay inside the package, and the weights match their checksum."""
    for rel in (card.runtime.file, card.reference.input, card.reference.output):
        target = (package_dir / rel).resolve()
        if package_dir.resolve() not in target.parents:
            raise ModelPackageError(f"{card.key}: {rel!r} points outside the package")
        if not target.is_file():
            raise ModelPackageError(f"{card.key}: missing file {rel!r}")
    actual = sha256_file(package_dir / card.runtime.file)
    if actual != card.runtime.sha256:
        raise ModelPackageError(f"{card.key}: runtime.sha256 mismatch (file has {actual})")
