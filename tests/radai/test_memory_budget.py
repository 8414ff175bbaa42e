"""A model's batch is what its card allows and what fits in the GPU memory budget, measured at load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radai.runtime.fake import FakeRunner
from radai.runtime.memory import MemoryUse, batch_for, fit_batch
from radai.runtime.torch_backend import TorchRunner
from tests.radai.host_parts import served_batch

MIB = 1 << 20


def test_the_batch_is_the_most_windows_that_fit_in_the_share_of_free_memory() -> None:
    use = MemoryUse(fixed_bytes=1000 * MIB, per_window_bytes=500 * MIB, free_bytes=10_000 * MIB)
    assert fit_batch(use, 0.8, 64) == 14  # (8000 - 1000) / 500
    assert fit_batch(use, 1.0, 64) == 18
    assert fit_batch(use, 0.8, 4) == 4  # the card's batch is the ceiling
    assert fit_batch(use, 0.1, 64) == 1  # nothing fits: one window, the OOM split is the last resort


def test_a_model_whose_windows_cost_nothing_measurable_keeps_the_cards_batch() -> None:
    assert fit_batch(MemoryUse(100, 0, 1000), 0.8, 8) == 8


@pytest.mark.parametrize(("fraction", "max_batch"), [(0.0, 4), (1.5, 4), (0.5, 0)])
def test_a_budget_outside_its_range_is_refused(fraction: float, max_batch: int) -> None:
    with pytest.raises(ValueError):
        fit_batch(MemoryUse(0, 1, 10), fraction, max_batch)


def test_runners_that_cannot_measure_memory_keep_the_cards_batch() -> None:
    assert batch_for(FakeRunner(), (64, 64, 16), 0.8, 6, "m") == 6  # reports None: a CPU
    assert batch_for(object(), (64, 64, 16), 0.8, 6, "m") == 6


def budget_batch(tmp_path: Path, memory: MemoryUse | None) -> int:
    """The batch a host serves at on a GPU runner (a fake) reporting `memory`, with half of it as the budget."""
    return served_batch(tmp_path, lambda: FakeRunner(2, memory=memory), "cuda:0", memory_fraction=0.5)


def test_a_loaded_model_batches_at_what_its_gpu_budget_allows(tmp_path: Path) -> None:
    # The threshold card allows 2; half of 300 MiB free, less 100 MiB fixed, holds one 40 MiB window.
    tight = MemoryUse(fixed_bytes=100 * MIB, per_window_bytes=40 * MIB, free_bytes=300 * MIB)
    assert budget_batch(tmp_path / "tight", tight) == 1
    roomy = MemoryUse(fixed_bytes=100 * MIB, per_window_bytes=40 * MIB, free_bytes=80_000 * MIB)
    assert budget_batch(tmp_path / "roomy", roomy) == 2
    assert budget_batch(tmp_path / "cpu", None) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_torch_runner_measures_what_a_window_costs() -> None:
    model = Path(__file__).resolve().parents[2] / "model_zoo" / "ct_body_classical" / "model.onnx"
    runner = TorchRunner(model, device="cuda", cuda_graphs=True)
    use = runner.memory_use((256, 256, 24))
    assert use is not None
    assert use.per_window_bytes >= 256 * 256 * 24 * 4 * (1 + 4)  # at least its input and its four scores
    assert use.free_bytes > 0
    assert runner.cuda_graphs  # the probe ran eagerly and left graph capture as configured
    assert TorchRunner(model, device="cpu").memory_use((256, 256, 24)) is None
