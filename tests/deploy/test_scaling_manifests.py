"""The scaling and routing manifests (components/keda-autoscaling, hpa-autoscaling,
pod-disruption-budget, inferencepool, and the Kaito Workspace in kaito-workspace/), as
`kubectl kustomize` renders them on every overlay: valid objects (core kinds against the
Kubernetes schemas, custom kinds against their CRD subsets in schemas/), and what a
schema cannot see: names after the overlay's prefix, selectors that pick exactly the
serving pods, the container port, the query's labels on the pods, the autoscaler's timings
against the pod's drain, and the queries' PromQL checked by promtool."""

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_support import (
    KUBERNETES_VERSION,
    MANIFESTS,
    OLDEST_KUBERNETES_VERSION,
    Rendered,
    kustomize,
    render_overlay,
    validate_object,
)
from tests.deploy.test_prometheus_scrape import sanitize

# Each render adds these components to an overlay, as a user would list them.
COMBINATIONS = (
    ("keda-autoscaling",),
    ("hpa-autoscaling",),
    ("inferencepool",),
    ("keda-autoscaling", "inferencepool", "servicemonitor"),
)
AUTOSCALERS = {"keda-autoscaling": "ScaledObject", "hpa-autoscaling": "HorizontalPodAutoscaler"}
QUEUE_METRICS = {"vllm:num_requests_waiting", "kaito_hf_queue_depth"}
ADAPTER_VALUES = MANIFESTS / "components" / "hpa-autoscaling" / "prometheus-adapter-values.yaml"
CONTAINER_PORT = 5000


@pytest.fixture(scope="module")
def scaling_renders(
    deployment_overlay_names: list[str], tmp_path_factory: pytest.TempPathFactory
) -> list[Rendered]:
    return [
        render_overlay(name, combo, tmp_path_factory.mktemp(name))
        for name in deployment_overlay_names
        for combo in COMBINATIONS
    ]


@pytest.fixture(scope="module")
def workspace_render() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(kustomize(MANIFESTS / "kaito-workspace")) if d]


def autoscaled(renders: list[Rendered]) -> list[tuple[Rendered, dict[str, Any]]]:
    """(render, its ScaledObject or HPA) for every render with an autoscaler."""
    return [
        (r, r.one(kind)) for r in renders for c, kind in AUTOSCALERS.items() if c in r.components
    ]


def query_of(scaled_object: dict[str, Any]) -> str:
    (trigger,) = scaled_object["spec"]["triggers"]
    return str(trigger["metadata"]["query"])


def matchers(promql: str) -> dict[str, str]:
    """The `label="value"` matchers of a PromQL selector (equality matchers only)."""
    return dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"', promql))


def metric_names(promql: str) -> set[str]:
    (names,) = re.findall(r'__name__=~"([^"]*)"', promql)
    return set(names.split("|"))


# --- rendering and schemas -------------------------------------------------------------


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, OLDEST_KUBERNETES_VERSION])
def test_objects_validate(
    scaling_renders: list[Rendered], workspace_render: list[dict[str, Any]], version: str
) -> None:
    for r in scaling_renders:
        for doc in r.docs:
            validate_object(doc, version, f"{r.id}: {doc['kind']}/{doc['metadata']['name']}")
    for doc in workspace_render:
        validate_object(doc, version, f"kaito-workspace: {doc['kind']}")


def test_components_render_their_objects(scaling_renders: list[Rendered]) -> None:
    for r in scaling_renders:
        kinds = {d["kind"] for d in r.docs}
        if "keda-autoscaling" in r.components:
            assert {"ScaledObject", "PodDisruptionBudget"} <= kinds, r.id
        if "hpa-autoscaling" in r.components:
            assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds, r.id
        if "inferencepool" in r.components:
            assert {"InferencePool", "HTTPRoute"} <= kinds, r.id


def test_schemas_reject_unknown_fields(scaling_renders: list[Rendered]) -> None:
    """The CRD subsets are strict: a misspelt field fails (the API server would drop it)."""
    r = next(r for r in scaling_renders if r.components == COMBINATIONS[-1])
    for kind in ("ScaledObject", "InferencePool", "HTTPRoute"):
        doc = yaml.safe_load(yaml.safe_dump(r.one(kind)))
        doc["spec"]["replicaCount"] = 2
        with pytest.raises(pytest.fail.Exception, match="Additional properties"):
            validate_object(doc, KUBERNETES_VERSION, kind)


# --- autoscaling -------------------------------------------------------------------------


def test_autoscaler_targets_this_deployment(scaling_renders: list[Rendered]) -> None:
    for r, scaler in autoscaled(scaling_renders):
        ref = scaler["spec"]["scaleTargetRef"]
        assert ref["name"] == r.deployment["metadata"]["name"], r.id
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment"), r.id
        # The autoscaler owns the count: an applied `replicas` would reset it.
        assert "replicas" not in r.deployment["spec"], r.id


def test_query_sums_this_instances_queues(scaling_renders: list[Rendered]) -> None:
    queries = {}
    for r in scaling_renders:
        if "keda-autoscaling" not in r.components:
            continue
        promql = query_of(r.one("ScaledObject"))
        # The pool's total: with AverageValue KEDA's HPA divides by the threshold itself.
        assert promql.startswith("sum(") and " by " not in promql, promql
        assert "avg" not in promql, promql
        assert metric_names(promql) == QUEUE_METRICS, promql
        # Every label the query filters on is a label of the serving pods (as Prometheus
        # names it), with the pods' value: the pods' series match, no other instance's do.
        pod_labels = {
            sanitize(k): v
            for k, v in r.deployment["spec"]["template"]["metadata"]["labels"].items()
        }
        filters = {k: v for k, v in matchers(promql).items() if k != "__name__"}
        assert filters, promql
        assert filters.items() <= pod_labels.items(), (r.id, filters, pod_labels)
        assert "app_kubernetes_io_instance" in filters, promql
        queries[r.name] = promql
    assert len(set(queries.values())) == len(queries), "two overlays share one query"


def test_servicemonitor_carries_the_querys_labels(scaling_renders: list[Rendered]) -> None:
    """Through the Prometheus Operator the series carry only the pod labels the
    ServiceMonitor names in podTargetLabels: the query's labels must be among them."""
    for r in scaling_renders:
        if not {"servicemonitor", "keda-autoscaling"} <= set(r.components):
            continue
        carried = {sanitize(k) for k in r.one("ServiceMonitor")["spec"]["podTargetLabels"]}
        filters = set(matchers(query_of(r.one("ScaledObject")))) - {"__name__"}
        assert filters <= carried, (r.id, filters, carried)


def test_keda_and_hpa_scale_alike(scaling_renders: list[Rendered]) -> None:
    """One policy in two forms: threshold, bounds and behaviour agree."""
    for name in {r.name for r in scaling_renders}:
        keda = next(
            r.one("ScaledObject")
            for r in scaling_renders
            if r.name == name and "keda-autoscaling" in r.components
        )
        hpa = next(
            r.one("HorizontalPodAutoscaler")
            for r in scaling_renders
            if r.name == name and "hpa-autoscaling" in r.components
        )
        (trigger,) = keda["spec"]["triggers"]
        assert trigger["metricType"] == "AverageValue"
        (metric,) = hpa["spec"]["metrics"]
        assert metric["pods"]["target"]["type"] == "AverageValue"
        assert float(metric["pods"]["target"]["averageValue"]) == float(
            trigger["metadata"]["threshold"]
        )
        assert keda["spec"]["minReplicaCount"] == hpa["spec"]["minReplicas"]
        assert keda["spec"]["maxReplicaCount"] == hpa["spec"]["maxReplicas"]
        behavior = keda["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior == hpa["spec"]["behavior"]


def test_replica_bounds(scaling_renders: list[Rendered]) -> None:
    for r, scaler in autoscaled(scaling_renders):
        spec = scaler["spec"]
        low = spec.get("minReplicaCount", spec.get("minReplicas"))
        high = spec.get("maxReplicaCount", spec.get("maxReplicas"))
        # At least one replica always (a cold start loads the model for minutes).
        assert 1 <= low < high, r.id


def test_scale_down_leaves_time_to_drain(scaling_renders: list[Rendered]) -> None:
    """Up at once; down slowly, one pod at a time, each removal at least a full
    termination grace apart, so one replica drains while the others take its traffic."""
    for r, scaler in autoscaled(scaling_renders):
        spec = scaler["spec"]
        behavior = (
            spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            if scaler["kind"] == "ScaledObject"
            else spec["behavior"]
        )
        grace = r.pod["terminationGracePeriodSeconds"]
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0, r.id
        down = behavior["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 300, r.id
        assert down["selectPolicy"] == "Min", r.id
        for policy in down["policies"]:
            assert policy["type"] == "Pods" and policy["value"] == 1, (r.id, policy)
            assert policy["periodSeconds"] >= grace, (r.id, policy, grace)


def test_pdb_covers_exactly_the_serving_pods(scaling_renders: list[Rendered]) -> None:
    for r in scaling_renders:
        if not r.of_kind("PodDisruptionBudget"):
            continue
        pdb = r.one("PodDisruptionBudget")
        assert pdb["metadata"]["name"] == r.deployment["metadata"]["name"], r.id
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert selector == r.deployment["spec"]["selector"]["matchLabels"], r.id
        # maxUnavailable, not minAvailable: a single replica never blocks a node drain.
        assert pdb["spec"] == {**pdb["spec"], "maxUnavailable": 1}, r.id
        assert "minAvailable" not in pdb["spec"], r.id


@pytest.mark.parametrize("autoscaler", sorted(AUTOSCALERS))
@pytest.mark.parametrize("cache_first", [True, False])
def test_readwriteonce_cache_with_an_autoscaler_fails_the_build(
    autoscaler: str, cache_first: bool, tmp_path: Path
) -> None:
    """Replicas on several nodes cannot mount one ReadWriteOnce claim: the build stops,
    whichever order the components are listed in."""
    combo = ("model-cache-pvc", autoscaler) if cache_first else (autoscaler, "model-cache-pvc")
    with pytest.raises(pytest.fail.Exception, match=r"testing value /spec/\w+(/0)? failed"):
        render_overlay("cpu", combo, tmp_path)


def test_promql_is_valid(scaling_renders: list[Rendered], tmp_path: Path) -> None:
    """promtool parses the ScaledObject's query and the adapter's metricsQuery (its
    template filled in as prometheus-adapter does for one pod)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (Debian: apt-get install -y prometheus)")
    r = next(r for r in scaling_renders if "keda-autoscaling" in r.components)
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    adapter = (
        rule["metricsQuery"]
        .replace("<<.GroupBy>>", "pod")
        .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"cpu-chat-.*"')
    )
    rules = {
        "groups": [
            {
                "name": "scaling",
                "rules": [
                    {"record": "keda_query", "expr": query_of(r.one("ScaledObject"))},
                    {"record": "adapter_query", "expr": adapter},
                    {"record": "adapter_series", "expr": rule["seriesQuery"]},
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_adapter_rule_serves_the_hpas_metric(scaling_renders: list[Rendered]) -> None:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    hpa = next(
        r.one("HorizontalPodAutoscaler")
        for r in scaling_renders
        if "hpa-autoscaling" in r.components
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    # Discovered through a series every pod exports, whichever backend serves.
    assert rule["seriesQuery"].startswith("kaito_hf_queue_depth{")
    assert re.fullmatch(rule["name"]["matches"], "kaito_hf_queue_depth")
    # The same sum as the ScaledObject's query, per pod.
    assert metric_names(rule["metricsQuery"]) == QUEUE_METRICS
    assert rule["metricsQuery"].startswith("sum by (<<.GroupBy>>)")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


# --- routing -----------------------------------------------------------------------------


def test_inferencepool_selects_the_serving_pods(scaling_renders: list[Rendered]) -> None:
    for r in scaling_renders:
        if "inferencepool" not in r.components:
            continue
        pool = r.one("InferencePool")
        selector = pool["spec"]["selector"]["matchLabels"]
        pod_labels = r.deployment["spec"]["template"]["metadata"]["labels"]
        # Exactly the Deployment's own selector: this instance's pods, no other's.
        assert selector == r.deployment["spec"]["selector"]["matchLabels"], r.id
        assert selector.items() <= pod_labels.items(), r.id
        (port,) = pool["spec"]["targetPorts"]
        (container_port,) = r.container["ports"]
        assert port["number"] == container_port["containerPort"] == CONTAINER_PORT, r.id
        # The picker reads vLLM's metric names from pods labelled as vLLM.
        assert pod_labels["llm-d.ai/engine-type"] == "vllm", r.id
        # The llm-d chart installed with the pool's name as release serves <release>-epp.
        picker = pool["spec"]["endpointPickerRef"]
        assert picker["name"] == pool["metadata"]["name"] + "-epp", r.id
        assert picker["port"]["number"] == 9002, r.id


def test_httproute_routes_to_this_pool(scaling_renders: list[Rendered]) -> None:
    for r in scaling_renders:
        if "inferencepool" not in r.components:
            continue
        (rule,) = r.one("HTTPRoute")["spec"]["rules"]
        (backend,) = rule["backendRefs"]
        assert backend["name"] == r.one("InferencePool")["metadata"]["name"], r.id
        assert (backend["group"], backend["kind"]) == (
            "inference.networking.k8s.io",
            "InferencePool",
        )
        # /chat and the rest of the API go through (a path match that left /chat out would
        # fall to the Gateway's 404).
        (match,) = rule["matches"]
        assert match["path"] == {"type": "PathPrefix", "value": "/"}, r.id


# --- Kaito Workspace ---------------------------------------------------------------------


def test_workspace_runs_the_overlays_pod(
    workspace_render: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The Workspace's inference template is the mistral-7b-instruct overlay's pod (one
    source: probes, drain, security), a valid PodTemplate, with its ConfigMap beside it."""
    kinds = sorted(d["kind"] for d in workspace_render)
    # Kaito makes the workload and the Service (port 80 -> 5000) from the Workspace.
    assert kinds == ["ConfigMap", "Workspace"], kinds
    workspace = next(d for d in workspace_render if d["kind"] == "Workspace")
    template = workspace["inference"]["template"]
    for version in (KUBERNETES_VERSION, OLDEST_KUBERNETES_VERSION):
        validate_object(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "t"},
                "template": template,
            },
            version,
            "Workspace inference.template",
        )
    overlay = render_overlay("mistral-7b-instruct", (), tmp_path)
    assert template == overlay.deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == CONTAINER_PORT
    (config_map,) = (d for d in workspace_render if d["kind"] == "ConfigMap")
    (ref,) = container["envFrom"]
    assert ref["configMapRef"]["name"] == config_map["metadata"]["name"]
    assert config_map["data"]["KAITO_PORT"] == str(CONTAINER_PORT)


# --- models ------------------------------------------------------------------------------


def test_model_overlays_serve_kaitos_preset_models(scaling_renders: list[Rendered]) -> None:
    """Kaito's preset names -> the hub models, and a context the model was trained for."""
    expected = {
        "mistral-7b": ("mistralai/Mistral-7B-v0.1", 8192),
        "mistral-7b-instruct": ("mistralai/Mistral-7B-Instruct-v0.2", 32768),
    }
    for r in scaling_renders:
        if r.name not in expected:
            continue
        model, context = expected[r.name]
        env = r.config_env
        assert env["KAITO_MODEL"] == model, r.id
        assert env["KAITO_SERVED_MODEL_NAME"] == r.name, r.id
        assert 0 < int(env["KAITO_MAX_MODEL_LEN"]) <= context, r.id
