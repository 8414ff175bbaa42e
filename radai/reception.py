"""What radai does with the DICOM receiver's reports (dicom_router.events): metrics by configured sender name,
and one audit record per association accepted or rejected.

A sender's name is the `name` of the first `dicom.allowed_peers` entry it matches (that entry's AE title when
it has no name), and `unlisted` for every other sender: metric labels stay a set the configuration bounds,
whatever AE titles the network presents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dicom_router.events import Peer
from dicom_router.security import AllowedPeer
from radai import metrics
from radai.audit import NO_AUDIT, Auditor, Event

UNLISTED = "unlisted"


@dataclass(frozen=True)
class NamedPeer:
    name: str
    peer: AllowedPeer


class ReceptionObserver:
    """Implements dicom_router.events.ScpObserver."""

    def __init__(self, senders: Sequence[NamedPeer] = (), audit: Auditor = NO_AUDIT) -> None:
        self._senders = tuple(senders)
        self._audit = audit

    def sender_name(self, peer: Peer) -> str:
        for named in self._senders:
            if named.peer.matches(peer.ae_title, peer.ip):
                return named.name
        return UNLISTED

    def association(self, peer: Peer, accepted: bool, reason: str) -> None:
        sender = self.sender_name(peer)
        outcome = "accepted" if accepted else "rejected"
        metrics.ASSOCIATIONS.labels(sender=sender, outcome=outcome, reason=reason).inc()
        event = Event.ASSOCIATION_ACCEPTED if accepted else Event.ASSOCIATION_REJECTED
        self._audit(event, f"{peer.ae_title}@{peer.ip}", sender, outcome if accepted else reason)

    def stored(self, peer: Peer, outcome: str, size: int) -> None:
        sender = self.sender_name(peer)
        metrics.INSTANCES_RECEIVED.labels(sender=sender, outcome=outcome).inc()
        metrics.BYTES_RECEIVED.labels(sender=sender).inc(size)
