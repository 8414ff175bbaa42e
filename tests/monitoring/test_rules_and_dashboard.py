"""The monitoring pack against real tools and the real registry: Debian's promtool checks and unit-tests the
Prometheus rules and parses every dashboard query; every metric name in the rules and the dashboard exists in
radai.metrics.REGISTRY (or is a recording rule); docs/metrics.md documents exactly the registry's metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from radai import metrics

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "radai-rules.yaml"
RULES_TEST = Path(__file__).with_name("radai-rules.test.yaml")
DASHBOARD = MONITORING / "grafana-dashboard.json"
README = MONITORING / "README.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"

# Metric names and recording-rule names as they appear in PromQL (not inside a longer identifier).
NAME = re.compile(r"(?<![A-Za-z0-9_:])radai(?:_[a-z0-9_]+|:[a-z0-9_:]+)")
# Series names each metric type is exposed under (prometheus_client, text format).
EXPOSED_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}
# Label names of families that a custom collector yields (their labels are unknown until they have samples).
COLLECTOR_LABELS: dict[str, tuple[str, ...]] = {"radai_gpu_memory_bytes": ("device", "kind")}
# Grafana's variables, substituted before promtool parses a dashboard query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "6h",
    "${model}": ".*",
    "$model": ".*",
}
ALERTS = {
    "RadaiDeadLetters",
    "RadaiStudyLatencyAboveSLO",
    "RadaiDestinationDown",
    "RadaiAssociationsRejected",
    "RadaiJobsFailing",
    "RadaiDown",
    "RadaiQueueBacklog",
    "RadaiGpuMemoryHigh",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool (Debian package prometheus, scripts/system-packages.sh) is required in CI")
        pytest.skip("promtool not installed (Debian package prometheus, scripts/system-packages.sh)")
    return found


def run_promtool(promtool: str, *args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"promtool {' '.join(args)} failed ({done.returncode}):\n{output}")
    return output


def families() -> dict[str, str]:
    """Family name -> type of every metric in the registry (counters without `_total`)."""
    return {family.name: family.type for family in metrics.REGISTRY.collect()}


def exposed_names() -> set[str]:
    """Every series name the registry exposes: radai_jobs_total, radai_study_stage_seconds_bucket..."""
    return {name + suffix for name, kind in families().items() for suffix in EXPOSED_SUFFIXES[kind]}


def documented_name(name: str, kind: str) -> str:
    """The name docs/metrics.md uses: a counter with `_total`, anything else as is."""
    return name + "_total" if kind == "counter" else name


def label_names() -> dict[str, tuple[str, ...]]:
    """Family name -> label names, from the metric objects of radai.metrics and COLLECTOR_LABELS."""
    out = dict(COLLECTOR_LABELS)
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            # prometheus_client offers no public accessor for a parent metric's label names.
            for family in value.describe():
                out[family.name] = tuple(value._labelnames)
    return out


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and templating query."""
    dashboard = load_dashboard()
    out = [
        (f"panel {panel['id']} ({panel['title']}) {target['refId']}", target["expr"])
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            out.append((f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query))
    return out


def unknown_names(expressions: list[tuple[str, str]]) -> list[str]:
    known = exposed_names() | recorded_names()
    return [
        f"{where}: {name}" for where, expr in expressions for name in NAME.findall(expr) if name not in known
    ]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# --- Prometheus rules -------------------------------------------------------------------------------------


def test_promtool_accepts_the_rule_file(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", str(RULES))
    assert "SUCCESS" in output


def test_promtool_unit_tests_of_the_rules_pass(promtool: str) -> None:
    # The rule file path inside the unit-test file is relative to it.
    output = run_promtool(promtool, "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert "SUCCESS" in output


def test_rule_expressions_name_only_registry_metrics_and_recording_rules() -> None:
    expressions = [(rule.get("record") or rule["alert"], str(rule["expr"])) for rule in load_rules()]
    assert unknown_names(expressions) == []


def test_every_required_alert_has_severity_annotations_and_a_runbook_section() -> None:
    alerts = {rule["alert"]: rule for rule in load_rules() if "alert" in rule}
    assert set(alerts) >= ALERTS
    anchors = {
        github_anchor(line.lstrip("#")) for line in README.read_text().splitlines() if line.startswith("#")
    }
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        path, _, anchor = annotations["runbook"].partition("#")
        assert path == README.relative_to(ROOT).as_posix(), name
        assert anchor in anchors, f"{name}: README has no section #{anchor}"


def test_radai_down_matches_the_documented_job_label() -> None:
    rule = next(rule for rule in load_rules() if rule.get("alert") == "RadaiDown")
    assert 'job="radai"' in rule["expr"]
    assert "job_name: radai" in README.read_text()


# --- Grafana dashboard ------------------------------------------------------------------------------------


def test_dashboard_has_uid_variables_and_unique_panel_ids() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "radai-overview"
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["query"]["query"] == "label_values(radai_study_stage_seconds_bucket, model)"
    ids = [panel["id"] for panel in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), ids


def test_every_dashboard_panel_queries_prometheus_through_the_datasource_variable() -> None:
    for panel in all_panels(load_dashboard()["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


def test_dashboard_queries_name_only_registry_metrics_and_recording_rules() -> None:
    queries = dashboard_queries()
    assert len(queries) > 20
    assert unknown_names(queries) == []


def test_dashboard_shows_every_registry_metric() -> None:
    text = " ".join(expr for _, expr in dashboard_queries())
    used = set(NAME.findall(text))
    missing = [
        name
        for name, kind in families().items()
        if not any(name + suffix in used for suffix in EXPOSED_SUFFIXES[kind])
    ]
    assert missing == []


def test_promtool_parses_every_dashboard_query(promtool: str, tmp_path: Path) -> None:
    # promtool checks PromQL only inside rule files: each query becomes a recording rule of a scratch file.
    rules = []
    for index, (_, expr) in enumerate(dashboard_queries()):
        if expr.startswith("label_values("):  # Grafana's variable function, not PromQL
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unsubstituted Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    scratch = tmp_path / "dashboard-queries.yaml"
    scratch.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    output = run_promtool(promtool, "check", "rules", str(scratch))
    assert f"SUCCESS: {len(rules)} rules found" in output


# --- docs/metrics.md --------------------------------------------------------------------------------------


def documented_sections() -> dict[str, str]:
    """Metric name -> its section of docs/metrics.md (headings `### `radai_...``)."""
    parts = re.split(r"^### `(radai_[a-z0-9_]+)`\s*$", METRICS_DOC.read_text(), flags=re.MULTILINE)
    return {parts[i]: parts[i + 1].split("\n## ")[0] for i in range(1, len(parts), 2)}


def test_every_registry_metric_is_documented() -> None:
    documented = set(documented_sections())
    missing = sorted(
        documented_name(n, k) for n, k in families().items() if documented_name(n, k) not in documented
    )
    assert missing == [], "add these metrics to docs/metrics.md"


def test_every_documented_metric_is_in_the_registry() -> None:
    exported = {documented_name(n, k) for n, k in families().items()}
    stale = sorted(set(documented_sections()) - exported)
    assert stale == [], "docs/metrics.md documents metrics radai does not export"


def test_documented_types_and_label_names_match_the_registry() -> None:
    sections = documented_sections()
    labels = label_names()
    for name, kind in families().items():
        section = sections.get(documented_name(name, kind))
        if section is None:
            continue  # reported by test_every_registry_metric_is_documented
        assert f"Type: {kind}." in section, name
        documented_labels = tuple(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))
        assert name in labels, f"{name}: a collector without COLLECTOR_LABELS"
        assert sorted(documented_labels) == sorted(labels[name]), name
