"""Durable on-disk spool of received instances, one file per SOP Instance UID.

An instance is durable before the C-STORE is acknowledged: written to a temporary file in the same
directory, flushed and fsynced, atomically renamed onto its final name, then the directory is fsynced so
that the rename itself survives a power cut.

Before writing, the spool's file system is checked against a usage watermark and a free-space floor
(counting the incoming bytes): a store that would cross either raises :class:`SpoolFullError`, an OSError,
which the SCP answers with 0xA700 (out of resources). Files that cannot be read back at start-up are moved
to ``quarantine/`` rather than deleted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
from pathlib import Path

from dicom_router.uids import is_valid_uid

SUFFIX = ".dcm"
_TEMP_PREFIX = ".incoming-"
_TEMP_SUFFIX = ".part"
QUARANTINE = "quarantine"

DEFAULT_MAX_USED_FRACTION = 0.95
DEFAULT_MIN_FREE_BYTES = 512 * 1024 * 1024


class SpoolFullError(OSError):
    """The spool's file system is above its watermark or under its free-space floor (errno ENOSPC)."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ENOSPC, reason)


class Spool:
    """A directory of received DICOM files named ``<SOP Instance UID>.dcm``.

    ``max_used_fraction`` (0 < f <= 1) and ``min_free_bytes`` (>= 0) bound the file system's usage after a
    write; 1.0 and 0 switch the checks off (a write can still fail with ENOSPC, leaving no partial file).
    """

    def __init__(
        self,
        root: Path,
        *,
        max_used_fraction: float = DEFAULT_MAX_USED_FRACTION,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
    ) -> None:
        if not 0.0 < max_used_fraction <= 1.0:
            raise ValueError("max_used_fraction must be in (0, 1]")
        if min_free_bytes < 0:
            raise ValueError("min_free_bytes must be >= 0")
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._max_used = float(max_used_fraction)
        self._min_free = int(min_free_bytes)
        self._replace_lock = threading.Lock()

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
        so a re-sent instance never produces a second file. Raises ValueError for an invalid UID,
        SpoolFullError when the write would cross the watermark or the floor, and OSError when the write
        fails (e.g. disk full); no partial file is left behind.
        """
        final = self.path_for(sop_instance_uid)
        self.check_space(len(encoded))
        fd, tmp_name = tempfile.mkstemp(dir=self._root, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(encoded)
                handle.flush()
                os.fsync(handle.fileno())
            with self._replace_lock:
                os.replace(tmp_name, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        self._fsync_dir()
        return final

    def check_space(self, incoming: int = 0) -> None:
        """Raise SpoolFullError when writing ``incoming`` more bytes would leave the file system above the
        watermark or under the free-space floor. One statvfs call: cheap enough for every C-STORE."""
        usage = shutil.disk_usage(self._root)
        free_after = usage.free - incoming
        if free_after < self._min_free:
            raise SpoolFullError(
                f"spool free space {_mib(max(free_after, 0))} MiB after this write would be under the floor "
                f"of {_mib(self._min_free)} MiB"
            )
        # 'used' as df counts it: blocks reserved for root are neither used nor available to us.
        capacity = usage.used + usage.free
        if capacity > 0 and (usage.used + incoming) / capacity > self._max_used:
            raise SpoolFullError(
                f"spool file system would be {100 * (usage.used + incoming) / capacity:.1f}% used, "
                f"above the {100 * self._max_used:.1f}% watermark"
            )

    def remove(self, path: Path, *, unless_written_after: float | None = None) -> bool:
        """Delete a spooled file (missing files are ignored); refuses paths outside the spool.

        With ``unless_written_after`` (a ``time.time()`` value, e.g. when the study was handed off), a file
        written later is kept: it is a re-sent copy that belongs to a later hand-off of the study. Returns
        whether a file was deleted."""
        path = Path(path)
        if path.parent.resolve() != self._root.resolve():
            raise ValueError("path is not in this spool")
        with self._replace_lock:  # no store may swap the file between the check and the unlink
            try:
                if unless_written_after is not None and path.stat().st_mtime > unless_written_after:
                    return False
                path.unlink()
            except FileNotFoundError:
                return False
        self._fsync_dir()
        return True

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

    def quarantine(self, path: Path) -> Path:
        """Move a spooled file that cannot be used into ``quarantine/`` (kept for inspection, never
        recovered again); returns its new path. Refuses paths outside the spool."""
        path = Path(path)
        if path.parent.resolve() != self._root.resolve():
            raise ValueError("path is not in this spool")
        folder = self._root / QUARANTINE
        folder.mkdir(exist_ok=True)
        target = folder / path.name
        os.replace(path, target)
        self._fsync_dir()
        return target

    def _fsync_dir(self) -> None:
        fd = os.open(self._root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _mib(n: int) -> int:
    return n // (1024 * 1024)
