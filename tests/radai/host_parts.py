"""A model host serving the threshold package (card max_batch 2) on runners a test makes, for the tests of the
batch a loaded model is served at (memory budget, tuning)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radai.app import make_runner_factory, make_validator
from radai.hosting import HostOptions, ModelHost
from radai.models.registry import RunnerFactory
from radai.ports import ModelRunner
from radai.scheduling.loop import Scheduler
from radai.storage.model_store import ModelStore
from tests.radai.model_packages import threshold_package


def served_batch(tmp_path: Path, runner: Callable[[], ModelRunner], device: str, **options: Any) -> int:
    """The batch the host serves the package at when its serving runner (one, on `device`) is `runner()`;
    the reference check runs on the real ONNX Runtime CPU runner. `options` are HostOptions fields."""
    registry = ModelStore(tmp_path / "registry")
    registry.add(threshold_package(tmp_path / "v1"), make_validator("cpu"))

    def on(_: str) -> RunnerFactory:
        return lambda backend, weights, channels: runner()

    host_options = dataclasses.replace(HostOptions(poll_s=3600, devices=(device,), runner_on=on), **options)
    host = ModelHost(registry, make_runner_factory("cpu"), host_options)
    host.start()
    try:
        (slot,) = host.lease_active()
        host.release(slot.key)
        assert isinstance(slot.inferer, Scheduler)
        return slot.inferer.max_batch
    finally:
        host.stop()
