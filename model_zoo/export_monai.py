"""Export a MONAI network to ONNX with a dynamic batch axis, and prove it with a parity check.

    python -m model_zoo.export_monai segresnet --out model.onnx [--checkpoint state_dict.pt] [--in-channels 1]
        [--out-channels 2] [--patch 96,96,96] [--features 16] [--opset 17] [--seed 0] [--trials 3]

Architectures: `segresnet` (monai.networks.nets.SegResNet), `unet` (monai.networks.nets.UNet) and `retinanet`
(the 3-D RetinaNet of monai.apps.detection on a MONAI ResNet + FPN; its classification and box-regression head
maps per pyramid level become the ONNX outputs `classification_<level>` and `box_regression_<level>`).
Every input and output has a symbolic batch axis (checked in the graph); the spatial axes are symbolic too, and
the parity check runs a second spatial size to prove it. Parity: PyTorch (eval, float32) against ONNX Runtime
(CPU) on seeded random inputs of batch 1 and 2 at the patch size and batch 1 at the second size; per output the
max absolute error and the max relative error |a - b| / (max |a| + eps). Above the tolerance the export fails and
no file is left at `--out`. A checkpoint is a state dict read with `torch.load(weights_only=True)`: tensors
only, nothing else is ever unpickled.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets.resnet import ResNet
from monai.networks.nets.segresnet import SegResNet
from monai.networks.nets.unet import UNet
from monai.utils.module import OptionalImportError
from torch import nn

from model_zoo.onnx_parity import ExportError, ParityError, ParityReport, check_graph, export_onnx, parity

__all__ = [
    "ARCHS",
    "SEG_OUTPUT",
    "BuiltNetwork",
    "ExportError",
    "ExportSpec",
    "ParityError",
    "ParityReport",
    "build_network",
    "export",
    "load_state_dict",
    "main",
    "parity_shapes",
]

ARCHS = ("segresnet", "unet", "retinanet")
SEG_OUTPUT = "logits"
# ResNet layouts of monai.networks.nets.resnet (resnet10 ... resnet50).
_RESNETS: dict[int, tuple[str, list[int]]] = {
    10: ("basic", [1, 1, 1, 1]),
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
}
# FPN levels as in MONAI's LUNA16 detection bundle: layer1, layer2 and a max-pooled level above them.
_RETURNED_LAYERS = (1, 2)


@dataclass(frozen=True)
class ExportSpec:
    """What to export. `features`: SegResNet (init_filters,), UNet channels per level, RetinaNet ResNet
    block_inplanes (4 values); () takes the default (8; 16-32-64-128-256; 64-128-256-512)."""

    arch: str
    out: Path
    in_channels: int = 1
    out_channels: int = 2  # classes (RetinaNet: foreground classes)
    patch: tuple[int, int, int] = (96, 96, 96)
    features: tuple[int, ...] = ()
    norm: str | None = None  # UNet only: "batch" or "instance" (None: MONAI's default, instance)
    backbone_depth: int = 18  # RetinaNet: ResNet 10, 18, 34 or 50
    conv1_stride: tuple[int, int, int] = (2, 2, 2)  # RetinaNet: stride of the ResNet's first convolution
    num_anchors: int = 3  # RetinaNet
    checkpoint: Path | None = None
    opset: int = 17
    seed: int = 0
    trials: int = 3
    max_rel_error: float = 1e-4
    threads: int = 1


@dataclass(frozen=True)
class BuiltNetwork:
    module: nn.Module  # returns a tensor or a tuple of tensors, one per output name
    output_names: tuple[str, ...]
    size_divisor: tuple[int, int, int]  # every spatial size must be a multiple of this
    inner: nn.Module = field(repr=False)  # the MONAI network itself (checkpoints load into it)


class _LayerGetter(nn.ModuleDict):
    """torchvision's IntermediateLayerGetter (models/_utils.py), copied because torchvision is not a dependency
    of radai: the children of `model` up to the last returned one, run in order, the returned ones collected.
    Same module names, hence the same state-dict keys as MONAI's BackboneWithFPN built with torchvision."""

    def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        left = set(return_layers)
        for name, child in model.named_children():
            layers[name] = child
            left.discard(name)
            if not left:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def _fpn_extractor(backbone: ResNet, returned_layers: Sequence[int]) -> nn.Module:
    """`resnet_fpn_feature_extractor(backbone, 3, False, returned_layers)` of monai.apps.detection. MONAI builds
    it on torchvision (one helper class); without torchvision the same module tree is built with _LayerGetter."""
    with contextlib.suppress(OptionalImportError):
        return resnet_fpn_feature_extractor(backbone, 3, False, list(returned_layers), None)

    class _BackboneWithFPN(BackboneWithFPN):
        def __init__(self) -> None:
            nn.Module.__init__(self)
            # As monai.networks.blocks.backbone_fpn_utils._resnet_fpn_extractor.
            self.body = _LayerGetter(backbone, {f"layer{k}": str(v) for v, k in enumerate(returned_layers)})
            stage2 = backbone.in_planes // 8
            self.fpn = FeaturePyramidNetwork(
                spatial_dims=3,
                in_channels_list=[stage2 * 2 ** (i - 1) for i in returned_layers],
                out_channels=256,
                extra_blocks=LastLevelMaxPool(3),
            )
            self.out_channels = 256

    return _BackboneWithFPN()


class _FlatRetinaNet(nn.Module):
    """RetinaNet's {"classification": [maps], "box_regression": [maps]} as one flat tuple (ONNX outputs)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(x)
        return (*out["classification"], *out["box_regression"])


def build_network(spec: ExportSpec) -> BuiltNetwork:
    """The MONAI network named by `spec.arch`, in eval mode, float32 (weights from the checkpoint if given)."""
    try:
        built = _construct(spec)
    except ExportError:
        raise
    except (ValueError, TypeError) as exc:  # MONAI's own checks of its arguments
        raise ExportError(f"{spec.arch}: {exc}") from exc
    if spec.checkpoint is not None:
        load_state_dict(built.inner, spec.checkpoint)
    built.module.float().eval()
    return built


def _construct(spec: ExportSpec) -> BuiltNetwork:
    if spec.arch == "segresnet":
        init = spec.features or (8,)
        if len(init) != 1:
            raise ExportError(f"segresnet: features is one value (init_filters), got {list(init)}")
        net: nn.Module = SegResNet(
            spatial_dims=3, in_channels=spec.in_channels, out_channels=spec.out_channels, init_filters=init[0]
        )
        built = BuiltNetwork(net, (SEG_OUTPUT,), (8, 8, 8), net)  # blocks_down (1, 2, 2, 4): 3 down-samplings
    elif spec.arch == "unet":
        channels = spec.features or (16, 32, 64, 128, 256)
        if len(channels) < 2:
            raise ExportError(f"unet: features needs at least 2 channel counts, got {list(channels)}")
        extra: dict[str, Any] = {"norm": spec.norm} if spec.norm else {}
        net = UNet(
            spatial_dims=3,
            in_channels=spec.in_channels,
            out_channels=spec.out_channels,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=2,
            **extra,
        )
        d = 2 ** (len(channels) - 1)
        built = BuiltNetwork(net, (SEG_OUTPUT,), (d, d, d), net)
    elif spec.arch == "retinanet":
        if spec.backbone_depth not in _RESNETS:
            raise ExportError(f"retinanet: backbone depth must be one of {sorted(_RESNETS)}")
        inplanes = list(spec.features or (64, 128, 256, 512))  # resnet.get_inplanes()
        if len(inplanes) != 4:
            raise ExportError(f"retinanet: features is 4 ResNet block widths, got {inplanes}")
        block, layers = _RESNETS[spec.backbone_depth]
        stride: Any = spec.conv1_stride  # MONAI annotates tuple[int] but takes one per spatial axis
        backbone = ResNet(
            block=block,
            layers=layers,
            block_inplanes=inplanes,
            spatial_dims=3,
            n_input_channels=spec.in_channels,
            conv1_t_stride=stride,
            conv1_t_size=7,
        )
        divisor = tuple(2 * s * 2 ** max(_RETURNED_LAYERS) for s in spec.conv1_stride)
        net = RetinaNet(
            spatial_dims=3,
            num_classes=spec.out_channels,
            num_anchors=spec.num_anchors,
            feature_extractor=_fpn_extractor(backbone, _RETURNED_LAYERS),
            size_divisible=divisor,
        )
        levels = len(_RETURNED_LAYERS) + 1
        names = tuple(f"classification_{i}" for i in range(levels)) + tuple(
            f"box_regression_{i}" for i in range(levels)
        )
        built = BuiltNetwork(_FlatRetinaNet(net), names, (divisor[0], divisor[1], divisor[2]), net)
    else:
        raise ExportError(f"unknown architecture {spec.arch!r} (known: {', '.join(ARCHS)})")
    return built


def load_state_dict(net: nn.Module, path: Path) -> None:
    """Load a state dict saved with torch.save; `weights_only=True` refuses anything but tensors and containers."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, OSError, zip errors: all mean "not a usable state dict"
        raise ExportError(f"{path.name}: not a loadable state dict ({str(exc).splitlines()[0]})") from exc
    state = raw
    if isinstance(raw, Mapping) and not all(isinstance(v, torch.Tensor) for v in raw.values()):
        nested = [raw[k] for k in ("state_dict", "model") if isinstance(raw.get(k), Mapping)]
        if len(nested) != 1:
            raise ExportError(f"{path.name}: expected a state dict (names -> tensors)")
        state = nested[0]
    if not isinstance(state, Mapping):
        raise ExportError(
            f"{path.name}: expected a state dict (names -> tensors), got {type(state).__name__}"
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(
            f"{path.name} does not fit the network: {str(exc).splitlines()[0]} {_key_diff(net, state)}"
        ) from exc


def _key_diff(net: nn.Module, state: Mapping[str, Any]) -> str:
    want, have = set(net.state_dict()), set(state)
    missing, unexpected = sorted(want - have), sorted(have - want)
    return f"(missing keys: {_few(missing)}; unexpected keys: {_few(unexpected)})"


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "") if keys else "none"


def parity_shapes(
    channels: int, patch: tuple[int, int, int], divisor: tuple[int, int, int] | None
) -> list[tuple[int, ...]]:
    """Batch 1 and 2 at the patch; with a divisor (dynamic spatial axes) batch 1 at a second, non-cubic size."""
    shapes: list[tuple[int, ...]] = [(1, channels, *patch), (2, channels, *patch)]
    if divisor is not None:
        z, d = patch[2], divisor[2]
        shapes.append((1, channels, patch[0], patch[1], z - d if z - d >= 2 * d else z + d))
    return shapes


def export(spec: ExportSpec) -> ParityReport:
    """Build, export to `spec.out`, check the graph and prove parity; raise ParityError above the tolerance
    (the file is then removed) and ExportError for anything else that goes wrong."""
    if spec.max_rel_error <= 0 or not math.isfinite(spec.max_rel_error):
        raise ExportError(f"tolerance must be a positive number, got {spec.max_rel_error}")
    if spec.in_channels < 1 or spec.out_channels < 1 or spec.trials < 1:
        raise ExportError("in/out channels and trials must be at least 1")
    torch.manual_seed(spec.seed)  # the same random weights for the same seed when no checkpoint is given
    built = build_network(spec)
    bad = [p for p, d in zip(spec.patch, built.size_divisor, strict=True) if p < d or p % d]
    if bad:
        raise ExportError(
            f"{spec.arch}: every patch size must be a multiple of {list(built.size_divisor)}, got {list(spec.patch)}"
        )
    spec.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = spec.out.with_name(spec.out.name + ".partial")
    try:
        example = torch.zeros((1, spec.in_channels, *spec.patch), dtype=torch.float32)
        export_onnx(
            built.module,
            example,
            tmp,
            built.output_names,
            opset=spec.opset,
            same_spatial_out=spec.arch != "retinanet",
        )
        check_graph(tmp)
        report = parity(
            built.module,
            tmp,
            parity_shapes(spec.in_channels, spec.patch, built.size_divisor),
            built.output_names,
            trials=spec.trials,
            seed=spec.seed,
            tolerance=spec.max_rel_error,
            threads=spec.threads,
        )
        if not report.passed:
            raise ParityError(report)
        os.replace(tmp, spec.out)
        return report
    finally:
        tmp.unlink(missing_ok=True)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _triple(text: str) -> tuple[int, int, int]:
    values = _ints(text)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected 1 or 3 integers, got {text!r}")
    return (values[0], values[1], values[2])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_zoo.export_monai", description=__doc__.split("\n")[0])
    p.add_argument("arch", choices=ARCHS)
    p.add_argument("--out", type=Path, required=True, help="the ONNX file to write")
    p.add_argument("--checkpoint", type=Path, help="state dict (torch.save), loaded with weights_only=True")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=2, help="classes (retinanet: foreground classes)")
    p.add_argument("--patch", type=_triple, default=(96, 96, 96), help="X,Y,Z of the example input")
    p.add_argument(
        "--features", type=_ints, default=(), help="segresnet init_filters, unet channels, retinanet widths"
    )
    p.add_argument(
        "--norm", choices=("batch", "instance"), help="unet normalisation (default: MONAI's, instance)"
    )
    p.add_argument("--depth", type=int, default=18, help="retinanet ResNet depth: 10, 18, 34 or 50")
    p.add_argument(
        "--conv1-stride", type=_triple, default=(2, 2, 2), help="retinanet first-convolution stride"
    )
    p.add_argument("--num-anchors", type=int, default=3, help="retinanet anchors per location")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=3, help="random inputs per parity shape")
    p.add_argument("--max-rel-error", type=float, default=1e-4, help="parity tolerance on the relative error")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch and ONNX Runtime")
    args = p.parse_args(argv)
    torch.set_num_threads(max(args.threads, 1))
    spec = ExportSpec(
        arch=args.arch,
        out=args.out,
        in_channels=args.in_channels,
        out_channels=args.out_channels,
        patch=args.patch,
        features=args.features,
        norm=args.norm,
        backbone_depth=args.depth,
        conv1_stride=args.conv1_stride,
        num_anchors=args.num_anchors,
        checkpoint=args.checkpoint,
        opset=args.opset,
        seed=args.seed,
        trials=args.trials,
        max_rel_error=args.max_rel_error,
        threads=args.threads,
    )
    try:
        report = export(spec)
    except ParityError as exc:
        print(exc.report.summary())
        print(f"error: {exc}; {spec.out} not written", file=sys.stderr)
        return 1
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {spec.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
