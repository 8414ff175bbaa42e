"""Which result objects each destination gets.

Modern viewers want DICOM SEG + TID 1500 SR; a legacy PACS wants a Secondary Capture series with the overlay
burned in, or a GSPS; every destination should get the "AI did not run" notice. Each destination has an
:class:`OutputPlan`; the workflow builds the union of what the plans ask for, tags every object with an output
key, and the delivery queue sends each destination the objects whose keys its plan wants.

A SEG comes in variants (BINARY or LABELMAP, empty frames omitted or kept). Different variants are different
objects, so their UIDs differ: the default variant (BINARY, empty frames omitted) has no suffix, others add
theirs to the UID derivation. The SR of a variant references that variant's SEG.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from pydicom import Dataset

Kind = Literal["seg", "sr", "sc", "gsps", "notice"]
KINDS: tuple[Kind, ...] = ("seg", "sr", "sc", "gsps", "notice")
DEFAULT_KINDS: frozenset[Kind] = frozenset({"seg", "sr", "notice"})


class Output(NamedTuple):
    """One result object and its output key (e.g. 'seg', 'sr+labelmap', 'sc', 'notice')."""

    key: str
    dataset: Dataset


@dataclass(frozen=True, order=True)
class SegVariant:
    """How a SEG is encoded: LABELMAP (Label Map Segmentation) rather than BINARY, empty frames kept."""

    labelmap: bool = False
    keep_empty: bool = False

    @property
    def suffix(self) -> str:
        """'' for the default variant, else e.g. '+labelmap+keep-empty' (used in output keys)."""
        return "".join(
            part for part, on in (("+labelmap", self.labelmap), ("+keep-empty", self.keep_empty)) if on
        )

    @property
    def uid_parts(self) -> tuple[str, ...]:
        """Extra parts of the UID derivation of this variant's SEG and SR (none for the default)."""
        return tuple(part for part in self.suffix.split("+") if part)


@dataclass(frozen=True)
class OutputPlan:
    """What one destination gets."""

    kinds: frozenset[Kind] = DEFAULT_KINDS
    seg: SegVariant = field(default_factory=SegVariant)

    def keys(self) -> frozenset[str]:
        """The output keys this destination wants."""
        out: set[str] = set()
        for kind in self.kinds:
            out.add(kind + self.seg.suffix if kind in ("seg", "sr") else kind)
        return frozenset(out)

    def wants(self, key: str) -> bool:
        return key in self.keys()


@dataclass(frozen=True)
class Needed:
    """The union of several plans: what the workflow has to build for one job."""

    seg_variants: tuple[SegVariant, ...]  # each needs a SEG (an SR references one)
    sr_variants: tuple[SegVariant, ...]
    sc: bool
    gsps: bool
    notice: bool

    @property
    def anything(self) -> bool:
        return bool(self.seg_variants or self.sc or self.gsps)


def needed(plans: Iterable[OutputPlan]) -> Needed:
    """What to build so that every plan gets its outputs. No plan at all (no destination) builds the default
    SEG and SR, so results are still computed and recorded."""
    plans = list(plans) or [OutputPlan()]
    segs = {p.seg for p in plans if {"seg", "sr"} & p.kinds}
    srs = {p.seg for p in plans if "sr" in p.kinds}
    return Needed(
        seg_variants=tuple(sorted(segs)),
        sr_variants=tuple(sorted(srs)),
        sc=any("sc" in p.kinds for p in plans),
        gsps=any("gsps" in p.kinds for p in plans),
        notice=any("notice" in p.kinds for p in plans),
    )


def seg_key(variant: SegVariant) -> str:
    return "seg" + variant.suffix


def sr_key(variant: SegVariant) -> str:
    return "sr" + variant.suffix


def select(keys: Sequence[str], plan: OutputPlan) -> list[int]:
    """Indexes of the outputs (by key, in order) that ``plan`` wants."""
    wanted = plan.keys()
    return [i for i, key in enumerate(keys) if key in wanted]
