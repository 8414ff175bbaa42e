"""Deterministic UIDs for result objects, so that a retried job never creates a duplicate instance."""

from __future__ import annotations

import json
import uuid

# Fixed namespace of radai's name-based UUIDs. Changing it changes every derived UID: never do that.
_NAMESPACE = uuid.UUID("6f1d1b2e-4c1a-5b7e-9d0a-7a3c2f1e8b64")


def derived_uid(*parts: str) -> str:
    """Return a ``2.25.<uuid>`` UID that depends only on ``parts`` (same parts -> same UID).

    ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores its entropy and returns a
    random UUID, and with a prefix it hashes the plain concatenation of the parts (``"ab", "c"``
    equals ``"a", "bc"``). So this builds a name-based (SHA-1) UUID, which PS3.5 B.2 allows under
    the ``2.25`` root, from the JSON list of parts, which keeps the parts' boundaries.
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part")
    name = json.dumps(list(parts), ensure_ascii=True, separators=(",", ":"))
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
