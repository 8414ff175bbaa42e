"""The audit log: one record per auditable event, append-only, in the database; readable via the API.

Auditable events (``Event``): an association accepted or rejected; a model version added, activated, put in
shadow (or taken out), removed; a job's results delivered to a destination or dead-lettered; and every
write request to the HTTP API, whatever its answer. A record names who (``actor``: the sender's AE title
and IP, ``api:<scope>``, ``cli:<user>`` or ``radai``), what it acted on (``subject``: a model ``id@version``,
a job id, a destination, an API route), the ``outcome`` and a few bounded details.

Records never hold patient values nor Study/Series/SOP Instance UIDs: jobs are named by their job id (a hash),
studies by ``uid_fingerprint``. The store chains each record to the previous one with SHA-256, so an edit
or a deletion made behind radai's back is found by ``verify``.
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from radai import metrics

log = logging.getLogger(__name__)


class Event(StrEnum):
    ASSOCIATION_ACCEPTED = "association.accepted"
    ASSOCIATION_REJECTED = "association.rejected"
    MODEL_ADDED = "model.added"
    MODEL_ACTIVATED = "model.activated"
    MODEL_SHADOW = "model.shadow"
    MODEL_REMOVED = "model.removed"
    RESULT_DELIVERED = "result.delivered"
    RESULT_DEAD_LETTERED = "result.dead-lettered"
    API_WRITE = "api.write"


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: float  # epoch seconds
    event: str
    actor: str
    subject: str
    outcome: str
    detail: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditQuery:
    """Filters of a listing: event name (exact), records after sequence number `after`, time window."""

    event: str | None = None
    after: int = 0
    since: float | None = None
    until: float | None = None
    limit: int = 100


class AuditLog(Protocol):
    def append(
        self, event: Event, actor: str, subject: str, outcome: str, detail: Mapping[str, str] | None = None
    ) -> None: ...

    def records(self, query: AuditQuery | None = None) -> list[AuditRecord]: ...

    def verify(self) -> int:
        """Check the hash chain: the number of records, or AuditTamperedError naming the first bad one."""
        ...

    def close(self) -> None: ...


class Auditor:
    """Writes audit records and never lets a failing write break the action it records (logged instead)."""

    def __init__(self, log_: AuditLog | None) -> None:
        self._log = log_

    def __call__(self, event: Event, actor: str, subject: str, outcome: str = "ok", **detail: str) -> None:
        if self._log is None:
            return
        try:
            self._log.append(event, actor, subject, outcome, detail)
        except Exception:
            log.exception("audit record %s could not be written", event.value)
            return
        metrics.AUDIT_EVENTS.labels(event=event.value).inc()


def cli_actor() -> str:
    """`cli:<login name>` for records made by the `radai` command line."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli:unknown"


NO_AUDIT = Auditor(None)
