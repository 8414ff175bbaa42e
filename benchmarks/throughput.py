"""radai's batching scheduler against the naive pipeline and against the runtime's own limit, same run.

A real MONAI network (UNet or SegResNet, random weights) is exported in the run and loaded through
`radai.runtime.create_runner` (`--backend onnx|torch`, `--device cpu|cuda`). Measured, every baseline beside:

- limit: the runner alone on random patches at batch 1, 2, 4, 8, 16 (best of a few passes; swept at the start
  and at the end of the run, as the machine may be shared); the best patches/s is the ceiling any scheduler
  on this device can reach with this model;
- naive: what MONAI users write: per study `sliding_window_inference(sw_batch_size=4)` calling the same
  runner's `run`, the studies one after another (on one non-main thread, see benchmarks/README.md);
- radai: the N studies arrive together, one thread each, `radai.scheduling.inferer.sliding_window` with
  `predict = scheduler.infer` on one `Scheduler` pooling the patches of every study;
- STAT: one STAT study alone, then arriving while N BACKGROUND studies keep the scheduler busy.

Per row: patches/s, ratio to naive, efficiency (of the limit), latency p50/p95 from the common arrival, mean
batch, studies per batch and busy fraction (share of the wall time the runner was executing). Checks that
radai and naive give the same scores. Run by hand: `python -m benchmarks.throughput --quick`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers.utils import sliding_window_inference
from monai.networks.nets.segresnet import SegResNet
from monai.networks.nets.unet import UNet
from numpy.typing import NDArray

from benchmarks.common import RESULTS, write_results
from benchmarks.runner_timing import BusyRunner, LoadSampler, limit_rows, limit_sweep, pct
from benchmarks.throughput_report import Scores, Served, machine, summarise, tables
from radai.domain import Priority
from radai.errors import InferenceError
from radai.models.manifest import InputSpec
from radai.pipeline import STAT_WINDOW_BYTES
from radai.runtime import create_runner
from radai.runtime.tuning import tune_batch
from radai.scheduling.inferer import sliding_window, sliding_window_tensor
from radai.scheduling.loop import BatchRecord, Scheduler

Array = NDArray[np.float32]


@dataclass(frozen=True)
class Setup:
    patch: int
    volume: tuple[int, int, int]
    unet_channels: tuple[int, ...]
    segresnet_filters: int
    repeats: int
    stat_repeats: int


# Quick: seconds on 2 cores. Full: 96^3 windows (the spleen UNet's), a CT resampled to 160x160x120 voxels.
QUICK = Setup(patch=32, volume=(64, 64, 48), unet_channels=(8, 16, 32, 64), segresnet_filters=8, repeats=3,
              stat_repeats=5)  # fmt: skip
FULL = Setup(patch=96, volume=(160, 160, 120), unet_channels=(16, 32, 64, 128, 256), segresnet_filters=16,
             repeats=1, stat_repeats=3)  # fmt: skip


def build_network(kind: str, setup: Setup) -> torch.nn.Module:
    """Random-weight MONAI network, 1 channel in, 2 out; full UNet = the MONAI spleen tutorial's."""
    torch.manual_seed(0)
    net: torch.nn.Module
    if kind == "unet":
        ch = setup.unet_channels
        net = UNet(3, 1, 2, channels=ch, strides=(2,) * (len(ch) - 1), num_res_units=2, norm="batch")
    elif kind == "segresnet":
        net = SegResNet(3, init_filters=setup.segresnet_filters, in_channels=1, out_channels=2)
    else:
        raise ValueError(f"unknown model {kind!r} (unet, segresnet)")
    return net.eval()


def export_model(net: torch.nn.Module, patch: int, folder: Path) -> Path:
    """The network as ONNX with a symbolic batch axis: what both the onnx and the torch backends load (the
    torch backend converts the graph with onnx2torch)."""
    from model_zoo.onnx_parity import export_onnx

    path = folder / "model.onnx"
    export_onnx(net, torch.zeros((1, 1, patch, patch, patch)), path, ["output"], dynamic_spatial=False)
    return path


@dataclass(frozen=True)
class Serving:
    """How radai is configured: the scheduler's batch and wait, each study's patches per `infer` call."""

    max_batch: int
    max_wait_s: float
    sw_batch: int
    stat_sw_batch: int
    device: str | None = None  # the device path: volumes, windows and blending on this device (tensors)


def windows(image: Array, spec: InputSpec, predict: Any, sw_batch: int, device: str | None) -> Scores:
    """One study's sliding window through radai's inferer: on the host (`predict` takes numpy), or on the
    device path (the volume moved to `device` once, `predict` takes tensors there, blending there too)."""
    if device is None:
        return sliding_window(image, spec, predict, sw_batch_size=sw_batch)
    volume = torch.from_numpy(image).to(device)
    return settled(sliding_window_tensor(volume, spec, predict, sw_batch_size=sw_batch))


def settled(out: torch.Tensor) -> torch.Tensor:
    """`out` once the device has computed it, so that a study's clock stops when its scores exist. They stay
    on the device, as in the pipeline, which reduces them to labels there (same for both modes)."""
    if out.device.type == "cuda":
        torch.cuda.synchronize(out.device)
    return out


def on_host(scores: Scores) -> Array:
    if isinstance(scores, torch.Tensor):
        return np.asarray(scores.detach().cpu().numpy(), dtype=np.float32)
    return scores


def naive(runner: BusyRunner, images: list[Array], spec: InputSpec, device: str | None = None) -> Served:
    """The studies one after another, MONAI sliding window (sw_batch_size 4) calling the same runner."""
    box: list[Served] = []
    thread = threading.Thread(target=lambda: box.append(_naive(runner, images, spec, device)), name="naive")
    thread.start()
    thread.join()
    if not box:
        raise RuntimeError("naive pipeline failed")
    return box[0]


def _naive(runner: BusyRunner, images: list[Array], spec: InputSpec, device: str | None) -> Served:
    def predictor(x: torch.Tensor) -> torch.Tensor:
        if device is not None:
            return runner.run_tensor(x)
        return torch.from_numpy(runner.run(x.numpy()))

    if spec.patch_size == "whole":
        raise ValueError("benchmark needs a patch size")
    where = device or "cpu"
    runner.take()
    t0 = time.perf_counter()
    latencies: list[float] = []
    outputs: list[Scores] = []
    for image in images:
        with torch.inference_mode():
            out = sliding_window_inference(
                torch.from_numpy(image)[None].to(where),
                spec.patch_size,
                4,
                predictor,
                spec.overlap,
                mode=spec.blend,
                sw_device=where,
                device=where,
            )
        outputs.append(settled(torch.as_tensor(out)[0]))
        latencies.append(time.perf_counter() - t0)
    spans = runner.take()
    return Served(latencies, outputs, latencies[-1], spans, t0, [1] * len(spans))


def radai_serve(
    runner: BusyRunner,
    images: list[Array],
    spec: InputSpec,
    cfg: Serving,
) -> Served:
    """All studies at once, one thread each, every patch through one radai Scheduler."""
    records: list[BatchRecord] = []
    scheduler = _scheduler(runner, cfg, records.append)
    latencies = [0.0] * len(images)
    outputs: list[Scores | None] = [None] * len(images)
    gate = threading.Barrier(len(images) + 1)
    t0 = 0.0

    def study(i: int) -> None:
        def predict(p: Any) -> Any:
            return _infer(scheduler, f"study{i}", p, Priority.ROUTINE)

        gate.wait()
        outputs[i] = windows(images[i], spec, predict, cfg.sw_batch, cfg.device)
        latencies[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=study, args=(i,), name=f"study{i}") for i in range(len(images))]
    for thread in threads:
        thread.start()
    runner.take()
    t0 = time.perf_counter()
    gate.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    scheduler.stop()
    done = [out for out in outputs if out is not None]
    if len(done) != len(images):
        raise RuntimeError("a radai study failed")
    return Served(latencies, done, wall, runner.take(), t0, [len(r.job_ids) for r in records])


def _scheduler(runner: BusyRunner, cfg: Serving, on_batch: Callable[[BatchRecord], None]) -> Scheduler:
    scheduler = Scheduler(
        "bench", runner, cfg.max_batch, cfg.max_wait_s, on_batch=on_batch, device_path=cfg.device is not None
    )
    scheduler.start()
    return scheduler


def _infer(scheduler: Scheduler, job: str, patches: Any, priority: Priority) -> Any:
    if isinstance(patches, torch.Tensor):
        return scheduler.infer_tensor(job, patches, priority)
    return scheduler.infer(job, patches, priority)


@dataclass(frozen=True)
class StatRow:
    """STAT latencies, and where each went (means over the repeats): the runner on the STAT study's own
    batches, the runner on background batches meanwhile (a batch runs to its end), and the rest (the STAT
    study's host work: windows, blending; and runner idle)."""

    background: int
    latencies_s: tuple[float, ...]
    own_batches_s: float
    background_batches_s: float
    rest_s: float


def stat_latencies(
    runner: BusyRunner,
    spec: InputSpec,
    stat_image: Array,
    background: list[Array],
    cfg: Serving,
    repeats: int,
) -> StatRow:
    """Latency of `repeats` STAT studies, one after another, while `background` studies (BACKGROUND
    priority, each restarted as soon as it ends) keep the scheduler busy; none: unloaded. Each STAT study
    arrives after a random pause of up to one batch, so not always just as a background batch starts."""
    ran: list[tuple[float, float, tuple[str, ...]]] = []  # (start, end, job ids) of every batch
    batches = threading.Semaphore(0)

    def on_batch(record: BatchRecord) -> None:
        end = time.monotonic()  # the scheduler's clock; on_batch runs right after the batch
        ran.append((end - record.run_s, end, record.job_ids))
        batches.release()

    scheduler = _scheduler(runner, cfg, on_batch)
    stop = threading.Event()

    def loop(i: int) -> None:
        def predict(p: Any) -> Any:
            return _infer(scheduler, f"bg{i}", p, Priority.BACKGROUND)

        while not stop.is_set():
            try:
                windows(background[i], spec, predict, cfg.sw_batch, cfg.device)
            except InferenceError:  # the scheduler was stopped under it
                return

    threads = [threading.Thread(target=loop, args=(i,), name=f"bg{i}") for i in range(len(background))]
    for thread in threads:
        thread.start()
    if background:  # the STAT study arrives once a background batch has run and the rest are queued
        batches.acquire()
    studies: list[tuple[str, float, float]] = []
    phase = np.random.default_rng(3)
    for r in range(repeats):
        job = f"stat{r}"
        if background and ran:  # arrive at a random point of the running batch, not just as one starts
            time.sleep(phase.uniform(0.0, ran[-1][1] - ran[-1][0]))

        def urgent(p: Any, job: str = job) -> Any:
            return _infer(scheduler, job, p, Priority.STAT)

        t = time.monotonic()
        windows(stat_image, spec, urgent, cfg.stat_sw_batch, cfg.device)
        studies.append((job, t, time.monotonic()))
    stop.set()
    scheduler.stop()
    for thread in threads:
        thread.join()
    runner.take()
    own, other = [], []
    for job, t0, t1 in studies:
        overlap = [(min(e, t1) - max(b, t0), job in jobs) for b, e, jobs in ran if min(e, t1) > max(b, t0)]
        own.append(sum(d for d, mine in overlap if mine))
        other.append(sum(d for d, mine in overlap if not mine))
    latencies = [t1 - t0 for _, t0, t1 in studies]
    return StatRow(
        background=len(background),
        latencies_s=tuple(round(x, 4) for x in latencies),
        own_batches_s=round(statistics.fmean(own), 4),
        background_batches_s=round(statistics.fmean(other), 4),
        rest_s=round(statistics.fmean(latencies) - statistics.fmean(own) - statistics.fmean(other), 4),
    )


def stat_windows(patch: int, max_batch: int) -> int:
    """Windows per call of a STAT study in radai's pipeline (radai.pipeline.window_batch): 1 GiB of patches
    and two-channel scores, at most 64, at least the batch."""
    per_window = patch**3 * (1 + 2) * 4
    return max(max_batch, min(64, STAT_WINDOW_BYTES // per_window))


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small network, 32^3 windows, 64x64x48 volumes")
    parser.add_argument("--model", choices=("unet", "segresnet"), default="unet")
    parser.add_argument("--backend", default="onnx", help="radai runtime backend (onnx, torch)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--studies", type=ints, default=(1, 4, 8, 16), help="concurrent studies, e.g. 1,4,8,16"
    )
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument(
        "--tune",
        action="store_true",
        help="radai's batch as the server picks it with scheduler.batch_tuning on: the smallest batch up to "
        "--max-batch within 5%% of the fastest (radai.runtime.tuning)",
    )
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--sw-batch", type=int, default=0, help="radai studies' patches per call (0: max batch)"
    )
    parser.add_argument(
        "--stat-sw-batch",
        type=int,
        default=0,
        help="the STAT study's (0: as radai's pipeline does, every window of up to 1 GiB per call, <= 64)",
    )
    parser.add_argument("--limit-batches", type=ints, default=(1, 2, 4, 8, 16))
    parser.add_argument("--repeats", type=int, default=0, help="runs per point (0: 3 quick, 1 full)")
    parser.add_argument("--stat-repeats", type=int, default=0, help="STAT studies per point (0: 5 / 3)")
    parser.add_argument("--volume", type=ints, default=None, help="override the volume, e.g. 160,160,120")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    parser.add_argument(
        "--path",
        choices=("auto", "host", "device"),
        default="auto",
        help="where volumes, windows and blending live: host (numpy), device (tensors on the runner's "
        "device, both modes), auto: device on CUDA",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    setup = QUICK if args.quick else FULL
    spec = InputSpec.model_validate(
        {
            "name": "image",
            "spacing": (1.5, 1.5, 2.0),
            "orientation": "RAS",
            "intensity": {"kind": "range", "a_min": 0.0, "a_max": 1.0},
            "patch_size": (setup.patch,) * 3,
            "overlap": 0.25,
            "blend": "gaussian",
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        net = build_network(args.model, setup)
        path = export_model(net, setup.patch, Path(tmp))
        runner = BusyRunner(create_runner(args.backend, path, output_channels=2, device=args.device))
        return _measure(args, setup, spec, runner)


def _measure(args: argparse.Namespace, setup: Setup, spec: InputSpec, runner: BusyRunner) -> int:
    volume = tuple(args.volume) if args.volume else setup.volume
    repeats = args.repeats or setup.repeats
    stat_repeats = args.stat_repeats or setup.stat_repeats
    rng = np.random.default_rng(1)

    def log(text: str) -> None:
        print(text, flush=True)

    def volumes(n: int) -> list[Array]:
        return [rng.random((1, *volume), dtype=np.float32) for _ in range(n)]

    info = machine(args.backend, args.device, runner.inner)
    on_cuda = runner.device.startswith("cuda")
    device = runner.device if args.path == "device" or (args.path == "auto" and on_cuda) else None
    info["path"] = "host" if device is None else f"device ({device})"
    loads = LoadSampler()
    rounds = 10 if args.quick else 2
    before = limit_sweep(runner, setup.patch, args.limit_batches, rounds, device)
    log("limit sweep before, best: " + ", ".join(f"b{b} {b / min(t):.1f}" for b, t in before.items()))
    warm = volumes(1)
    naive(runner, warm, spec, device)
    max_batch = args.max_batch
    if args.tune:
        max_batch = tune_batch(runner, 1, (setup.patch,) * 3, args.max_batch).batch
        log(f"tuned batch: {max_batch}")
    cfg = Serving(
        max_batch,
        args.max_wait_ms / 1000,
        args.sw_batch or max_batch,
        args.stat_sw_batch or stat_windows(setup.patch, max_batch),
        device,
    )
    radai_serve(runner, warm, spec, cfg)
    rows: list[dict[str, Any]] = []
    max_diff = 0.0
    for n in args.studies:
        images = volumes(n)
        base, ours = [], []
        for _ in range(repeats):
            base.append(naive(runner, images, spec, device))
            ours.append(radai_serve(runner, images, spec, cfg))
            diffs = (
                float(np.abs(on_host(a) - on_host(b)).max())
                for a, b in zip(base[-1].outputs, ours[-1].outputs, strict=True)
            )
            max_diff = max(max_diff, *diffs)
        b_row, o_row = summarise(n, "naive", base), summarise(n, "radai", ours)
        b_row["vs_naive"] = 1.0
        o_row["vs_naive"] = round(o_row["patches_per_s"] / b_row["patches_per_s"], 3)
        rows += [b_row, o_row]
        log(f"studies={n}: naive {b_row['patches_per_s']:.1f}, radai {o_row['patches_per_s']:.1f} patches/s")
    stat_image = volumes(1)[0]
    stat_rows = [stat_latencies(runner, spec, stat_image, [], cfg, stat_repeats)]
    for n in args.studies:
        stat_rows.append(stat_latencies(runner, spec, stat_image, volumes(n), cfg, stat_repeats))
        log(f"STAT with {n} background: {stat_rows[-1].latencies_s} s (unloaded {stat_rows[0].latencies_s})")
    base_median = statistics.median(stat_rows[0].latencies_s)
    base_p95 = pct(stat_rows[0].latencies_s, 95)
    stat = []
    for r in stat_rows:
        median, p95 = statistics.median(r.latencies_s), pct(r.latencies_s, 95)
        stat.append(
            {
                **asdict(r),
                "median_s": round(median, 4),
                "p95_s": round(p95, 4),
                "median_ratio": round(median / base_median, 3),
                "p95_ratio": round(p95 / base_p95, 3),
            }
        )
    after = limit_sweep(
        runner, setup.patch, args.limit_batches, rounds, device
    )  # the machine is shared: sweep twice
    log("limit sweep after, best: " + ", ".join(f"b{b} {b / min(t):.1f}" for b, t in after.items()))
    runner.close()
    limits = limit_rows(before, after)
    best = max(r["best_patches_per_s"] for r in limits)
    typical = max(r["median_patches_per_s"] for r in limits)
    for row in rows:
        row["efficiency"] = round(row["patches_per_s"] / best, 3)
        row["efficiency_of_median_limit"] = round(row["patches_per_s"] / typical, 3)
    result = {
        "benchmark": "throughput",
        "setup": {**asdict(setup), "volume": list(volume), "quick": args.quick, "model": args.model},
        "studies": list(args.studies),
        "repeats": repeats,
        "stat_repeats": stat_repeats,
        "max_batch": max_batch,
        "max_batch_ceiling": args.max_batch,
        "tuned": args.tune,
        "max_wait_ms": args.max_wait_ms,
        "radai_sw_batch_size": cfg.sw_batch,
        "stat_sw_batch_size": cfg.stat_sw_batch,
        "naive_sw_batch_size": 4,
        "machine": info,
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "loadavg_1min_during": loads.stop(),
        "limit_patches_per_s": best,
        "limit_median_pass_patches_per_s": typical,
        "limit": limits,
        "max_abs_diff_radai_vs_naive": max_diff,
        "rows": rows,
        "stat": stat,
    }
    md = tables(result)
    js, mdp = write_results(args.out_dir, "throughput", result, md)
    print(md)
    print(f"wrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
