"""onnx2torch, imported once per process, and the ONNX graph made ready for it (radai.runtime.torch_backend).

onnx2torch imports torchvision at module level for two converters only; where torchvision cannot load (absent,
or a CUDA wheel beside a CPU torch) a placeholder stands in while it imports, and the torch backend refuses
models that use those two ops.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

from radai.errors import InferenceError

# onnx2torch converts these two with torchvision ops; every other converter is plain torch.
TORCHVISION_OPS = frozenset({"NonMaxSuppression", "RoiAlign"})
# ONNX attribute defaults that onnx2torch 1.5.15 gets wrong (CumSum: it reads a missing `reverse` as 1, the
# spec says 0), written out explicitly before conversion, which leaves the graph's meaning unchanged.
_EXPLICIT_DEFAULTS: dict[str, dict[str, int]] = {"CumSum": {"exclusive": 0, "reverse": 0}}

_convert_lock = threading.Lock()
_converter: tuple[Callable[[Any], Any], bool] | None = None


@contextlib.contextmanager
def _torchvision_placeholder() -> Iterator[None]:
    """Let onnx2torch import where torchvision cannot (absent, or a CUDA wheel beside a CPU torch, whose
    extension fails to load): onnx2torch imports it at module level only for its NonMaxSuppression and
    RoiAlign converters, which `TorchRunner` refuses at load in that case. The real entries come back after."""

    def unusable(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("torchvision is not usable on this machine")

    vision, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    for name in ("nms", "box_convert", "roi_align"):
        setattr(ops, name, unusable)
    vision.ops = ops  # type: ignore[attr-defined]
    saved = {name: sys.modules[name] for name in ("torchvision", "torchvision.ops") if name in sys.modules}
    sys.modules.update({"torchvision": vision, "torchvision.ops": ops})
    try:
        yield
    finally:
        for name in ("torchvision", "torchvision.ops"):
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                sys.modules.pop(name, None)


def load_converter() -> tuple[Callable[[Any], Any], bool]:
    """onnx2torch's `convert`, and whether torchvision works here; imported once per process."""
    global _converter
    with _convert_lock:
        if _converter is None:
            try:
                importlib.import_module("torchvision")
                vision = True
            except Exception:  # ImportError when absent, RuntimeError when its extension does not load
                vision = False
            try:
                with contextlib.nullcontext() if vision else _torchvision_placeholder():
                    module = importlib.import_module("onnx2torch")
            except ImportError as exc:
                raise InferenceError(
                    "backend 'torch' needs the onnx2torch package (pip install onnx2torch)"
                ) from exc
            _converter = (module.convert, vision)
        return _converter


def spell_out_defaults(graph: Any, onnx: Any) -> None:
    """Add the attributes of `_EXPLICIT_DEFAULTS` that a node leaves at their ONNX default."""
    for node in graph.node:
        defaults = _EXPLICIT_DEFAULTS.get(node.op_type)
        if not defaults:
            continue
        present = {a.name for a in node.attribute}
        for name, value in defaults.items():
            if name not in present:
                node.attribute.append(onnx.helper.make_attribute(name, value))
