"""The alert rules and the Grafana dashboard, without a server: `promtool check rules` and
`promtool test rules` (Debian's prometheus package brings promtool), every alert tested
firing and silent, each with a runbook section; the PrometheusRule is the rules file; the
dashboard is well formed and every query is scoped by its template variables. Their
queries against real data: test_observability_live.py."""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_support import MANIFESTS, REPO, Rendered
from tests.deploy.promql import matcher_blocks, metric_names

RULES_DIR = MANIFESTS / "components" / "prometheus-rules"
RULES = RULES_DIR / "kaito-chat.rules.yaml"
PROMETHEUSRULE = RULES_DIR / "prometheusrule.yaml"
UNIT_TESTS = Path(__file__).parent / "prometheus" / "alerts-test.yaml"
DASHBOARD = MANIFESTS / "components" / "grafana-dashboard" / "kaito-chat-dashboard.json"
RUNBOOKS = REPO / "docs/OBSERVABILITY.md"
POD_LABEL = "app.kubernetes.io/name"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: it checks and unit-tests the alert rules "
            "(Debian: `apt-get install -y prometheus`; scripts/install-test-tools.sh does)"
        )
    return path


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for g in groups for rule in g["rules"] if "alert" in rule]


def with_components(renders: list[Rendered], component: str) -> list[Rendered]:
    found = [r for r in renders if component in r.components]
    assert found, f"no render with {component}"
    return found


# --- alert rules ----------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", str(UNIT_TESTS)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    cases = [
        case
        for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    names = {a["alert"] for a in alerts()}
    assert names - fires == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested staying silent"
    assert fires | silent <= names, "tests for alerts that do not exist"


def test_every_alert_has_severity_summary_description_and_a_runbook() -> None:
    docs = RUNBOOKS.read_text()
    headings = re.findall(r"^### (\S+)$", docs, flags=re.MULTILINE)
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        notes = alert["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), name
        # GitHub's anchor for a "### Name" heading is the name in lower case.
        assert notes["runbook_url"] == f"docs/OBSERVABILITY.md#{name.lower()}", name
        assert name in headings, f"no runbook section `### {name}` in {RUNBOOKS.name}"
        section = docs.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        assert "**Look at**" in section and "**Do**" in section, name


def test_every_rule_selects_the_servers_pods(renders: list[Rendered]) -> None:
    """The rules select by the pod label that both scrape setups copy onto the series:
    the ServiceMonitor's podTargetLabels and the kubernetes-pods job's labelmap."""
    for alert in alerts():
        blocks = matcher_blocks(alert["expr"])
        assert blocks, alert["alert"]
        for block in blocks:
            assert 'app_kubernetes_io_name="kaito-chat"' in block, (alert["alert"], block)
    for r in renders:
        assert r.deployment["spec"]["template"]["metadata"]["labels"][POD_LABEL] == "kaito-chat"
    for r in with_components(renders, "servicemonitor"):
        assert POD_LABEL in r.one("ServiceMonitor")["spec"]["podTargetLabels"], r.id


def test_the_prometheusrule_is_the_rules_file(renders: list[Rendered]) -> None:
    spec = yaml.safe_load(RULES.read_text())
    for r in with_components(renders, "prometheus-rules"):
        assert r.one("PrometheusRule")["spec"] == spec, r.id
    # The committed file is what the generator writes now (`make prometheus-rules`).
    loader = importlib.util.spec_from_file_location(
        "render_prometheusrule", REPO / "scripts" / "render_prometheusrule.py"
    )
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    assert PROMETHEUSRULE.read_text() == module.render(), (
        f"{PROMETHEUSRULE.relative_to(REPO)} is stale: run `make prometheus-rules`"
    )


# --- dashboard --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def targets(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in dashboard["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["title"] and p["description"], p
        # A data source variable, so the import and the sidecar both work on any cluster.
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_dashboard_variables_scope_every_query(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for name in ("namespace", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"], name
        assert variables[name]["allValue"] == ".*", name
    for t in targets(dashboard):
        for block in matcher_blocks(t["expr"]):
            assert 'namespace=~"$namespace"' in block, t["expr"]
            assert 'instance=~"$instance"' in block, t["expr"]


def test_dashboard_shows_what_an_operator_needs(dashboard: dict[str, Any]) -> None:
    exprs = [t["expr"] for t in targets(dashboard)]
    names = {n for e in exprs for n in metric_names(e)}
    wanted = {
        "kaito_requests_total",  # request rate by route and status, errors
        "kaito_backend_requests_total",  # by backend
        "kaito_request_duration_seconds_bucket",  # end-to-end latency
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:request_time_per_output_token_seconds_bucket",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",  # tokens in
        "vllm:generation_tokens_total",  # tokens out
        "kaito_hf_queue_depth",  # the transformers backend's queue
    }
    assert wanted <= names, sorted(wanted - names)
    for status in ('status="429"', 'status="499"', 'status="504"', 'status=~"5.."'):
        assert any(status in e for e in exprs), status


def test_dashboard_configmap_is_for_grafanas_sidecar(renders: list[Rendered]) -> None:
    text = DASHBOARD.read_text()
    for r in with_components(renders, "grafana-dashboard"):
        (cm,) = [
            c for c in r.of_kind("ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]
        ]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", r.id
        assert cm["data"] == {DASHBOARD.name: text}, r.id


# --- the PromQL helper the dashboard and alert tests use ---------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{a="b"} == 0', {"up"}),
        ("sum by (le) (rate(x_bucket{a=~\"$v\"}[$__rate_interval]))", {"x_bucket"}),
        ('sum(rate(a_total{s="5.."}[1m])) or 0 * sum(rate(a_total[1m]))', {"a_total"}),
        ("vllm:w{x=\"y\"} > 10\nand deriv(vllm:w{x=\"y\"}[10m]) > 0", {"vllm:w"}),
        ("sum by (ns) (rate(a[5m])) / on(ns) group_left(pod) b > 0.05", {"a", "b"}),
    ],
)  # fmt: skip
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
