"""A minimal KServe v2 (Triton) HTTP inference server for the `triton` backend's tests.

It stands in for NVIDIA Triton Inference Server, which cannot be installed on the test machines (no Debian or
PyPI package; Triton ships as a container image). Models are real ONNX files run by ONNX Runtime on the CPU,
so the scores are real. Implemented, as Triton does them:

- `GET /v2/health/live`, `GET /v2/health/ready`: 200;
- `GET /v2/models/{m}[/versions/{v}]/ready`: 200 when the model is loaded, 400 otherwise;
- `GET /v2/models/{m}[/versions/{v}]`: model metadata (name, versions, platform, inputs, outputs with KServe
  datatypes and shapes, -1 for variable axes), 400 with `{"error": ...}` for an unknown model;
- `POST /v2/models/{m}[/versions/{v}]/infer` with the binary tensor data extension only: the JSON header's
  length in `Inference-Header-Content-Length`, each input's bytes (`parameters.binary_data_size`) after it;
  outputs answered the same way. Errors (unknown model, bad request, ONNX Runtime failures) are 400 with
  `{"error": message}`.

Not implemented: JSON tensor data, shared memory, statistics, repository and config APIs, gRPC. A model can be
given a fixed `error` message that every inference answers, to replay a server-side failure (e.g. Triton's
out-of-memory message) that a CPU test cannot cause for real.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

# ONNX Runtime type -> (KServe v2 datatype, numpy dtype)
_TYPES: dict[str, tuple[str, type[np.generic]]] = {
    "tensor(float)": ("FP32", np.float32),
    "tensor(float16)": ("FP16", np.float16),
    "tensor(int64)": ("INT64", np.int64),
    "tensor(int32)": ("INT32", np.int32),
}
_ROUTE = re.compile(
    r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?$"
)


@dataclass(frozen=True)
class StubModel:
    """A model the stub serves: an ONNX file, optionally answering every inference with `error`, or only
    after `delay_s` seconds (a hung server)."""

    path: Path
    error: str | None = None
    delay_s: float = 0.0


class _Loaded:
    def __init__(self, name: str, model: StubModel) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(model.path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.error = model.error
        self.delay_s = model.delay_s
        self.name = name

    def metadata(self) -> dict[str, Any]:
        def tensor(arg: Any) -> dict[str, Any]:
            shape = [d if isinstance(d, int) else -1 for d in arg.shape]
            return {"name": arg.name, "datatype": _TYPES[arg.type][0], "shape": shape}

        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [tensor(a) for a in self.session.get_inputs()],
            "outputs": [tensor(a) for a in self.session.get_outputs()],
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Triton and tritonclient use
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {"Content-Type": "application/json"}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode())

    def _model(self, name: str, version: str | None) -> _Loaded | None:
        model = self.server.models.get(name)
        return model if model is not None and version in (None, "1") else None

    def do_GET(self) -> None:
        if self.path in ("/v2/health/live", "/v2/health/ready"):
            self._send(200, b"")
            return
        route = _ROUTE.match(self.path)
        if route is None or route["action"] == "/infer":
            self._json(404, {"error": f"not found: {self.path}"})
            return
        model = self._model(route["model"], route["version"])
        if model is None:
            self._json(400, {"error": f"Request for unknown model: '{route['model']}' is not found"})
        elif route["action"] == "/ready":
            self._send(200, b"")
        else:
            self._json(200, model.metadata())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        route = _ROUTE.match(self.path)
        if route is None or route["action"] != "/infer":
            self._json(404, {"error": f"not found: {self.path}"})
            return
        model = self._model(route["model"], route["version"])
        if model is None:
            self._json(400, {"error": f"Request for unknown model: '{route['model']}' is not found"})
            return
        try:
            header_length = int(self.headers["Inference-Header-Content-Length"])
            request = json.loads(body[:header_length])
            feed = self._inputs(model, request, body[header_length:])
        except (KeyError, ValueError, TypeError) as exc:
            self._json(400, {"error": f"bad inference request: {exc!r}"})
            return
        time.sleep(model.delay_s)
        if model.error is not None:
            self._json(400, {"error": model.error})
            return
        wanted = [o["name"] for o in request.get("outputs") or []] or [
            o.name for o in model.session.get_outputs()
        ]
        try:
            results = model.session.run(wanted, feed)
        except Exception as exc:  # onnxruntime's own exceptions, reported as Triton reports backend errors
            self._json(400, {"error": f"onnx runtime error: {exc}"})
            return
        self._outputs(model, wanted, results)

    @staticmethod
    def _inputs(model: _Loaded, request: dict[str, Any], data: bytes) -> dict[str, np.ndarray[Any, Any]]:
        declared = {a.name: _TYPES[a.type] for a in model.session.get_inputs()}
        feed: dict[str, np.ndarray[Any, Any]] = {}
        offset = 0
        for tensor in request["inputs"]:
            size = int(tensor["parameters"]["binary_data_size"])  # binary extension only
            datatype, dtype = declared[tensor["name"]]
            if tensor["datatype"] != datatype:
                raise ValueError(f"input {tensor['name']} is {datatype}, got {tensor['datatype']}")
            array = np.frombuffer(data[offset : offset + size], dtype=dtype)
            feed[tensor["name"]] = array.reshape(tensor["shape"])
            offset += size
        return feed

    def _outputs(self, model: _Loaded, names: list[str], results: list[Any]) -> None:
        kinds = {a.name: _TYPES[a.type][0] for a in model.session.get_outputs()}
        tensors, blobs = [], []
        for name, result in zip(names, results, strict=True):
            blob = np.ascontiguousarray(result).tobytes()
            tensors.append(
                {
                    "name": name,
                    "datatype": kinds[name],
                    "shape": list(result.shape),
                    "parameters": {"binary_data_size": len(blob)},
                }
            )
            blobs.append(blob)
        header = json.dumps({"model_name": model.name, "model_version": "1", "outputs": tensors}).encode()
        self._send(
            200,
            header + b"".join(blobs),
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    models: dict[str, _Loaded]


class TritonStub:
    """The stub on 127.0.0.1 at a free port, serving in a background thread; use as a context manager."""

    def __init__(self, models: dict[str, StubModel]) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.models = {name: _Loaded(name, model) for name, model in models.items()}
        self._thread = threading.Thread(target=self._server.serve_forever, name="triton-stub", daemon=True)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> TritonStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
