"""What the storage SCP reports to an observer: associations accepted or rejected, and C-STORE outcomes.

An application counts and audits these (metrics by sender, an audit record per association) without the SCP
knowing about either. Observer calls run on the association's thread and must be quick; an observer that
raises is logged and otherwise ignored, never changing what the peer is answered.

Values are bounded: a reason is one of :data:`REJECT_REASONS` (or ``"none"`` for an accepted association)
and an outcome is the lower-case name of the DIMSE status answered; peers are identified by calling AE title
and IP address only, never by anything inside a data set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

#: Why an association was rejected: wrong called AE title, calling AE/IP not on the allow-list, the
#: association limit, an error in the admission check itself (rejected, failing closed), or a rejection
#: by the DICOM stack (pynetdicom: e.g. a protocol version or context it cannot accept).
REJECT_REASONS = ("called_ae", "not_allowed", "limit", "admission_error", "dicom_stack")


@dataclass(frozen=True)
class Peer:
    """The sending side of an association: calling AE title (spaces stripped) and IP address."""

    ae_title: str
    ip: str


class ScpObserver(Protocol):
    def association(self, peer: Peer, accepted: bool, reason: str) -> None:
        """An association was accepted (reason ``"none"``) or rejected (a reason of REJECT_REASONS)."""

    def stored(self, peer: Peer, outcome: str, size: int) -> None:
        """A C-STORE was answered: the status name in lower case (``"success"``, ``"out_of_resources"``...)
        and the size in bytes of the data set as received."""


def notify_association(observer: ScpObserver | None, peer: Peer, accepted: bool, reason: str) -> None:
    if observer is None:
        return
    try:
        observer.association(peer, accepted, reason)
    except Exception:  # an observer must never change what the peer is answered
        log.exception("association observer failed")


def notify_stored(observer: ScpObserver | None, peer: Peer, outcome: str, size: int) -> None:
    if observer is None:
        return
    try:
        observer.stored(peer, outcome, size)
    except Exception:
        log.exception("C-STORE observer failed")
