"""Crash test: `kill -9` a real `radai serve` at a random point while DCMTK storescu sends a CT series, restart
it on the same data directory and ports, let the PACS re-send the series (it never saw some acknowledgements),
then check that every instance acknowledged before the kill was durable, the study is processed with all of
its instances, and the PACS (a DCMTK storescp writing one file per reception) got exactly one SEG and one SR.

Trials: RADAI_CRASH_TRIALS (default 5); RADAI_CRASH_SEED makes the kill points reproducible.
"""

from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.dicom_router.peers import dcmtk_storescp
from tests.e2e.crash_peers import CrashableRadai, SendLog, send_watching_acks
from tests.e2e.peers import CRLM, Pacs, copy_as_new_study, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CRLM.is_dir(), reason="../shared test data not present"),
]

CT_1004 = CRLM / "CRLM-CT-1004" / "image"
TRIALS = int(os.environ.get("RADAI_CRASH_TRIALS", "5"))
SEED = int(os.environ.get("RADAI_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))
# Recovered studies wait for the quiet period, so the PACS's re-send joins them before they are processed.
# Long enough for a restart on a loaded machine; it costs nothing when the re-send comes (release + 1 s).
QUIET_SECONDS = 30.0
WAIT = 300.0  # generous bound per step; never a timing assertion


@dataclass(frozen=True)
class Trial:
    number: int
    kill_after_acks: int
    jitter: float
    acknowledged: int
    in_spool_after_restart: int


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class PacsIndex:
    """SEG and SR files in the PACS folder by study (headers read once per file)."""

    def __init__(self, pacs: Pacs) -> None:
        self._pacs = pacs
        self._seen: dict[Path, tuple[str, str, str]] = {}

    def results(self, study_uid: str) -> dict[str, list[tuple[Path, str]]]:
        for path in self._pacs.files():
            if path not in self._seen:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                self._seen[path] = (str(ds.StudyInstanceUID), str(ds.Modality), str(ds.SOPInstanceUID))
        out: dict[str, list[tuple[Path, str]]] = {}
        for path, (study, modality, sop) in self._seen.items():
            if study == study_uid:
                out.setdefault(modality, []).append((path, sop))
        return out


def _study_state(radai: CrashableRadai, study_uid: str) -> str | None:
    response = radai.server.get(f"/api/v1/studies/{study_uid}")
    return str(response.json()["state"]) if response.status_code == 200 else None


def _send_and_kill(radai: CrashableRadai, files: list[Path], kill_after: int, jitter: float) -> SendLog:
    """Send the series and SIGKILL the server once ``kill_after`` instances were acknowledged (+ jitter)."""
    reached = threading.Event()
    if kill_after == 0:
        reached.set()

    def on_ack(count: int) -> None:
        if count >= kill_after:
            reached.set()

    def killer() -> None:
        reached.wait(timeout=WAIT)
        threading.Event().wait(jitter)
        radai.kill()

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        log = send_watching_acks(radai.server.dicom_port, files, on_ack)
    finally:
        reached.set()  # storescu ended before the kill point: kill now
        thread.join()
    return log


def _check_durable(radai: CrashableRadai, acknowledged: list[Path]) -> int:
    """Every acknowledged instance is in the spool, byte-identical in its pixels to what was sent; returns
    how many instances the spool holds (acknowledged, plus any written but not yet answered at the kill)."""
    for source in acknowledged:
        spooled = radai.spool / f"{_sop_uid(source)}.dcm"
        assert spooled.is_file(), f"acknowledged instance {source.name} lost in the crash"
        sent, kept = pydicom.dcmread(source), pydicom.dcmread(spooled)
        assert kept.SOPInstanceUID == sent.SOPInstanceUID
        assert np.array_equal(kept.pixel_array, sent.pixel_array), source.name
    return sum(1 for _ in radai.spool.glob("*.dcm"))


def _run_trial(number: int, rng: random.Random, radai: CrashableRadai, pacs: PacsIndex, tmp: Path) -> Trial:
    folder = tmp / f"study-{number}"
    study_uid = copy_as_new_study(CT_1004, folder)
    files = sorted(folder.glob("*.dcm"))
    all_uids = {_sop_uid(p) for p in files}
    kill_after, jitter = rng.randrange(len(files)), rng.uniform(0.0, 0.01)

    first = _send_and_kill(radai, files, kill_after, jitter)
    radai.start()  # same data dir and ports: recovery runs before the SCP listens
    recovered = _check_durable(radai, first.acknowledged)

    resent = send_watching_acks(radai.server.dicom_port, files)  # the PACS re-sends the whole series
    assert resent.returncode == 0 and len(resent.acknowledged) == len(files), resent.other

    wait_for(lambda: _study_state(radai, study_uid) in ("done", "failed"), WAIT, "the study to be processed")
    study = radai.server.get(f"/api/v1/studies/{study_uid}").json()
    assert study["state"] == "done", study
    assert study["instances"] == len(files)
    assert all(job["state"] == "delivered" for job in study["jobs"]), study["jobs"]
    results = pacs.results(study_uid)
    assert len(results.get("SEG", [])) == 1 and len(results.get("SR", [])) == 1, results  # received once
    seg = pydicom.dcmread(results["SEG"][0][0])
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == all_uids  # processed with every instance, the acknowledged ones included
    # Leave a clean state for the next kill: the delivered study's instances have left the spool.
    wait_for(lambda: not any(radai.spool.glob("*.dcm")), WAIT, "the spool to be released")
    return Trial(number, kill_after, jitter, len(first.acknowledged), recovered)


def test_kill_9_during_a_send_loses_no_acknowledged_instance_and_delivers_each_study_once(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    trials: list[Trial] = []
    with dcmtk_storescp(tmp_path / "pacs", "+xa", "+uf") as pacs:  # +uf: a re-delivery is a second file
        radai = CrashableRadai(tmp_path, pacs, quiet_seconds=QUIET_SECONDS)
        radai.start()
        index = PacsIndex(pacs)
        try:
            for number in range(TRIALS):
                try:
                    trials.append(_run_trial(number, rng, radai, index, tmp_path))
                except Exception as exc:
                    exc.add_note(f"crash trial {number}, RADAI_CRASH_SEED={SEED}")
                    raise
        finally:
            radai.stop()
        for trial in trials:  # nothing delivered twice later on either (e.g. recovered after a delivery)
            results = index.results(_study_of(tmp_path / f"study-{trial.number}"))
            assert len(results["SEG"]) == 1 and len(results["SR"]) == 1, trial
    print(
        f"\ncrash trials: {len(trials)} (seed {SEED}); (killed after n acks, acknowledged, in spool "
        f"after restart): {[(t.kill_after_acks, t.acknowledged, t.in_spool_after_restart) for t in trials]}"
    )
    assert len(trials) == TRIALS


def _study_of(folder: Path) -> str:
    first = sorted(folder.glob("*.dcm"))[0]
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def test_a_study_cut_by_a_crash_is_completed_from_the_spool_without_a_resend(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    folder = tmp_path / "study"
    study_uid = copy_as_new_study(CT_1004, folder)
    files = sorted(folder.glob("*.dcm"))
    with dcmtk_storescp(tmp_path / "pacs", "+xa", "+uf") as pacs:
        radai = CrashableRadai(tmp_path, pacs, quiet_seconds=2.0)
        radai.start()
        try:
            first = _send_and_kill(radai, files, rng.randrange(20, len(files) - 1), 0.0)
            radai.start()
            in_spool = {p.name.removesuffix(".dcm") for p in radai.spool.glob("*.dcm")}
            assert {_sop_uid(p) for p in first.acknowledged} <= in_spool

            # No re-send: the recovered study is processed on its own once the quiet period has passed.
            wait_for(
                lambda: _study_state(radai, study_uid) in ("done", "failed"), WAIT, "the recovered study"
            )
            study = radai.server.get(f"/api/v1/studies/{study_uid}").json()
            assert study["state"] == "done", study
            assert study["instances"] == len(in_spool)
        finally:
            radai.stop()
        results = PacsIndex(pacs).results(study_uid)
        assert len(results.get("SEG", [])) == 1 and len(results.get("SR", [])) == 1, results
        seg = pydicom.dcmread(results["SEG"][0][0])
        referenced = {
            item.ReferencedSOPInstanceUID
            for series in seg.ReferencedSeriesSequence
            for item in series.ReferencedInstanceSequence
        }
        assert referenced == in_spool
