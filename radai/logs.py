"""Logging set-up. Log lines carry job ids and hashed UIDs only, never patient values.

`text` (default) is one human line per record; `json` is one JSON object per line for log collectors:
time (ISO 8601, UTC), level, logger, message, and the thread; exceptions as a `exception` string.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys


class JsonFormatter(logging.Formatter):
    """One JSON object per record (stdlib only: the fields are few and fixed)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # pynetdicom's debug output dumps datasets (patient data): keep it at WARNING whatever the level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom narrates every module it copies at INFO; pydicom's warnings can quote element values.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
