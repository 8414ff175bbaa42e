"""The package files of the demonstration CT lesion detector: `model.yaml` (validated) and `README.md`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from model_zoo.lesion_detector_eval import INPUT, INTENSITY, LESIONS_PER_SCAN, THRESHOLDS
from radai.models.manifest import CentersPost, ModelCard


def write_card(out: Path, sha: str, ref: tuple[str, str], provenance: str, post: CentersPost) -> None:
    card = {
        "id": "ct-lesion-demo",
        "version": "1.0.0",
        "name": "CT lesion detector (demonstration, trained on synthetic lesions)",
        "task": "detection",
        "kind": "trained-demo",
        "modality": "CT",
        "body_part": "ABDOMEN",
        "series_selection": [{"modality": ["CT"], "orientation": "axial", "min_slices": 8}],
        "input": json.loads(INPUT.model_dump_json()),
        "output": {"name": "maps", "channels": 4, "postprocess": json.loads(post.model_dump_json())},
        "labels": [
            {
                "value": 1,
                "name": "Lesion",
                "category": {
                    "scheme": "SCT",
                    "value": "49755003",
                    "meaning": "Morphologically Abnormal Structure",
                },
                "type": {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"},
                "color": [255, 80, 40],
            }
        ],
        "runtime": {
            "backend": "onnx",
            "file": "model.onnx",
            "sha256": sha,
            "max_batch": 4,
            "precision": "fp32",
        },
        "reference": {"input": ref[0], "output": ref[1], "atol": 0.002},
        "intended_use": (
            "Demonstration and integration testing of radai's detection path (SR findings with 3-D locations). "
            "Trained only on synthetic spheres/ellipsoids inserted into two real CT series; it finds such "
            "inserted round lesions (hypodense soft-tissue lesions, solid lung nodules, 10-30 mm) and is not "
            "expected to find real lesions. Not a medical device; not for clinical use."
        ),
        "not_for_clinical_use": True,
        "licence": (
            "Apache-2.0 (weights and code). Trained on TCIA Colorectal-Liver-Metastases CRLM-CT-1006 (CC BY 4.0, "
            "Simpson et al. 2023, doi:10.7937/QXK2-QG03) and the TotalSegmentator example CT (Apache-2.0); "
            "reference arrays derive from CRLM-CT-1004 (CC BY 4.0)."
        ),
        "provenance": provenance,
    }
    ModelCard.model_validate(card)
    (out / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False, width=110), encoding="utf-8")


def _rows(result: dict[str, Any]) -> str:
    lines = [
        f"| all | {result['lesions']} | {result['true_positives']} | {result['sensitivity']:.2f} |",
        *(
            f"| {name} mm | {v['lesions']} | {v['found']} | {v['found'] / max(v['lesions'], 1):.2f} |"
            for name, v in result["by_diameter_mm"].items()
        ),
        *(
            f"| {name} | {v['lesions']} | {v['found']} | {v['found'] / max(v['lesions'], 1):.2f} |"
            for name, v in result["by_kind"].items()
        ),
    ]
    return "\n".join(lines)


def _section(title: str, result: dict[str, Any]) -> str:
    return f"""### {title}

`{result["series"]}`, {result["scans"]} scans (seeds {result["seeds"][0]}-{result["seeds"][1]}), \
{LESIONS_PER_SCAN} inserted lesions each: **sensitivity {result["sensitivity"]:.2f}** \
({result["true_positives"]}/{result["lesions"]}), **{result["false_positives_per_scan"]:.2f} false positives per \
scan**; the same series without insertions gives {result["false_positives_without_insertions"]} detection(s).

| lesions | n | found | sensitivity |
|---|---|---|---|
{_rows(result)}
"""


def write_readme(out: Path, report: dict[str, Any], post: CentersPost) -> None:
    """The package's human-readable card, with the evaluation figures and the command that made them."""
    text = f"""# ct-lesion-demo 1.0.0: CT lesion detector (DEMONSTRATION MODEL, synthetic lesions)

**Not for clinical use. Not a medical device.** This is a demonstration model for radai's detection path
(findings with 3-D locations in a TID 1500 SR). It was trained only on *synthetic* lesions (soft-edged
spheres/ellipsoids with realistic density and noise) inserted into two real CT series. It finds such
inserted round lesions; it has never seen a real lesion and is not expected to find real ones, and it will
mark real round structures that resemble its training lesions.

## What it detects
- Hypodense lesions 10-30 mm across, 25-60 HU darker than the soft tissue around them (liver, spleen,
  muscle, ...), on contrast-enhanced abdominal CT;
- solid nodules 10-30 mm (-10..60 HU) in aerated lung at the lung bases.

It will not detect: lesions under ~10 mm or over ~30 mm, hyperdense or calcified lesions, lesions with
less than ~25 HU contrast, lesions outside the body mask, anything on non-axial or non-CT series. It was
trained on two patients only; expect false positives on real round hypodense structures (gallbladder,
bowel loops, cysts, the real metastases present in these TCIA colorectal-liver-metastasis scans).

## Model
- Anchor-free, CenterNet-style dense detector: MONAI `UNet` trunk (channels 16-32-64, one residual unit,
  batch norm) and 1x1x1 heads: channel 0 the centre-heatmap logit of label 1 "Lesion"
  (SCT 52988006, category SCT 49755003 Morphologically Abnormal Structure), channels 1-3 the box size in mm
  along the model axes. Input (N, 1, X, Y, Z): CT resampled by radai to {INPUT.spacing} mm, orientation
  {INPUT.orientation}, HU window [{INTENSITY.a_min:g}, {INTENSITY.a_max:g}] -> [0, 1] clipped
  (`kind: range`); sliding windows {INPUT.patch_size} with gaussian blending.
- Decoding (`radai.detection.decode_centers`, card `postprocess: centers`): sigmoid, local maxima over a
  {post.peak_window}-voxel cube with probability >= {post.score_threshold}, NMS at IoU {post.nms_iou}, at most
  {post.max_findings} findings. The threshold was chosen on the validation scans (training patient, fresh
  insertions): best sensitivity at <= 1 false positive per scan among {", ".join(map(str, THRESHOLDS))}.
- Loss: CenterNet penalty-reduced focal loss on a gaussian centre heatmap + L1 on sizes near centres.
- ONNX opset 17, dynamic batch and spatial axes (spatial sizes must be multiples of 4);
  torch vs ONNX Runtime max relative error {report["onnx_parity_max_rel_error"]:.1e}.

## Training
Series: TCIA Colorectal-Liver-Metastases CRLM-CT-1006 (51 slices, 5 mm) and the TotalSegmentator example
abdominal CT (20 slices, 2 mm, JPEG 2000); CRLM-CT-1004 is held out. {LESIONS_PER_SCAN} lesions per synthetic scan
(`model_zoo/lesion_synth.py`: placed in the body mask, density relative to the replaced tissue, soft 1.5 mm
edges, slice-thickness averaging, noise with the image's measured soft-tissue standard deviation), a pool of
synthetic scans refreshed during training, patches {tuple(report["train_patch"])}, left-right mirroring.
Trained in {report["train_seconds"] // 60} min with:

    {report["command"]}

## Evaluation (held-out insertions)
Through radai's own path: `build_volume` -> `prepare` (card input spec) -> `sliding_window` (ONNX Runtime)
-> `decode_centers`. A detection is a true positive when its centre lies within
**{report["match_distance_mm"]:g} mm** of an inserted lesion's centre (one-to-one, `radai.detection.match_findings`);
every other detection is a false positive (including any on real anatomy). Score threshold
{report["score_threshold"]}. Figures written by the command above (also in `evaluation.json`).

{_section("Held-out patient (never seen in training)", report["heldout_patient"])}
{_section("Training patient, fresh insertions (unseen seeds)", report["training_patient_fresh_insertions"])}
## Licence
Weights and code Apache-2.0. Training data: TCIA Colorectal-Liver-Metastases (CC BY 4.0, Simpson et al.
2023, doi:10.7937/QXK2-QG03) and TotalSegmentator's test CT (Apache-2.0); reference arrays from CRLM-CT-1004.
"""
    (out / "README.md").write_text(text, encoding="utf-8")
