"""Receiver: the storage SCP, the study assembler and a background thread that completes studies.

The SCP thread only enqueues headers; one assembler thread owns the :class:`Assembler` (no locks on
its state), feeds it, and every ``poll_seconds`` pops studies that have been quiet long enough and hands
them to ``on_study_complete``. A failing callback is logged and never stops the thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dicom_router.assembler import Assembler, Study
from dicom_router.headers import InstanceHeader
from dicom_router.scp import StoreSCP
from dicom_router.spool import Spool
from dicom_router.uids import uid_fingerprint

log = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 0.15


class Receiver:
    """Receives instances over DICOM and reports each study once it has been quiet for ``quiet_seconds``."""

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
    ) -> None:
        self._spool = Spool(spool_dir)
        self._assembler = Assembler(quiet_seconds)
        self._on_study_complete = on_study_complete
        self._clock = clock
        self._poll = poll_seconds
        self._queue: queue.SimpleQueue[InstanceHeader] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._scp = StoreSCP(ae_title, host, port, self._spool, self._queue.put, clock=clock)

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
                header = self._queue.get(timeout=timeout)
            except queue.Empty:
                pass
            else:
                self._assembler.add(header, self._clock())
                self._drain()
            self._complete(self._clock())

    def _drain(self) -> None:
        """Add everything already queued before checking completion (bursts cost one pass)."""
        while True:
            try:
                header = self._queue.get_nowait()
            except queue.Empty:
                return
            self._assembler.add(header, self._clock())

    def _complete(self, now: float) -> None:
        for study in self._assembler.pop_complete(now):
            try:
                self._on_study_complete(study)
            except Exception:
                log.exception("study %s: on_study_complete failed", uid_fingerprint(study.study_uid))
