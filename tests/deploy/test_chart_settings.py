"""The rendered environment in radai's settings: each container's env (secret references resolved to the
rendered Secrets, or stand-ins for outside ones) and the rendered radai.yaml load with radai's own loader into
the intended mode, role, URLs, ports, tokens and TLS files; the KEDA streams are the ones radai's workers read;
the README's deploy sections name only existing values and settings, and their examples render."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

import helm_python
import pytest
import redis
import yaml
from pydantic import BaseModel

from radai.config import Settings
from radai.storage.redis_streams import GROUP, JobStreams

from .chart import (
    CHART,
    EXTERNAL_URLS,
    KUBE_VERSION,
    NAMESPACE,
    OPERATOR_APIS,
    RELEASE,
    ROOT,
    SCALEOUT,
    Manifest,
    find,
    one,
    ports,
    render,
    secrets,
    settings_of,
)


def test_default_render_loads_as_one_embedded_process(
    default: list[Manifest], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings, container = settings_of(default, RELEASE, monkeypatch, tmp_path)
    assert (settings.scaleout.mode, settings.scaleout.role) == ("embedded", "all")
    assert (settings.api.host, settings.dicom.host) == ("0.0.0.0", "0.0.0.0")
    assert (
        ports(container)
        == {"dicom": settings.dicom.port, "http-api": settings.api.port}
        == {
            "dicom": 11112,
            "http-api": 8000,
        }
    )
    assert settings.storage.data_dir == Path("/data")
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data", "/tmp"}
    token = secrets(default)[f"{RELEASE}-api"]["admin-token"]
    assert settings.api.admin_token is not None and settings.api.admin_token.get_secret_value() == token
    assert settings.dicom.ae_title == "RADAI" and settings.dicom.tls is None
    for probe, path in (
        ("livenessProbe", "/livez"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/livez"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http-api"}


def test_scale_out_receiver_loads_as_a_distributed_receiver_with_tls(
    scaleout: list[Manifest], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings, container = settings_of(scaleout, f"{RELEASE}-receiver", monkeypatch, tmp_path)
    secret = secrets(scaleout)[f"{RELEASE}-scaleout"]
    assert (settings.scaleout.mode, settings.scaleout.role) == ("distributed", "receiver")
    assert settings.scaleout.database_url is not None and settings.scaleout.redis_url is not None
    database_url = settings.scaleout.database_url.get_secret_value()
    assert database_url == f"postgresql://radai:{secret['postgres-password']}@{RELEASE}-postgresql:5432/radai"
    redis_url = settings.scaleout.redis_url.get_secret_value()
    assert redis_url == f"redis://:{secret['redis-password']}@{RELEASE}-redis:6379/0"
    assert settings.scaleout.consumer_name == f"{RELEASE}-receiver-6d9f7c-x2b4q"
    assert settings.dicom.tls is not None and settings.dicom.tls.require_client_cert
    tls_mount = next(m for m in container["volumeMounts"] if m["name"] == "dicom-tls")
    for file in (settings.dicom.tls.cert_file, settings.dicom.tls.key_file, settings.dicom.tls.ca_file):
        assert file is not None and file.parent == Path(tls_mount["mountPath"])
    assert [d.name for d in settings.destinations] == ["pacs"]
    assert ports(container) == {"dicom": settings.dicom.port, "http-api": settings.api.port}


def test_scale_out_worker_loads_as_a_distributed_worker(
    scaleout: list[Manifest], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings, container = settings_of(scaleout, f"{RELEASE}-worker", monkeypatch, tmp_path)
    assert (settings.scaleout.mode, settings.scaleout.role) == ("distributed", "worker")
    assert settings.scaleout.stream_prefix == "radai"
    assert settings.dicom.tls is None
    assert settings.storage.data_dir == Path("/data")
    assert ports(container) == {"http-api": settings.api.port}


def test_external_servers_come_from_the_existing_secret(
    external: list[Manifest], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert [d["metadata"]["name"] for d in find(external, "StatefulSet")] == [
        f"{RELEASE}-receiver"
    ]  # no bundled server
    assert not find(external, "Secret", f"{RELEASE}-scaleout")
    for deployment, role in ((f"{RELEASE}-receiver", "receiver"), (f"{RELEASE}-worker", "worker")):
        settings, _ = settings_of(external, deployment, monkeypatch, tmp_path)
        assert settings.scaleout.role == role
        assert settings.scaleout.database_url is not None and settings.scaleout.redis_url is not None
        assert settings.scaleout.database_url.get_secret_value() == EXTERNAL_URLS["database-url"]
        assert settings.scaleout.redis_url.get_secret_value() == EXTERNAL_URLS["redis-url"]


def test_keda_streams_are_the_ones_radai_workers_read(
    chart: helm_python.Chart, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    values = {
        **SCALEOUT,
        "config": {"scaleout": {"stream_prefix": "site-a"}},
        "worker": {"autoscaling": {"models": ["m1"]}},
    }
    docs = render(chart, values, OPERATOR_APIS)
    settings, _ = settings_of(docs, f"{RELEASE}-worker", monkeypatch, tmp_path)
    (trigger,) = one(docs, "ScaledObject", f"{RELEASE}-worker")["spec"]["triggers"]
    client = redis.Redis()  # never connects: only the key names are asked for
    try:
        streams = JobStreams(
            client, settings.scaleout.stream_prefix, "test", settings.scaleout.claim_idle_seconds
        )
        assert trigger["metadata"]["stream"] == streams.stream_key("m1") == "site-a:jobs:m1"
    finally:
        client.close()
    assert trigger["metadata"]["consumerGroup"] == GROUP


# --- the README's "Deploy on Kubernetes" and "Scale out" sections -----------------------------------------

DOTTED = re.compile(r"`([a-z][A-Za-z_]*(?:\.[A-Za-z_]+)+)`")
FILE_SUFFIXES = (".txt", ".yaml", ".json", ".crt", ".key", ".md")


def deploy_docs() -> str:
    """The README's "Deploy on Kubernetes" and "Scale out" sections."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## Deploy on Kubernetes\n")
    end = readme.find("\n## ", readme.index("\n## Scale out\n") + 1)
    return readme[start : end if end >= 0 else None]


def _is_value(values: dict[str, Any], parts: list[str]) -> bool:
    node: Any = values
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _is_setting(parts: list[str]) -> bool:
    if parts[0] == "config":  # the chart's `config` value is radai's settings file
        parts = parts[1:]
    model: Any = Settings
    for part in parts:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        annotation = fields[part].annotation
        candidates = (annotation, *get_args(annotation))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return True


@pytest.mark.parametrize("document", ["deploy docs", "chart README"])
def test_docs_name_only_existing_values_and_settings(chart: helm_python.Chart, document: str) -> None:
    text = deploy_docs() if document == "deploy docs" else (CHART / "README.md").read_text(encoding="utf-8")
    names = {n for n in DOTTED.findall(text) if not n.endswith(FILE_SUFFIXES)}
    assert len(names) > 20
    unknown = [
        n
        for n in sorted(names)
        if not _is_value(chart.values, n.split(".")) and not _is_setting(n.split("."))
    ]
    assert unknown == []


def test_docs_value_examples_render_and_lint(chart: helm_python.Chart) -> None:
    examples = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", deploy_docs(), re.S)]
    assert len(examples) >= 2
    for values in examples:
        kinds = {d["kind"] for d in render(chart, values, OPERATOR_APIS)}
        assert "Deployment" in kinds
        report = helm_python.lint(
            CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
        )
        assert report["errors"] == []
