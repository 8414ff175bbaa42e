"""A chain of jobs planned by one process and run by another (scale-out: a receiver plans, a worker runs).

A chain is one series' jobs in order: a model that consumes another's mask runs after it, on the same
worker. `run` False: that job's results were already delivered; it runs again only to give its mask to the
next model of the chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from radai.domain import JobSpec


@dataclass(frozen=True)
class PlannedJob:
    spec: JobSpec
    run: bool = True


@dataclass(frozen=True)
class PlannedChain:
    series_uid: str
    paths: tuple[Path, ...]  # the series' instance files in the spool
    jobs: tuple[PlannedJob, ...]

    @property
    def head(self) -> JobSpec:
        return self.jobs[0].spec
