"""Priority lanes end to end in the scheduler: which studies are STAT (routing rules on the calling AE,
modality, series description), and a STAT job's patches overtaking queued background work."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from dicom_router.assembler import Series, Study
from radai.catalog import Lane, priority_for
from radai.config import PriorityRule, load_settings
from radai.domain import Priority
from radai.errors import ConfigError
from radai.scheduling.loop import Scheduler
from tests.radai.test_scheduling_loop import JOIN_S, GatedRunner, patches, wait_until


def study(calling_ae: str, description: str = "CT ABDOMEN", modality: str = "CT") -> tuple[Study, Series]:
    series = Series("1.2", modality, description, "ABDOMEN", ("ORIGINAL",), "axial")
    return Study("1", {"1.2": series}, 0.0, 0.0, calling_ae), series


RULES = [
    PriorityRule(priority="stat", calling_ae="ER_CT"),
    PriorityRule(priority="stat", modality=["CT"], series_description=r"\bstroke\b"),
    PriorityRule(priority="background", calling_ae="RESEARCH"),
]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("ER_CT",), Priority.STAT),
        (("WARD", "CT Head STROKE protocol"), Priority.STAT),
        (("WARD", "CT Head stroke protocol", "MR"), Priority.ROUTINE),
        (("RESEARCH",), Priority.BACKGROUND),
        (("WARD",), Priority.ROUTINE),
    ],
)
def test_the_first_matching_rule_sets_the_lane(args: tuple[str, ...], expected: Priority) -> None:
    s, series = study(*args)
    assert priority_for(RULES, s, series) is expected


def test_a_bad_rule_is_refused_at_start_up_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text("scheduler: {priorities: [{priority: urgent}]}\n")
    with pytest.raises(ConfigError, match=r"scheduler\.priorities\.0\.priority"):
        load_settings(cfg)
    cfg.write_text("scheduler: {priorities: [{priority: stat, series_description: '(unclosed'}]}\n")
    with pytest.raises(ConfigError, match=r"scheduler\.priorities\.0\.series_description"):
        load_settings(cfg)


def test_a_stat_jobs_patches_run_in_the_next_batch_ahead_of_queued_background_work() -> None:
    runner = GatedRunner()
    order: list[tuple[str, ...]] = []
    scheduler = Scheduler("m", runner, 2, 5.0, on_batch=lambda r: order.append(r.job_ids))
    scheduler.start()
    results: dict[str, NDArray[np.float32]] = {}

    def job(job_id: str, n: int, priority: Priority) -> Callable[[], None]:
        lane = Lane(scheduler, priority)
        return lambda: results.__setitem__(job_id, lane.infer(job_id, patches(n, 0)))

    try:
        background = threading.Thread(target=job("bg", 8, Priority.BACKGROUND), daemon=True)
        background.start()
        assert runner.entered.wait(JOIN_S)  # the first background batch is running, 6 patches queued
        wait_until(lambda: scheduler.depth == 6)
        stat = threading.Thread(target=job("stat", 2, Priority.STAT), daemon=True)
        stat.start()
        wait_until(lambda: scheduler.depth == 8)
        runner.gate.set()
        background.join(JOIN_S)
        stat.join(JOIN_S)
    finally:
        scheduler.stop(timeout_s=1.0)
    assert order == [("bg",), ("stat",), ("bg",), ("bg",), ("bg",)]
    assert results["stat"].shape[0] == 2 and results["bg"].shape[0] == 8


def test_several_devices_are_accepted_and_a_bad_one_is_refused_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text("scheduler: {devices: [cuda:0, cuda:1], batches_in_flight: 2}\n")
    assert load_settings(cfg).scheduler.devices == ["cuda:0", "cuda:1"]
    cfg.write_text("scheduler: {devices: [gpu0]}\n")
    with pytest.raises(ConfigError, match=r"scheduler\.devices\.0"):
        load_settings(cfg)
