"""Fixtures for the dicom_router tests: a running StoreSCP that records the headers it hands on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicom_router.headers import InstanceHeader
from dicom_router.scp import StoreSCP
from dicom_router.spool import Spool


@dataclass
class RunningScp:
    scp: StoreSCP
    spool: Spool
    headers: list[InstanceHeader]

    @property
    def port(self) -> int:
        return self.scp.port


@pytest.fixture
def running_scp(tmp_path: Path) -> Iterator[RunningScp]:
    """A StoreSCP on a free loopback port, spooling into tmp_path/spool; stopped after the test."""
    spool = Spool(tmp_path / "spool")
    headers: list[InstanceHeader] = []  # list.append is atomic: safe from the association threads
    scp = StoreSCP("RADAI", "127.0.0.1", 0, spool, headers.append)
    scp.start()
    try:
        yield RunningScp(scp=scp, spool=spool, headers=headers)
    finally:
        scp.stop()
