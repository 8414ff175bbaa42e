"""Receiver: the storage SCP, the study assembler and a background thread that completes studies.

The SCP threads only enqueue: headers from C-STORE and, when a sender releases its association, the
studies it carried. Both go through one FIFO queue, so an association's instances are always added before
its release is applied. One assembler thread owns the :class:`Assembler` (no locks on its state), feeds it,
sleeps until the next deadline (at most ``poll_seconds``, woken at once by anything queued), and hands due
studies to ``on_study_complete``: ``release_grace_seconds`` after the release, or after ``quiet_seconds``
without new instances for senders that never release. A failing callback is logged and never stops the
thread.

Start-up recovers the spool: temporary files of interrupted writes are deleted, every instance already
spooled (received before a crash or a stop, not yet processed) is read back and assembled as if just
received, and files that cannot be read are moved to the spool's ``quarantine/``. Recovered studies become
due after the quiet period (their sender may be re-sending what it saw unacknowledged), or after
``recovery_delay_seconds`` when that is given.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from dicom_router.assembler import Assembler, Study
from dicom_router.completion import CompletionRules
from dicom_router.headers import InstanceHeader, header_from_dataset
from dicom_router.scp import ScpOptions, StoreSCP
from dicom_router.spool import DEFAULT_MAX_USED_FRACTION, DEFAULT_MIN_FREE_BYTES, Spool
from dicom_router.uids import uid_fingerprint

log = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 0.15
DEFAULT_RELEASE_GRACE_SECONDS = 1.0


@dataclass(frozen=True)
class _Released:
    """An association carrying these studies was released by its sender."""

    calling_ae: str
    study_uids: frozenset[str]


@dataclass(frozen=True)
class _Recovered:
    """These studies were rebuilt from the spool at start-up; due ``delay`` seconds after it (if set)."""

    study_uids: frozenset[str]
    delay: float | None


@dataclass(frozen=True)
class RecoveryReport:
    """What start-up found in the spool."""

    partial_removed: int
    instances: int
    studies: int
    quarantined: int


class Receiver:
    """Receives instances over DICOM and reports each study once its sender is done with it.

    Done means: the association that carried it was released and ``release_grace_seconds`` passed with no
    new instance (time for a follow-up association), or no new instance came for ``quiet_seconds``.
    ``release_grace_seconds=None`` ignores releases (quiet period only). ``spool_max_used_fraction`` and
    ``spool_min_free_bytes`` are the spool's disk watermark and free-space floor (see :class:`Spool`);
    ``recovery_delay_seconds`` makes studies recovered at start-up due that long after it (None: the quiet
    period). ``on_instance`` (optional) sees each instance as it is assembled, on the assembler thread: it
    must be quick (a scale-out receiver records that the study is still arriving)."""

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
        *,
        spool_max_used_fraction: float = DEFAULT_MAX_USED_FRACTION,
        spool_min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        recovery_delay_seconds: float | None = None,
        rules: CompletionRules | None = None,
        scp_options: ScpOptions | None = None,
        on_instance: Callable[[InstanceHeader], None] | None = None,
    ) -> None:
        if release_grace_seconds is not None and release_grace_seconds < 0:
            raise ValueError("release_grace_seconds must be >= 0 or None")
        if recovery_delay_seconds is not None and recovery_delay_seconds < 0:
            raise ValueError("recovery_delay_seconds must be >= 0 or None")
        self._spool = Spool(
            spool_dir, max_used_fraction=spool_max_used_fraction, min_free_bytes=spool_min_free_bytes
        )
        self._recovery_delay = recovery_delay_seconds
        self._recovery: RecoveryReport | None = None
        # Completion rules carry their own quiet period; without them, quiet_seconds alone.
        self._assembler = Assembler(rules=rules) if rules is not None else Assembler(quiet_seconds)
        self._on_study_complete = on_study_complete
        self._on_instance = on_instance
        self._clock = clock
        self._poll = poll_seconds
        self._grace = release_grace_seconds
        self._queue: queue.SimpleQueue[InstanceHeader | _Released | _Recovered] = queue.SimpleQueue()
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
            **(scp_options or ScpOptions()).as_kwargs(),
        )

    @property
    def port(self) -> int:
        """The bound TCP port (RuntimeError before start)."""
        return self._scp.port

    @property
    def spool(self) -> Spool:
        """The spool the SCP writes into."""
        return self._spool

    @property
    def recovery(self) -> RecoveryReport | None:
        """What the last start() recovered from the spool (None before the first start)."""
        return self._recovery

    def start(self) -> None:
        """Recover the spool, start the assembler thread, then the SCP (so nothing received waits on a
        missing consumer, and no new write races the recovery).

        Raises OSError when the port cannot be bound; nothing is left running then."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._recovery = self._recover()
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

    def _recover(self) -> RecoveryReport:
        """Queue every spooled instance for the assembler; quarantine what cannot be read. Never raises
        for a bad file: one unreadable instance must not keep the server from starting."""
        partial = self._spool.discard_partial()
        studies: set[str] = set()
        instances = quarantined = 0
        for path in self._spool.pending():
            header = self._read_spooled(path)
            if header is None:
                quarantined += self._quarantine(path)
                continue
            self._queue.put(header)
            studies.add(header.study_uid)
            instances += 1
        if studies:
            self._queue.put(_Recovered(frozenset(studies), self._recovery_delay))
        report = RecoveryReport(partial, instances, len(studies), quarantined)
        if partial or instances or quarantined:
            log.warning(
                "spool recovery: %d instances of %d studies resumed, %d unreadable files quarantined, "
                "%d interrupted writes removed",
                instances,
                len(studies),
                quarantined,
                partial,
            )
        return report

    def _read_spooled(self, path: Path) -> InstanceHeader | None:
        tag = uid_fingerprint(path.name[: -len(path.suffix)])
        try:
            received_at = os.stat(path).st_mtime
            ds = dcmread(path, stop_before_pixels=True)
            calling_ae = str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "")
            header = header_from_dataset(ds, path, calling_ae, received_at)
        except FileNotFoundError:
            return None
        except Exception as exc:  # pydicom raises many types on damaged files; header_from_dataset ValueError
            log.warning("spooled instance %s unreadable at recovery: %s", tag, type(exc).__name__)
            return None
        if header.sop_instance_uid != path.name[: -len(path.suffix)]:
            log.warning("spooled instance %s: SOP Instance UID does not match its file name", tag)
            return None
        return header

    def _quarantine(self, path: Path) -> int:
        if not path.exists():
            return 0
        try:
            self._spool.quarantine(path)
        except OSError as exc:
            log.error("could not quarantine an unreadable spooled file: %s", exc.strerror)
            return 0
        return 1

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

    def _apply(self, item: InstanceHeader | _Released | _Recovered) -> None:
        now = self._clock()
        if isinstance(item, _Recovered):
            if item.delay is not None:
                self._assembler.association_released(item.study_uids, now, item.delay)
        elif isinstance(item, _Released):
            if self._grace is not None:
                log.debug("association from %s released (%d studies)", item.calling_ae, len(item.study_uids))
                self._assembler.association_released(item.study_uids, now, self._grace)
        else:
            self._assembler.add(item, now)
            if self._on_instance is not None:
                try:
                    self._on_instance(item)
                except Exception:  # an observer must never stop assembly
                    log.exception("on_instance callback failed")

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
        for study in self._assembler.take_discarded():
            # The completion rules' hard deadline passed without the required series: drop what came.
            log.warning(
                "study %s discarded at its completion deadline (required series missing): %d instances",
                uid_fingerprint(study.study_uid),
                study.instance_count,
            )
            for series in study.series.values():
                for header in series.instances:
                    self._spool.remove(header.path)
