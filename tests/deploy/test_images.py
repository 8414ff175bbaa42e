"""The container images, checked statically (no Docker daemon or registry in CI): non-root numeric user,
health check on /livez without curl, pinned base images, the ports and entry point, read-only-root-friendly
environment, the CPU image installing through constraints.txt, the CUDA image swapping in onnxruntime-gpu,
and a build context that leaves out the virtual environment, git and the data folders."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU = ROOT / "Dockerfile"
CUDA = ROOT / "Dockerfile.cuda"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKERFILES = [CPU, CUDA]
# The Python 3 of each Ubuntu release a CUDA base image may be built on.
UBUNTU_PYTHON = {"ubuntu20.04": (3, 8), "ubuntu22.04": (3, 10), "ubuntu24.04": (3, 12)}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@dataclass(frozen=True)
class Stage:
    base: str  # the FROM image with build arguments substituted
    name: str
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                values[key] = value
        return values


def _instructions(path: Path) -> list[Instruction]:
    # Hand-written: no Dockerfile parser is among the dev dependencies (BuildKit's is Go). It handles what
    # these files use: comments, backslash continuations (comment lines inside them dropped, as Docker does).
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(args.split())))
        pending = ""
    return instructions


def _stages(path: Path) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    base, name, body = "", "", list[Instruction]()
    for ins in _instructions(path):
        if ins.keyword == "FROM":
            if base:
                stages.append(Stage(base, name, tuple(body)))
            parts = ins.args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            body = []
        elif ins.keyword == "ARG" and not base:
            key, _, value = ins.args.partition("=")
            global_args[key] = value
        else:
            body.append(ins)
    stages.append(Stage(base, name, tuple(body)))
    return stages


def _runtime(path: Path) -> Stage:
    return _stages(path)[-1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    users = _runtime(dockerfile).all("USER")
    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid == "10001"
    assert gid in ("", "10001")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_health_check_calls_livez_with_python(dockerfile: Path) -> None:
    checks = _runtime(dockerfile).all("HEALTHCHECK")
    assert len(checks) == 1
    assert "/livez" in checks[0]
    assert "urllib.request" in checks[0]
    assert not re.search(r"\b(curl|wget)\b", checks[0])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_bases_are_pinned_tags_and_nothing_is_added_from_the_network(dockerfile: Path) -> None:
    for stage in _stages(dockerfile):
        image, _, tag = stage.base.rpartition(":")
        assert image and tag and tag != "latest", stage.base
    for ins in _instructions(dockerfile):
        assert not (ins.keyword == "ADD" and re.search(r"https?://", ins.args)), ins.args


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_exposes_dicom_and_api_ports_and_serves_by_default(dockerfile: Path) -> None:
    runtime = _runtime(dockerfile)
    assert sorted(" ".join(runtime.all("EXPOSE")).split()) == ["11112", "8000"]
    assert runtime.all("ENTRYPOINT") == ['["radai"]']
    assert runtime.all("CMD") == ['["serve"]']
    assert runtime.all("WORKDIR") == ["/app"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_writes_only_to_data_and_tmp(dockerfile: Path) -> None:
    env = _runtime(dockerfile).env()
    assert env["RADAI_STORAGE__DATA_DIR"] == "/data"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == "/tmp"
    assert env["XDG_CACHE_HOME"].startswith("/tmp/")
    assert _runtime(dockerfile).all("VOLUME") == ['["/data"]']


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_carries_oci_labels(dockerfile: Path) -> None:
    labels = " ".join(_runtime(dockerfile).all("LABEL"))
    for key in ("title", "description", "licenses", "version", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_neither_dev_extras_nor_dcmtk(dockerfile: Path) -> None:
    runs = " ".join(ins.args for ins in _instructions(dockerfile) if ins.keyword == "RUN")
    assert "[dev]" not in runs
    assert "dcmtk" not in runs.lower()


def test_cpu_image_installs_through_the_cpu_torch_constraint() -> None:
    build = _stages(CPU)[0]
    runs = " ".join(build.all("RUN"))
    assert "constraints.txt" in " ".join(build.all("COPY"))
    assert runs.count("pip install -c constraints.txt") >= 2  # torch, then the radai wheel
    assert "pip install --no-deps 'onnx2torch==" in runs
    assert "pip wheel" in runs
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text(encoding="utf-8").split()
    assert _runtime(CPU).base == build.base == "python:3.11-slim-bookworm"


def test_cuda_image_replaces_onnxruntime_with_onnxruntime_gpu() -> None:
    runs = " ".join(_stages(CUDA)[0].all("RUN"))
    uninstall = runs.index("pip uninstall -y onnxruntime")
    assert runs.index('pip install "onnxruntime-gpu==', uninstall) > uninstall
    assert "constraints.txt" not in runs


def test_cuda_image_base_has_a_python_radai_supports() -> None:
    base = _runtime(CUDA).base
    match = re.fullmatch(r"nvidia/cuda:12\.[0-9.]+-cudnn-runtime-(ubuntu[0-9.]+)", base)
    assert match, base
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    bound = re.fullmatch(r">=(\d+)\.(\d+)", spec)
    assert bound, spec
    assert UBUNTU_PYTHON[match.group(1)] >= (int(bound.group(1)), int(bound.group(2)))


def _ignored() -> set[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return {line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")}


def test_build_context_leaves_out_venv_git_and_data() -> None:
    assert {".venv", ".git", "test-artifacts", "radai-data"} <= _ignored()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_copies_only_files_the_context_holds(dockerfile: Path) -> None:
    ignored = _ignored()
    for stage in _stages(dockerfile):
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.split("/")[0] not in ignored, source
