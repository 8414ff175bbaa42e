#!/usr/bin/env bash
# The GPU checks and figures in one run, on a machine with a CUDA device and radai installed with its torch
# extra (`pip install -e .[torch]` against a CUDA build of torch):
#   1. every test marked `gpu` (backend conformance on CUDA, CUDA graphs, fp16, the device path, I/O binding
#      where onnxruntime-gpu is installed, the memory probe);
#   2. the throughput benchmark (radai vs the naive pipeline vs the runtime's limit, STAT latency, busy
#      fraction) with the torch backend on the GPU, quick and full size.
# Results (JSON + markdown) go to $1 (default benchmarks/results); run from the repository root:
#   bash benchmarks/gpu.sh [OUT_DIR] [PYTHON]
set -euo pipefail
out="${1:-benchmarks/results}"
python="${2:-python3}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$python" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: these checks need one"
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
EOF
set +e
"$python" -m pytest -q -p no:cacheprovider -m gpu tests/radai 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
set -e
"$python" -m benchmarks.throughput --quick --backend torch --device cuda --out-dir "$out" 2>&1 \
    | tee "$out/throughput-quick.log"
"$python" -m benchmarks.throughput --backend torch --device cuda --studies 1,4,8,16 --out-dir "$out" 2>&1 \
    | tee "$out/throughput-full.log"
exit "$tests"
