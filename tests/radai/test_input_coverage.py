"""Input coverage: instances without UIDs are refused at the SCP with a stated reason, and every series of the
shared edge-case folders either builds a sane volume or is refused with a NotAVolumeError and a reason.

The sweep's table is docs/input-coverage.md; regenerate its rows with
``python -m tests.radai.test_input_coverage``.
"""

from __future__ import annotations

import logging
import queue
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, JPEG2000Lossless
from pynetdicom import AE, _config
from pynetdicom.status import code_to_category

from dicom_router.assembler import Study
from dicom_router.receiver import Receiver
from radai.errors import NotAVolumeError
from radai.imaging.volume import build_volume
from tests.dicom_router.peers import CT_SERIES, storescu

ROOT = Path(__file__).resolve().parents[2]
DICOM = ROOT.parent / "shared" / "data" / "dicom"
NO_UIDS = DICOM / "ct_abdomen_j2k_nouids" / "dicom"
SWEPT = ("edgecases", "ct_head_tilt_and_phantom")
DOC = ROOT / "docs" / "input-coverage.md"
QUIET = 0.3
WAIT = 30.0  # generous bound for a loaded CI machine; never a timing assertion

pytestmark = pytest.mark.skipif(not DICOM.is_dir(), reason="../shared test data not present")


# --- instances without UIDs, through a real Receiver ---------------------------------------------------------


@dataclass
class Running:
    receiver: Receiver
    studies: queue.Queue[Study]
    spool: Path


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    studies: queue.Queue[Study] = queue.Queue()
    spool = tmp_path / "spool"
    receiver = Receiver("RADAI", "127.0.0.1", 0, spool, QUIET, studies.put, release_grace_seconds=0.0)
    receiver.start()
    try:
        yield Running(receiver, studies, spool)
    finally:
        receiver.stop()


def _instance_files(spool: Path) -> list[Path]:
    """Anything under the spool big enough to be an instance (the CT slices are > 100 kB)."""
    return [p for p in spool.rglob("*") if p.is_file() and p.stat().st_size > 1024]


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("dicom_router") and r.levelno >= logging.WARNING and "refused" in r.getMessage()
    ]


def _accepts_a_valid_instance(running: Running) -> None:
    """The control: the same receiver stores a valid CT slice (so the refusals above were about the UIDs)."""
    sent = storescu(running.receiver.port, sorted(CT_SERIES.glob("*.dcm"))[:1])
    assert sent.returncode == 0, sent.stderr
    assert len(running.receiver.spool.pending()) == 1


def test_instances_with_empty_uids_are_refused_with_a_reason_and_nothing_is_spooled(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    # DCMTK storescu will not even send these (their data set has an empty SOP Class UID), so a lax
    # sender is played by pynetdicom, which takes the UIDs of the C-STORE request from the file meta.
    files = sorted(NO_UIDS.iterdir())
    assert len(files) == 20
    assert all(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID == "" for f in files)
    caplog.set_level(logging.WARNING, logger="dicom_router")
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, JPEG2000Lossless)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        assoc = ae.associate("127.0.0.1", running.receiver.port, ae_title="RADAI")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(f).Status) for f in files]
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        ae.shutdown()

    assert [code_to_category(s) for s in statuses] == ["Failure"] * len(files)
    reasons = _refusals(caplog)
    assert len(reasons) == len(files)
    assert all(re.search(r"(missing|invalid|empty)\b.*InstanceUID", r) for r in reasons), reasons
    assert running.receiver.spool.pending() == []
    assert _instance_files(running.spool) == []
    with pytest.raises(queue.Empty):
        running.studies.get(timeout=3 * QUIET)
    _accepts_a_valid_instance(running)


@pytest.mark.parametrize(
    ("keyword", "how"),
    [
        ("StudyInstanceUID", "empty"),
        ("StudyInstanceUID", "missing"),
        ("SeriesInstanceUID", "empty"),
        ("SeriesInstanceUID", "missing"),
    ],
)
def test_storescu_instance_without_study_or_series_uid_is_refused_with_a_reason(
    keyword: str, how: str, running: Running, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(sorted(CT_SERIES.glob("*.dcm"))[0])
    if how == "empty":
        setattr(ds, keyword, "")
    else:
        delattr(ds, keyword)
    path = tmp_path / "broken.dcm"
    ds.save_as(path)
    caplog.set_level(logging.WARNING, logger="dicom_router")

    sent = storescu(running.receiver.port, [path], "-v")

    assert sent.returncode != 0
    assert re.search(r"Received Store Response \((Error|Failed|Refused)", sent.stdout + sent.stderr)
    (reason,) = _refusals(caplog)
    assert keyword in reason
    assert _instance_files(running.spool) == []
    _accepts_a_valid_instance(running)


# --- every series of the shared edge cases: a volume or a stated reason -------------------------------------


@dataclass(frozen=True)
class Outcome:
    series: (
        str  # folder relative to ../shared/data/dicom, plus the UID's last digits where a folder has several
    )
    instances: int
    built: bool
    detail: str  # shape and spacing, or the refusal reason

    def row(self) -> str:
        outcome = "volume" if self.built else "refused"
        return f"| `{self.series}` | {self.instances} | {outcome} | {self.detail} |"


def _series() -> dict[tuple[str, str], list[Dataset]]:
    """Every DICOM image of the swept folders, grouped by (folder, SeriesInstanceUID)."""
    groups: dict[tuple[str, str], list[Dataset]] = defaultdict(list)
    for top in SWEPT:
        for path in sorted((DICOM / top).rglob("*")):
            if not path.is_file() or path.name.endswith((".gz", ".md", ".txt")) or path.name == "LICENSE":
                continue
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:
                continue
            if "PixelData" not in ds:  # DICOMDIR / DIRFILE: media directories, not images
                continue
            folder = str(path.parent.relative_to(DICOM))
            groups[(folder, str(ds.get("SeriesInstanceUID", "")))].append(ds)
    return groups


def _check_sane(datasets: list[Dataset]) -> str:
    vol = build_volume(datasets)
    x, y, z = vol.array.shape
    assert z >= 3 and x > 1 and y > 1
    assert np.all(np.isfinite(vol.array))
    spacing = np.array(vol.spacing)
    assert np.all((spacing > 0.1) & (spacing < 20.0))
    directions = vol.affine[:3, :3] / spacing
    np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=2e-3)  # orthonormal, no shear
    assert len(vol.sop_instance_uids) == z
    assert vol.frame_numbers is None or len(vol.frame_numbers) == z
    mm = "x".join(f"{s:.3g}" for s in spacing)
    return f"{x}x{y}x{z} voxels of {mm} mm"


def sweep() -> list[Outcome]:
    """Build every series; anything but a volume or NotAVolumeError propagates (and fails the test)."""
    groups = _series()
    per_folder: dict[str, int] = defaultdict(int)
    for folder, _ in groups:
        per_folder[folder] += 1
    outcomes: list[Outcome] = []
    for (folder, series_uid), datasets in sorted(groups.items()):
        name = folder if per_folder[folder] == 1 else f"{folder} (…{series_uid[-6:]})"
        try:
            outcomes.append(Outcome(name, len(datasets), True, _check_sane(datasets)))
        except NotAVolumeError as exc:
            outcomes.append(Outcome(name, len(datasets), False, str(exc)))
    return outcomes


@pytest.fixture(scope="module")
def outcomes() -> list[Outcome]:
    return sweep()


def test_every_edge_case_series_builds_or_is_refused_with_a_reason(outcomes: list[Outcome]) -> None:
    assert len(outcomes) >= 19
    assert all(o.detail.strip() for o in outcomes)
    built = {o.series for o in outcomes if o.built}
    assert {
        "edgecases/philips_enhanced/anatomical/001",
        "edgecases/siemens_multiframe/anatomical/001",
        "edgecases/generic/compressed_j2k/001",
        "ct_head_tilt_and_phantom/Philips_phantom/S21570/S2010",
    } <= built
    refused = {o.series for o in outcomes if not o.built}
    assert all(s.startswith("edgecases/failing/") for s in refused if s.startswith("edgecases/"))
    assert {
        f"edgecases/failing/{c}" for c in ("gantrytilting/001", "notavolume/001", "slicecount/001")
    } <= refused


def test_input_coverage_doc_lists_every_outcome(outcomes: list[Outcome]) -> None:
    doc = DOC.read_text(encoding="utf-8")
    missing = [o.row() for o in outcomes if o.row() not in doc]
    assert not missing, "docs/input-coverage.md is stale; rows to add:\n" + "\n".join(missing)


if __name__ == "__main__":
    for outcome in sweep():
        print(outcome.row())
