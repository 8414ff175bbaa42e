"""`radai demo`: the whole pipeline on a bundled brain MRI, in process, no network.

Builds a DICOM MR series from the bundled NIfTI sample, runs the bundled tissue model through the batching
scheduler, writes the SEG and SR, and an overlay PNG of the middle slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from radai.config import bundled_models_dir
from radai.errors import ConfigError
from radai.imaging.synth import mr_series_from_nifti
from radai.imaging.volume import Volume
from radai.models.registry import ModelPackage, open_package
from radai.pipeline import run_pipeline
from radai.runtime import create_runner
from radai.scheduling.loop import Scheduler
from radai.senders import FolderSender

DEMO_MODEL = "brain_tissue"
DEMO_SAMPLE = Path("samples") / "t1_crop.nii.gz"


@dataclass(frozen=True)
class DemoResult:
    files: tuple[Path, ...]
    overlay: Path
    volumes_ml: dict[str, float]


def overlay_png(volume: Volume, labels: np.ndarray, package: ModelPackage, path: Path) -> Path:
    """Middle axial slice, grey-scale, with each label blended in its card colour and a caption bar."""
    k = labels.shape[2] // 2
    img = volume.array[:, :, k].T.astype(np.float32)  # rows x columns
    lo, hi = np.percentile(img, [1, 99])
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    lab = labels[:, :, k].T
    for label in package.card.labels:
        mask = lab == label.value
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array(label.color, dtype=np.float32)
    out = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    scale = max(1, 512 // max(out.size))
    out = out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (out.width, out.height + 18), (0, 0, 0))
    canvas.paste(out, (0, 18))
    from PIL import ImageDraw

    ImageDraw.Draw(canvas).text(
        (4, 3), f"AI result, not verified - {package.card.id} {package.card.version}", fill=(255, 255, 0)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def run_demo(out_dir: Path, nifti: Path | None = None, device: str = "auto") -> DemoResult:
    zoo = bundled_models_dir()
    if zoo is None or not (zoo / DEMO_MODEL).is_dir():
        raise ConfigError("the bundled model packages are not installed (model_zoo)")
    package = open_package(zoo / DEMO_MODEL)
    sample = nifti if nifti is not None else zoo / DEMO_SAMPLE
    if not sample.is_file():
        raise ConfigError(f"demo input not found: {sample}")
    datasets = mr_series_from_nifti(sample)
    card = package.card
    runner = create_runner(
        card.runtime.backend, package.weights, output_channels=card.output.channels, device=device
    )
    scheduler = Scheduler(card.id, runner, card.runtime.max_batch, 0.05)
    scheduler.start()
    try:
        result = run_pipeline(datasets, card, scheduler, "demo")
    finally:
        scheduler.stop()
        runner.close()
    sender = FolderSender(out_dir)
    sender.send(result.datasets)
    overlay = overlay_png(result.volume, result.labels, package, out_dir / "overlay.png")
    voxel_ml = result.volume.voxel_volume_ml
    volumes = {
        lab.name: float(np.count_nonzero(result.labels == lab.value)) * voxel_ml for lab in card.labels
    }
    return DemoResult(files=tuple(sender.written), overlay=overlay, volumes_ml=volumes)
