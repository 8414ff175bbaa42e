"""Shared by the chart tests: the chart rendered offline by Helm's SDK, lookups in the manifests, the restricted
Pod Security Standard as checks, and radai's settings as a rendered container loads them."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from helm_python import _native

from radai.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "radai"
MONITORING = ROOT / "deploy" / "monitoring"
KUBE_VERSION = "1.33.0"  # kubernetes-validate ships strict schemas for it
RELEASE = "radai"
NAMESPACE = "pacs"
OPERATOR_APIS = ("monitoring.coreos.com/v1", "keda.sh/v1alpha1")
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
}
TLS = {"enabled": True, "secretName": "radai-dicom-tls", "requireClientCert": True}
PACS = {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}
SCALEOUT: dict[str, Any] = {
    "scaleout": {"enabled": True},
    "postgresql": {"enabled": True},
    "redis": {"enabled": True},
    "dicom": {"tls": TLS},
    "config": {"destinations": [PACS], "scaleout": {"stream_prefix": "radai"}},
    "networkPolicy": {
        "dicom": {"allowedCidrs": ["10.0.0.0/16"]},
        "api": {"allowedNamespaces": ["monitoring"]},
        "egress": {"destinations": [{"cidr": "10.0.0.5/32", "ports": [104]}]},
    },
}
EXTERNAL_URLS = {
    "database-url": "postgresql://radai:Zq81nR0pWx@db.hospital.internal:5432/radai",
    "redis-url": "rediss://:Zq81nR0pWx@redis.hospital.internal:6380/0",
}
EXTERNAL: dict[str, Any] = {
    "scaleout": {"enabled": True, "existingSecret": "radai-external"},
    "worker": {"autoscaling": {"redis": {"address": "redis.hospital.internal:6380", "enableTLS": True}}},
}
# Secrets the chart refers to but does not create (existingSecret): the test's stand-ins.
OUTSIDE_SECRETS = {"radai-external": EXTERNAL_URLS}
Manifest = dict[str, Any]
RENDERS = ["default", "scaleout", "external"]


def render(chart: helm_python.Chart, values: dict[str, Any], apis: tuple[str, ...] = ()) -> list[Manifest]:
    """Every rendered manifest. Chart.render() passes no capabilities, but the library's render options take
    the CLI's --kube-version and --api-versions, so the call goes to it directly."""
    options = {
        "name": RELEASE,
        "namespace": NAMESPACE,
        "kube_version": f"v{KUBE_VERSION}",
        "api_versions": apis,
    }
    rendered = json.loads(
        _native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(options))
    )
    return [
        doc
        for path, text in sorted(rendered.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def find(docs: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def one(docs: list[Manifest], kind: str, name: str) -> Manifest:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def pod_templates(docs: list[Manifest]) -> list[tuple[str, Manifest]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    ]


# The restricted Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards), as
# checks over a pod spec: written here because no Python package of the dev dependencies implements it (the
# admission controller is Go, in the API server). Plus the chart's own rule: a read-only root filesystem.
VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def restricted_violations(spec: Manifest) -> list[str]:
    """Every way the pod spec breaks the restricted profile, one message each (empty: none)."""
    found = [f"{key}: true" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= VOLUME_TYPES:
            found.append(f"volume {volume['name']}: {', '.join(sorted(kinds))} not allowed")
    pod = spec.get("securityContext", {})
    for sysctl in pod.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")
    containers = spec.get("initContainers", []) + spec["containers"] + spec.get("ephemeralContainers", [])
    for container in containers:
        context = container.get("securityContext", {})
        name = container["name"]
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {
            "NET_BIND_SERVICE"
        }:
            found.append(f"{name}: capabilities must drop ALL and add at most NET_BIND_SERVICE")
        seccomp = context.get("seccompProfile") or pod.get("seccompProfile") or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccomp profile is not RuntimeDefault or Localhost")
        if context.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser", pod.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount")
        if context.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: readOnlyRootFilesystem is not true")
        found += [
            f"{name}: hostPort {p['hostPort']}" for p in container.get("ports", []) if p.get("hostPort")
        ]
    return found


def secrets(docs: list[Manifest]) -> dict[str, dict[str, str]]:
    rendered = {
        s["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
        for s in find(docs, "Secret")
    }
    return {**OUTSIDE_SECRETS, **rendered}


def environment(docs: list[Manifest], container: Manifest, pod_name: str) -> dict[str, str]:
    known = secrets(docs)
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            value = known.get(ref["name"], {}).get(ref["key"])
            if value is None:
                assert ref.get("optional"), (
                    f"{item['name']}: {ref} is neither rendered nor a known outside secret"
                )
                continue
            env[item["name"]] = value
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[item["name"]] = pod_name
    return env


def workload(docs: list[Manifest], name: str) -> Manifest:
    """The Deployment or StatefulSet (the scale-out receivers) called `name`."""
    (found,) = [
        d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name
    ]
    return found


def settings_of(
    docs: list[Manifest], deployment: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[Settings, Manifest]:
    """radai's settings as the container of `deployment` loads them (`serve -c <mounted radai.yaml>`)."""
    pod = workload(docs, deployment)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config_file = container["args"][container["args"].index("-c") + 1]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == config_file)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
    path = tmp_path / "radai.yaml"
    path.write_text(config_map["data"][mount["subPath"]], encoding="utf-8")
    for key in list(os.environ):
        if key.startswith("RADAI_"):
            monkeypatch.delenv(key)
    for key, value in environment(docs, container, f"{deployment}-6d9f7c-x2b4q").items():
        monkeypatch.setenv(key, value)
    return load_settings(path), container


def ports(container: Manifest) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}
