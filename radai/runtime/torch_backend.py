"""PyTorch backend: the package's ONNX graph converted to a torch.nn.Module at load with onnx2torch.

Model packages stay ONNX-only (nothing is unpickled); this backend runs them on PyTorch, which is what a CUDA
machine without onnxruntime-gpu has. On CUDA: pinned host memory, non-blocking copies, fp16 autocast on
request, and optional CUDA graphs captured once per input shape.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from radai.errors import InferenceError, OutOfMemoryError
from radai.runtime import onnx2torch_import
from radai.runtime.memory import MemoryUse
from radai.runtime.onnx import parse_device

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
_MAX_GRAPHS = 16  # input shapes captured as CUDA graphs per runner; later shapes run eagerly
_CPU_OOM_SIGNS = ("can't allocate memory", "DefaultCPUAllocator", "std::bad_alloc")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise InferenceError("backend 'torch' needs the torch package (pip install torch)") from exc
    return torch


def available_devices() -> list[str]:
    """Devices this backend can use here: `cpu`, then `cuda:N` for every CUDA device torch sees."""
    torch = _import_torch()
    count = int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(count))]


def resolve_device(device: str) -> str:
    """`auto`, `cpu`, `cuda`, `cuda:N` -> the torch device string; a device not present raises."""
    kind, index = parse_device(device)
    torch = _import_torch()
    cuda = bool(torch.cuda.is_available())
    if kind == "cpu" or (kind == "auto" and not cuda):
        return "cpu"
    if not cuda:
        raise InferenceError(
            f"device {device!r} requested but torch {torch.__version__} sees no CUDA device; use device 'cpu'"
        )
    count = int(torch.cuda.device_count())
    if index >= count:
        raise InferenceError(f"device {device!r} requested but torch sees {count} CUDA device(s)")
    return f"cuda:{index}"


@dataclass(frozen=True)
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    static_in: Any  # torch.Tensor on the device
    static_out: Any


class TorchRunner:
    """Implements radai.ports.DeviceRunner on PyTorch; `run` and `run_tensor` are serialised by a lock (one
    device stream)."""

    def __init__(
        self,
        model_path: Path,
        *,
        device: str = "auto",
        output_channels: int | None = None,
        precision: str = "fp32",
        cuda_graphs: bool = False,
    ) -> None:
        """Convert and load the model; every problem (missing package, file or device, an ONNX op onnx2torch
        cannot convert, channels that disagree with the card) raises InferenceError here."""
        torch = _import_torch()
        if precision not in PRECISIONS:
            raise InferenceError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.device: str = resolve_device(device)
        cuda = self.device.startswith("cuda")
        if precision == "fp16" and not cuda:
            raise InferenceError("precision 'fp16' needs a CUDA device (got device 'cpu')")
        if not model_path.is_file():
            raise InferenceError(f"ONNX model file not found: {model_path.name}")
        self._name = f"{model_path.parent.name}/{model_path.name}"
        convert, vision = onnx2torch_import.load_converter()
        onnx = importlib.import_module("onnx")
        try:
            proto = onnx.load(str(model_path))
        except Exception as exc:  # protobuf's DecodeError and friends
            raise InferenceError(f"cannot load ONNX model {model_path.name}: {exc}") from exc
        graph = proto.graph
        initializers = {t.name for t in graph.initializer}
        inputs = [v for v in graph.input if v.name not in initializers]
        if len(inputs) != 1 or not graph.output:
            raise InferenceError(
                f"ONNX model {model_path.name} must have one input and at least one output "
                f"(has {len(inputs)} inputs, {len(graph.output)} outputs)"
            )
        needs_vision = sorted(onnx2torch_import.TORCHVISION_OPS & {n.op_type for n in graph.node})
        if needs_vision and not vision:
            raise InferenceError(
                f"ONNX model {model_path.name} uses {', '.join(needs_vision)}, which the torch backend runs "
                "with torchvision, not usable on this machine"
            )
        dims = graph.output[0].type.tensor_type.shape.dim
        declared = dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else None
        if output_channels is not None and declared is not None and declared != output_channels:
            raise InferenceError(
                f"ONNX model {model_path.name} has {declared} output channels, the card says {output_channels}"
            )
        self.output_channels: int | None = output_channels if output_channels is not None else declared
        in_dims = inputs[0].type.tensor_type.shape.dim
        self.input_channels: int = (
            in_dims[1].dim_value if len(in_dims) > 1 and in_dims[1].HasField("dim_value") else 1
        )
        self.input_name: str = inputs[0].name
        self.output_name: str = graph.output[0].name
        fp16_input = inputs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        onnx2torch_import.spell_out_defaults(graph, onnx)
        try:
            module = convert(proto)
        except Exception as exc:  # onnx2torch raises NotImplementedError, ValueError, ...
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InferenceError(f"cannot convert ONNX model {model_path.name} to PyTorch: {detail}") from exc
        try:
            module = module.to(self.device).eval()
            module.requires_grad_(False)
        except torch.cuda.OutOfMemoryError as exc:
            raise InferenceError(f"model {self._name} does not fit on {self.device}") from exc
        self.precision = precision
        self.cuda_graphs = cuda_graphs and cuda
        self._torch: Any = torch
        self._module: Any = module
        self._input_dtype: Any = torch.float16 if fp16_input else torch.float32
        self._lock = threading.Lock()
        self._graphs: dict[tuple[int, ...], _Graph] = {}
        self._stream: Any = torch.cuda.Stream(self.device) if cuda else None
        # One memory pool for every captured shape: replays are serialised by the lock and each output is
        # copied to the host before the next replay, so graphs may reuse each other's memory.
        self._pool: Any = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        log.debug("torch model %s loaded on %s (%s)", self._name, self.device, precision)

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        with self._errors():
            # The copy into pinned memory runs outside the lock, overlapping another thread's compute.
            host = self._stage(batch) if self._stream is not None else None
            with self._lock:
                self._check_open()
                out = self._run_cpu(batch) if host is None else self._run_cuda(host)
        self._checked(out, tuple(batch.shape))
        return out

    def run_tensor(self, batch: Any) -> Any:
        """`run` for a tensor: (N, C, *spatial) on any device -> float32 scores on this runner's device. On
        CUDA the batch is read where it lies (no host round trip) after the work that produced it on the
        caller's stream; the scores are a fresh tensor, safe to use on that stream once this returns."""
        torch = self._torch
        with self._errors(), self._lock:
            self._check_open()
            if self._stream is None:
                with torch.inference_mode():
                    x = batch.detach().to("cpu", torch.float32).contiguous().to(self._input_dtype)
                    out = self._forward(x).float()
            else:
                out = self._run_cuda_tensor(batch)
        self._checked(out, tuple(batch.shape))
        return out

    def _check_open(self) -> None:
        if self._module is None:
            raise InferenceError(f"torch model {self._name} is closed")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """torch's errors as radai's, at the adapter boundary: allocation failures as OutOfMemoryError."""
        torch = self._torch
        try:
            yield
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()  # give cached blocks back so that the split retry can fit
            raise OutOfMemoryError(f"torch ran out of memory on {self.device} for {self._name}") from exc
        except InferenceError:
            raise
        except Exception as exc:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if any(sign in message for sign in _CPU_OOM_SIGNS):
                raise OutOfMemoryError(f"torch ran out of memory on cpu for {self._name}") from exc
            raise InferenceError(f"torch failed on {self._name}: {message}") from exc

    def _checked(self, out: Any, batch_shape: tuple[int, ...]) -> None:
        channels = self.output_channels
        if (
            out.ndim < 2
            or out.shape[0] != batch_shape[0]
            or (channels is not None and out.shape[1] != channels)
        ):
            raise InferenceError(
                f"torch model {self._name} returned shape {tuple(out.shape)} for batch {batch_shape} "
                f"({channels} channels expected)"
            )

    def _run_cuda_tensor(self, batch: Any) -> Any:
        torch = self._torch
        device = torch.device(self.device)
        with torch.inference_mode(), torch.cuda.device(device):
            caller = torch.cuda.current_stream(device)
            self._stream.wait_stream(caller)  # the kernels that wrote `batch` come first
            with torch.cuda.stream(self._stream):
                x = batch.detach().to(device, torch.float32, non_blocking=True).contiguous()
                out = self._compute(x.to(self._input_dtype))
                result = out.to(torch.float32, copy=True)
            self._stream.synchronize()
            result.record_stream(caller)  # freed by the caller: its stream's pending reads come first
        return result

    def memory_use(self, window: tuple[int, ...]) -> MemoryUse | None:
        """Device memory for batches of this window (radai.runtime.memory): the peak allocation while scoring
        one window and two, eagerly (no graph captured for the probe). None on the CPU."""
        if self._stream is None:
            return None
        torch = self._torch
        device = torch.device(self.device)
        graphs, self.cuda_graphs = self.cuda_graphs, False
        try:
            torch.cuda.synchronize(device)
            free, _ = torch.cuda.mem_get_info(device)
            peaks = []
            for n in (1, 2):
                x = torch.zeros((n, self.input_channels, *window), device=device)
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                self.run_tensor(x)
                torch.cuda.synchronize(device)
                peaks.append(int(torch.cuda.max_memory_allocated(device)) - int(base))
                del x
        finally:
            self.cuda_graphs = graphs
        per_window = max(peaks[1] - peaks[0], 0)
        return MemoryUse(max(peaks[0] - per_window, 0), per_window, int(free))

    def _forward(self, x: Any) -> Any:
        torch = self._torch
        # No autocast weight cache: each weight is cast once per forward anyway, and CUDA graphs need it off.
        fp16 = self.precision == "fp16"
        with (
            torch.autocast("cuda", dtype=torch.float16, cache_enabled=False)
            if fp16
            else contextlib.nullcontext()
        ):
            out = self._module(x)
        return out[0] if isinstance(out, tuple | list) else out

    def _run_cpu(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self._input_dtype)
        with torch.inference_mode():
            out = self._forward(x)
        return np.asarray(out.float().numpy(), dtype=np.float32)

    def _run_cuda(self, host: Any) -> NDArray[np.float32]:
        torch = self._torch
        with torch.inference_mode(), torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            out = self._compute(host.to(self.device, non_blocking=True).to(self._input_dtype))
            result = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
            result.copy_(out, non_blocking=True)
            self._stream.synchronize()
        return np.asarray(result.numpy(), dtype=np.float32)

    def _compute(self, x: Any) -> Any:
        """The model on `x` (on the device, in the side stream): the CUDA graph captured for its shape, else
        eagerly. A graph's output is overwritten by its next replay: callers copy it before the lock goes."""
        graph = self._graph_for(x) if self.cuda_graphs else None
        if graph is None:
            return self._forward(x)
        graph.static_in.copy_(x)
        graph.graph.replay()
        return graph.static_out

    def _stage(self, batch: NDArray[np.float32]) -> Any:
        """The batch in pinned host memory (torch's caching host allocator reuses the block once the
        non-blocking copy that reads it has finished)."""
        torch = self._torch
        source = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        host = torch.empty(source.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(source)
        return host

    def _graph_for(self, x: Any) -> _Graph | None:
        """The CUDA graph for this input shape, captured on first use; None runs eagerly."""
        shape = tuple(int(s) for s in x.shape)
        graph = self._graphs.get(shape)
        if graph is not None or len(self._graphs) >= _MAX_GRAPHS:
            return graph
        torch = self._torch
        try:
            static_in = x.clone()
            for _ in range(2):  # warm-up on the side stream, as torch.cuda.graphs asks before capture
                self._forward(static_in)
            self._stream.synchronize()
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                cuda_graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"
            ):
                static_out = self._forward(static_in)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # capture refused (an op that syncs with the host, dynamic shapes, ...)
            self.cuda_graphs = False
            log.warning("CUDA graph capture failed for %s, running eagerly: %s", self._name, exc)
            return None
        graph = _Graph(cuda_graph, static_in, static_out)
        self._graphs[shape] = graph
        return graph

    def close(self) -> None:
        with self._lock:
            self._module = None
            self._graphs.clear()
