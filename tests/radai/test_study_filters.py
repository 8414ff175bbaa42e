"""Filtering studies in SQL (state, job state, model, time window, limit) on a real SQLite store, and the
same filters on `radai studies list`."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from radai.domain import JobSpec, JobState, Stage, StudyRecord, StudyState
from radai.storage.sqlite import SqliteJobStore

T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.UTC).timestamp()
HOUR = 3600.0


def add_study(
    store: SqliteJobStore, uid: str, completed_at: float, state: StudyState, jobs: dict[str, JobState]
) -> None:
    """A study complete at `completed_at` with one job per model key, each finished in its given state."""
    store.upsert_study(
        StudyRecord(
            uid, StudyState.COMPLETE, "MODALITY", 10, 1, completed_at - 60, completed_at - 5, completed_at
        )
    )
    for index, (model_key, job_state) in enumerate(jobs.items()):
        job_id = f"{uid.replace('.', '')}j{index}"
        store.add_job(
            JobSpec(
                job_id, uid, f"{uid}.{index}", model_key, completed_at - 60, completed_at - 5, completed_at
            )
        )
        store.mark_stage(job_id, Stage.QUEUED, completed_at + 1)
        if job_state is not JobState.QUEUED:
            store.mark_stage(job_id, Stage.INFERRED, completed_at + 10)
            store.finish_job(job_id, job_state, reason="boom" if job_state is JobState.FAILED else "")
    store.set_study_state(uid, state)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    s = SqliteJobStore(tmp_path / "radai-data" / "radai.sqlite")
    add_study(s, "1.1", T0, StudyState.DONE, {"ct-body@1.0.0": JobState.DELIVERED})
    add_study(
        s,
        "1.2",
        T0 + HOUR,
        StudyState.FAILED,
        {"ct-body@1.1.0": JobState.FAILED, "brain@2.0.0": JobState.DELIVERED},
    )
    add_study(s, "1.3", T0 + 2 * HOUR, StudyState.DEAD_LETTER, {"brain@2.0.0": JobState.DEAD_LETTER})
    add_study(s, "1.4", T0 + 3 * HOUR, StudyState.PROCESSING, {"ct-body-xl@1.0.0": JobState.QUEUED})
    add_study(s, "1.5", T0 + 4 * HOUR, StudyState.NO_MATCH, {})
    yield s
    s.close()


def uids(found: list[StudyRecord]) -> list[str]:
    return [s.study_uid for s in found]


def test_without_filters_every_study_comes_newest_first(store: SqliteJobStore) -> None:
    assert uids(store.list_studies()) == ["1.5", "1.4", "1.3", "1.2", "1.1"]
    assert uids(store.list_studies(2)) == ["1.5", "1.4"]


def test_state_keeps_only_studies_in_that_state(store: SqliteJobStore) -> None:
    assert uids(store.list_studies(state=StudyState.FAILED)) == ["1.2"]
    assert uids(store.list_studies(state=StudyState.COMPLETE)) == []


def test_model_id_matches_every_version_but_not_a_longer_id(store: SqliteJobStore) -> None:
    assert uids(store.list_studies(model="ct-body")) == ["1.2", "1.1"]  # not ct-body-xl
    assert uids(store.list_studies(model="ct-body@1.1.0")) == ["1.2"]
    assert uids(store.list_studies(model="brain")) == ["1.3", "1.2"]
    assert uids(store.list_studies(model="ct-body%")) == []  # no LIKE wildcards
    assert uids(store.list_studies(model="CT-BODY")) == []  # ids compare exactly


def test_job_state_with_model_needs_one_job_with_both(store: SqliteJobStore) -> None:
    assert uids(store.list_studies(job_state=JobState.DELIVERED)) == ["1.2", "1.1"]
    assert uids(store.list_studies(job_state=JobState.DELIVERED, model="brain")) == ["1.2"]
    # 1.2 has a failed ct-body job and a delivered brain job, but no failed brain job.
    assert uids(store.list_studies(job_state=JobState.FAILED, model="brain")) == []


def test_since_is_inclusive_and_until_exclusive_on_the_completion_time(store: SqliteJobStore) -> None:
    assert uids(store.list_studies(since=T0 + HOUR)) == ["1.5", "1.4", "1.3", "1.2"]
    assert uids(store.list_studies(until=T0 + HOUR)) == ["1.1"]
    assert uids(store.list_studies(since=T0 + HOUR, until=T0 + 3 * HOUR)) == ["1.3", "1.2"]
    assert uids(store.list_studies(since=T0 + 10 * HOUR)) == []


def test_filters_combine_and_the_limit_applies_after_them(store: SqliteJobStore) -> None:
    assert uids(store.list_studies(1, model="brain", since=T0)) == ["1.3"]
    assert uids(store.list_studies(model="brain", state=StudyState.DEAD_LETTER, until=T0 + 2 * HOUR)) == []
    found = store.list_studies(state=StudyState.FAILED, model="ct-body")
    (study,) = found
    assert {j.model_key: j.state for j in study.jobs} == {
        "brain@2.0.0": JobState.DELIVERED,
        "ct-body@1.1.0": JobState.FAILED,
    }


def radai_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
    env["RADAI_STORAGE__DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "radai", "studies", "list", *args],
        cwd=data_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def listed(run: subprocess.CompletedProcess[str]) -> list[str]:
    assert run.returncode == 0, run.stderr
    return [line.split("\t")[0] for line in run.stdout.splitlines() if "\t" in line]


def test_cli_studies_list_filters_by_state_model_and_since(store: SqliteJobStore, tmp_path: Path) -> None:
    data = tmp_path / "radai-data"
    assert listed(radai_cli(data, "--state", "failed")) == ["1.2"]
    assert listed(radai_cli(data, "--model", "brain")) == ["1.3", "1.2"]
    assert listed(radai_cli(data, "--since", "2026-11-23T10:00:00Z")) == ["1.5", "1.4", "1.3"]
    # 11:00+01:00 is 10:00 UTC; a date alone is its midnight (UTC).
    assert listed(radai_cli(data, "--since", "2026-11-23T11:00:00+01:00", "--model", "brain")) == ["1.3"]
    assert listed(radai_cli(data, "--since", "2026-11-24")) == []


def test_cli_refuses_an_unknown_state_or_a_bad_date_in_one_line(
    store: SqliteJobStore, tmp_path: Path
) -> None:
    data = tmp_path / "radai-data"
    for args in (("--state", "lost"), ("--since", "yesterday")):
        run = radai_cli(data, *args)
        assert run.returncode == 2, (args, run.stdout)
        assert "Traceback" not in run.stderr and args[0] in run.stderr
