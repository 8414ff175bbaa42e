"""The chart's workloads: every pod template meets the restricted Pod Security Standard; embedded mode is one
pod on a ReadWriteOnce volume; scale-out mode is receivers and GPU workers on a shared volume with bundled or
external servers; Services and NetworkPolicy as configured."""

from __future__ import annotations

import copy
from collections.abc import Callable

import helm_python
import pytest

import radai

from .chart import (
    RELEASE,
    RENDERS,
    SCALEOUT,
    Manifest,
    find,
    one,
    pod_templates,
    render,
    restricted_violations,
)


@pytest.mark.parametrize("name", RENDERS)
def test_every_pod_template_meets_the_restricted_pod_security_standard(
    renders: dict[str, list[Manifest]], name: str
) -> None:
    templates = pod_templates(renders[name])
    assert templates
    for workload, template in templates:
        assert restricted_violations(template["spec"]) == [], workload
        assert template["spec"]["automountServiceAccountToken"] is False


def test_pod_security_check_finds_each_kind_of_violation(default: list[Manifest]) -> None:
    spec = one(default, "Deployment", RELEASE)["spec"]["template"]["spec"]
    changes: dict[str, Callable[[Manifest], object]] = {
        "hostNetwork": lambda s: s.update(hostNetwork=True),
        "hostPath": lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "privileged": lambda s: s["containers"][0]["securityContext"].update(privileged=True),
        "allowPrivilegeEscalation": lambda s: s["containers"][0]["securityContext"].pop(
            "allowPrivilegeEscalation"
        ),
        "capabilities": lambda s: s["containers"][0]["securityContext"]["capabilities"].update(
            add=["NET_ADMIN"]
        ),
        "seccomp": lambda s: (
            s["securityContext"].pop("seccompProfile"),
            s["containers"][0]["securityContext"].pop("seccompProfile"),
        ),
        "runAsNonRoot": lambda s: (
            s["securityContext"].pop("runAsNonRoot"),
            s["containers"][0]["securityContext"].pop("runAsNonRoot"),
        ),
        "runAsUser": lambda s: s["containers"][0]["securityContext"].update(runAsUser=0),
        "readOnlyRootFilesystem": lambda s: s["containers"][0]["securityContext"].update(
            readOnlyRootFilesystem=False
        ),
        "hostPort": lambda s: s["containers"][0]["ports"][0].update(hostPort=11112),
    }
    for rule, change in changes.items():
        broken = copy.deepcopy(spec)
        change(broken)
        violations = restricted_violations(broken)
        assert violations and all(rule in v for v in violations), (rule, violations)


def test_embedded_mode_runs_one_pod_on_a_read_write_once_volume(default: list[Manifest]) -> None:
    assert [d["metadata"]["name"] for d in find(default, "Deployment")] == [RELEASE]
    deployment = one(default, "Deployment", RELEASE)["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"]["type"] == "Recreate"
    assert one(default, "PersistentVolumeClaim", f"{RELEASE}-data")["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]
    assert (
        not find(default, "StatefulSet")
        + find(default, "HorizontalPodAutoscaler")
        + find(default, "ScaledObject")
    )
    assert not find(default, "PodDisruptionBudget")
    container = deployment["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert container["image"] == f"radai:{radai.__version__}"


def test_scale_out_runs_receivers_and_gpu_workers_on_a_shared_volume(scaleout: list[Manifest]) -> None:
    assert [d["metadata"]["name"] for d in find(scaleout, "Deployment")] == [f"{RELEASE}-worker"]
    # receivers: a StatefulSet, so that each keeps its name (spool folder, parts of studies) across restarts
    receiver = one(scaleout, "StatefulSet", f"{RELEASE}-receiver")["spec"]
    assert receiver["serviceName"] == f"{RELEASE}-receiver" and receiver["podManagementPolicy"] == "Parallel"
    governing = one(scaleout, "Service", f"{RELEASE}-receiver")["spec"]
    assert governing["clusterIP"] == "None"
    env = {e["name"]: e for e in receiver["template"]["spec"]["containers"][0]["env"]}
    assert env["RADAI_SCALEOUT__CONSUMER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert one(scaleout, "PersistentVolumeClaim", f"{RELEASE}-data")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    worker = one(scaleout, "Deployment", f"{RELEASE}-worker")["spec"]["template"]["spec"]
    container = worker["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == f"radai:{radai.__version__}-cuda"
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert [p["name"] for p in container["ports"]] == ["http-api"]
    hpa = one(scaleout, "HorizontalPodAutoscaler", f"{RELEASE}-receiver")["spec"]
    assert (hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"]) == (
        "StatefulSet",
        f"{RELEASE}-receiver",
    )
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    pdb = one(scaleout, "PodDisruptionBudget", f"{RELEASE}-receiver")["spec"]
    assert pdb["selector"]["matchLabels"]["app.kubernetes.io/component"] == "receiver"
    for server, image in (("postgresql", "postgres:16"), ("redis", "redis:7")):
        statefulset = one(scaleout, "StatefulSet", f"{RELEASE}-{server}")["spec"]
        assert statefulset["template"]["spec"]["containers"][0]["image"] == image
        assert statefulset["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_worker_node_placement_and_gpu_count_come_from_values(chart: helm_python.Chart) -> None:
    values = {
        **SCALEOUT,
        "worker": {"gpu": 2, "nodeSelector": {"gpu": "a100"}, "affinity": {"podAntiAffinity": {}}},
        "persistence": {"existingClaim": "shared-radai", "storageClass": "cephfs"},
    }
    docs = render(chart, values)
    worker = one(docs, "Deployment", f"{RELEASE}-worker")["spec"]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert worker["nodeSelector"] == {"gpu": "a100"}
    assert worker["affinity"] == {"podAntiAffinity": {}}
    assert not find(docs, "PersistentVolumeClaim")
    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in worker["volumes"] if "persistentVolumeClaim" in v
    }
    assert claims == {"shared-radai"}


def test_dicom_service_type_and_api_service_select_the_receivers(chart: helm_python.Chart) -> None:
    docs = render(
        chart, {**SCALEOUT, "dicom": {"service": {"type": "NodePort", "port": 104, "nodePort": 30104}}}
    )
    dicom = one(docs, "Service", f"{RELEASE}-dicom")["spec"]
    assert (dicom["type"], dicom["ports"][0]["port"], dicom["ports"][0]["nodePort"]) == (
        "NodePort",
        104,
        30104,
    )
    assert dicom["externalTrafficPolicy"] == "Local"
    api = one(docs, "Service", f"{RELEASE}-api")["spec"]
    for spec in (dicom, api):
        assert spec["selector"]["app.kubernetes.io/component"] == "receiver"


def test_network_policy_opens_dicom_api_and_egress_as_configured(scaleout: list[Manifest]) -> None:
    policy = one(scaleout, "NetworkPolicy", RELEASE)["spec"]
    dicom, api = policy["ingress"]
    assert dicom["ports"][0]["port"] == "dicom"
    assert dicom["from"] == [{"ipBlock": {"cidr": "10.0.0.0/16"}}]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in api[
        "from"
    ]
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 5432, 6379, 104}
    for server in ("postgresql", "redis"):
        assert one(scaleout, "NetworkPolicy", f"{RELEASE}-{server}")["spec"]["egress"] == []
