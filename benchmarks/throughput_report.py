"""The throughput benchmark's runs summarised, the machine they ran on, and the markdown tables
(benchmarks.throughput)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from benchmarks.common import machine_basics
from benchmarks.runner_timing import busy_fraction, pct
from radai.ports import ModelRunner

Array = NDArray[np.float32]
Scores = Array | torch.Tensor  # a study's blended scores: numpy on the host path, a tensor on the device path


@dataclass
class Served:
    latencies: list[float]  # per study, from the common arrival
    outputs: list[Scores]
    wall_s: float
    spans: list[tuple[float, float, int]]
    t0: float
    batch_jobs: list[int]  # distinct studies per batch


def summarise(n: int, mode: str, runs: list[Served]) -> dict[str, Any]:
    """Median run by wall time; latency percentiles over every study of every repeat."""
    run = sorted(runs, key=lambda s: s.wall_s)[len(runs) // 2]
    patches = sum(p for _, _, p in run.spans)
    lat = [x for s in runs for x in s.latencies]
    sizes = [p for _, _, p in run.spans]
    return {
        "studies": n,
        "mode": mode,
        "wall_s": round(run.wall_s, 4),
        "patches": patches,
        "patches_per_s": round(patches / run.wall_s, 2),
        "latency_p50_s": round(pct(lat, 50), 4),
        "latency_p95_s": round(pct(lat, 95), 4),
        "batches": len(sizes),
        "mean_batch": round(statistics.fmean(sizes), 2),
        "studies_per_batch": round(statistics.fmean(run.batch_jobs), 2),
        "busy_fraction": round(busy_fraction(run.spans, run.t0, run.t0 + run.wall_s), 3),
        # patches per second of runner time: achieved = busy_fraction x this (one runner call at a time)
        "runner_patches_per_s": round(patches / sum(e - b for b, e, _ in run.spans), 2),
    }


def machine(backend: str, device: str, runner: ModelRunner) -> dict[str, Any]:
    info: dict[str, Any] = {
        **machine_basics(),
        "backend": backend,
        "device": device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        info["onnxruntime"] = None
    info["providers"] = getattr(runner, "providers", None)
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def loads(values: Sequence[float] | None) -> str:
    return "n/a" if values is None else "/".join(f"{v:.2f}" for v in values)


def tables(result: dict[str, Any]) -> str:
    m, s, during = result["machine"], result["setup"], result["loadavg_1min_during"]
    where = m.get("gpu") or f"{m['cpus_usable']} CPUs ({m['processor']})"
    head = (
        f"# throughput ({'quick' if s['quick'] else 'full'}): {s['model']} {s['patch']}^3 windows, "
        f"volume {tuple(s['volume'])}\n\n"
        f"Device: {where}; backend {m['backend']} ({m['device']}, {m.get('path', 'host')} path), torch {m['torch']} "
        f"({m['torch_threads']} threads), onnxruntime {m['onnxruntime']}, "
        f"OMP_WAIT_POLICY={m['OMP_WAIT_POLICY'] or 'unset'}, load average at start {loads(m['loadavg_at_start'])}, "
        f"1-min load during the run (this run's own threads included) {during['mean']:.2f} mean, "
        f"{during['max']:.2f} max. Scheduler max_batch {result['max_batch']}"
        f"{' (tuned, ceiling ' + str(result['max_batch_ceiling']) + ')' if result.get('tuned') else ''}, max_wait "
        f"{result['max_wait_ms']} ms, sw_batch_size {result['radai_sw_batch_size']} (STAT study "
        f"{result['stat_sw_batch_size']}); naive sw_batch_size 4. Max |radai - naive| = "
        f"{result['max_abs_diff_radai_vs_naive']:.2e}.\n"
    )
    limit = [
        "| batch | patches/s, best pass | median pass | best before the run | best after |",
        "|---:|---:|---:|---:|---:|",
    ]
    limit += [
        f"| {r['batch']} | {r['best_patches_per_s']:.1f} | {r['median_patches_per_s']:.1f} "
        f"| {r['best_before']:.1f} | {r['best_after']:.1f} |"
        for r in result["limit"]
    ]
    rows = [
        "| studies | mode | wall s | patches/s | vs naive | of limit | of median limit | p50 s | p95 s | mean batch "
        "| studies/batch | busy | runner patches/s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        rows.append(
            f"| {r['studies']} | {r['mode']} | {r['wall_s']:.3f} | {r['patches_per_s']:.1f} "
            f"| {r['vs_naive']:.2f}x | {100 * r['efficiency']:.0f}% | {100 * r['efficiency_of_median_limit']:.0f}% "
            f"| {r['latency_p50_s']:.3f} "
            f"| {r['latency_p95_s']:.3f} | {r['mean_batch']:.2f} | {r['studies_per_batch']:.2f} "
            f"| {100 * r['busy_fraction']:.0f}% | {r['runner_patches_per_s']:.1f} |"
        )
    stat = [
        "| background studies | STAT median s | STAT p95 s | median ratio | p95 ratio | own batches s "
        "| background batches s | rest s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["stat"]:
        stat.append(
            f"| {r['background']} | {r['median_s']:.3f} | {r['p95_s']:.3f} | {r['median_ratio']:.2f}x "
            f"| {r['p95_ratio']:.2f}x | {r['own_batches_s']:.3f} | {r['background_batches_s']:.3f} "
            f"| {r['rest_s']:.3f} |"
        )
    return "\n".join(
        [
            head,
            f"Limit: {result['limit_patches_per_s']:.1f} patches/s (best pass; "
            f"{result['limit_median_pass_patches_per_s']:.1f} at the median pass)",
            "",
            *limit,
            "",
            *rows,
            "",
            *stat,
        ]
    )
