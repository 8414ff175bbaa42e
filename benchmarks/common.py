"""Shared pieces of the benchmarks: naming the machine and writing JSON + a markdown table."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine_basics() -> dict[str, Any]:
    """What the figures were measured on (no host names)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_results(out_dir: Path, name: str, data: dict[str, Any], table: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    js = out_dir / f"{name}-{stamp}.json"
    md = out_dir / f"{name}-{stamp}.md"
    js.write_text(json.dumps(data, indent=2, default=str))
    md.write_text(table + "\n")
    return js, md
