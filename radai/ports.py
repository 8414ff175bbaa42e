"""Protocols the application services talk to; adapters implement them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset


class ModelRunner(Protocol):
    """Runs one model on a batch: (N, C, X, Y, Z) float32 in, (N, K, X, Y, Z) float32 scores out."""

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]: ...

    def close(self) -> None: ...


class ResultSender(Protocol):
    """Delivers result datasets to one destination; raises radai.errors.DeliveryError on failure."""

    @property
    def name(self) -> str: ...

    def send(self, datasets: Sequence[Dataset]) -> None: ...


class Clock(Protocol):
    def __call__(self) -> float: ...
