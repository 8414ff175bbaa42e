"""The Helm chart as Helm sees it, offline (helm-python-sdk: Helm's Go SDK in a wheel): metadata, strict lint,
values.schema.json and the render-time checks; every rendered manifest against Kubernetes' strict schemas
(kubernetes-validate), the operators' custom resources field by field, and the monitoring files it ships."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import helm_python
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

import radai

from .chart import (
    CHART,
    CUSTOM_KINDS,
    EXTERNAL,
    KUBE_VERSION,
    MONITORING,
    NAMESPACE,
    OPERATOR_APIS,
    RELEASE,
    RENDERS,
    SCALEOUT,
    Manifest,
    find,
    one,
    render,
)

# --- the chart as Helm sees it ---------------------------------------------------------------------------


def test_chart_metadata_carries_radai_version(chart: helm_python.Chart) -> None:
    meta = chart.metadata
    assert (meta["apiVersion"], meta["name"], meta["version"]) == ("v2", "radai", "0.1.0")
    assert meta["appVersion"] == radai.__version__


@pytest.mark.parametrize("values", [{}, SCALEOUT, EXTERNAL], ids=["default", "scaleout", "external"])
def test_chart_lints_without_warnings_in_strict_mode(values: dict[str, Any]) -> None:
    report = helm_python.lint(
        CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_schema_rejects_a_string_for_replicas_at_render_time(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmValuesError, match="/receiver/replicas"):
        render(chart, {"receiver": {"replicas": "two"}})


def test_schema_rejects_unknown_keys_and_short_tokens(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmValuesError, match="dicomm"):
        render(chart, {"config": {"dicomm": {"port": 104}}})
    with pytest.raises(helm_python.HelmValuesError, match="/api/adminToken"):
        render(chart, {"api": {"adminToken": "short"}})
    with pytest.raises(helm_python.HelmValuesError, match="/dicom/service/type"):
        render(chart, {"dicom": {"service": {"type": "Ingress"}}})


def test_default_values_pass_the_schema(chart: helm_python.Chart) -> None:
    chart.validate_schema(chart.values)  # raises HelmValuesError naming the key otherwise


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"scaleout": {"enabled": True}}, "needs PostgreSQL"),
        ({"scaleout": {"enabled": True}, "postgresql": {"enabled": True}}, "needs Redis"),
        ({**SCALEOUT, "persistence": {"accessMode": "ReadWriteOnce"}}, "ReadWriteMany"),
        ({"postgresql": {"enabled": True}}, "for scale-out mode"),
        ({"dicom": {"tls": {"enabled": True}}}, "dicom.tls.secretName"),
        ({"scaleout": {"enabled": True, "existingSecret": "x"}}, "worker.autoscaling.redis.address"),
    ],
    ids=[
        "no-database",
        "no-redis",
        "rwo-volume",
        "bundled-embedded",
        "tls-without-secret",
        "keda-no-address",
    ],
)
def test_render_fails_with_a_clear_message_for_inconsistent_values(
    chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        render(chart, values, OPERATOR_APIS)


# --- Kubernetes' schemas and the custom resources ------------------------------------------------------


@pytest.mark.parametrize("name", RENDERS)
def test_every_manifest_validates_against_kubernetes_schemas(
    renders: dict[str, list[Manifest]], name: str
) -> None:
    docs = renders[name]
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue  # no schema in kubernetes-validate: checked field by field below
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    expected = {
        "default": {"ServiceMonitor", "PrometheusRule"},
        "scaleout": {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"},
        "external": {"ServiceMonitor", "PrometheusRule", "ScaledObject"},
    }
    assert {d["kind"] for d in docs if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS} == expected[name]


def test_schema_validation_catches_a_misplaced_field(default: list[Manifest]) -> None:
    deployment = copy.deepcopy(one(default, "Deployment", RELEASE))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRoot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_operator_resources_render_only_when_their_apis_exist(chart: helm_python.Chart) -> None:
    kinds = {d["kind"] for d in render(chart, SCALEOUT)}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}
    assert one(render(chart, SCALEOUT), "Deployment", f"{RELEASE}-worker")["spec"]["replicas"] == 1
    disabled = {
        **SCALEOUT,
        "monitoring": {"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}},
        "worker": {"autoscaling": {"enabled": False}},
    }
    kinds = {d["kind"] for d in render(chart, disabled, OPERATOR_APIS)}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "ScaledObject"}


def test_service_monitor_scrapes_every_radai_pod_under_job_radai(scaleout: list[Manifest]) -> None:
    monitor = one(scaleout, "ServiceMonitor", RELEASE)["spec"]
    services = [
        s
        for s in find(scaleout, "Service")
        if monitor["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert len(services) == 1
    service = services[0]
    assert service["metadata"]["labels"][monitor["jobLabel"]] == "radai"
    assert [e["port"] for e in monitor["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert monitor["endpoints"][0]["path"] == "/metrics"
    selected = [
        d["metadata"]["name"]
        for d in find(scaleout, "Deployment") + find(scaleout, "StatefulSet")
        if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert sorted(selected) == [f"{RELEASE}-receiver", f"{RELEASE}-worker"]
    rules = yaml.safe_load((MONITORING / "radai-rules.yaml").read_text(encoding="utf-8"))
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == "RadaiDown"]
    assert exprs and all('job="radai"' in e for e in exprs)


def test_prometheus_rule_holds_the_shipped_rule_groups(default: list[Manifest]) -> None:
    rule = one(default, "PrometheusRule", RELEASE)
    shipped = yaml.safe_load((MONITORING / "radai-rules.yaml").read_text(encoding="utf-8"))
    assert rule["spec"] == shipped
    assert all(group["name"] and group["rules"] for group in rule["spec"]["groups"])


def test_dashboard_config_map_holds_the_shipped_dashboard(default: list[Manifest]) -> None:
    config_map = one(default, "ConfigMap", f"{RELEASE}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((MONITORING / "grafana-dashboard.json").read_text(encoding="utf-8"))
    assert json.loads(config_map["data"]["radai-overview.json"]) == shipped


@pytest.mark.parametrize("name", ["radai-rules.yaml", "grafana-dashboard.json"])
def test_chart_copies_of_monitoring_files_are_byte_identical(name: str) -> None:
    assert (CHART / "files" / name).read_bytes() == (MONITORING / name).read_bytes()


@pytest.mark.parametrize("name", ["scaleout", "external"])
def test_workers_scale_on_the_lag_of_each_model_stream(renders: dict[str, list[Manifest]], name: str) -> None:
    docs = renders[name]
    scaled = one(docs, "ScaledObject", f"{RELEASE}-worker")["spec"]
    target = one(docs, "Deployment", scaled["scaleTargetRef"]["name"])
    assert target["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    assert "replicas" not in target["spec"]  # KEDA owns it
    assert scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    models = ["ct-body-classical", "brain-tissue"]
    assert [t["metadata"]["stream"] for t in scaled["triggers"]] == [f"radai:jobs:{m}" for m in models]
    expected = (
        f"{RELEASE}-redis.{NAMESPACE}.svc:6379" if name == "scaleout" else "redis.hospital.internal:6380"
    )
    for trigger in scaled["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["consumerGroup"] == "workers"
        assert meta["lagCount"].isdigit() and meta["address"] == expected
        assert all(isinstance(v, str) for v in meta.values())
    if name == "scaleout":
        auth = one(docs, "TriggerAuthentication", scaled["triggers"][0]["authenticationRef"]["name"])
        ref = auth["spec"]["secretTargetRef"][0]
        assert ref["parameter"] == "password"
        assert ref["key"] in one(docs, "Secret", ref["name"])["data"]
        assert one(docs, "Service", f"{RELEASE}-redis")["spec"]["ports"][0]["port"] == 6379
    else:
        assert scaled["triggers"][0]["metadata"]["enableTLS"] == "true"
        assert "authenticationRef" not in scaled["triggers"][0]
