"""Turns an uploaded model-package archive into a package folder, refusing anything hostile.

Uploads are untrusted. Every member's name, type and size is checked here before anything is written, and
bytes are counted while decompressing, since headers can lie. The standard library's own guards differ
between Python versions (tarfile's ``data`` filter only exists from 3.11.4/3.12, zipfile's overlap check
from 3.12), so they are used as a second line only; the checks below do not rely on them.
The scan for files able to run code when loaded lives in ``radai.models.unsafe`` and is re-exported here.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import lzma
import shutil
import stat
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, BinaryIO

from radai.errors import ModelPackageError
from radai.models.unsafe import UnsafeFile, find_unsafe_files, scan_package

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "CARD_NAME",
    "ArchiveLimits",
    "UnsafeFile",
    "extract_package",
    "find_unsafe_files",
    "scan_package",
]

CARD_NAME = "model.yaml"
_CHUNK = 1024 * 1024
_SKIPPED_TOP = "__MACOSX"  # resource forks macOS's archiver adds; never extracted
_STREAM_SLACK_PER_MEMBER = 3 * 512  # tar header + padding + one extended header block
# Read errors of the stdlib decoders on corrupt input; they become a ModelPackageError.
_CORRUPT = (
    EOFError,
    zlib.error,
    lzma.LZMAError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    ValueError,
    NotImplementedError,
    RuntimeError,
)
_TarFilter = Callable[[tarfile.TarInfo, str], tarfile.TarInfo]
_DATA_FILTER: _TarFilter | None = getattr(tarfile, "data_filter", None)


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on what an uploaded archive may expand to."""

    max_total_bytes: int = 2 * 1024**3  # sum of uncompressed member sizes
    max_members: int = 10_000
    max_ratio: float = 200.0  # total uncompressed bytes / archive size on disk, against bombs


def extract_package(archive: Path, target: Path, limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Extract a .zip or .tar[.gz|.bz2|.xz] archive into the new, empty folder ``target``.

    Returns the folder holding model.yaml: ``target`` itself or its single top-level sub-folder. Raises
    ModelPackageError (one line) on anything unsafe or unreadable; ``target`` is then removed (or emptied when
    it existed before), so nothing half-extracted remains.
    """
    created = not target.exists()
    if not created and (not target.is_dir() or any(target.iterdir())):
        raise ModelPackageError(f"extraction target {target.name!r} is not a new, empty folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
        kind = _sniff(archive)
        budget = _Budget(limits, archive.stat().st_size)
        if kind == "zip":
            _extract_zip(archive, target, budget)
        else:
            _extract_tar(archive, kind, target, budget)
        if budget.members == 0:
            raise ModelPackageError("archive is empty")
        return _package_folder(target)
    except ModelPackageError:
        _discard(target, created)
        raise
    except _CORRUPT as exc:
        _discard(target, created)
        raise ModelPackageError(f"corrupt or unreadable archive: {_one_line(exc)}") from exc
    except OSError as exc:
        _discard(target, created)
        # gzip and bz2 report corrupt data as OSError without an errno, zipfile's seek to a corrupt offset
        # as EINVAL; other file-system errors (disk full, name too long) are ours, not the archive's
        corrupt = exc.errno in (None, errno.EINVAL)
        what = "corrupt or unreadable archive" if corrupt else "cannot extract archive"
        raise ModelPackageError(f"{what}: {_one_line(exc)}") from exc
    except BaseException:
        _discard(target, created)
        raise


class _Budget:
    """Counts members and bytes across one extraction and refuses names that could escape or collide."""

    def __init__(self, limits: ArchiveLimits, archive_size: int) -> None:
        self.limits = limits
        self.cap = min(limits.max_total_bytes, int(limits.max_ratio * max(archive_size, 1)))
        self.stream_cap = self.cap + limits.max_members * _STREAM_SLACK_PER_MEMBER + 64 * 1024
        self.members = 0
        self.declared = 0
        self.written = 0
        self._files: set[str] = set()  # folded names (see _fold)
        self._dirs: set[str] = set()

    def over(self, what: str) -> ModelPackageError:
        if self.cap == self.limits.max_total_bytes:
            return ModelPackageError(f"{what} more than the limit of {self.cap} bytes")
        return ModelPackageError(
            f"{what} more than {self.limits.max_ratio:g} times the archive's size (possible decompression bomb)"
        )

    def admit(self, name: str, is_dir: bool, declared_size: int) -> PurePosixPath | None:
        """Check one member's name and declared size; None for members that are not written."""
        self.members += 1
        if self.members > self.limits.max_members:
            raise ModelPackageError(f"archive has more than {self.limits.max_members} members")
        rel = _safe_relpath(name)
        if rel is None or rel.parts[0] == _SKIPPED_TOP:
            return None
        key = _fold(rel)
        parents = [_fold(p) for p in rel.parents][:-1]
        if any(p in self._files for p in parents) or key in (self._files if is_dir else self._dirs):
            raise ModelPackageError(f"archive member {_show(name)} is both a file and a folder")
        if key in (self._dirs if is_dir else self._files):
            if is_dir:
                return None  # a folder listed twice is harmless
            raise ModelPackageError(f"archive has duplicate member {_show(name)}")
        self._dirs.update(parents)
        (self._dirs if is_dir else self._files).add(key)
        self.declared += max(declared_size, 0)
        if self.declared > self.cap:
            raise self.over("archive members declare")
        return rel

    def copy(self, source: IO[bytes], dest: Path, name: str, declared_size: int) -> None:
        """Write one member in chunks, counting real bytes against the caps and the member's header."""
        size = 0
        with dest.open("xb") as out:  # "x": never overwrite, never follow a planted link
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                self.written += len(chunk)
                if self.written > self.cap:
                    raise self.over("archive expands to")
                out.write(chunk)
        if size != declared_size:
            raise ModelPackageError(f"archive member {_show(name)} does not match the size in its header")


def _extract_zip(archive: Path, target: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath, bool]] = []
        for info in zf.infolist():  # the whole central directory is checked before anything is written
            if info.flag_bits & 0x1:
                raise ModelPackageError(f"archive member {_show(info.filename)} is encrypted")
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise ModelPackageError(f"archive member {_show(info.filename)} is a symbolic link")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ModelPackageError(f"archive member {_show(info.filename)} is not a regular file")
            is_dir = info.is_dir() or kind == stat.S_IFDIR
            rel = budget.admit(info.filename, is_dir, 0 if is_dir else info.file_size)
            if rel is not None:
                plan.append((info, rel, is_dir))
        for info, rel, is_dir in plan:
            dest = _destination(target, rel)
            if is_dir:
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as source:
                budget.copy(source, dest, info.filename, info.file_size)


def _extract_tar(archive: Path, kind: str, target: Path, budget: _Budget) -> None:
    # Streaming mode ("r|") over our own decompressor, so the decompressed stream is capped as a whole:
    # that covers bytes no member header accounts for (e.g. a huge pax extended header).
    with _decompressed(archive, kind) as raw:
        stream = io.BufferedReader(_CappedReader(raw, budget))
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for member in tf:
                _check_tar_type(member)
                is_dir = member.isdir()
                rel = budget.admit(member.name, is_dir, 0 if is_dir else member.size)
                if _DATA_FILTER is not None:  # second line; raises FilterError (a TarError) on escapes
                    _DATA_FILTER(member, str(target))
                if rel is None:
                    continue
                dest = _destination(target, rel)
                if is_dir:
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = tf.extractfile(member)
                if source is None:
                    raise ModelPackageError(f"archive member {_show(member.name)} has no data")
                with source:
                    budget.copy(source, dest, member.name, member.size)


def _check_tar_type(member: tarfile.TarInfo) -> None:
    name = _show(member.name)
    if member.issym() or member.islnk():
        raise ModelPackageError(f"archive member {name} is a link")
    if member.ischr() or member.isblk() or member.isfifo():
        raise ModelPackageError(f"archive member {name} is a device or FIFO")
    if member.size < 0:
        raise ModelPackageError(f"archive member {name} has a negative size")
    if member.issparse():
        raise ModelPackageError(f"archive member {name} is a sparse file")
    if not (member.isreg() or member.isdir()):
        raise ModelPackageError(f"archive member {name} is not a regular file or folder")


class _CappedReader(io.RawIOBase):
    """A read-only stream that fails once more bytes came out of the decompressor than the caps allow."""

    def __init__(self, raw: io.BufferedIOBase, budget: _Budget) -> None:
        super().__init__()
        self._raw = raw
        self._budget = budget
        self._count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._raw.read(len(view))
        self._count += len(data)
        if self._count > self._budget.stream_cap:
            raise self._budget.over("archive stream expands to")
        view[: len(data)] = data
        return len(data)


_DECOMPRESSORS: dict[str, Callable[[BinaryIO], io.BufferedIOBase]] = {
    "gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    "bz2": lambda f: bz2.BZ2File(f, "rb"),
    "xz": lambda f: lzma.LZMAFile(f, "rb"),  # noqa: SIM115 (closed by the caller)
}


@contextmanager
def _decompressed(archive: Path, kind: str) -> Iterator[io.BufferedIOBase]:
    with archive.open("rb") as f:
        if kind == "tar":
            yield f
            return
        with _DECOMPRESSORS[kind](f) as raw:
            yield raw


def _sniff(archive: Path) -> str:
    """The archive kind from its leading bytes (an upload's file name is not trusted)."""
    with archive.open("rb") as f:
        head = f.read(512)
    if not head:
        raise ModelPackageError("archive is empty")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "gz"
    if head[:3] == b"BZh":
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[257:262] == b"ustar":
        return "tar"
    raise ModelPackageError("not a zip or tar archive (unknown or corrupt format)")


def _safe_relpath(name: str) -> PurePosixPath | None:
    """The member's path relative to the target, or None for the archive root itself ("./")."""
    shown = _show(name)
    if not name or any(ord(c) < 32 or c == "\x7f" or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise ModelPackageError(f"archive member {shown} has an empty or unprintable name")
    if "\\" in name:
        raise ModelPackageError(f"archive member {shown} contains a backslash")
    if len(name) >= 2 and name[1] == ":" and name[0].isascii() and name[0].isalpha():
        raise ModelPackageError(f"archive member {shown} starts with a drive letter")
    if name.startswith("/"):
        raise ModelPackageError(f"archive member {shown} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ModelPackageError(f"archive member {shown} contains '..'")
    return PurePosixPath(*parts) if parts else None


def _fold(rel: PurePosixPath) -> str:
    """Names that one file system could treat as equal (case, Unicode normal form) must not both occur."""
    return unicodedata.normalize("NFC", rel.as_posix()).casefold()


def _destination(target: Path, rel: PurePosixPath) -> Path:
    dest = target.joinpath(*rel.parts)
    if not dest.resolve().is_relative_to(target.resolve()):  # cannot happen after _safe_relpath; kept
        raise ModelPackageError(f"archive member {_show(rel.as_posix())} resolves outside the target")
    return dest


def _package_folder(target: Path) -> Path:
    if (target / CARD_NAME).is_file():
        return target
    children = list(target.iterdir())
    if len(children) == 1 and (children[0] / CARD_NAME).is_file():
        return children[0]
    raise ModelPackageError(f"no {CARD_NAME} at the top of the archive or inside its single top-level folder")


def _discard(target: Path, created: bool) -> None:
    if created:
        shutil.rmtree(target, ignore_errors=True)
        return
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _show(name: str) -> str:
    shown = repr(name)
    return shown if len(shown) <= 120 else shown[:117] + "..."


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
