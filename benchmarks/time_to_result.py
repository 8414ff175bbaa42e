"""Time to result: a CT study sent by DCMTK storescu to `radai serve`, until the SEG and SR are stored in the
PACS (a DCMTK storescp), against the baseline of merely moving the same study between the same tuned DCMTK
peers in the same run. Also reports where radai's time goes, per stage, from its own /metrics.

    python -m benchmarks.time_to_result [--runs 3] [--series DIR]     (from the repository root)

Both DCMTK peers are tuned as DESIGN.md asks (TCP_NODELAY=1, --max-pdu 131072). radai runs on its embedded
defaults except ports, data folder and the destination; each run sends the series under new UIDs so every run
is a new study. Needs the shared test data (../shared) unless --series is given.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine_basics, write_results
from tests.e2e.peers import CRLM, copy_as_new_study, radai_serve, send_folder, storescp, wait_for

STAGES = ("received", "complete", "queued", "inferred", "encoded", "delivered")


def stage_means(metrics_text: str, model: str) -> dict[str, float]:
    out = {}
    for stage in STAGES:
        label = rf'\{{model="{model}",stage="{stage}"\}}|\{{stage="{stage}",model="{model}"\}}'
        total = re.search(rf"radai_study_stage_seconds_sum(?:{label}) (\S+)", metrics_text)
        count = re.search(rf"radai_study_stage_seconds_count(?:{label}) (\S+)", metrics_text)
        if total and count and float(count.group(1)) > 0:
            out[stage] = float(total.group(1)) / float(count.group(1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--series", type=Path, default=CRLM / "CRLM-CT-1004" / "image")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.series.is_dir():
        print(f"series folder not found: {args.series}", file=sys.stderr)
        return 1
    n_files = len(list(args.series.glob("*.dcm")))
    baseline: list[float] = []
    radai: list[float] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with storescp(tmp / "pacs-baseline") as pacs:
            for _ in range(args.runs):
                t0 = time.perf_counter()
                if send_folder(pacs.port, args.series).returncode != 0:
                    raise RuntimeError("baseline storescu failed")
                baseline.append(time.perf_counter() - t0)
        with storescp(tmp / "pacs") as pacs, radai_serve(tmp, pacs, quiet_seconds=None) as server:
            for i in range(args.runs):
                folder = tmp / f"study{i}"
                copy_as_new_study(args.series, folder)
                before = len(pacs.files())
                t0 = time.perf_counter()
                if send_folder(server.dicom_port, folder).returncode != 0:
                    raise RuntimeError("storescu to radai failed")
                wait_for(
                    lambda before=before: len(pacs.files()) >= before + 2, 600, "SEG and SR in the PACS", 0.02
                )
                radai.append(time.perf_counter() - t0)
            stages = stage_means(server.get("/metrics").text, "ct-body-classical")
    b, r = statistics.median(baseline), statistics.median(radai)
    data: dict[str, Any] = {
        "machine": machine_basics(),
        "series": {"files": n_files, "folder": args.series.name},
        "baseline_dicom_transfer_s": baseline,
        "radai_time_to_result_s": radai,
        "median_baseline_s": b,
        "median_radai_s": r,
        "ratio_radai_over_transfer": r / b,
        "radai_stage_mean_s": stages,
    }
    lines = [
        f"Time to result, {n_files}-slice CT, median of {args.runs} ({data['machine']['cpus_usable']} CPUs)",
        "",
        "| what | seconds |",
        "|---|---:|",
        f"| baseline: storescu -> storescp (tuned DCMTK), same study | {b:.3f} |",
        f"| radai: storescu -> radai -> SEG + SR stored in storescp | {r:.3f} |",
        f"| ratio | {r / b:.1f}x |",
        "",
        "| radai stage (mean) | seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in stages.items()],
    ]
    table = "\n".join(lines)
    js, md = write_results(args.out, "time_to_result", data, table)
    print(table)
    print(f"\nwrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
