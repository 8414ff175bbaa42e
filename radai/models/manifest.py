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
    """brainchop-style: optional min-max to 0..255, then (x - q_lower) / (q_upper - q_lower), clipped to 0..1
    unless `clip` is false."""

    model_config = _STRICT
    kind: Literal["quantile"]
    lower: float = Field(ge=0.0, le=1.0)
    upper: float = Field(ge=0.0, le=1.0)
    to_uint8_first: bool = True
    clip: bool = True


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
    # Sliding-window patch in voxels, or "whole": the whole resampled volume in one window, padded up to a
    # multiple of `size_divisor` (for networks that downsample).
    patch_size: tuple[int, int, int] | Literal["whole"]
    size_divisor: int = Field(default=1, ge=1, le=256)
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    blend: Literal["gaussian", "constant"] = "gaussian"
    pad_value: float = 0.0


class ArgmaxPost(BaseModel):
    """Segmentation: the label of a voxel is the channel with the highest score (channel 0 = background)."""

    model_config = _STRICT
    kind: Literal["argmax"]


class ThresholdPost(BaseModel):
    """Segmentation from independent per-class scores: channel c (c >= 1) is label c where its probability
    (after `activation`) reaches `threshold`; where several do, the most probable wins; else background."""

    model_config = _STRICT
    kind: Literal["threshold"]
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    activation: Literal["sigmoid", "none"] = "sigmoid"


class CentersPost(BaseModel):
    """Detection with dense maps (anchor-free, one box per centre): channels 0..C-1 are centre-heatmap logits
    of label values 1..C, the last 3 channels the box size in mm along the model axes X', Y', Z'. Decoding:
    sigmoid, local maxima over a `peak_window` cube at or above `score_threshold`, a box of the predicted size
    at each peak, non-maximum suppression at `nms_iou`, the `max_findings` most probable kept."""

    model_config = _STRICT
    kind: Literal["centers"]
    score_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    nms_iou: float = Field(default=0.1, ge=0.0, le=1.0)
    max_findings: int = Field(default=20, ge=1, le=1000)
    peak_window: int = Field(default=3, ge=1, le=31)

    @field_validator("peak_window")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("peak_window must be odd")
        return v


class ComponentsSpec(BaseModel):
    """Connected-component clean-up of a label map, per label (26-connectivity)."""

    model_config = _STRICT
    min_voxels: int = Field(default=0, ge=0)  # components smaller than this (source voxels) become background
    largest_only: bool = False  # keep only the largest component of each label


Postprocess = Annotated[ArgmaxPost | ThresholdPost | CentersPost, Field(discriminator="kind")]


class OutputSpec(BaseModel):
    model_config = _STRICT
    name: str
    channels: int = Field(ge=2)  # class scores including background (channel 0), or detection maps
    postprocess: Postprocess = ArgmaxPost(kind="argmax")
    components: ComponentsSpec | None = None

    @field_validator("postprocess", mode="before")
    @classmethod
    def _short_form(cls, v: object) -> object:
        return {"kind": v} if isinstance(v, str) else v  # `postprocess: argmax` is short for {kind: argmax}


class ConsumesSpec(BaseModel):
    """This model runs after model `model` on the same series; `restrict`: its labels (segmentation) or
    findings' centres (detection) outside the union of that model's `labels` become background / are dropped."""

    model_config = _STRICT
    model: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    labels: list[int] = Field(min_length=1)
    mode: Literal["restrict"] = "restrict"


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
    # The runtime that runs the ONNX file: ONNX Runtime, or PyTorch (the graph converted at load).
    # `triton`: a shared Triton Inference Server (scheduler.triton_url) serving this ONNX file under the card id.
    backend: Literal["onnx", "tensorrt", "torch", "triton", "fake"] = "onnx"
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
    task: Literal["segmentation", "detection"]
    kind: Literal["published-weights", "classical-algorithm", "trained-demo"]
    modality: str
    body_part: str
    series_selection: list[SeriesRuleCard] = Field(min_length=1)
    input: InputSpec
    output: OutputSpec
    labels: list[Label] = Field(min_length=1)
    runtime: RuntimeSpec
    reference: ReferenceSpec
    consumes: ConsumesSpec | None = None
    intended_use: str
    not_for_clinical_use: Literal[True]
    licence: str
    provenance: str

    @model_validator(mode="after")
    def _labels_fit_outputs(self) -> ModelCard:
        values = [lab.value for lab in self.labels]
        if len(set(values)) != len(values):
            raise ValueError("labels: duplicate value")
        detection = isinstance(self.output.postprocess, CentersPost)
        if (self.task == "detection") != detection:
            raise ValueError("output.postprocess: detection models use `centers`, segmentation models do not")
        if detection:
            if sorted(values) != list(range(1, len(values) + 1)):
                raise ValueError("labels: detection label values must be 1..C (C heatmap channels)")
            if self.output.channels != len(values) + 3:
                raise ValueError(
                    f"output.channels: a `centers` detector with {len(values)} labels has "
                    f"{len(values) + 3} channels (heatmaps + 3 sizes), not {self.output.channels}"
                )
        elif max(values) >= self.output.channels:
            raise ValueError(
                f"labels: value {max(values)} has no output channel (channels={self.output.channels})"
            )
        if self.consumes is not None and self.consumes.model == self.id:
            raise ValueError("consumes: a model cannot consume its own output")
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
