"""Runtime backends by name. Each backend's module (and its heavy package) is imported only when used."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from radai.errors import InferenceError
from radai.ports import ModelRunner


@dataclass
class RuntimeOptions:
    """Process-wide backend options, set once at start-up from the settings (`scheduler.*`)."""

    tensorrt_cache: Path = Path("radai-data/tensorrt")  # TensorRT engines, built once per model and shape
    tensorrt_fp16: bool = False
    triton_url: str | None = None  # the `triton` backend's server, e.g. "http://triton.internal:8000"
    # Triton model per radai model (card id): "name" or "name/version"; a model not listed uses its card id.
    triton_models: dict[str, str] = field(default_factory=dict)
    triton_timeout_s: float = 60.0


RUNTIME_OPTIONS = RuntimeOptions()


def _onnx(model_path: Path, output_channels: int | None, device: str) -> ModelRunner:
    from radai.runtime.onnx import OnnxRunner

    return OnnxRunner(model_path, device=device, output_channels=output_channels)


def _tensorrt(model_path: Path, output_channels: int | None, device: str) -> ModelRunner:
    from radai.runtime.onnx import OnnxRunner, TensorrtOptions

    options = TensorrtOptions(cache_dir=RUNTIME_OPTIONS.tensorrt_cache, fp16=RUNTIME_OPTIONS.tensorrt_fp16)
    return OnnxRunner(model_path, device=device, output_channels=output_channels, tensorrt=options)


def _fake(model_path: Path, output_channels: int | None, device: str) -> ModelRunner:
    from radai.runtime.fake import FakeRunner

    return FakeRunner(output_channels if output_channels is not None else 2)


def _torch(model_path: Path, output_channels: int | None, device: str) -> ModelRunner:
    from radai.runtime.torch_backend import TorchRunner

    return TorchRunner(model_path, device=device, output_channels=output_channels)


def _triton(model_path: Path, output_channels: int | None, device: str) -> ModelRunner:
    from radai.runtime.triton import TritonRunner, triton_model_key

    if not RUNTIME_OPTIONS.triton_url:
        raise InferenceError("backend 'triton' needs the Triton server's URL (RUNTIME_OPTIONS.triton_url)")
    key = triton_model_key(model_path)
    name, _, version = RUNTIME_OPTIONS.triton_models.get(key, key).partition("/")
    return TritonRunner(
        RUNTIME_OPTIONS.triton_url,
        name,
        version,
        output_channels=output_channels,
        timeout_s=RUNTIME_OPTIONS.triton_timeout_s,
    )


_Factory = Callable[[Path, "int | None", str], ModelRunner]

# name -> (factory, third-party package the backend needs, or None)
_BACKENDS: dict[str, tuple[_Factory, str | None]] = {
    "onnx": (_onnx, "onnxruntime"),
    # ONNX Runtime with its TensorRT execution provider (onnxruntime-gpu); engines cached on disk.
    "tensorrt": (_tensorrt, "onnxruntime"),
    "fake": (_fake, None),
    "torch": (_torch, "onnx2torch"),
    # A shared NVIDIA Triton Inference Server over HTTP; the device is the server's.
    "triton": (_triton, "tritonclient"),
}


def known_backends() -> list[str]:
    """Every registered backend name."""
    return sorted(_BACKENDS)


def available_backends() -> list[str]:
    """Registered backends whose package is installed here (checked without importing it)."""
    return [
        name
        for name, (_, package) in sorted(_BACKENDS.items())
        if package is None or importlib.util.find_spec(package) is not None
    ]


def create_runner(
    backend: str, model_path: Path, *, output_channels: int | None = None, device: str = "auto"
) -> ModelRunner:
    """Build the runner for `backend`; every failure (unknown name, missing package, bad model) raises
    radai.errors.InferenceError here, at creation, never mid-job."""
    entry = _BACKENDS.get(backend)
    if entry is None:
        raise InferenceError(f"unknown runtime backend {backend!r} (known: {', '.join(known_backends())})")
    factory, _ = entry
    return factory(model_path, output_channels, device)


__all__ = ["available_backends", "create_runner", "known_backends"]
