"""A running server's model host when the registry goes wrong: a damaged or failing version is never switched
in, and the version already loaded keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from radai.app import make_runner_factory, make_validator
from radai.errors import ConfigError, NotFoundError
from radai.hosting import HostOptions, ModelHost
from radai.storage.model_store import ModelStore
from tests.radai.model_packages import threshold_package

VALIDATE = make_validator("cpu")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[ModelStore, ModelHost]]:
    registry = ModelStore(tmp_path / "registry")
    registry.add(threshold_package(tmp_path / "v1"), VALIDATE)
    registry.add(threshold_package(tmp_path / "v2", version="1.1.0", thresholds_hu=(-150.0,)), VALIDATE)
    h = ModelHost(registry, make_runner_factory("cpu"), HostOptions(poll_s=3600))
    h.start()
    try:
        yield registry, h
    finally:
        h.stop()


def installed(registry: ModelStore, version: str) -> Path:
    return registry.root / "packages" / "threshold" / version


def test_a_new_version_failing_its_reference_check_at_load_is_not_switched_in(
    host: tuple[ModelStore, ModelHost],
) -> None:
    registry, h = host
    out = installed(registry, "1.1.0") / "reference" / "output.npy"
    np.save(out, np.load(out) + 1.0)  # changed on disk after it was registered
    registry.activate("threshold@1.1.0")
    assert h.reconcile() is False
    assert [p.key for p in h.active] == ["threshold@1.0.0"]
    assert h.loaded == {"threshold@1.0.0": 0}


def test_damaged_weights_of_the_active_version_keep_the_loaded_copy_and_switch_to_no_other(
    host: tuple[ModelStore, ModelHost],
) -> None:
    registry, h = host
    weights = installed(registry, "1.0.0") / "model.onnx"
    weights.write_bytes(weights.read_bytes() + b"\x00")
    assert registry.selection().broken == frozenset({"threshold"})
    assert h.reconcile() is False
    assert [p.key for p in h.active] == ["threshold@1.0.0"]  # not 1.1.0, which nobody activated
    (slot,) = h.lease_active()
    h.release(slot.key)


def test_a_removed_model_is_unloaded_and_the_server_refuses_to_start_with_no_model(tmp_path: Path) -> None:
    registry = ModelStore(tmp_path / "registry")
    registry.add(threshold_package(tmp_path / "v1"), VALIDATE)
    h = ModelHost(registry, make_runner_factory("cpu"), HostOptions(poll_s=3600))
    h.start()
    try:
        (slot,) = h.lease_active()  # a job holds it
        registry.remove("threshold")
        assert h.reconcile() is True and h.active == []
        assert h.loaded == {"threshold@1.0.0": 1}  # still loaded for the job
        h.release(slot.key)
        assert h.loaded == {}
    finally:
        h.stop()
    with pytest.raises(ConfigError, match="no valid model package could be loaded"):
        ModelHost(registry, make_runner_factory("cpu"), HostOptions(poll_s=3600)).start()


def test_a_job_planned_on_a_version_not_served_gets_it_loaded_for_itself_and_unloaded_after(
    host: tuple[ModelStore, ModelHost],
) -> None:
    _, h = host
    assert list(h.loaded) == ["threshold@1.0.0"]
    slot = h.lease("threshold@1.1.0")  # a scale-out worker running a job a receiver planned on 1.1.0
    assert slot.key == "threshold@1.1.0" and h.loaded == {"threshold@1.0.0": 0, "threshold@1.1.0": 1}
    assert [p.key for p in h.active] == ["threshold@1.0.0"]  # serving it for the job does not activate it
    assert h.lease("threshold@1.1.0") is slot  # a second job shares the loaded copy
    h.release("threshold@1.1.0")
    h.release("threshold@1.1.0")
    assert list(h.loaded) == ["threshold@1.0.0"]
    active = h.lease("threshold@1.0.0")
    h.release(active.key)
    assert list(h.loaded) == ["threshold@1.0.0"]  # the active version stays after its leases end
    with pytest.raises(NotFoundError):
        h.lease("threshold@9.9.9")
