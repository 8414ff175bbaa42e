"""Scheduler pooling vs one-job-at-a-time sliding-window inference, same ONNX model, same machine, same run.

N jobs (volumes) arrive together. Two ways to serve them:

- baseline: what a user of MONAI + onnxruntime writes without a scheduler: each job alone, one after the
  other, `monai.inferers.sliding_window_inference(sw_batch_size=4)` with a predictor calling the
  onnxruntime session directly. It runs on one non-main thread, like the pooled jobs: on the main thread
  torch's OpenMP workers spin-wait against onnxruntime's pool, which made the same code 2-4x slower on a
  2-core machine (gone with OMP_WAIT_POLICY=PASSIVE) -- a thread-placement effect, not a scheduler one;
- pooled: one job thread per volume, each running `radai.scheduling.inferer.sliding_window` with
  `predict = scheduler.infer`, so the radai `Scheduler` pools the patches of every active job into batches
  of `--max-batch` on one `OnnxRunner`.

Reports makespan (all N done), per-job latency from the common arrival time, patch throughput, mean batch size
and jobs per batch, and checks the two modes give the same scores. Writes JSON + a markdown table to
benchmarks/results/ and prints the table. Run by hand: `python -m benchmarks.scheduler_pooling --quick`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import monai
import numpy as np
import onnx
import onnxruntime as ort
import torch
from monai.inferers.utils import sliding_window_inference
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import RESULTS, machine_basics
from radai.models.manifest import InputSpec
from radai.runtime.onnx import OnnxRunner
from radai.scheduling.inferer import sliding_window
from radai.scheduling.loop import BatchRecord, Scheduler


@dataclass(frozen=True)
class Setup:
    patch: int
    channels: int
    volume: tuple[int, int, int]
    jobs: tuple[int, ...]
    repeats: int


QUICK = Setup(patch=32, channels=8, volume=(64, 64, 48), jobs=(1, 4, 8), repeats=3)
FULL = Setup(patch=48, channels=16, volume=(112, 112, 96), jobs=(1, 4, 8), repeats=3)


@dataclass(frozen=True)
class Row:
    jobs: int
    mode: str
    makespan_s: float
    mean_latency_s: float
    max_latency_s: float
    patches: int
    patches_per_s: float
    batches: int
    mean_batch: float
    mean_jobs_per_batch: float


def build_model(path: Path, channels: int, seed: int = 0) -> Path:
    """A small 3-D conv net (two 3^3 convs + ReLU, 1^3 head to 2 classes), dynamic batch and spatial axes."""
    rng = np.random.default_rng(seed)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:]))
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name
        )

    c = channels
    pads = [1] * 6
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h1"], kernel_shape=[3, 3, 3], pads=pads),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["h2"], kernel_shape=[3, 3, 3], pads=pads),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["y"], kernel_shape=[1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "bench-conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "X", "Y", "Z"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "X", "Y", "Z"])],
        [weight("w1", (c, 1, 3, 3, 3)), weight("w2", (c, c, 3, 3, 3)), weight("w3", (2, c, 1, 1, 1))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


Timed = tuple[list[float], list[NDArray[np.float32]], list[int]]


def baseline(session: ort.InferenceSession, images: list[NDArray[np.float32]], spec: InputSpec) -> Timed:
    """Each job alone, one after another, MONAI sliding window calling onnxruntime directly (own thread)."""
    box: list[Timed] = []
    thread = threading.Thread(target=lambda: box.append(_baseline(session, images, spec)), name="baseline")
    thread.start()
    thread.join()
    if not box:
        raise RuntimeError("baseline failed")
    return box[0]


def _baseline(session: ort.InferenceSession, images: list[NDArray[np.float32]], spec: InputSpec) -> Timed:
    batches: list[int] = []

    def predictor(x: torch.Tensor) -> torch.Tensor:
        batches.append(int(x.shape[0]))
        return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])

    t0 = time.perf_counter()
    done, outputs = [], []
    for image in images:
        with torch.inference_mode():
            out = sliding_window_inference(
                torch.from_numpy(image)[None],
                roi_size=spec.patch_size,
                sw_batch_size=4,
                predictor=predictor,
                overlap=spec.overlap,
                mode=spec.blend,
            )
        outputs.append(torch.as_tensor(out)[0].numpy())
        done.append(time.perf_counter() - t0)
    return done, outputs, batches


def pooled(
    runner: OnnxRunner, images: list[NDArray[np.float32]], spec: InputSpec, max_batch: int, max_wait_s: float
) -> tuple[list[float], list[NDArray[np.float32]], list[BatchRecord]]:
    """One thread per job, all patches through one radai Scheduler."""
    records: list[BatchRecord] = []
    scheduler = Scheduler("bench", runner, max_batch, max_wait_s, on_batch=records.append)
    scheduler.start()
    done = [0.0] * len(images)
    outputs: list[NDArray[np.float32] | None] = [None] * len(images)
    gate = threading.Barrier(len(images) + 1)
    t0 = 0.0

    def job(i: int) -> None:
        def predict(patches: NDArray[np.float32]) -> NDArray[np.float32]:
            return scheduler.infer(f"job{i}", patches)

        gate.wait()
        outputs[i] = sliding_window(images[i], spec, predict, sw_batch_size=max_batch)
        done[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=job, args=(i,), name=f"job{i}") for i in range(len(images))]
    for thread in threads:
        thread.start()
    t0 = time.perf_counter()
    gate.wait()
    for thread in threads:
        thread.join()
    scheduler.stop()
    if any(out is None for out in outputs):
        raise RuntimeError("a pooled job failed")
    return done, [out for out in outputs if out is not None], records


def row(jobs: int, mode: str, done: list[float], batch_sizes: list[int], batch_jobs: list[int]) -> Row:
    makespan = max(done)
    patches = sum(batch_sizes)
    return Row(
        jobs=jobs,
        mode=mode,
        makespan_s=round(makespan, 4),
        mean_latency_s=round(statistics.fmean(done), 4),
        max_latency_s=round(max(done), 4),
        patches=patches,
        patches_per_s=round(patches / makespan, 2),
        batches=len(batch_sizes),
        mean_batch=round(statistics.fmean(batch_sizes), 2),
        mean_jobs_per_batch=round(statistics.fmean(batch_jobs), 2),
    )


def machine(runner: OnnxRunner) -> dict[str, Any]:
    return {
        **machine_basics(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers_available": ort.get_available_providers(),
        "onnxruntime_providers_used": runner.providers,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "monai": monai.__version__,
    }


def table(rows: list[Row]) -> str:
    lines = [
        "| jobs | mode | makespan s | mean latency s | max latency s | patches/s | batches | mean batch "
        "| jobs/batch | speed-up |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r.jobs: r.makespan_s for r in rows if r.mode == "baseline"}
    for r in rows:
        speedup = base[r.jobs] / r.makespan_s if r.jobs in base else float("nan")
        lines.append(
            f"| {r.jobs} | {r.mode} | {r.makespan_s:.3f} | {r.mean_latency_s:.3f} | {r.max_latency_s:.3f} "
            f"| {r.patches_per_s:.1f} | {r.batches} | {r.mean_batch:.2f} | {r.mean_jobs_per_batch:.2f} "
            f"| {speedup:.2f}x |"
        )
    return "\n".join(lines)


def median_row(rows: list[Row]) -> Row:
    return sorted(rows, key=lambda r: r.makespan_s)[len(rows) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small model and volumes, median of 3 repeats")
    parser.add_argument("--jobs", default=None, help="comma-separated concurrent job counts (default 1,4,8)")
    parser.add_argument("--max-batch", type=int, default=4, help="scheduler batch size (baseline uses 4)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch.set_num_threads (0: leave default)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    setup = QUICK if args.quick else FULL
    job_counts = tuple(int(j) for j in args.jobs.split(",")) if args.jobs else setup.jobs
    spec = InputSpec.model_validate(
        {
            "name": "image",
            "spacing": (1.0, 1.0, 1.0),
            "orientation": "RAS",
            "intensity": {"kind": "range", "a_min": 0.0, "a_max": 1.0},
            "patch_size": (setup.patch,) * 3,
            "overlap": 0.25,
            "blend": "gaussian",
        }
    )
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_model(Path(tmp) / "bench.onnx", setup.channels)
        runner = OnnxRunner(model_path)
        session = ort.InferenceSession(str(model_path), providers=runner.providers)  # as users create it
        info = machine(runner)
        warm = [rng.random((1, *setup.volume), dtype=np.float32)]
        baseline(session, warm, spec)
        pooled(runner, warm, spec, args.max_batch, args.max_wait_ms / 1000)
        rows: list[Row] = []
        max_diff = 0.0
        for n in job_counts:
            images = [rng.random((1, *setup.volume), dtype=np.float32) for _ in range(n)]
            base_rows, pool_rows = [], []
            for _ in range(setup.repeats):
                done, ref, sizes = baseline(session, images, spec)
                base_rows.append(row(n, "baseline", done, sizes, [1] * len(sizes)))
                done, out, records = pooled(runner, images, spec, args.max_batch, args.max_wait_ms / 1000)
                pool_rows.append(
                    row(n, "pooled", done, [r.size for r in records], [len(r.job_ids) for r in records])
                )
                max_diff = max(max_diff, *(float(np.abs(a - b).max()) for a, b in zip(ref, out, strict=True)))
            rows += [median_row(base_rows), median_row(pool_rows)]
            print(
                f"jobs={n}: baseline {rows[-2].makespan_s:.3f} s, pooled {rows[-1].makespan_s:.3f} s",
                flush=True,
            )
        runner.close()
    result = {
        "benchmark": "scheduler_pooling",
        "setup": {**asdict(setup), "jobs": list(job_counts), "quick": args.quick},
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "baseline_sw_batch_size": 4,
        "machine": info,
        "max_abs_diff_pooled_vs_baseline": max_diff,
        "rows": [asdict(r) for r in rows],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"scheduler_pooling-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (
        f"# scheduler_pooling ({'quick' if args.quick else 'full'})\n\n"
        f"Machine: {info['platform']}, {info['cpus_usable']} usable CPUs, onnxruntime {info['onnxruntime']} "
        f"({', '.join(info['onnxruntime_providers_used'])}), torch threads {info['torch_threads']}, "
        f"OMP_WAIT_POLICY={info['OMP_WAIT_POLICY'] or 'unset'}, "
        f"load at start {info['loadavg_at_start']}.\n"
        f"Model: 3-D conv net, {setup.channels} channels, patch {setup.patch}^3, volume {setup.volume}, "
        f"overlap 0.25, gaussian blend. Scheduler max_batch {args.max_batch}, "
        f"max_wait {args.max_wait_ms} ms; "
        f"baseline sw_batch_size 4. Max |pooled - baseline| = {max_diff:.2e}.\n\n{table(rows)}\n"
    )
    (args.out / f"scheduler_pooling-{stamp}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
