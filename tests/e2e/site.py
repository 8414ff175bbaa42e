"""A site as an administrator sets it up: a real Orthanc auto-forwarding stable CT/MR series to `radai serve`
with the shipped Lua script (docs/orthanc/autoforward.lua), and radai sending its results back to Orthanc."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom

from tests.dicom_router.peers import free_port
from tests.e2e.peers import RadaiServer, radai_serve
from tests.orthanc import OrthancServer, run_orthanc

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "docs" / "orthanc" / "autoforward.lua"
STABLE_AGE_S = 2


@dataclass
class Site:
    orthanc: OrthancServer
    radai: RadaiServer


@contextmanager
def run_site(tmp: Path, outputs: list[str] | None = None) -> Iterator[Site]:
    """Orthanc (accepting the modality and radai, forwarding to radai) and radai (sending back to Orthanc the
    `outputs` given, else its default ones)."""
    radai_port = free_port()
    extra = {
        "DicomModalities": {
            "modality": ["MODALITY", "127.0.0.1", free_port()],
            "radai": ["RADAI", "127.0.0.1", radai_port],
        },
        "LuaScripts": [str(LUA)],
        "StableAge": STABLE_AGE_S,
    }
    with run_orthanc(tmp / "orthanc", extra=extra) as orthanc:
        destination: dict[str, object] = {
            "name": "orthanc",
            "ae_title": orthanc.aet,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
        }
        if outputs is not None:
            destination["outputs"] = outputs
        with radai_serve(tmp, None, dicom_port=radai_port, destinations=[destination]) as radai:
            yield Site(orthanc, radai)


def study_id(orthanc: OrthancServer, study_uid: str) -> str | None:
    """Orthanc's id of the study, or None while it has none."""
    found = httpx.post(f"{orthanc.http_url}/tools/lookup", content=study_uid, timeout=10).json()
    return next((str(item["ID"]) for item in found if item["Type"] == "Study"), None)


def modalities(orthanc: OrthancServer, study_uid: str) -> list[str]:
    """The modality of each series of the study in Orthanc, sorted."""
    found = study_id(orthanc, study_uid)
    if found is None:
        return []
    return sorted(
        str(s["MainDicomTags"].get("Modality", "")) for s in orthanc.get(f"/studies/{found}/series")
    )


def instances_of(orthanc: OrthancServer, study_uid: str, modality: str) -> list[pydicom.Dataset]:
    """The study's instances of one modality, as stored by Orthanc."""
    found = study_id(orthanc, study_uid)
    out: list[pydicom.Dataset] = []
    for series in orthanc.get(f"/studies/{found}/series"):
        if series["MainDicomTags"].get("Modality") != modality:
            continue
        for instance_id in series["Instances"]:
            raw = httpx.get(f"{orthanc.http_url}/instances/{instance_id}/file", timeout=30).content
            out.append(pydicom.dcmread(io.BytesIO(raw)))
    return out
