"""ONNX Runtime backend: one InferenceSession per model, CUDA first when present and allowed.

`run` takes and returns numpy arrays. `run_tensor` takes torch tensors and uses ONNX Runtime's I/O binding:
the input and a preallocated output are bound by pointer on the runner's device, so patches that already live
on the GPU are neither copied to the host nor back. torch is imported only when `run_tensor` is called.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from radai.errors import InferenceError, OutOfMemoryError

if TYPE_CHECKING:
    import torch

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
    """Implements radai.ports.ModelRunner and DeviceRunner with onnxruntime. Session.run is thread-safe, and
    so is run_with_iobinding as each call of `run_tensor` builds its own binding."""

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
        self._output_type: str = outputs[0].type
        declared = self.output_shape[1] if len(self.output_shape) > 1 else None
        if output_channels is not None and isinstance(declared, int) and declared != output_channels:
            raise InferenceError(
                f"ONNX model {model_path.name} has {declared} output channels, "
                f"the card says {output_channels}"
            )
        # Output channels for preallocating `run_tensor`'s output; None: let onnxruntime allocate it.
        self._output_channels = declared if isinstance(declared, int) else output_channels
        index = parse_device(device)[1]
        on_gpu = self.providers[0] in (_CUDA, _TRT)
        self.device: str = f"cuda:{index}" if on_gpu else "cpu"
        self._ort_device: tuple[str, int] = ("cuda", index) if on_gpu else ("cpu", 0)
        self._session: Any = session
        self._name = f"{model_path.parent.name}/{model_path.name}"
        log.debug("onnx model %s loaded with providers %s", self._name, ",".join(self.providers))

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        session = self._session
        if session is None:
            raise InferenceError(f"ONNX model {self._name} is closed")
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=self._input_dtype)}
        try:
            out = session.run([self.output_name], feed)[0]
        except Exception as exc:  # translate onnxruntime's errors at the adapter boundary
            raise self._failure(exc) from exc
        return np.asarray(out, dtype=np.float32)

    def run_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) tensor on any device -> (N, K, *spatial) float32 tensor on `self.device`, through
        I/O binding: no host round trip when the batch is already on the device."""
        session = self._session
        if session is None:
            raise InferenceError(f"ONNX model {self._name} is closed")
        import torch

        try:
            dtype = torch.float16 if self._input_dtype == np.float16 else torch.float32
            x = batch.to(device=self.device, dtype=dtype).contiguous()
            out = self._preallocated_output(x)
            binding = session.io_binding()
            kind, index = self._ort_device
            binding.bind_input(self.input_name, kind, index, self._input_dtype, tuple(x.shape), x.data_ptr())
            if out is not None:
                out_type = np.float16 if out.dtype == torch.float16 else np.float32
                binding.bind_output(self.output_name, kind, index, out_type, tuple(out.shape), out.data_ptr())
            else:
                binding.bind_output(self.output_name, kind, index)
            if kind == "cuda":  # onnxruntime runs on its own stream: let torch's pending work on x finish
                torch.cuda.current_stream(self.device).synchronize()
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            if out is None:
                out = torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(self.device)
            return out.float()
        except Exception as exc:  # onnxruntime's and torch's errors (a CUDA OOM included) end here
            raise self._failure(exc) from exc

    def _preallocated_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """An empty output tensor of the model's exact shape and type, or None when either is not known."""
        import torch

        dtypes = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}
        dtype = dtypes.get(self._output_type)
        if self._output_channels is None or dtype is None or x.dim() < 2 or len(self.output_shape) != x.dim():
            return None
        shape = (x.shape[0], self._output_channels, *x.shape[2:])
        if any(isinstance(d, int) and d != n for d, n in zip(self.output_shape, shape, strict=True)):
            return None  # e.g. a model that downsamples: its output is not the input's size
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _failure(self, exc: Exception) -> InferenceError:
        """An exception from onnxruntime (or torch) as radai's error; allocation failures as OutOfMemoryError."""
        message = str(exc)
        if any(sign in message for sign in _OOM_SIGNS):
            return OutOfMemoryError(f"onnxruntime ran out of memory on {self._name}: {message}")
        return InferenceError(f"onnxruntime failed on {self._name}: {exc}")

    def close(self) -> None:
        self._session = None
