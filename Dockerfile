# syntax=docker/dockerfile:1
# radai, CPU image: ONNX Runtime (CPU) and the CPU build of PyTorch (for MONAI), no development tools.
#   docker build -t radai:0.1.0 .
#   docker run --read-only --tmpfs /tmp -v radai-data:/data -p 11112:11112 -p 8000:8000 \
#     -e RADAI_API__HOST=0.0.0.0 -e RADAI_API__ADMIN_TOKEN=<32 random characters> radai:0.1.0
# The GPU variant is Dockerfile.cuda. Both run as uid 10001 and write only to /data and /tmp.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a wheel of radai, then a virtual environment with it and its runtime dependencies -------------
FROM ${PYTHON_IMAGE} AS build
# The CPU build of torch comes from PyTorch's CPU index (PyPI's Linux wheels are CUDA builds of several GB).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY radai ./radai
COPY dicom_router ./dicom_router
COPY model_zoo ./model_zoo
RUN python -m pip wheel --no-deps --wheel-dir /wheels .
# constraints.txt pins torch==2.13.0, which the CPU index satisfies with 2.13.0+cpu; it is installed first so
# that radai's own requirement (torch>=2.2) is already met when the wheel is installed from PyPI. As in the
# Makefile, onnx2torch (the `torch` backend) goes in without its torchvision dependency, whose CUDA build
# cannot load beside the CPU torch.
RUN python -m venv /opt/radai \
 && /opt/radai/bin/pip install -c constraints.txt --index-url "${TORCH_INDEX_URL}" torch \
 && /opt/radai/bin/pip install -c constraints.txt /wheels/radai-*.whl \
 && /opt/radai/bin/pip install --no-deps 'onnx2torch==1.5.15' \
 && /opt/radai/bin/radai --version

# --- runtime: the virtual environment only -------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="radai" \
      org.opencontainers.image.description="Radiology AI inference server: DICOM in, DICOM SEG and SR out (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="the radai source tree (Dockerfile at its root)"
# No DCMTK: radai speaks DICOM with pynetdicom. Everything written goes to /data (the data dir) or /tmp, so the
# root filesystem may be mounted read-only (docker run --read-only --tmpfs /tmp; Kubernetes: an emptyDir at /tmp).
ENV PATH=/opt/radai/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    RADAI_STORAGE__DATA_DIR=/data
RUN groupadd --system --gid 10001 radai \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin radai \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY --from=build /opt/radai /opt/radai
WORKDIR /app
USER 10001:10001
VOLUME ["/data"]
EXPOSE 11112 8000
# /livez on the API port (api.port, 8000); python's urllib, as the image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RADAI_API__PORT', '8000') + '/livez', timeout=4)"]
ENTRYPOINT ["radai"]
CMD ["serve"]
