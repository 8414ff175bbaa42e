"""Receiver: the storage SCP, the study assembler and a background thread that completes studies.

The SCP threads only enqueue: headers from C-STORE and, when a sender releases its association, the
studies it carried. Both go through one FIFO queue, so an association's instances are always added before
its release is applied. One assembler thread owns the :class:`Assembler` (no locks on its state), feeds it,
sleeps until the next deadline (at most ``poll_seconds``, woken at once by anything queued), and hands due
studies to ``on_study_complete``: ``release_grace_seconds`` after the release, or after ``quiet_seconds``
without new instances for senders that never release. A failing callback is logged and never stops the
thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicom_router.assembler import Assembler, Study
from dicom_router.headers import InstanceHeader
from dicom_router.scp import StoreSCP
from dicom_router.spool import Spool
from dicom_router.uids import uid_fingerprint

log = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 0.15
DEFAULT_RELEASE_GRACE_SECONDS = 1.0


@dataclass(frozen=True)
class _Released:
    """An association carrying these studies was released by its sender."""

    calling_ae: str
    study_uids: frozenset[str]


class Receiver:
    """Receives instances over DICOM and reports each study once its sender is done with it.

    Done means: the association that carried it was released and ``release_grace_seconds`` passed with no
    new instance (time for a follow-up association), or no new instance came for ``quiet_seconds``.
    ``release_grace_seconds=None`` ignores releases (quiet period only)."""

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        spool_dir: Path,
        quiet_seconds: float,
        on_study_complete: Callable[[Study], None],
        clock: Callable[[], float] = time.time,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        release_grace_seconds: float | None = DEFAULT_RELEASE_GRACE_SECONDS,
    ) -> None:
        if release_grace_seconds is not None and release_grace_seconds < 0:
            raise ValueError("release_grace_seconds must be >= 0 or None")
        self._spool = Spool(spool_dir)
        self._assembler = Assembler(quiet_seconds)
        self._on_study_complete = on_study_complete
        self._clock = clock
        self._poll = poll_seconds
        self._grace = release_grace_seconds
        self._queue: queue.SimpleQueue[InstanceHeader | _Released] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._scp = StoreSCP(
            ae_title,
            host,
            port,
            self._spool,
            self._queue.put,
            clock=clock,
            on_association_released=None if release_grace_seconds is None else self._released,
        )

    @property
    def port(self) -> int:
        """The bound TCP port (RuntimeError before start)."""
        return self._scp.port

    @property
    def spool(self) -> Spool:
        """The spool the SCP writes into."""
        return self._spool

    def start(self) -> None:
        """Start the assembler thread, then the SCP (so nothing received waits on a missing consumer).

        Raises OSError when the port cannot be bound; nothing is left running then."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="dicom-router-assembler", daemon=True)
        self._thread.start()
        try:
            self._scp.start()
        except BaseException:  # e.g. OSError: port in use; leave nothing running behind
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the SCP, then the assembler thread. Studies still assembling stay in the spool."""
        self._scp.stop()
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while not self._stopping.is_set():
            deadline = self._assembler.next_deadline()
            timeout = self._poll if deadline is None else min(self._poll, max(0.0, deadline - self._clock()))
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                pass
            else:
                self._apply(item)
                self._drain()
            self._complete(self._clock())

    def _released(self, calling_ae: str, study_uids: frozenset[str]) -> None:
        """SCP release callback, on the association's thread: only enqueue (this also wakes the thread)."""
        self._queue.put(_Released(calling_ae, study_uids))

    def _apply(self, item: InstanceHeader | _Released) -> None:
        now = self._clock()
        if isinstance(item, _Released):
            if self._grace is not None:
                log.debug("association from %s released (%d studies)", item.calling_ae, len(item.study_uids))
                self._assembler.association_released(item.study_uids, now, self._grace)
        else:
            self._assembler.add(item, now)

    def _drain(self) -> None:
        """Apply everything already queued before checking completion (bursts cost one pass)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._apply(item)

    def _complete(self, now: float) -> None:
        for study in self._assembler.pop_complete(now):
            try:
                self._on_study_complete(study)
            except Exception:
                log.exception("study %s: on_study_complete failed", uid_fingerprint(study.study_uid))
