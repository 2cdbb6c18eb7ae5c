"""The dashboard and the alert rules against real data: a real Prometheus scrapes the live
server the way the ServiceMonitor component tells the Prometheus Operator to, real traffic
runs, and then

- every PromQL expression of the dashboard returns data (finite values), with its
  template variables set to this server's namespace and instance and to "All";
- the dashboard's variable queries list this server's namespace and instance;
- every metric name in the dashboard and the alert rules is one the server exports
  (Prometheus scraped it), so a renamed or misspelt metric fails here;
- every series selector of the alert rules selects scraped series: the label the rules
  select by reaches the series through the ServiceMonitor's podTargetLabels.

No cluster here: the pod is a static target carrying the `__meta_kubernetes_*` labels
Kubernetes service discovery would give it, and the relabelling is the one the Prometheus
Operator generates for the rendered ServiceMonitor (the fields it uses). As in
test_prometheus_scrape.py, the address is mapped to the test server's random port.
"""

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tests.deploy.deploy_support import MANIFESTS, Rendered
from tests.deploy.promql import metric_names
from tests.deploy.test_prometheus_scrape import POD_IP, query, run_prometheus, sanitize

pytestmark = pytest.mark.integration

DASHBOARD = MANIFESTS / "components" / "grafana-dashboard" / "kaito-chat-dashboard.json"
RULES = MANIFESTS / "components" / "prometheus-rules" / "kaito-chat.rules.yaml"
NAMESPACE = "default"
SCRAPE_INTERVAL = "1s"
WAIT_S = 120
# Grafana's $__rate_interval is at least four scrape intervals; five minutes keep this
# test's traffic in the window however slowly a busy machine answers the queries.
RATE_INTERVAL = "5m"
# Series Prometheus makes itself, not the server.
PROMETHEUS_SERIES = {"up"}


def operator_scrape_config(r: Rendered, server_port: int) -> dict[str, Any]:
    """The scrape job the Prometheus Operator makes of this ServiceMonitor, over one pod."""
    monitor, service = r.one("ServiceMonitor"), r.one("Service")
    (endpoint,) = monitor["spec"]["endpoints"]
    template = r.deployment["spec"]["template"]
    (container_port,) = r.container["ports"]
    (service_port,) = service["spec"]["ports"]
    meta = {
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_service_name": service["metadata"]["name"],
        "__meta_kubernetes_endpoint_port_name": service_port["name"],
        "__meta_kubernetes_pod_name": f"{r.deployment['metadata']['name']}-0",
        "__meta_kubernetes_pod_container_name": r.container["name"],
    }
    for key, value in service["metadata"].get("labels", {}).items():
        meta[f"__meta_kubernetes_service_label_{sanitize(key)}"] = value
    for key, value in template["metadata"].get("labels", {}).items():
        meta[f"__meta_kubernetes_pod_label_{sanitize(key)}"] = value
    serving = f"{POD_IP}:{container_port['containerPort']}"
    relabel: list[dict[str, Any]] = [
        # spec.selector.matchLabels: only the Services carrying these labels.
        {
            "source_labels": [f"__meta_kubernetes_service_label_{sanitize(k)}"],
            "action": "keep",
            "regex": v,
        }
        for k, v in monitor["spec"]["selector"]["matchLabels"].items()
    ]
    relabel += [
        {
            "source_labels": ["__meta_kubernetes_endpoint_port_name"],
            "action": "keep",
            "regex": endpoint["port"],
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
    ]
    relabel += [
        {
            "source_labels": [f"__meta_kubernetes_pod_label_{sanitize(label)}"],
            "regex": "(.+)",
            "target_label": sanitize(label),
            "replacement": "${1}",
        }
        for label in monitor["spec"].get("podTargetLabels", [])
    ]
    relabel += [
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
        # The test's one change: the pod's address -> the test server's random port.
        {
            "source_labels": ["__address__"],
            "regex": re.escape(serving),
            "replacement": f"{POD_IP}:{server_port}",
            "target_label": "__address__",
        },
    ]
    job = f"serviceMonitor/{NAMESPACE}/{monitor['metadata']['name']}/0"
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "metrics_path": endpoint["path"],
                "static_configs": [{"targets": [serving], "labels": meta}],
                "relabel_configs": relabel,
            }
        ],
    }


@pytest.fixture
def monitored(renders: list[Rendered]) -> Rendered:
    return next(r for r in renders if r.name == "cpu" and "servicemonitor" in r.components)


@pytest.fixture
def prometheus_operator_style(
    monitored: Rendered, server_url: str, tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    server = urlsplit(server_url)
    assert server.hostname == POD_IP and server.port, "loopback only"
    with run_prometheus(operator_scrape_config(monitored, server.port), tmp_path) as running:
        yield running


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for g in groups for rule in g["rules"]]


def grafana_regex_value(value: str) -> str:
    """A variable value as Grafana writes it into a Prometheus regex matcher (multi-value
    variables are regex-escaped; inside a PromQL string the backslash is doubled)."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def substitute(expr: str, namespace: str, instance: str) -> str:
    out = (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$namespace", namespace)
        .replace("$instance", instance)
    )
    assert "$" not in out, f"a template variable this test does not know: {out}"
    return out


def finite(result: list[dict[str, Any]]) -> bool:
    return bool(result) and all(math.isfinite(float(s["value"][1])) for s in result)


def wait_until_scraped(base: str, log: Path) -> str:
    """Waits for the first good scrape; returns the target's instance label."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if result := query(base, "up == 1"):
                return str(result[0]["metric"]["instance"])
        except httpx.HTTPError:
            pass  # still starting
        time.sleep(0.5)
    pytest.fail(f"Prometheus never scraped the server; its log:\n{log.read_text()[-3000:]}")


def real_traffic(server_url: str) -> None:
    """Generations on both routes, a client mistake, and a client that goes away (499)."""
    ok = httpx.post(
        server_url + "/chat",
        json={"prompt": "Once upon a time", "generate_kwargs": {"max_new_tokens": 8}},
        timeout=120,
    )
    assert ok.status_code == 200, ok.text
    models = httpx.get(server_url + "/v1/models", timeout=30).json()
    v1 = httpx.post(
        server_url + "/v1/completions",
        json={"model": models["data"][0]["id"], "prompt": "Once upon a time", "max_tokens": 8},
        timeout=120,
    )
    assert v1.status_code == 200, v1.text
    bad = httpx.post(
        server_url + "/chat",
        json={"prompt": "x", "generate_kwargs": {"max_new_tokens": -1}},
        timeout=30,
    )
    assert bad.status_code in (400, 422), bad.text
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server_url + "/chat",
            json={"prompt": "Once upon a time", "generate_kwargs": {"max_new_tokens": 2000}},
            timeout=1.0,
        )


def test_every_dashboard_query_returns_data_and_every_metric_exists(
    prometheus_operator_style: tuple[str, Path], server_url: str
) -> None:
    base, log = prometheus_operator_style
    instance = wait_until_scraped(base, log)
    time.sleep(2)  # a scrape before the traffic: rates then see it as an increase
    real_traffic(server_url)

    variants = {
        "this namespace and instance": (NAMESPACE, grafana_regex_value(instance)),
        "All": (".*", ".*"),
    }
    pending = {
        (name, expr): substitute(expr, *values)
        for name, values in variants.items()
        for expr in dashboard_expressions()
    }
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    deadline = time.monotonic() + WAIT_S
    while pending and time.monotonic() < deadline:
        for key, promql in list(pending.items()):
            try:
                results[key] = query(base, promql)
            except httpx.TimeoutException:
                continue  # a loaded machine; asked again on the next pass
            if finite(results[key]):
                del pending[key]
        time.sleep(1)
    assert not pending, "dashboard queries without data after real traffic:\n" + "\n".join(
        f"[{name}] {promql} -> {results.get((name, expr))}"
        for (name, expr), promql in pending.items()
    )

    # The variables' own queries (Grafana's label_values) list this server.
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"] if v["type"] == "query"}
    expected = {"namespace": NAMESPACE, "instance": instance}
    assert set(variables) == set(expected)
    for name, variable in variables.items():
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        assert found, variable
        selector = substitute(found.group(1), NAMESPACE, ".*")
        values = httpx.get(
            f"{base}/api/v1/label/{found.group(2)}/values",
            params={"match[]": selector},
            timeout=5,
        ).json()["data"]
        assert expected[name] in values, (name, values)

    # Every metric named anywhere is one the server exports.
    exported = set(httpx.get(f"{base}/api/v1/label/__name__/values", timeout=5).json()["data"])
    named = {n for e in dashboard_expressions() + rule_expressions() for n in metric_names(e)}
    missing = named - exported - PROMETHEUS_SERIES
    assert not missing, f"metrics the server does not export: {sorted(missing)}"
    # The check is not vacuous: a misspelt name is caught.
    assert metric_names("sum(rate(kaito_request_total[1m]))") - exported == {"kaito_request_total"}


def test_alert_selectors_select_the_scraped_series(
    prometheus_operator_style: tuple[str, Path], server_url: str
) -> None:
    base, log = prometheus_operator_style
    wait_until_scraped(base, log)
    # One generation so the engine's histograms and counters have series.
    reply = httpx.post(
        server_url + "/chat",
        json={"prompt": "Once upon a time", "generate_kwargs": {"max_new_tokens": 4}},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    # Each series selector, narrowed to the pod label every rule selects by: a 5xx
    # selector selects nothing on a healthy server, but its metric and label must exist.
    selectors = set()
    for expr in rule_expressions():
        for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{[^{}]*\})", expr):
            app = re.search(r'app_kubernetes_io_name="[^"]*"', m.group(2))
            assert app, f"a rule selector without the pod label: {m.group(0)}"
            selectors.add(f"{m.group(1)}{{{app.group(0)}}}")
    assert selectors
    empty = set(selectors)
    deadline = time.monotonic() + 60
    while empty and time.monotonic() < deadline:
        for selector in list(empty):
            try:
                if query(base, f"count({selector})"):
                    empty.discard(selector)
            except httpx.TimeoutException:
                pass  # a loaded machine; asked again on the next pass
        time.sleep(1)
    assert not empty, f"alert selectors that select nothing the server exports: {sorted(empty)}"
