"""Reads a MONAI bundle's configs as plain data and drafts a radai card from them, evaluating nothing.

The configs are parsed with `json` / `yaml.safe_load` and never handed to monai.bundle's ConfigParser. A
string starting with `$` (a Python expression), `@` (a reference) or `%` (a macro) is never evaluated,
resolved or expanded: where the card needs such a value, the draft fails naming the key, unless the
overrides give the literal. Used by `model_zoo.import_bundle`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Card fields the importer computes from the files it writes; overrides may not set them.
COMPUTED = ("runtime.file", "runtime.sha256", "reference.input", "reference.output", "not_for_clinical_use")
_INTENSITY = "input.intensity"
_Hit = tuple[str, Mapping[str, Any]]  # (path in the config, the transform's dict)


class BundleError(ValueError):
    """The bundle cannot be imported as it stands; the message names what is missing or unusable."""


@dataclass(frozen=True)
class CardDraft:
    """The card as far as bundle and overrides give it (no weights, names or reference yet)."""

    card: dict[str, Any]
    metadata: Mapping[str, Any]
    channels: int
    patch: tuple[int, int, int]


def is_expression(value: Any) -> bool:
    """A config value MONAI would evaluate ($), resolve (@) or expand (%), at any depth."""
    if isinstance(value, str):
        return value.startswith(("$", "@", "%"))
    if isinstance(value, Mapping):
        return any(is_expression(v) for v in value.values())
    if isinstance(value, list):
        return any(is_expression(v) for v in value)
    return False


def find_transforms(node: Any, names: tuple[str, ...], where: str = "") -> list[_Hit]:
    """Every dict whose literal `_target_` names one of `names` (with or without a module path), with its path."""
    found: list[_Hit] = []
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if isinstance(target, str) and not is_expression(target) and target.rsplit(".", 1)[-1] in names:
            found.append((where or "(root)", node))
        for key, child in node.items():
            found += find_transforms(child, names, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            found += find_transforms(child, names, f"{where}[{i}]")
    return found


def load_config(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise BundleError(f"{path.name}: cannot be read as {path.suffix[1:].upper()} ({exc})") from exc
    if not isinstance(raw, Mapping):
        raise BundleError(f"{path.name}: expected a mapping at the top level")
    return raw


class InferenceValues:
    """Card values found as literals in an inference config and, per card key, why one could not be had."""

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        self.name, self.config = name, config
        self.values: dict[str, Any] = {}
        self.problems: dict[str, str] = {}

    def find_one(self, names: tuple[str, ...], section: str) -> _Hit | None:
        """The transform in `section`, else anywhere outside post-processing (bundles often list transforms in a
        top-level list the section refers to with `@`); the same settings twice are fine, differing ones not."""
        hits = find_transforms(self.config.get(section), names, section)
        if not hits:
            rest = {k: v for k, v in self.config.items() if "postprocess" not in k}
            hits = find_transforms(rest, names)
        if len({json.dumps(h[1], sort_keys=True, default=str) for h in hits}) > 1:
            where = ", ".join(h[0] for h in hits)
            raise BundleError(f"{self.name}: {'/'.join(names)} appears with different settings at {where}")
        return hits[0] if hits else None

    def take(self, card_key: str, hit: _Hit | None, key: str, default: Any = None) -> None:
        if hit is None:
            self.problems[card_key] = f"{self.name} has no literal source for it"
            return
        path, node = hit
        value = node.get(key, default)
        if value is None:
            self.problems[card_key] = f"{self.name}: {path} has no {key!r}"
        elif is_expression(value):
            self.problems[card_key] = (
                f"{self.name}: {path}.{key} is a bundle expression ({value!r}), which is never evaluated; "
                "a literal is needed"
            )
        else:
            self.values[card_key] = value


def read_inference(name: str, config: Mapping[str, Any]) -> InferenceValues:
    """Spacing, orientation, intensity window and sliding-window settings, keyed by card field. Where the
    config leaves an optional setting out, MONAI's own default for it is used."""
    r = InferenceValues(name, config)
    r.take("input.spacing", r.find_one(("Spacingd", "Spacing"), "preprocessing"), "pixdim")
    r.take("input.orientation", r.find_one(("Orientationd", "Orientation"), "preprocessing"), "axcodes")
    scale = r.find_one(("ScaleIntensityRanged", "ScaleIntensityRange"), "preprocessing")
    if scale is None:
        other = find_transforms(
            config, ("NormalizeIntensityd", "ScaleIntensityd", "ScaleIntensityRangePercentilesd")
        )
        what = f" (it uses {other[0][1]['_target_']}, which a card cannot express)" if other else ""
        r.problems[_INTENSITY] = f"{name} has no ScaleIntensityRanged{what}"
    else:
        r.values[f"{_INTENSITY}.kind"] = "range"
        r.take(f"{_INTENSITY}.a_min", scale, "a_min")
        r.take(f"{_INTENSITY}.a_max", scale, "a_max")
        for key, default in (("b_min", 0.0), ("b_max", 1.0)):
            if scale[1].get(key) is None:  # MONAI's default: no rescaling of (x - a_min) / (a_max - a_min)
                r.values[f"{_INTENSITY}.{key}"] = default
            else:
                r.take(f"{_INTENSITY}.{key}", scale, key)
        r.take(f"{_INTENSITY}.clip", scale, "clip", False)  # MONAI's default: no clipping
    inferer = r.find_one(("SlidingWindowInferer",), "inferer")
    r.take("input.patch_size", inferer, "roi_size")
    if inferer is not None:
        r.take("input.overlap", inferer, "overlap", 0.25)
        r.take("input.blend", inferer, "mode", "constant")
        r.take("input.pad_value", inferer, "cval", 0.0)
        r.take("runtime.max_batch", inferer, "sw_batch_size", 1)
    return r


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def has(tree: Mapping[str, Any], dotted: str) -> bool:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` deep-merged onto `base`: mappings merge, anything else (lists included) replaces."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        out[key] = merge(old, value) if isinstance(old, Mapping) and isinstance(value, Mapping) else value
    return out


def _single(section: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(section, Mapping) or len(section) != 1:
        n = len(section) if isinstance(section, Mapping) else 0
        raise BundleError(
            f"metadata.json: network_data_format.{what} has {n} entries; radai takes exactly one"
        )
    value = next(iter(section.values()))
    if not isinstance(value, Mapping):
        raise BundleError(f"metadata.json: network_data_format.{what} entry is not a mapping")
    return value


def _labels(
    meta_out: Mapping[str, Any], over: Mapping[str, Any], problems: dict[str, str]
) -> list[Any] | None:
    """The overrides' labels, named from the bundle's channel_def where they give no name. Every channel the
    bundle names (but background, 0) needs a label: a class is never dropped silently."""
    names = {int(k): str(v) for k, v in dict(meta_out.get("channel_def") or {}).items() if str(k).isdigit()}
    wanted = sorted(k for k in names if k != 0)
    given = over.get("labels")
    if not isinstance(given, list) or not given:
        listing = ", ".join(f"{k} ({names[k]})" for k in wanted) or "(the bundle names none)"
        problems["labels"] = f"SNOMED CT category/type codes, colour per output channel: channels {listing}"
        return None
    labels = [dict(lab) if isinstance(lab, Mapping) else lab for lab in given]
    for lab in labels:
        if isinstance(lab, dict) and "name" not in lab and lab.get("value") in names:
            lab["name"] = names[lab["value"]]
    covered = {lab.get("value") for lab in labels if isinstance(lab, dict)}
    if missing := [k for k in wanted if k not in covered]:
        raise BundleError("labels: no label for channel " + ", ".join(f"{k} ({names[k]})" for k in missing))
    return labels


def draft_card(bundle: Path, overrides: Mapping[str, Any]) -> CardDraft:
    """Metadata and inference literals, the overrides merged over them; one error lists everything missing."""
    if bad := [k for k in COMPUTED if has(overrides, k)]:
        raise BundleError(f"overrides: {', '.join(bad)} is computed by the importer and cannot be overridden")
    meta_path = bundle / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise BundleError(f"{bundle.name}: configs/metadata.json is missing (is this a MONAI bundle?)")
    meta = load_config(meta_path)
    fmt = meta.get("network_data_format")
    meta_in = _single(fmt.get("inputs") if isinstance(fmt, Mapping) else None, "inputs")
    meta_out = _single(fmt.get("outputs") if isinstance(fmt, Mapping) else None, "outputs")
    if meta_out.get("format", "segmentation") != "segmentation":
        raise BundleError(
            f"metadata.json: output format {meta_out.get('format')!r}; only segmentation is imported"
        )

    paths = [bundle / "configs" / f"inference.{ext}" for ext in ("json", "yaml", "yml")]
    config = next((p for p in paths if p.is_file()), None)
    found = read_inference(config.name, load_config(config)) if config else InferenceValues("inference", {})
    if config is None:
        for key in ("input.spacing", "input.orientation", _INTENSITY, "input.patch_size"):
            found.problems[key] = "the bundle has no configs/inference.json"
    replaced = has(overrides, _INTENSITY)  # the overrides give a whole normalisation, of any kind
    problems = {k: v for k, v in found.problems.items() if not (replaced and k.startswith(_INTENSITY))}
    auto: dict[str, Any] = {"task": "segmentation", "kind": "published-weights", "not_for_clinical_use": True}
    for key, value in found.values.items():
        if not (replaced and key.startswith(_INTENSITY)):
            _set(auto, key, value)
    from_metadata = {
        "version": meta.get("version"),
        "name": meta.get("name"),
        "modality": meta_in.get("modality"),
        "intended_use": meta.get("intended_use"),
        "licence": meta.get("license"),
        "input.channels": meta_in.get("num_channels"),
        "output.channels": meta_out.get("num_channels"),
    }
    for key, value in from_metadata.items():
        if value is None:
            problems[key] = "not given by metadata.json"
        elif is_expression(value):
            problems[key] = f"metadata.json: {value!r} is an expression"
        else:
            _set(auto, key, value)
    problems.update({"id": "a bundle cannot give it", "body_part": "a bundle cannot give it"})
    labels = _labels(meta_out, overrides, problems)
    card = merge(auto, overrides)
    if labels is not None:
        card["labels"] = labels
    card.setdefault("series_selection", [{"modality": [card.get("modality")]}])
    if unresolved := sorted((k, why) for k, why in problems.items() if not has(card, k)):
        lines = "\n".join(f"  {k}: {why}" for k, why in unresolved)
        raise BundleError(
            f"{bundle.name}: the card needs values the bundle does not give (put them in the overrides):\n{lines}"
        )
    try:
        channels = int(card["input"]["channels"])
        patch_raw = card["input"]["patch_size"]
        patch = (int(patch_raw[0]), int(patch_raw[1]), int(patch_raw[2]))
        if len(patch_raw) != 3 or min(patch) < 1 or channels < 1:
            raise ValueError("three positive sizes and at least one channel are needed")
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise BundleError(f"input.channels / input.patch_size: not usable ({exc!r})") from exc
    return CardDraft(card, meta, channels, patch)
