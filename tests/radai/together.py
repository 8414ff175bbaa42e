"""Threads released at the same moment (a Barrier): the concurrency tests of the stores use it to make
several connections (several processes, in production) race for the same rows."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def together(workers: int, work: Callable[[int], T], timeout_s: float = 120.0) -> list[T]:
    """Runs `work(i)` in `workers` threads released at the same moment; their results in order. The first
    error any thread raised is raised here."""
    start = threading.Barrier(workers)
    results: dict[int, T] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    if errors:
        raise errors[0]
    return [results[i] for i in range(workers)]
