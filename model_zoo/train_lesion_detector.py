"""Train, evaluate and package the demonstration CT lesion detector (`ct-lesion-demo`).

A small anchor-free 3-D detector (CenterNet-style: a MONAI UNet trunk and a dense head giving a centre
heatmap and box sizes in mm at every voxel) trained on synthetic lesions (`model_zoo.lesion_synth`)
inserted into real CT. Training series: CRLM-CT-1006 and the JPEG 2000 abdomen; held out: CRLM-CT-1004.

    python -m model_zoo.train_lesion_detector --out model_zoo/catalogue/ct_lesion_demo [--steps N] [--seed 0]

Everything the evaluation sees goes through radai's own path: `build_volume` -> `prepare` (card InputSpec)
-> `sliding_window` (ONNX Runtime) -> `decode_centers`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.layers.factories import Norm
from monai.networks.nets.unet import UNet
from numpy.typing import NDArray
from torch import nn

from model_zoo.lesion_detector_card import write_card, write_readme
from model_zoo.lesion_detector_eval import (
    DICOM,
    HELDOUT_SERIES,
    INPUT,
    LESIONS_PER_SCAN,
    MATCH_MM,
    ROOT,
    TRAIN_SERIES,
    choose_threshold,
    onnx_predictor,
    scan_maps,
    score,
)
from model_zoo.lesion_synth import Anatomy, Lesion, analyse, insert_lesions, load_series
from radai.imaging.resample import Prepared, prepare
from radai.imaging.volume import Volume, build_volume
from radai.models.manifest import sha256_file
from radai.scheduling.inferer import Predict

log = logging.getLogger("train_lesion_detector")

TRAIN_PATCH = (64, 64, 16)
SIZE_SCALE_MM = 10.0
SIZE_OFFSET_MM = 20.0


class CenterNet3D(nn.Module):
    """MONAI UNet trunk -> ReLU -> 1x1x1 heads: C heatmap logits and 3 sizes (mm)."""

    def __init__(self, classes: int = 1, features: Sequence[int] = (16, 32, 64), width: int = 16) -> None:
        super().__init__()
        self.trunk = UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=width,
            channels=tuple(features),
            strides=(2,) * (len(features) - 1),
            num_res_units=1,
            norm=Norm.BATCH,
        )
        self.heat = nn.Conv3d(width, classes, 1)
        self.size = nn.Conv3d(width, 3, 1)
        if self.heat.bias is not None:  # CenterNet prior: p = 0.01 everywhere at the start
            nn.init.constant_(self.heat.bias, -4.6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.trunk(x))
        return torch.cat([self.heat(f), SIZE_SCALE_MM * self.size(f) + SIZE_OFFSET_MM], dim=1)


@dataclass(frozen=True, eq=False)
class Sample:
    """One synthesised scan in model space with its targets."""

    image: NDArray[np.float32]  # (1, X, Y, Z)
    heat: NDArray[np.float32]  # (X, Y, Z) gaussian centre heatmap, 1 at the centre voxels
    owner: NDArray[np.int8]  # (X, Y, Z) index of the lesion whose size applies (heat > 0.5), else -1
    sizes: NDArray[np.float32]  # (n, 3) box sizes in mm along the model axes
    centers: NDArray[np.float64]  # (n, 3) model voxel coordinates


def model_centre_and_size(
    lesion: Lesion, volume: Volume, prepared: Prepared
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """A lesion's centre in model voxels and its bounding-box size (mm) along the model axes."""
    ras = volume.affine @ np.array([*lesion.center_voxel, 1.0])
    centre = (np.linalg.inv(prepared.affine) @ ras)[:3]
    src = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    dst = prepared.affine[:3, :3] / np.linalg.norm(prepared.affine[:3, :3], axis=0)
    size = np.abs(dst.T @ src) @ np.asarray(lesion.size_mm)
    return centre, size


def make_sample(volume: Volume, anatomy: Anatomy, seed: int) -> Sample:
    synth, lesions = insert_lesions(volume, seed, LESIONS_PER_SCAN, anatomy=anatomy)
    prepared = prepare(synth, INPUT)
    shape = prepared.image.shape[1:]
    heat = np.zeros(shape, dtype=np.float32)
    owner = np.full(shape, -1, dtype=np.int8)
    grid = np.indices(shape, dtype=np.float32)
    spacing = np.asarray(INPUT.spacing)
    centres, sizes = [], []
    for n, lesion in enumerate(lesions):
        c, s = model_centre_and_size(lesion, synth, prepared)
        sigma = np.maximum(0.75, s / spacing / 6.0)
        d2 = sum(((grid[a] - c[a]) / sigma[a]) ** 2 for a in range(3))
        g = np.exp(-0.5 * d2).astype(np.float32)
        peak = tuple(int(np.clip(round(float(c[a])), 0, shape[a] - 1)) for a in range(3))
        g[peak] = 1.0
        heat = np.maximum(heat, g)
        owner[g > 0.5] = n
        centres.append(c)
        sizes.append(s)
    return Sample(
        prepared.image,
        heat,
        owner,
        np.array(sizes, np.float32).reshape(-1, 3),
        np.array(centres).reshape(-1, 3),
    )


def _crop(sample: Sample, rng: np.random.Generator) -> tuple[NDArray[np.float32], ...]:
    """A training patch: 70 % around a lesion, else anywhere; zero padding where the scan is smaller."""
    shape = np.array(sample.image.shape[1:])
    patch = np.array(TRAIN_PATCH)
    if len(sample.centers) and rng.random() < 0.7:
        c = sample.centers[rng.integers(len(sample.centers))]
        start = np.round(c - patch / 2 + rng.uniform(-0.4, 0.4, 3) * patch).astype(int)
    else:
        start = np.array(
            [rng.integers(min(0, s - p), max(0, s - p) + 1) for s, p in zip(shape, patch, strict=True)]
        )
    img = np.zeros((1, *TRAIN_PATCH), dtype=np.float32)
    heat = np.zeros(TRAIN_PATCH, dtype=np.float32)
    owner = np.full(TRAIN_PATCH, -1, dtype=np.int8)
    src = tuple(
        slice(max(0, int(a)), min(int(s), int(a) + int(p)))
        for a, s, p in zip(start, shape, patch, strict=True)
    )
    dst = tuple(slice(sl.start - int(a), sl.stop - int(a)) for sl, a in zip(src, start, strict=True))
    img[(slice(None), *dst)] = sample.image[(slice(None), *src)]
    heat[dst] = sample.heat[src]
    owner[dst] = sample.owner[src]
    size = np.zeros((3, *TRAIN_PATCH), dtype=np.float32)
    if len(sample.sizes):
        size[:, owner >= 0] = sample.sizes[owner[owner >= 0]].T
    if rng.random() < 0.5:  # left-right mirror
        img, heat, size = img[:, ::-1], heat[::-1], size[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(heat), np.ascontiguousarray(size)


def loss_fn(out: torch.Tensor, heat: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CenterNet penalty-reduced focal loss on the heatmap + L1 on sizes near centres."""
    p = torch.sigmoid(out[:, 0]).clamp(1e-4, 1 - 1e-4)
    pos = heat >= 1.0
    n_pos = pos.sum().clamp(min=1)
    pos_loss = (torch.log(p) * (1 - p) ** 2)[pos].sum()
    neg_loss = (torch.log(1 - p) * p**2 * (1 - heat) ** 4)[~pos].sum()
    focal = -(pos_loss + neg_loss) / n_pos
    near = heat > 0.5
    if bool(near.any()):
        l1 = (out[:, 1:] - size).abs().permute(1, 0, 2, 3, 4)[:, near].mean() / SIZE_SCALE_MM
    else:
        l1 = out.sum() * 0.0
    return focal, l1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


class Pool:
    """Synthesised training scans, partly replaced by fresh insertions every `refresh` steps."""

    def __init__(self, sources: Sequence[tuple[Volume, Anatomy]], size: int, seed: int) -> None:
        self._sources = sources
        self._next_seed = seed * 1_000_000
        self.samples = [self._make(i) for i in range(size)]

    def _make(self, i: int) -> Sample:
        volume, anatomy = self._sources[i % len(self._sources)]
        self._next_seed += 1
        return make_sample(volume, anatomy, self._next_seed)

    def refresh(self, count: int, rng: np.random.Generator) -> None:
        for i in rng.choice(len(self.samples), size=count, replace=False):
            self.samples[int(i)] = self._make(int(i))


def train(pool: Pool, steps: int, seed: int, device: str, batch: int = 4, refresh: int = 250) -> CenterNet3D:
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    model = CenterNet3D().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.monotonic()
    for step in range(steps):
        if step and step % refresh == 0:
            pool.refresh(len(pool.samples) // 4, rng)
        parts = [_crop(pool.samples[rng.integers(len(pool.samples))], rng) for _ in range(batch)]
        img, heat, size = (torch.from_numpy(np.stack(x)).to(device) for x in zip(*parts, strict=True))
        focal, l1 = loss_fn(model(img), heat, size)
        loss = focal + 0.5 * l1
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log.info(
                "step %d/%d focal %.3f size %.3f (%.0f s)",
                step,
                steps,
                focal.item(),
                l1.item(),
                time.monotonic() - t0,
            )
    return model.eval()


def export_onnx(model: CenterNet3D, path: Path) -> None:
    import onnx

    model = model.cpu().eval()
    dummy = torch.zeros((1, 1, *TRAIN_PATCH), dtype=torch.float32)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=[INPUT.name],
        output_names=["maps"],
        opset_version=17,
        dynamic_axes={
            INPUT.name: {0: "batch", 2: "x", 3: "y", 4: "z"},
            "maps": {0: "batch", 2: "x", 3: "y", 4: "z"},
        },
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def parity(model: CenterNet3D, predict: Predict, rng: np.random.Generator) -> float:
    """Max |torch - ONNX Runtime| / max |torch| over random inputs of two shapes and batch sizes."""
    worst = 0.0
    for shape in ((1, 1, 64, 64, 16), (2, 1, 96, 80, 32)):
        x = rng.random(shape, dtype=np.float32)
        with torch.no_grad():
            ref = model.cpu()(torch.from_numpy(x)).numpy()
        got = predict(x)
        worst = max(worst, float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-6)))
    return worst


def reference_pair(predict: Predict, out: Path) -> tuple[str, str]:
    """A 48x48x16 crop of the held-out CT (with one inserted lesion) and the ONNX output on it."""
    volume = build_volume(load_series(DICOM / HELDOUT_SERIES))
    synth, lesions = insert_lesions(volume, 7, 1)
    prepared = prepare(synth, INPUT)
    c = model_centre_and_size(lesions[0], synth, prepared)[0]
    shape = np.array(prepared.image.shape[1:])
    half = np.array([24, 24, 8])
    lo = np.clip(np.round(c).astype(int) - half, 0, shape - 2 * half)
    crop = prepared.image[:, lo[0] : lo[0] + 48, lo[1] : lo[1] + 48, lo[2] : lo[2] + 16][None]
    crop = np.ascontiguousarray(crop, dtype=np.float32)
    (out / "reference").mkdir(parents=True, exist_ok=True)
    np.save(out / "reference" / "input.npy", crop)
    np.save(out / "reference" / "output.npy", predict(crop))
    return "reference/input.npy", "reference/output.npy"


def _shown(path: Path) -> str:
    """A path as written in the card: relative to the project root where it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3200, help="optimiser steps (batches of 4 patches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--pool", type=int, default=40, help="synthesised scans held at once")
    parser.add_argument("--eval-scans", type=int, default=20, help="held-out scans with fresh insertions")
    parser.add_argument("--checkpoint", type=Path, help="also save the trained weights here (outside --out)")
    parser.add_argument(
        "--from-checkpoint", type=Path, help="skip training: evaluate and package these weights"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if args.from_checkpoint is None:
        sources = []
        for name in TRAIN_SERIES:
            volume = build_volume(load_series(DICOM / name))
            sources.append((volume, analyse(volume)))
        model = train(Pool(sources, args.pool, args.seed), args.steps, args.seed, args.device)
        train_s = time.monotonic() - t0
    else:  # re-evaluate and re-package a finished training (weights only: nothing unpickled)
        model = CenterNet3D()
        model.load_state_dict(torch.load(args.from_checkpoint, weights_only=True))
        model.eval()
        record = json.loads(args.from_checkpoint.with_suffix(".json").read_text(encoding="utf-8"))
        args.steps, args.seed, args.device, args.pool = (
            record[k] for k in ("steps", "seed", "device", "pool")
        )
        train_s = float(record["train_seconds"])
    if args.checkpoint is not None:
        torch.save(model.state_dict(), args.checkpoint)
        record = {"steps": args.steps, "seed": args.seed, "device": args.device, "pool": args.pool}
        record["train_seconds"] = round(train_s)
        args.checkpoint.with_suffix(".json").write_text(json.dumps(record) + "\n", encoding="utf-8")
    export_onnx(model, out / "model.onnx")
    predict = onnx_predictor(out / "model.onnx")
    rel = parity(model, predict, np.random.default_rng(args.seed))
    ref = reference_pair(predict, out)
    val_series = TRAIN_SERIES[0]
    val_seeds = range(2000, 2000 + args.eval_scans // 2)
    validation = scan_maps(predict, val_series, val_seeds)
    post = choose_threshold(*validation)
    held_seeds = range(1000, 1000 + args.eval_scans)
    held = score(*scan_maps(predict, HELDOUT_SERIES, held_seeds), post)
    seen = score(*validation, post)
    held.update(series=HELDOUT_SERIES, seeds=[held_seeds[0], held_seeds[-1]])
    seen.update(series=val_series, seeds=[val_seeds[0], val_seeds[-1]])
    report: dict[str, Any] = {
        "command": f"python -m model_zoo.train_lesion_detector --out {_shown(out)} --steps {args.steps} "
        f"--seed {args.seed} --device {args.device} --pool {args.pool} --eval-scans {args.eval_scans}",
        "train_seconds": round(train_s),
        "onnx_parity_max_rel_error": rel,
        "match_distance_mm": MATCH_MM,
        "train_patch": list(TRAIN_PATCH),
        "score_threshold": post.score_threshold,
        "heldout_patient": held,
        "training_patient_fresh_insertions": seen,
    }
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    provenance = (
        f"Trained by `{report['command']}` ({args.steps} steps of 4 patches {TRAIN_PATCH}, "
        f"{round(train_s / 60)} min on 1 {args.device} thread); exported to ONNX opset 17 with dynamic batch and "
        f"spatial axes; torch vs ONNX Runtime max relative error {rel:.1e}. Figures in README.md and evaluation.json."
    )
    write_card(out, sha256_file(out / "model.onnx"), ref, provenance, post)
    write_readme(out, report, post)
    log.info("done: %s", json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
