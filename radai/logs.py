"""Logging set-up. Log lines carry job ids and hashed UIDs only, never patient values."""

from __future__ import annotations

import logging
import sys


def configure(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom's debug output dumps datasets (patient data): keep it at WARNING whatever the level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom narrates every module it copies at INFO; pydicom's warnings can quote element values.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
