"""Durable on-disk spool of received instances, one file per SOP Instance UID.

An instance is durable before the C-STORE is acknowledged: written to a temporary file in the same
directory, flushed and fsynced, atomically renamed onto its final name, then the directory is fsynced so
that the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from dicom_router.uids import is_valid_uid

SUFFIX = ".dcm"
_TEMP_PREFIX = ".incoming-"
_TEMP_SUFFIX = ".part"


class Spool:
    """A directory of received DICOM files named ``<SOP Instance UID>.dcm``."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)

    @property
    def root(self) -> Path:
        """The spool directory."""
        return self._root

    def path_for(self, sop_instance_uid: str) -> Path:
        """The file an instance is (or would be) stored at; ValueError for an invalid UID.

        Validating the UID is what keeps a hostile UID ('../../etc/x') from escaping the spool.
        """
        if not is_valid_uid(sop_instance_uid):
            raise ValueError("invalid SOP Instance UID")
        return self._root / f"{sop_instance_uid}{SUFFIX}"

    def store(self, sop_instance_uid: str, encoded: bytes) -> Path:
        """Durably write ``encoded`` for the instance and return its path.

        Idempotent per UID: storing the same UID again atomically replaces the file (last write wins),
        so a re-sent instance never produces a second file. Raises ValueError for an invalid UID and
        OSError when the write fails (e.g. disk full); no partial file is left behind.
        """
        final = self.path_for(sop_instance_uid)
        fd, tmp_name = tempfile.mkstemp(dir=self._root, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(encoded)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        self._fsync_dir()
        return final

    def remove(self, path: Path) -> None:
        """Delete a spooled file (missing files are ignored); refuses paths outside the spool."""
        path = Path(path)
        if path.parent.resolve() != self._root.resolve():
            raise ValueError("path is not in this spool")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._fsync_dir()

    def pending(self) -> list[Path]:
        """Instances already in the spool (sorted by name), ignoring interrupted temporary writes."""
        return sorted(
            p for p in self._root.iterdir() if p.suffix == SUFFIX and is_valid_uid(p.name[: -len(SUFFIX)])
        )

    def discard_partial(self) -> int:
        """Delete temporary files left by an interrupted write; returns how many were removed."""
        removed = 0
        for p in self._root.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
        return removed

    def _fsync_dir(self) -> None:
        fd = os.open(self._root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
