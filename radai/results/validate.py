"""IOD validation of result objects with dciodvfy (dicom3tools), when it is installed.

The one place in ``radai.results`` that touches the disk: the dataset is written to a temporary
file because dciodvfy reads files only.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from pydicom import Dataset

from radai.errors import EncodingError

_TIMEOUT_S = 120.0


def dciodvfy_messages(ds: Dataset) -> list[str] | None:
    """All "Error" and "Warning" lines dciodvfy prints for ``ds``; None if dciodvfy is missing."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory(prefix="radai-dciodvfy-") as tmp:
        path = Path(tmp) / "object.dcm"
        try:
            ds.save_as(path, enforce_file_format=True)
        except (ValueError, AttributeError, TypeError) as exc:
            raise EncodingError(f"dataset cannot be written as a DICOM file: {exc}") from exc
        try:
            done = subprocess.run(
                [exe, str(path)], capture_output=True, text=True, errors="replace", timeout=_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as exc:
            raise EncodingError("dciodvfy did not finish") from exc
    lines = (done.stdout + "\n" + done.stderr).splitlines()
    return [line.strip() for line in lines if line.startswith(("Error", "Warning"))]


def dciodvfy_errors(ds: Dataset) -> list[str] | None:
    """The "Error" lines dciodvfy prints for ``ds`` (empty if valid); None if dciodvfy is missing."""
    messages = dciodvfy_messages(ds)
    if messages is None:
        return None
    return [m for m in messages if m.startswith("Error")]
