"""Triton backend: batches go to a shared NVIDIA Triton Inference Server over HTTP (KServe v2 protocol).

Uses the official client `tritonclient[http]` with the binary tensor extension. Everything the server can be
asked about (live, ready, the model's metadata) is checked at construction, so a wrong URL, model name or
model shape fails at start-up, not mid-job. The `device` is the server's business: radai sends host arrays.
"""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from radai.errors import InferenceError, InferenceTimeoutError, ModelPackageError, OutOfMemoryError
from radai.models.manifest import load_card

log = logging.getLogger(__name__)

# How Triton's backends word an allocation failure (ONNX Runtime, PyTorch, TensorRT); the HTTP error carries
# no type for it, only the backend's message.
_OOM_SIGNS = (
    "out of memory",
    "failed to allocate memory",
    "cuda_error_out_of_memory",
    "bad_alloc",
    "outofmemory",
)
_FLOATS = {"FP32": np.float32, "FP16": np.float16}
_CONNECT_TIMEOUT_S = 10.0


def _import_client() -> Any:
    try:
        return importlib.import_module("tritonclient.http")
    except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError without its http extra
        raise InferenceError(
            "backend 'triton' needs the tritonclient package with HTTP support "
            "(pip install 'tritonclient[http]')"
        ) from exc


def triton_model_key(model_path: Path) -> str:
    """The radai model a package's ONNX file belongs to: the card id of the `model.yaml` beside it, else the
    file's folder name. (Not the folder name alone: installed packages live in `packages/<id>/<version>/`.)"""
    if (model_path.parent / "model.yaml").is_file():
        try:
            return load_card(model_path.parent).id
        except ModelPackageError as exc:
            raise InferenceError(f"backend 'triton': {exc}") from exc
    return model_path.parent.name


def _one_line(exc: BaseException) -> str:
    """A foreign error's message on one line (ONNX Runtime's, relayed by Triton, span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _split_url(url: str) -> tuple[str, bool]:
    """`http://host:port[/base]`, `https://...` or `host:port` -> (url without scheme, ssl)."""
    text = url.strip().rstrip("/")
    for scheme, ssl in (("http://", False), ("https://", True)):
        if text.lower().startswith(scheme):
            return text[len(scheme) :], ssl
    if "://" in text:
        raise InferenceError(f"Triton URL {url!r}: only http:// and https:// are supported")
    return text, False


def _tensor(meta: dict[str, Any], role: str, name: str | None, where: str) -> dict[str, Any]:
    """The input or output tensor `name` (or the only input / first output) from the model metadata."""
    tensors: list[dict[str, Any]] = list(meta.get(role) or [])
    if name is not None:
        found = [t for t in tensors if t.get("name") == name]
        if not found:
            names = ", ".join(str(t.get("name")) for t in tensors) or "none"
            raise InferenceError(f"Triton model {where} has no {role[:-1]} {name!r} (it has: {names})")
        return found[0]
    if not tensors or (role == "inputs" and len(tensors) != 1):
        raise InferenceError(
            f"Triton model {where} must have one input and at least one output "
            f"(has {len(meta.get('inputs') or [])} inputs, {len(meta.get('outputs') or [])} outputs); "
            f"name the one to use"
        )
    return tensors[0]


def _float_5d(tensor: dict[str, Any], role: str, where: str) -> tuple[int, ...]:
    """Check a tensor is 5-D (N, C, X, Y, Z) FP32 or FP16; return its declared shape (-1: variable)."""
    datatype, shape = str(tensor.get("datatype")), tuple(int(d) for d in tensor.get("shape") or ())
    if datatype not in _FLOATS:
        raise InferenceError(
            f"Triton model {where}: {role} {tensor.get('name')!r} has datatype {datatype}, "
            f"radai needs FP32 or FP16"
        )
    if len(shape) != 5:
        raise InferenceError(
            f"Triton model {where}: {role} {tensor.get('name')!r} has shape {list(shape)}, radai needs 5-D "
            f"(N, C, X, Y, Z) with the batch axis (set max_batch_size > 0 in the model's config)"
        )
    return shape


class TritonRunner:
    """Implements radai.ports.ModelRunner on a Triton Inference Server over HTTP.

    tritonclient's HTTP client is not thread-safe (and is gevent-based, one hub per thread), so each calling
    thread gets its own client; `run` may be called from many threads at once.
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        model_version: str = "",
        *,
        output_channels: int | None,
        timeout_s: float = 60.0,
        input_name: str | None = None,
        output_name: str | None = None,
    ) -> None:
        """Connect and check server, model and metadata; every problem raises InferenceError here."""
        self._http = _import_client()
        self._address, self._ssl = _split_url(url)
        self._timeout_s = float(timeout_s)
        self.model_name, self.model_version = model_name, str(model_version)
        self.url = url
        where = f"{model_name!r}" + (f" version {self.model_version}" if self.model_version else "")
        self._where = f"{where} at {url}"
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            client = self._client()
            live, ready = client.is_server_live(), client.is_server_ready()
        except Exception as exc:  # connection refused, DNS, TLS, timeouts: all surface as foreign errors
            self.close()
            raise InferenceError(f"Triton server at {url} is unreachable: {_one_line(exc)}") from exc
        if not (live and ready):
            self.close()
            raise InferenceError(f"Triton server at {url} is not {'ready' if live else 'live'}")
        try:
            meta: dict[str, Any] = client.get_model_metadata(model_name, self.model_version)
            ready = bool(client.is_model_ready(model_name, self.model_version))
        except Exception as exc:  # unknown model: the server's 400 answer names it
            self.close()
            raise InferenceError(f"Triton model {self._where}: {_one_line(exc)}") from exc
        if not ready:
            self.close()
            raise InferenceError(f"Triton model {self._where} is not ready (not loaded)")
        try:
            source, target = (
                _tensor(meta, "inputs", input_name, self._where),
                _tensor(meta, "outputs", output_name, self._where),
            )
            self.input_shape = _float_5d(source, "input", self._where)
            self.output_shape = _float_5d(target, "output", self._where)
            declared = self.output_shape[1]
            if output_channels is not None and declared >= 0 and declared != output_channels:
                raise InferenceError(
                    f"Triton model {self._where} has {declared} output channels, the card says {output_channels}"
                )
        except InferenceError:
            self.close()
            raise
        self.input_name: str = str(source["name"])
        self.output_name: str = str(target["name"])
        self._input_type: str = str(source["datatype"])
        log.debug("triton model %s ready: %s -> %s", self._where, self.input_name, self.output_name)

    def _client(self) -> Any:
        """This thread's client, created on first use."""
        client = getattr(self._local, "client", None)
        if client is None:
            with self._lock:
                if self._closed:
                    raise InferenceError(f"Triton model {self._where}: runner is closed")
                client = self._http.InferenceServerClient(
                    self._address,
                    ssl=self._ssl,
                    connection_timeout=min(self._timeout_s, _CONNECT_TIMEOUT_S),
                    network_timeout=self._timeout_s,
                )
                self._clients.append(client)
            self._local.client = client
        return client

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        if self._closed:
            raise InferenceError(f"Triton model {self._where}: runner is closed")
        if batch.ndim != 5:
            raise InferenceError(f"Triton model {self._where}: batch must be 5-D, got shape {batch.shape}")
        data = np.ascontiguousarray(batch, dtype=_FLOATS[self._input_type])
        request = self._http.InferInput(self.input_name, list(data.shape), self._input_type)
        request.set_data_from_numpy(data, binary_data=True)
        wanted = self._http.InferRequestedOutput(self.output_name, binary_data=True)
        try:
            client = self._client()
            result = client.infer(
                self.model_name, [request], model_version=self.model_version, outputs=[wanted]
            )
            out = result.as_numpy(self.output_name)
        except InferenceError:
            raise
        except Exception as exc:  # translate tritonclient/gevent errors at the adapter boundary
            self._discard()  # a fresh connection next time: a late answer must not be read as the next one
            message = _one_line(exc)
            if any(sign in message.lower() for sign in _OOM_SIGNS):
                raise OutOfMemoryError(f"Triton ran out of memory on {self._where}: {message}") from exc
            if "timeout" in type(exc).__name__.lower() or "timed out" in message.lower():
                raise InferenceTimeoutError(
                    f"Triton model {self._where}: no answer within {self._timeout_s:g} s"
                ) from exc
            raise InferenceError(f"Triton failed on {self._where}: {message}") from exc
        if out is None:
            raise InferenceError(f"Triton model {self._where} returned no output {self.output_name!r}")
        if out.ndim != 5 or out.shape[0] != batch.shape[0]:
            raise InferenceError(
                f"Triton model {self._where} returned shape {list(out.shape)} for a batch of shape "
                f"{list(batch.shape)}"
            )
        return np.asarray(out, dtype=np.float32)

    def _discard(self) -> None:
        """Close and forget this thread's client."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is None:
            return
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        try:
            client.close()
        except Exception as exc:  # the connection is dropped either way
            log.debug("closing a triton client failed: %s", exc)

    def close(self) -> None:
        """Close every thread's client; later `run` calls raise InferenceError."""
        with self._lock:
            self._closed = True
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except (
                Exception
            ) as exc:  # closing a socket another thread's hub owns; the socket is dropped anyway
                log.debug("closing a triton client failed: %s", exc)
