"""Every entry of the hostile-input catalogue gets its documented answer from a live SCP, within a time
bound, and the SCP keeps serving: the next valid store after each entry succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_router.scp import StoreSCP
from dicom_router.spool import Spool
from tests.dicom_router.hostile_catalogue import CAP_INFLATED, CT_FILE, DOC, catalogue, documented, send

pytestmark = pytest.mark.skipif(not CT_FILE.is_file(), reason="../shared test data not present")

TIME_BOUND_S = 10.0  # an answer, not a hang: generous for a loaded 2-core CI machine


def test_catalogue_has_at_least_100_entries_and_all_are_documented() -> None:
    entries = catalogue()
    table = documented()
    assert len(entries) >= 100
    missing = [(e.group, e.name) for e in entries if (e.group, e.name.replace("|", "/")) not in table]
    assert missing == [], f"not in {DOC.name}: {missing[:5]}"


def test_every_hostile_input_gets_its_documented_answer_and_the_scp_keeps_serving(tmp_path: Path) -> None:
    import time

    table = documented()
    control = CT_FILE.read_bytes()
    spool = Spool(tmp_path / "spool")
    scp = StoreSCP(
        "RADAI", "127.0.0.1", 0, spool, on_instance=lambda _h: None, max_inflated_bytes=CAP_INFLATED
    )
    scp.start()
    wrong: list[str] = []
    try:
        for entry in catalogue():
            t0 = time.perf_counter()
            answer = send(scp.port, entry.make(), tmp_path)
            elapsed = time.perf_counter() - t0
            expected = table[(entry.group, entry.name.replace("|", "/"))]
            if answer != expected:
                wrong.append(f"{entry.group} / {entry.name}: got {answer!r}, documented {expected!r}")
            assert elapsed < TIME_BOUND_S, f"{entry.name}: no answer within {TIME_BOUND_S} s"
            assert send(scp.port, control, tmp_path) == "0x0000 SUCCESS", (
                f"SCP stopped serving after {entry.name}"
            )
    finally:
        scp.stop()
    assert wrong == []
    # nothing half-written is left behind by the refused inputs
    assert not [p for p in spool.root.rglob("*") if p.is_file() and p.suffix != ".dcm"]
