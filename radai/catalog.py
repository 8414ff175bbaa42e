"""Which model versions the workflow may start jobs on, held for as long as a job needs them.

A `ModelCatalog` hands out *leases*: the slot of a model version stays loaded until every job holding it
has released it, so switching the active version (radai.hosting) never fails a job in flight; the old
version is unloaded after its last job. `StaticCatalog` serves a fixed set (tests, embedding).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from dicom_router.assembler import Series, Study
from dicom_router.selection import select_series
from radai.config import PriorityRule
from radai.domain import Priority
from radai.errors import InferenceError, NotFoundError
from radai.models.registry import ModelPackage
from radai.ports import DeviceInferer, PatchInferer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSlot:
    """A served model version: its package and the scheduler its patches go through."""

    package: ModelPackage
    inferer: PatchInferer

    @property
    def key(self) -> str:
        return self.package.key


class ModelCatalog(Protocol):
    def lease_active(self) -> list[ModelSlot]:
        """The active version of every model, each held until `release(slot.key)`."""
        ...

    def lease_shadow(self, model_id: str) -> ModelSlot | None:
        """The version running in shadow of `model_id`, held until released; None if there is none."""
        ...

    def lease(self, key: str) -> ModelSlot:
        """The exact version `id@version` (a job planned elsewhere), held until released; NotFoundError if
        it is not served."""
        ...

    def release(self, key: str) -> None: ...


class StaticCatalog:
    """A fixed set of active (and optionally shadow) slots; leases are no-ops."""

    def __init__(
        self, active: Mapping[str, ModelSlot], shadow: Mapping[str, ModelSlot] | None = None
    ) -> None:
        self._active = list(active.values())
        self._shadow = dict(shadow or {})  # model id -> slot

    def lease_active(self) -> list[ModelSlot]:
        return list(self._active)

    def lease_shadow(self, model_id: str) -> ModelSlot | None:
        return self._shadow.get(model_id)

    def lease(self, key: str) -> ModelSlot:
        for slot in (*self._active, *self._shadow.values()):
            if slot.key == key:
                return slot
        raise NotFoundError(f"model version {key} is not served")

    def release(self, key: str) -> None:
        return None


def plan_chains(study: Study, slots: Sequence[ModelSlot]) -> list[tuple[Series, list[ModelSlot]]]:
    """Group the models that accept a series of the study into chains, upstream model first: a model that
    consumes another's output joins that model's chain when it accepts the same series; one whose upstream
    is not active or chose another series does not run (logged)."""
    chains: dict[str, tuple[Series, list[ModelSlot]]] = {}  # model id -> its chain
    for slot in slots:
        if slot.package.card.consumes is None:
            series = select_series(study, slot.package.series_rules())
            if series is not None:
                chains[slot.package.card.id] = (series, [slot])
    pending = [s for s in slots if s.package.card.consumes is not None]
    while pending:
        progressed = False
        for slot in list(pending):
            consumes = slot.package.card.consumes
            if consumes is None or consumes.model not in chains:
                continue
            pending.remove(slot)
            progressed = True
            series, chain = chains[consumes.model]
            if select_series(study, slot.package.series_rules()) is series:
                chain.append(slot)
                chains[slot.package.card.id] = (series, chain)
        if not progressed:
            break
    for slot in pending:
        log.info("model %s: its upstream model did not run on this study", slot.key)
    unique = {id(chain): (series, chain) for series, chain in chains.values()}
    return list(unique.values())


def priority_for(rules: Sequence[PriorityRule], study: Study, series: Series) -> Priority:
    """The lane of a job on `series` of `study`: the first rule whose given fields all hold, else routine."""
    for rule in rules:
        if rule.calling_ae is not None and rule.calling_ae.strip() != study.calling_ae.strip():
            continue
        if rule.modality and series.modality not in rule.modality:
            continue
        if rule.series_description is not None and not re.search(
            rule.series_description, series.description, re.IGNORECASE
        ):
            continue
        return Priority(rule.priority)
    return Priority.ROUTINE


class Lane:
    """A PatchInferer that submits every patch of a job in the job's lane."""

    def __init__(self, inner: PatchInferer, priority: Priority) -> None:
        self._inner, self._priority = inner, priority

    def job_device(self) -> str | None:
        """The inner inferer's device for a new job (radai.ports.DeviceInferer), None on the host."""
        return self._inner.job_device() if isinstance(self._inner, DeviceInferer) else None

    def _lane(self, priority: Priority) -> Priority:
        return min(priority, self._priority, key=lambda p: p.rank)

    def infer(
        self, job_id: str, patches: NDArray[np.float32], priority: Priority = Priority.ROUTINE
    ) -> NDArray[np.float32]:
        return self._inner.infer(job_id, patches, self._lane(priority))

    def infer_tensor(
        self, job_id: str, patches: torch.Tensor, priority: Priority = Priority.ROUTINE
    ) -> torch.Tensor:
        if not isinstance(self._inner, DeviceInferer):
            raise InferenceError("this model's inferer takes no tensors")
        return self._inner.infer_tensor(job_id, patches, self._lane(priority))
