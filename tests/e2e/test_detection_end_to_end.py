"""Detection end to end: a real CT (held out from the detector's training) with one synthetic lesion inserted is
sent by DCMTK storescu to `radai serve` serving the demonstration lesion detector; the PACS (storescp) gets a
TID 1500 Comprehensive 3D SR whose finding lies at the inserted lesion's location."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from model_zoo.lesion_synth import insert_lesions, load_series, write_series
from radai.imaging.volume import build_volume
from tests.e2e.peers import CRLM, ROOT, radai_serve, send_folder, storescp, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CRLM.is_dir(), reason="../shared test data not present"),
]

HELD_OUT = CRLM / "CRLM-CT-1004" / "image"  # never seen in the detector's training
CATALOGUE = ROOT / "model_zoo" / "catalogue"
MATCH_MM = 10.0  # the distance the detector's card states for a true positive


def _ellipsoid_centres(sr: pydicom.Dataset) -> list[np.ndarray]:
    """Centre of every SCOORD3D ellipsoid (mean of its 3 axes' 6 end points) or point in the report."""
    centres: list[np.ndarray] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "SCOORD3D":
                points = np.asarray(item.GraphicData, dtype=np.float64).reshape(-1, 3)
                centres.append(points.mean(axis=0))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return centres


def test_a_ct_with_an_inserted_lesion_yields_an_sr_finding_at_the_lesion(tmp_path: Path) -> None:
    datasets = load_series(HELD_OUT)
    volume = build_volume(datasets)
    with_lesion, lesions = insert_lesions(volume, seed=0, count=1)
    (lesion,) = lesions
    series_dir = tmp_path / "study"
    write_series(datasets, with_lesion.array, series_dir, "e2e-lesion")
    study_uid = str(datasets[0].StudyInstanceUID)

    extra: dict[str, dict[str, object]] = {
        "models": {"paths": [str(CATALOGUE)], "enabled": ["ct-lesion-demo"]}
    }
    with (
        storescp(tmp_path / "pacs") as pacs,
        radai_serve(tmp_path, pacs, quiet_seconds=1.0, extra=extra) as server,
    ):
        assert send_folder(server.dicom_port, series_dir).returncode == 0

        def reports() -> list[pydicom.Dataset]:
            found = [pydicom.dcmread(p) for p in pacs.files()]
            return [ds for ds in found if ds.Modality == "SR" and ds.StudyInstanceUID == study_uid]

        wait_for(lambda: bool(reports()), 240, "the findings SR at the PACS")
        (sr,) = reports()
        (job,) = server.get(f"/api/v1/studies/{study_uid}").json()["jobs"]
        assert job["model_key"] == "ct-lesion-demo@1.0.0" and job["state"] in ("delivering", "delivered")

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert groups, "the report holds no finding"
    assert all(g.finding_type == codes.SCT.Lesion for g in groups)
    centres = _ellipsoid_centres(sr)
    distances = [float(np.linalg.norm(c - np.asarray(lesion.center_lps))) for c in centres]
    assert min(distances) <= MATCH_MM, f"nearest finding {min(distances):.1f} mm from the inserted lesion"
    assert len(groups) <= 2  # the lesion, and at most one false positive
    frame_of_reference = {str(item.ReferencedFrameOfReferenceUID) for item in _scoords(sr)}
    assert frame_of_reference == {str(datasets[0].FrameOfReferenceUID)}


def _scoords(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    out: list[pydicom.Dataset] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "SCOORD3D":
                out.append(item)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return out
