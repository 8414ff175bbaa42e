"""README.md (the human model card) of the brainchop catalogue packages, generated with the card.

The parity figures were measured by hand with `python -m model_zoo.build_brainchop --full-check` and are
kept here (MEASURED) so that the README says exactly what was measured; rerun and update them when the
weights, the converter or the preprocessing change.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_zoo.tfjs import load_tfjs_model

if TYPE_CHECKING:
    from model_zoo.build_brainchop import ModelSpec

# model id -> lines printed by --full-check (ONNX Runtime vs model_zoo.meshnet_reference, float64).
MEASURED: dict[str, tuple[str, ...]] = {
    "brain-subcortical": (
        "reference crop (32^3): max |logit difference| 4.3e-06, argmax agreement 100 %",
        "centred 128^3 of the conformed sample: max |logit difference| 3.2e-05, argmax agreement 100 % "
        "of 2,097,152 voxels",
        "whole conformed sample through ONNX Runtime (256^3, 1 thread, 8 min on a busy 2-core machine): "
        "cerebral white matter 478.5 mL, cerebral cortex 585.7 mL, cerebellar cortex 116.9 mL, lateral "
        "ventricles 17.9 mL, thalamus 17.2 mL, hippocampus 8.9 mL, amygdala 4.4 mL (the sample is cropped: "
        "not whole-brain reference volumes)",
    ),
    "brain-parcellation": (
        "reference crop (32^3): max |logit difference| 4.9e-06, argmax agreement 100 %",
        "centred 128^3 of the conformed sample: max |logit difference| 1.2e-05, argmax agreement 100 % "
        "of 2,097,152 voxels",
        "whole conformed sample through ONNX Runtime (256^3, 1 thread, 2.4 min on a busy 2-core machine), "
        "with the card's unclipped 5..95 % normalisation: cerebral white matter 521.9 mL, the 34 cortical "
        "parcels 517.1 mL together, cerebellar cortex 115.0 mL, ventricles 16.8 mL, thalamus 16.6 mL",
    ),
    "brain-mask": (
        "reference crop (32^3): max |logit difference| 4.2e-05, argmax agreement 100 %",
        "centred 128^3 of the conformed sample: max |logit difference| 0.015, mean 6.8e-04, on logits up to "
        "60 in magnitude (26 float32 layers, each with an instance norm over 2 million voxels), argmax "
        "agreement 99.9996 % of 2,097,152 voxels: the 9 voxels that differ all have their two reference "
        "logits within 0.011 of each other",
        "whole conformed sample through ONNX Runtime (256^3, 1 thread, 4 min on a busy 2-core machine): "
        "brain 1606.6 mL (brainchop quotes about 1.6 L on a real 1 mm MPRAGE)",
    ),
}

# What each model's brainchop entry does that radai's card expresses differently, per model id.
NORMALISATION: dict[str, str] = {
    "brain-subcortical": (
        "brainchop's entry has `enableQuantileNorm: false`: niivue's conform scales to uint8 (upper limit at "
        "99.9 % of the histogram), then the volume is min-max normalised to 0..1. The card says the same: "
        "`{kind: quantile, lower: 0.0, upper: 0.999, to_uint8_first: true}` (min -> 0, 99.9th percentile -> 1, "
        "clipped)."
    ),
    "brain-parcellation": (
        "brainchop's entry has `enableQuantileNorm: true` (and the weights' model.json says 'Normalize the "
        "data for this model with min = 5% quantile, max = 95% quantile'): `(x - q5) / (q95 - q5)` over the "
        "whole uint8 volume, **not clipped**, so the brightest tissue (white matter) goes above 1. The card "
        "says exactly that: `{kind: quantile, lower: 0.05, upper: 0.95, to_uint8_first: true, clip: false}`. "
        "(Clipping to [0, 1] would move about 90 to 100 mL from cortex to white matter on the sample.)"
    ),
    "brain-mask": (
        "brainchop's entry has `enableQuantileNorm: true`. Every convolution of MindGrab is followed by an "
        "instance norm (brainchop's `_gn` layers), so any affine change of the input intensities cancels; "
        "only clipping would change the result. The card therefore uses the uint8 min-max step without "
        "clipping anything but the top 0.1 % (`lower: 0.0, upper: 0.999`): on the centred 128^3 of the "
        "sample it gives the same mask as brainchop's unclipped 5..95 % step in 99.97 % of voxels (the clipped "
        "5..95 % step: 98.4 %)."
    ),
}


# Model-specific remarks for the "What it is not" section, per model id.
NOTES: dict[str, str] = {
    "brain-subcortical": (
        "brainchop describes it as robust to data quality and possibly usable on infant brains; none of that "
        "was checked here."
    ),
    "brain-parcellation": (
        "Cortical parcels follow the Desikan-Killiany atlas as FreeSurfer's aparc+aseg draws it, with left and "
        "right merged into one class each; they are atlas regions, not anatomical gyri."
    ),
    "brain-mask": (
        "The authors describe MindGrab as modality-agnostic (T1, T2, FLAIR, DWI, EPI, MRA, PD, CT, PET); this "
        "card accepts MR series only and only a T1 was checked. The model needs the whole 256^3 volume: every "
        "layer's instance norm takes its statistics over the whole input, so a smaller patch changes the result "
        "everywhere (on the sample, the centred 128^3 run on its own agreed with the whole-volume mask there in "
        "58 % of voxels)."
    ),
}


def _architecture(model_dir: Path) -> str:
    model = load_tfjs_model(model_dir)
    convs = [layer for layer in model.layers if layer.class_name == "Conv3D"]
    acts = sorted(
        {str(layer.config.get("activation")) for layer in model.layers if layer.class_name == "Activation"}
    )
    dilations = "-".join(str(int(c.config["dilation_rate"][0])) for c in convs[:-1])
    weights = sum(int(w.size) for w in model.weights.values())
    norm = ", each followed by an instance norm" if convs[0].name.endswith("_gn") else ""
    return (
        f"{len(convs) - 1} dilated 3x3x3 convolutions ({int(convs[0].config['filters'])} channels, dilations "
        f"{dilations}{norm}; activation {', '.join(acts)}) and a 1x1x1 convolution to "
        f"{int(convs[-1].config['filters'])} class logits: {weights:,} weights"
    )


def _label_table(raw: dict[str, Any], spec: ModelSpec) -> list[str]:
    rows = ["| value | name | brainchop name | type code | colour |", "|---|---|---|---|---|"]
    for lab, src in zip(raw["labels"], spec.labels, strict=True):
        t = lab["type"]
        rows.append(
            f'| {lab["value"]} | {lab["name"]} | `{src.source}` | {t["scheme"]} {t["value"]} "{t["meaning"]}" '
            f"| {tuple(lab['color'])} |"
        )
    return rows


def readme(spec: ModelSpec, raw: dict[str, Any], onnx_bytes: int, source: Path, upstream: str) -> str:
    """The package README.md for `spec`, from its card dictionary `raw` and the weights' folder `source`."""
    laterality = (
        " The model does not tell left from right (FreeSurfer's left and right labels were merged for "
        "training), so each label covers both sides and no name carries a side."
    )
    substance = any(lab["category"]["value"] != "91723000" for lab in raw["labels"])
    private = [lab["name"] for lab in raw["labels"] if lab["type"]["scheme"] != "SCT"]
    measured = MEASURED.get(spec.model_id) or ("(not measured yet: run with --full-check)",)
    lines = [
        f"# {spec.model_id} 1.0.0: {spec.name}",
        "",
        "Generated by `python -m model_zoo.build_brainchop` with the card; edit that script, not this file.",
        "",
        "## What it is",
        "",
        f'Published, trained weights, not trained here: brainchop\'s "{spec.upstream_name}" MeshNet '
        f"(`{spec.folder}`), converted from TensorFlow.js to ONNX. The network has "
        f"{_architecture(source)}; `model.onnx` is {onnx_bytes / 1e6:.2f} MB.",
        "",
        "This is a catalogue package: shipped with radai but not served by default. Install it with "
        f"`radai models add model_zoo/catalogue/{spec.package}`.",
        "",
        "## What it is not",
        "",
        "Not for clinical use (`not_for_clinical_use: true`). These are published research weights; radai has "
        "not validated them for any population, scanner, sequence or pathology, and has only checked that the "
        "conversion computes what the published weights compute. The output is a research and demonstration "
        "result to be checked by a person. " + NOTES[spec.model_id],
        "",
        "## Provenance",
        "",
        f"- Weights: `{upstream}` (`model.json` + `model.bin`, float32) and the label names and colours "
        "of its `colormap.json`, from [neuroneural/brainchop](https://github.com/neuroneural/brainchop), MIT "
        "licence (copied in `LICENSE`).",
        "- Conversion: `model_zoo.tfjs` (TensorFlow.js layers JSON and weight shards to an ONNX opset 17 graph, "
        "no TensorFlow involved). Every weight tensor in the manifest is in `model.onnx`; the converter refuses "
        "to finish if one is left unused.",
    ]
    if spec.folder == "mindgrab":
        lines.append(
            "- The final layer's bias is kept. brainchop's own Python loader (brainchop-cli) drops it, which "
            "shifts the two logits by about +-1.5; this package computes what the published weights say."
        )
    lines += [
        "",
        "## Axes",
        "",
        "radai feeds `input` as (N, 1, X, Y, Z), X, Y, Z the voxel axes (i, j, k) of the volume resampled to "
        "LIA, and reads `logits` as (N, K, X, Y, Z). brainchop's entry has `enableTranspose: true`, under which "
        "the tfjs model also sees (i, j, k), so the graph needs no transposes.",
        "",
        "## Preprocessing (from the card)",
        "",
        "1. Resample to 1 mm isotropic, LIA orientation (bilinear), as brainchop's conform step does.",
        f"2. Intensities: {NORMALISATION[spec.model_id]}",
        "3. One 256^3 patch, no overlap, padded with 0; batches of 1.",
        "",
        "Not reproduced: brainchop crops to the brain's bounding box before inference (and for some models runs "
        "a brain-extraction model first) and keeps only the largest connected component of each label "
        "afterwards.",
        "",
        "## Labels",
        "",
        'Channel 0 is background. Category of every label: SCT 91723000 "Anatomical Structure"'
        + (', except cerebrospinal fluid (SCT 91720002 "Body Substance")' if substance else "")
        + ". SNOMED CT codes come from pydicom's DICOM code dictionary (PS3.16)."
        + (laterality if len(raw["labels"]) > 1 else ""),
        "",
        *_label_table(raw, spec),
        "",
    ]
    if private:
        lines += [
            "No SNOMED CT concept was found or confirmed for these labels, so they carry the private scheme "
            "`99RADAI` (value: a stable token, meaning: the name): " + ", ".join(private) + ". FreeSurfer's "
            "ventral diencephalon groups several structures (hypothalamus, mammillary bodies, substantia nigra "
            "and more) and is no single anatomical concept."
            + (
                " The Desikan-Killiany parcels are regions of cortex named after the gyrus or sulcus they lie "
                "on; their boundaries are the atlas's, and pydicom's DICOM dictionary has SNOMED CT codes only "
                "for entorhinal cortex and insula among them."
                if len(private) > 1
                else ""
            ),
            "",
        ]
    if any(tuple(lab["color"]) == (64, 150, 255) for lab in raw["labels"]):
        lines += [
            "Colours are brainchop's except near-white ones (white matter, the brain mask), drawn blue "
            "(64, 150, 255) as in the brain-tissue package: white cannot be seen over a T1 image.",
            "",
        ]
    lines += [
        "## Checks",
        "",
        "- `reference/input.npy` is a real 32^3 crop of the sample T1 (`t1_crop.nii.gz` from brainchop), "
        "conformed and normalised as the card says, and `reference/output.npy` is what `model.onnx` gives for "
        "it. radai compares them at registration (atol 1e-3).",
        "- `tests/model_zoo/test_brainchop_catalogue.py` checks the card, the files, the reference through "
        "radai's runtime, that `model.onnx` is a byte-for-byte fresh conversion of the published weights, and "
        "parity with the independent float64 NumPy implementation (`model_zoo.meshnet_reference`).",
        "- Measured with `--full-check` (ONNX Runtime vs the NumPy reference; each crop is run on its own, "
        "zero-padded):",
        "",
        *(f"  - {line}" for line in measured),
        "",
    ]
    return "\n".join(lines)
