"""Finds files in a model package that could run code when loaded: "ONNX only: nothing that unpickles".

Files are judged by content as well as by name, so a pickle renamed ``weights.bin`` is still found. Nothing
is ever unpickled or loaded: pickles are recognised by their opcodes (``pickletools.genops`` only parses),
NumPy files by their header alone, zip archives by their member names and first bytes.
"""

from __future__ import annotations

import bz2
import io
import lzma
import os
import pickletools
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol

import numpy as np

_HEAD = 1024 * 1024  # bytes of each file (or decompressed stream) that are inspected
_ZIP_HEAD = 64 * 1024  # bytes of each member of a zip inside the package (enough for any .npy header)
_ZIP_MEMBERS = 1000  # a zip with more members is not checked member by member, but refused
_SUFFIXES = {
    ".pt": "PyTorch file",
    ".pth": "PyTorch file",
    ".ptl": "PyTorch Lite file",
    ".ckpt": "checkpoint",
    ".pkl": "pickle",
    ".pickle": "pickle",
    ".joblib": "joblib pickle",
    ".mar": "TorchServe archive",
    ".py": "Python source",
    ".pyc": "Python bytecode",
    ".pyo": "Python bytecode",
    ".pyd": "native library",
    ".so": "native library",
    ".dll": "native library",
    ".dylib": "native library",
}
# Text formats that are never unpickled: not parsed as protocol 0/1 pickles (which are printable text).
_TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".md", ".txt", ".rst", ".csv", ".html"}
# Opcodes that import or call something; a plain-data pickle has none.
_CODE_OPS = {
    "GLOBAL",
    "STACK_GLOBAL",
    "INST",
    "OBJ",
    "REDUCE",
    "NEWOBJ",
    "NEWOBJ_EX",
    "BUILD",
    "EXT1",
    "EXT2",
    "EXT4",
    "PERSID",
    "BINPERSID",
}


class _Decompressor(Protocol):
    def decompress(self, data: bytes, max_length: int, /) -> bytes: ...


_DECOMPRESSORS: dict[bytes, Callable[[], _Decompressor]] = {
    b"\x1f\x8b": lambda: zlib.decompressobj(wbits=31),  # gzip
    b"BZh": bz2.BZ2Decompressor,
    b"\xfd7zXZ\x00": lzma.LZMADecompressor,
}


@dataclass(frozen=True)
class UnsafeFile:
    path: str  # relative to the package folder, "/"-separated
    reason: str


def scan_package(package_dir: Path) -> list[UnsafeFile]:
    """Every file (or link) under ``package_dir`` that could execute code when loaded, with the reason."""
    found: list[UnsafeFile] = []
    errors: list[OSError] = []
    for root, dirs, files in os.walk(package_dir, onerror=errors.append):  # links are reported, not followed
        for name in dirs + files:
            path = Path(root, name)
            reason = _reason(path)
            if reason is not None:
                found.append(UnsafeFile(path.relative_to(package_dir).as_posix(), reason))
    for error in errors:
        where = Path(str(error.filename or package_dir)).relative_to(package_dir).as_posix()
        found.append(UnsafeFile(where, "unreadable folder"))
    return sorted(found, key=lambda u: u.path)


def find_unsafe_files(package_dir: Path) -> list[str]:
    """Relative paths of the files that could execute code when loaded; the registry refuses any."""
    return [u.path for u in scan_package(package_dir)]


def _reason(path: Path) -> str | None:
    try:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            return "symbolic link"
        if stat.S_ISDIR(mode):
            return None
        if not stat.S_ISREG(mode):
            return "not a regular file"
        for suffix in (s.lower() for s in path.suffixes):
            if suffix in _SUFFIXES:
                return _SUFFIXES[suffix]
        with path.open("rb") as f:
            head = f.read(_HEAD)
            reason = _content_reason(head, path)
            if reason is None and (start := _decompressor(head)) is not None:
                f.seek(0)
                found = _content_reason(_decompress_head(start(), f), path, zips=False)
                reason = None if found is None else f"compressed {found}"
        return reason
    except OSError:
        return "unreadable file"


def _decompressor(head: bytes) -> Callable[[], _Decompressor] | None:
    return next((start for magic, start in _DECOMPRESSORS.items() if head.startswith(magic)), None)


def _decompress_head(decompressor: _Decompressor, f: BinaryIO) -> bytes:
    """Up to _HEAD decompressed bytes, keeping what came out before any corruption: a streaming loader would."""
    out = b""
    try:
        while len(out) < _HEAD and (chunk := f.read(64 * 1024)):
            out += decompressor.decompress(chunk, _HEAD - len(out))
    except (OSError, EOFError, lzma.LZMAError, zlib.error):
        pass
    return out


def _content_reason(head: bytes, path: Path, *, zips: bool = True) -> str | None:
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"pickle (protocol {head[1]})"
    if head.startswith(b"\x93NUMPY"):
        return _npy_reason(io.BytesIO(head))
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _zip_reason(path) if zips else "zip archive inside another archive (not checked)"
    if path.suffix.lower() not in _TEXT_SUFFIXES and _is_text_pickle(head):
        return "pickle (protocol 0/1)"
    return None


def _npy_reason(fp: IO[bytes]) -> str | None:
    """Object (or object-holding structured) dtypes are pickled inside .npy files; reads the header only."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            dtype = np.lib.format.read_array_header_1_0(fp)[2]
        elif version == (2, 0):
            dtype = np.lib.format.read_array_header_2_0(fp)[2]
        else:  # 3.0 only differs by UTF-8 field names; not read here, so not trusted
            return f"NumPy file of unchecked format version {version[0]}.{version[1]}"
    except Exception:  # numpy parses the hostile header with ast/tokenize; any failure means unreadable
        return "NumPy file with an unreadable header"
    return "NumPy array of object dtype (unpickles)" if dtype.hasobject else None


def _zip_reason(path: Path) -> str | None:
    """PyTorch checkpoints and TorchScript archives are zips holding pickles and code; .npz are zips of .npy."""
    try:
        with zipfile.ZipFile(path) as zf:
            if len(zf.infolist()) > _ZIP_MEMBERS:
                return f"zip archive of more than {_ZIP_MEMBERS} members (not checked)"
            for info in zf.infolist():
                name = info.filename
                lower = name.lower()
                if lower.endswith(("data.pkl", "constants.pkl")) or "/code/" in f"/{lower}":
                    return f"PyTorch or TorchScript archive ({name!r})"
                if any(lower.endswith(s) for s in _SUFFIXES):
                    return f"zip archive holding {name!r}"
                if info.is_dir() or info.flag_bits & 0x1:
                    continue
                with zf.open(info) as member:
                    inner = member.read(_ZIP_HEAD)
                reason = _content_reason(inner, Path(name), zips=False)
                if reason is not None:
                    return f"zip archive holding {name!r}: {reason}"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError):
        return "unreadable zip archive"
    return None


def _is_text_pickle(head: bytes) -> bool:
    """Protocol 0/1 pickles have no magic: parse opcodes (never execute) and look for imports or calls.

    Unpickling runs each opcode as it is read, so a stream that parses cleanly up to STOP or up to the end
    of the bytes seen is dangerous even if cut short. Imports must name identifiers, which text rarely does.
    """
    stream = io.BytesIO(head)
    calls = False
    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            if opcode.name in ("GLOBAL", "INST") and not _names_a_global(arg):
                return False
            calls = calls or opcode.name in _CODE_OPS
            if opcode.name == "STOP":
                return calls
    except (ValueError, struct.error):
        return calls and stream.tell() >= len(head)
    return False


def _names_a_global(arg: object) -> bool:
    parts = str(arg).split(" ")
    return len(parts) == 2 and all(word.isidentifier() for part in parts for word in part.split("."))
