"""The destinations as the HTTP API shows them (radai.api.destinations.DestinationAdmin): configuration without
secrets, the last echo result, outbound queue counts, and an echo test on demand."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

from radai.api.destinations import DestinationStatus, EchoOutcome
from radai.config import DestinationSettings
from radai.domain import DeliveryState
from radai.errors import NotFoundError
from radai.ports import ResultSender


class EchoCache(Protocol):
    """The last echo result per destination (shared with /readyz's probe): read without any network."""

    def last(self, name: str) -> bool | None:
        """The last result for `name`; None if it was never checked."""
        ...

    def record(self, name: str, up: bool) -> None: ...


class DeliveryCounts(Protocol):
    """The outbound queue's counts (radai.ports.DeliveryQueue has it)."""

    def count_deliveries(self, destination: str, state: DeliveryState) -> int: ...


class EchoResults:
    """A thread-safe EchoCache on its own (when the /readyz probe does not share its cache)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._up: dict[str, bool] = {}

    def last(self, name: str) -> bool | None:
        with self._lock:
            return self._up.get(name)

    def record(self, name: str, up: bool) -> None:
        with self._lock:
            self._up[name] = up


class ServerDestinations:
    """Implements radai.api.destinations.DestinationAdmin for the running server."""

    def __init__(
        self,
        destinations: Sequence[DestinationSettings],
        senders: Sequence[ResultSender],
        probe: EchoCache,
        store: DeliveryCounts,
    ) -> None:
        self._settings = {d.name: d for d in destinations}
        self._senders = {s.name: s for s in senders}
        if self._settings.keys() != self._senders.keys():
            raise ValueError("every configured destination needs exactly one sender of the same name")
        self._probe = probe
        self._store = store

    def statuses(self) -> list[DestinationStatus]:
        return [self._status(d) for d in self._settings.values()]

    def status(self, name: str) -> DestinationStatus:
        return self._status(self._find(name))

    def echo(self, name: str) -> EchoOutcome:
        """A fresh echo now (the sender's own: C-ECHO, or QIDO-RS for STOW-RS), remembered as `up`."""
        sender = self._senders[self._find(name).name]
        started = time.monotonic()
        ok = sender.echo()
        seconds = time.monotonic() - started
        self._probe.record(name, ok)
        return EchoOutcome(name=name, ok=ok, seconds=round(seconds, 4))

    def _find(self, name: str) -> DestinationSettings:
        dest = self._settings.get(name)
        if dest is None:
            raise NotFoundError(f"no destination {name!r} is configured")
        return dest

    def _status(self, dest: DestinationSettings) -> DestinationStatus:
        count = self._store.count_deliveries
        dimse = dest.type == "dimse"
        # Only what identifies the peer: never TLS file paths, usernames, passwords or tokens.
        return DestinationStatus(
            name=dest.name,
            type=dest.type,
            ae_title=dest.ae_title if dimse else None,
            host=dest.host if dimse else None,
            port=dest.port if dimse else None,
            url=None if dimse else dest.url,
            outputs=list(dest.outputs),
            tls=dest.tls is not None if dimse else (dest.url or "").startswith("https://"),
            up=self._probe.last(dest.name),
            pending=count(dest.name, DeliveryState.QUEUED) + count(dest.name, DeliveryState.SENDING),
            dead=count(dest.name, DeliveryState.DEAD),
        )
