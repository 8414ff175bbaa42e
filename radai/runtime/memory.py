"""How many windows of a model fit in a batch on its GPU: measured at load, capped by a memory budget.

A card's `runtime.max_batch` says what the model takes; the GPU says what fits beside everything else on it.
At load the runner scores one and then two windows and reads the device's peak allocation each time: the
difference is what one more window costs, the rest is fixed (weights, workspace). The batch is the largest
that keeps fixed + n x per-window within `fraction` of the memory free at that moment. An out-of-memory error
later still splits the batch (radai.scheduling.loop); this keeps it from happening on every batch. The peak is
the device's: a model loading while another runs batches on the same GPU gets a larger estimate (a smaller
batch), or, where the other frees memory meanwhile, a smaller one that the split then corrects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryUse:
    """One model's measured device memory, and what its device had free when it was measured."""

    fixed_bytes: int  # weights, workspace and the one-window activations' floor
    per_window_bytes: int  # what each further window of the batch adds
    free_bytes: int  # free on the device before the measurement (torch.cuda.mem_get_info)


@runtime_checkable
class MeasuresMemory(Protocol):
    """A runner that can measure its device memory for a window shape (None where it cannot: on a CPU)."""

    def memory_use(self, window: tuple[int, ...]) -> MemoryUse | None: ...


def fit_batch(use: MemoryUse, fraction: float, max_batch: int) -> int:
    """The largest batch <= `max_batch` with fixed + n x per-window <= fraction x free; at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if use.per_window_bytes <= 0:
        return max_batch
    room = fraction * use.free_bytes - use.fixed_bytes
    return max(1, min(max_batch, int(room // use.per_window_bytes)))


def batch_for(runner: object, window: tuple[int, ...], fraction: float, max_batch: int, name: str) -> int:
    """The batch a model's scheduler closes at on this runner: `max_batch`, lowered to what fits in
    `fraction` of the device's free memory where the runner can measure it."""
    if not isinstance(runner, MeasuresMemory):
        return max_batch
    use = runner.memory_use(window)
    if use is None:
        return max_batch
    batch = fit_batch(use, fraction, max_batch)
    mib = 1 << 20
    log.info(
        "model %s: %d MiB fixed + %d MiB per window, %d MiB free: batches of up to %d (card: %d)",
        name,
        use.fixed_bytes // mib,
        use.per_window_bytes // mib,
        use.free_bytes // mib,
        batch,
        max_batch,
    )
    return batch
