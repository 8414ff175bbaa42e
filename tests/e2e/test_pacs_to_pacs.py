"""End to end: a real DCMTK storescu sends real studies to a real `radai serve`; a real DCMTK storescp is the
PACS and receives SEG + SR, checked with dciodvfy, pydicom and highdicom."""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from tests.dicom_router.peers import echoscu, raw_part10, raw_store_association
from tests.e2e.peers import (
    CRLM,
    T1_NIFTI,
    Pacs,
    RadaiServer,
    copy_as_new_study,
    radai_serve,
    send_folder,
    storescp,
    wait_for,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CRLM.is_dir(), reason="../shared test data not present"),
]

CT_1004 = CRLM / "CRLM-CT-1004" / "image"
CT_1006 = CRLM / "CRLM-CT-1006" / "image"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RadaiServer, Pacs]]:
    tmp = tmp_path_factory.mktemp("e2e")
    # A partial batch may wait 3 s for patches of other jobs, so that studies arriving together share batches
    # even when one is prepared a little faster than the other.
    with (
        storescp(tmp / "pacs") as pacs,
        radai_serve(tmp, pacs, quiet_seconds=1.0, max_wait_seconds=3.0) as server,
    ):
        yield server, pacs


def results_for(pacs: Pacs, study_uid: str) -> dict[str, list[Dataset]]:
    out: dict[str, list[Dataset]] = {}
    for path in pacs.files():
        ds = pydicom.dcmread(path)
        if ds.StudyInstanceUID == study_uid:
            out.setdefault(str(ds.Modality), []).append(ds)
    return out


def wait_results(pacs: Pacs, study_uid: str, timeout: float = 300) -> dict[str, list[Dataset]]:
    wait_for(lambda: {"SEG", "SR"} <= results_for(pacs, study_uid).keys(), timeout, "SEG and SR in the PACS")
    return results_for(pacs, study_uid)


def dciodvfy_errors(ds: Dataset, tmp: Path) -> list[str]:
    path = tmp / f"{ds.Modality}.dcm"
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def first_header(folder: Path) -> Dataset:
    return pydicom.dcmread(sorted(folder.glob("*.dcm"))[0], stop_before_pixels=True)


def sr_groups(sr: Dataset) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    doc = hd.sr.Comprehensive3DSR.from_dataset(sr)
    return list(doc.content.get_volumetric_roi_measurement_groups())


def volume_ml(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> float:
    (measurement,) = [m for m in group.get_measurements() if m.name.value == "118565006"]  # SCT Volume
    return float(measurement.value)


def test_echo_succeeds(stack: tuple[RadaiServer, Pacs]) -> None:
    server, _ = stack
    run = echoscu(server.dicom_port)
    assert run.returncode == 0, run.stderr


def test_non_dicom_payload_gets_failure_and_server_keeps_serving(
    stack: tuple[RadaiServer, Pacs], tmp_path: Path
) -> None:
    server, _ = stack
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(
        raw_part10(CTImageStorage, generate_uid(), b"this is not a DICOM data set \xff\xfe\x00" * 20)
    )
    with raw_store_association(server.dicom_port, CTImageStorage) as assoc:
        status = assoc.send_c_store(junk)
    assert status and status.Status != 0x0000 and (status.Status & 0xF000) in (0xA000, 0xC000)
    # still serving: C-ECHO works right after (and the next study succeeds, in the test below)
    assert echoscu(server.dicom_port).returncode == 0


def test_ct_study_comes_back_as_valid_seg_and_sr(stack: tuple[RadaiServer, Pacs], tmp_path: Path) -> None:
    server, pacs = stack
    src = first_header(CT_1004)
    sent = send_folder(server.dicom_port, CT_1004)
    assert sent.returncode == 0, sent.stderr
    results = wait_results(pacs, src.StudyInstanceUID)
    (seg,), (sr,) = results["SEG"], results["SR"]
    assert dciodvfy_errors(seg, tmp_path) == []
    assert dciodvfy_errors(sr, tmp_path) == []

    seg_doc = hd.seg.Segmentation.from_dataset(seg)
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [src.SeriesInstanceUID]
    labels = {seg_doc.get_segment_description(n).SegmentLabel: n for n in seg_doc.segment_numbers}
    assert "Body (soft tissue)" in labels

    groups = sr_groups(sr)
    assert len(groups) == len(labels)
    for group in groups:
        ref = group.referenced_segment
        assert ref is not None
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers[0] in labels.values()
    body = next(
        g
        for g in groups
        if g.referenced_segment.referenced_segment_numbers[0] == labels["Body (soft tissue)"]
    )
    # 41 slices x 5 mm of chest/abdomen at ~0.7 mm in-plane: a body of several litres, never 0 or a cube of air
    assert 3_000 < volume_ml(body) < 40_000
    assert sr.VerificationFlag == "UNVERIFIED"


def test_brain_mr_seg_lines_up_with_source_slices(stack: tuple[RadaiServer, Pacs], tmp_path: Path) -> None:
    from radai.imaging.synth import mr_series_from_nifti
    from radai.imaging.volume import build_volume

    server, pacs = stack
    series = mr_series_from_nifti(T1_NIFTI)
    folder = tmp_path / "mr"
    folder.mkdir()
    for i, ds in enumerate(series):
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
    assert send_folder(server.dicom_port, folder).returncode == 0
    results = wait_results(pacs, series[0].StudyInstanceUID, timeout=600)
    (seg,) = results["SEG"]
    assert dciodvfy_errors(seg, tmp_path) == []
    seg_doc = hd.seg.Segmentation.from_dataset(seg)
    names = {seg_doc.get_segment_description(n).SegmentLabel.lower(): n for n in seg_doc.segment_numbers}
    assert any("white" in n for n in names) and any("grey" in n or "gray" in n for n in names)

    # Same geometry: every SEG frame sits exactly on a source slice (position, orientation, spacing)
    positions = {tuple(round(float(v), 3) for v in ds.ImagePositionPatient): ds for ds in series}
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert np.allclose(
        shared.PlaneOrientationSequence[0].ImageOrientationPatient, series[0].ImageOrientationPatient
    )
    assert np.allclose(shared.PixelMeasuresSequence[0].PixelSpacing, series[0].PixelSpacing)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        pos = tuple(round(float(v), 3) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        assert pos in positions

    # ... and the masks line up with the anatomy: on T1, white matter is brighter than grey matter.
    volume = build_volume(series)
    order = {uid: k for k, uid in enumerate(volume.sop_instance_uids)}
    mean = {}
    for key, number in names.items():
        total, count = 0.0, 0
        for ds in series:
            k = order[ds.SOPInstanceUID]
            frame = seg_doc.get_pixels_by_source_instance(
                source_sop_instance_uids=[ds.SOPInstanceUID],
                segment_numbers=[number],
                assert_missing_frames_are_empty=True,
            )[0, :, :, 0]
            values = volume.array[:, :, k].T[frame > 0]
            total += float(values.sum())
            count += int(values.size)
        mean[key] = total / max(count, 1)
    white = next(v for k, v in mean.items() if "white" in k)
    grey = next(v for k, v in mean.items() if "grey" in k or "gray" in k)
    assert white > grey * 1.1


def test_two_studies_sent_together_share_batches(stack: tuple[RadaiServer, Pacs], tmp_path: Path) -> None:
    server, pacs = stack
    folders = {"a": CT_1006, "b": tmp_path / "b"}
    uids = {"a": first_header(CT_1006).StudyInstanceUID, "b": copy_as_new_study(CT_1004, folders["b"])}
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    threads = [
        threading.Thread(target=lambda n=n, f=f: results.__setitem__(n, send_folder(server.dicom_port, f)))
        for n, f in folders.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results.values())

    def both_done() -> bool:
        studies = {s["study_uid"]: s for s in server.get("/api/v1/studies").json()}
        return all(studies.get(u, {}).get("state") in ("done", "failed") for u in uids.values())

    wait_for(both_done, 300, "both studies delivered")
    studies = {s["study_uid"]: s for s in server.get("/api/v1/studies").json()}
    for uid in uids.values():
        (job,) = [j for j in studies[uid]["jobs"] if j["model_key"].startswith("ct-body-classical")]
        assert job["state"] == "delivered", job["reason"]
        assert job["shared_batches"] >= 1, job
    for uid in uids.values():
        assert len(wait_results(pacs, uid)["SEG"]) == 1


def test_metrics_show_every_stage(stack: tuple[RadaiServer, Pacs]) -> None:
    server, _ = stack
    text = server.get("/metrics").text
    for stage in ("received", "complete", "queued", "inferred", "encoded", "delivered"):
        counts = re.findall(rf'radai_study_stage_seconds_count\{{[^}}]*stage="{stage}"[^}}]*\}} (\S+)', text)
        assert counts and sum(float(c) for c in counts) > 0, stage
    assert re.search(r"radai_scheduler_batch_size_count\{[^}]*\} [1-9]", text)
    assert "radai_scheduler_queue_depth" in text
