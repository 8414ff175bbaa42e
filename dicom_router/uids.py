"""DICOM UID validation (PS3.5 section 9.1) and PHI-free UID fingerprints for logs."""

from __future__ import annotations

import hashlib
import re

_MAX_UID_LENGTH = 64
# Components are digits without leading zeros ("0" alone is allowed), separated by single dots.
_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def is_valid_uid(value: str) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID.

    Digits and dots only, at most 64 characters, no empty component, no leading zero in a
    multi-digit component. A valid UID is therefore also a safe file name (no '/', no '..').
    Not pydicom's ``UID.is_valid``: its regex ends in ``$``, which also matches before a trailing
    newline ("1.2\\n"), and the spool relies on this check for path safety.
    """
    if not isinstance(value, str) or not value or len(value) > _MAX_UID_LENGTH:
        return False
    return _UID_RE.fullmatch(value) is not None


def uid_fingerprint(value: str) -> str:
    """A short stable hash of a UID for log lines (UIDs can be traced to patients; never log them raw)."""
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:12]
