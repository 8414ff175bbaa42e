"""ONNX Runtime backend: one InferenceSession per model, CUDA first when present and allowed."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from radai.errors import InferenceError, OutOfMemoryError

log = logging.getLogger(__name__)

# How onnxruntime reports an allocation failure (its exceptions carry no type for it).
_OOM_SIGNS = ("Failed to allocate memory", "out of memory", "CUDA_ERROR_OUT_OF_MEMORY", "bad_alloc")
_TRT = "TensorrtExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise InferenceError(
            "backend 'onnx' needs the onnxruntime package (pip install onnxruntime or onnxruntime-gpu)"
        ) from exc
    return onnxruntime


def parse_device(device: str) -> tuple[str, int]:
    """`auto`, `cpu`, `cuda` or `cuda:N` -> (kind, device index)."""
    kind, _, index = device.strip().lower().partition(":")
    if kind in ("auto", "cpu") and not index:
        return kind, 0
    if kind == "cuda" and (not index or index.isdigit()):
        return kind, int(index or 0)
    raise InferenceError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class TensorrtOptions:
    """ONNX Runtime's TensorRT execution provider: engines built once per model and shape, cached on disk."""

    cache_dir: Path
    fp16: bool = False


def choose_providers(
    available: list[str], device: str, tensorrt: TensorrtOptions | None = None
) -> list[str | tuple[str, dict[str, Any]]]:
    """Execution providers in priority order for `device`, given those onnxruntime offers; with `tensorrt`,
    TensorRT first (CUDA and CPU behind it for the nodes TensorRT does not take)."""
    kind, index = parse_device(device)
    if tensorrt is not None:
        if kind == "cpu" or _TRT not in available:
            raise InferenceError(
                f"backend 'tensorrt' needs onnxruntime-gpu with {_TRT} and a CUDA device "
                f"(device {device!r}; available: {', '.join(available)})"
            )
        options = {
            "device_id": index,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(tensorrt.cache_dir),
            "trt_timing_cache_enable": True,
            "trt_fp16_enable": tensorrt.fp16,
        }
        return [(_TRT, options), (_CUDA, {"device_id": index}), _CPU]
    if kind == "cpu":
        return [_CPU]
    if _CUDA in available:
        return [(_CUDA, {"device_id": index}), _CPU]
    if kind == "cuda":
        raise InferenceError(
            f"device {device!r} requested but onnxruntime offers no {_CUDA} "
            f"(available: {', '.join(available)}); install onnxruntime-gpu or use device 'cpu'"
        )
    return [_CPU]


class OnnxRunner:
    """Implements radai.ports.ModelRunner with onnxruntime. Session.run is thread-safe."""

    def __init__(
        self,
        model_path: Path,
        *,
        device: str = "auto",
        output_channels: int | None = None,
        intra_op_threads: int = 0,
        tensorrt: TensorrtOptions | None = None,
    ) -> None:
        """Load the model; every problem (missing package, file, provider, bad graph) raises here."""
        ort = _import_ort()
        if not model_path.is_file():
            raise InferenceError(f"ONNX model file not found: {model_path.name}")
        if tensorrt is not None:
            tensorrt.cache_dir.mkdir(parents=True, exist_ok=True)
        providers = choose_providers(list(ort.get_available_providers()), device, tensorrt)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads  # 0: onnxruntime's default (one per physical core)
        options.log_severity_level = 3  # errors only; provider fallbacks are logged below
        try:
            session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise InferenceError(f"cannot load ONNX model {model_path.name}: {exc}") from exc
        self.providers: list[str] = list(session.get_providers())
        if tensorrt is not None and _TRT not in self.providers:
            raise InferenceError(f"backend 'tensorrt' requested but onnxruntime could not start {_TRT}")
        if parse_device(device)[0] == "cuda" and _CUDA not in self.providers:
            raise InferenceError(f"device {device!r} requested but onnxruntime could not start {_CUDA}")
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise InferenceError(
                f"ONNX model {model_path.name} must have one input and at least one output "
                f"(has {len(inputs)} inputs, {len(outputs)} outputs)"
            )
        self.input_name: str = inputs[0].name
        self.output_name: str = outputs[0].name
        self.input_shape: tuple[int | str | None, ...] = tuple(inputs[0].shape)
        self.output_shape: tuple[int | str | None, ...] = tuple(outputs[0].shape)
        self._input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        declared = self.output_shape[1] if len(self.output_shape) > 1 else None
        if output_channels is not None and isinstance(declared, int) and declared != output_channels:
            raise InferenceError(
                f"ONNX model {model_path.name} has {declared} output channels, "
                f"the card says {output_channels}"
            )
        self._session: Any = session
        self._name = f"{model_path.parent.name}/{model_path.name}"
        log.debug("onnx model %s loaded with providers %s", self._name, ",".join(self.providers))

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        if self._session is None:
            raise InferenceError(f"ONNX model {self._name} is closed")
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=self._input_dtype)}
        try:
            out = self._session.run([self.output_name], feed)[0]
        except Exception as exc:  # translate onnxruntime's errors at the adapter boundary
            message = str(exc)
            if any(sign in message for sign in _OOM_SIGNS):
                raise OutOfMemoryError(f"onnxruntime ran out of memory on {self._name}: {message}") from exc
            raise InferenceError(f"onnxruntime failed on {self._name}: {exc}") from exc
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self._session = None
