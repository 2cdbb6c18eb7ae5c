"""Models bigger than one GPU, as manifests: components/multi-gpu (one pod, N GPUs, tensor
parallel N) and overlays/multinode (a LeaderWorkerSet group of nodes: tensor parallel
inside a node, pipeline parallel across, vLLM's Ray executor), with overlays/multinode-keda
scaling its groups.

No cluster here: the LeaderWorkerSet is validated against a schema written from the
upstream CRD for the fields used (unknown fields rejected), its two pod templates as core
Pods, and the rest by tests of what a schema cannot see: which pods the Service and the
NetworkPolicies select, parallel sizes = GPUs per pod x group size, /dev/shm on both
templates, the leader's and workers' start scripts."""

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.settings import Settings
from tests.deploy.deploy_support import (
    KUBERNETES_VERSION,
    MANIFESTS,
    OLDEST_KUBERNETES_VERSION,
    Dockerfile,
    Rendered,
    kustomize,
    render_overlay,
    validate_object,
)
from tests.deploy.test_deploy_manifests import check_known, vllm_env_names

LWS_SCHEMA = Path(__file__).parent / "schemas" / "leaderworkerset-lws-v1.json"
CONTAINER_PORT = 5000
RAY_PORT = 6379
# What the LeaderWorkerSet controller adds to each pod (upstream
# api/leaderworkerset/v1/leaderworkerset_types.go): a Service or policy must not rely on
# them being absent.
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"


def docs(directory: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(kustomize(directory)) if d]


def one(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [
        d for d in objects if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)
    ]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def multinode() -> list[dict[str, Any]]:
    return docs(MANIFESTS / "overlays" / "multinode")


@pytest.fixture(scope="module")
def keda() -> list[dict[str, Any]]:
    return docs(MANIFESTS / "overlays" / "multinode-keda")


@pytest.fixture(scope="module")
def lws(multinode: list[dict[str, Any]]) -> dict[str, Any]:
    return one(multinode, "LeaderWorkerSet")


def template(lws: dict[str, Any], role: str) -> dict[str, Any]:
    return lws["spec"]["leaderWorkerTemplate"][f"{role}Template"]  # type: ignore[no-any-return]


def container(lws: dict[str, Any], role: str) -> dict[str, Any]:
    (c,) = template(lws, role)["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def pod_labels(lws: dict[str, Any], role: str, group: int = 0, index: int = 0) -> dict[str, str]:
    """A pod's labels as the controller makes them: the template's plus its own."""
    return {
        **template(lws, role)["metadata"]["labels"],
        LWS_NAME_LABEL: lws["metadata"]["name"],
        WORKER_INDEX_LABEL: str(index),
        "leaderworkerset.sigs.k8s.io/group-index": str(group),
    }


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def settings_env(objects: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    names = [s["configMapRef"]["name"] for s in c.get("envFrom", [])]
    env: dict[str, str] = {}
    for cm in objects:
        if cm["kind"] == "ConfigMap" and cm["metadata"]["name"] in names:
            env.update(cm["data"])
    assert env, f"{c['name']}: its envFrom names no rendered ConfigMap"
    return env


def script(c: dict[str, Any]) -> str:
    assert c["command"] == ["/bin/sh", "-c"], c["name"]
    (text,) = c["args"]
    return text  # type: ignore[no-any-return]


def gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return float(number) / (1024 if unit == "Mi" else 1)


# --- schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, OLDEST_KUBERNETES_VERSION])
def test_objects_validate(keda: list[dict[str, Any]], version: str) -> None:
    kinds = sorted(d["kind"] for d in keda)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Service",
            "LeaderWorkerSet",
            "NetworkPolicy",
            "NetworkPolicy",
            "ScaledObject",
        ]
    )
    for doc in keda:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        validate_object(doc, version, where)
        if doc["kind"] == "LeaderWorkerSet":
            for role in ("leader", "worker"):
                t = template(doc, role)
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": t["metadata"] | {
                    "name": f"{role}"}, "spec": t["spec"]}  # fmt: skip
                validate_object(pod, version, f"{where}: the {role} template as a Pod")


def test_schema_rejects_unknown_fields(lws: dict[str, Any]) -> None:
    """The schema is closed: a misspelt field fails instead of being dropped by the API."""
    schema = json.loads(LWS_SCHEMA.read_text())
    bad = json.loads(json.dumps(lws))
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "RecreateGroupOnPodRestrt"
    bad["spec"]["leaderWorkerTemplate"]["sise"] = 2
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(bad))
    assert len(errors) == 2


# --- the group --------------------------------------------------------------------------


def test_group_recreated_when_a_member_fails_and_workers_start_with_the_leader(
    lws: dict[str, Any],
) -> None:
    spec = lws["spec"]
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    # The leader waits for its workers: LeaderReady would create them only once the leader
    # is ready, which it never is without them.
    assert spec["startupPolicy"] == "LeaderCreated"


def test_parallel_sizes_are_gpus_per_pod_times_group_size(
    multinode: list[dict[str, Any]], lws: dict[str, Any], clean_kaito_env: pytest.MonkeyPatch
) -> None:
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    assert size >= 2, "a multi-node example needs a group of nodes"
    gpus = set()
    for role in ("leader", "worker"):
        c = container(lws, role)
        resources = c["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        gpus.add(resources["limits"]["nvidia.com/gpu"])
        # Ray must announce the GPUs the pod got, no more, no fewer.
        (ray_gpus,) = re.findall(r"--num-gpus=(\d+)", script(c))
        assert int(ray_gpus) == resources["limits"]["nvidia.com/gpu"], role
    (per_pod,) = gpus
    env = settings_env(multinode, container(lws, "leader"))
    for key, value in env.items():
        clean_kaito_env.setenv(key, value)
    settings = Settings()
    assert settings.pipeline_parallel_size == size
    assert settings.tensor_parallel_size == per_pod
    assert settings.distributed_executor_backend == "ray"
    assert settings.tensor_parallel_size * settings.pipeline_parallel_size == per_pod * size
    assert settings.device == "cuda" and settings.max_model_len is not None


def test_leader_script_refuses_a_pipeline_size_other_than_the_group(lws: dict[str, Any]) -> None:
    """The guard runs before anything starts: real sh, mismatched sizes."""
    text = script(container(lws, "leader"))
    result = subprocess.run(
        ["/bin/sh", "-c", text],
        env={"KAITO_PIPELINE_PARALLEL_SIZE": "3", "LWS_GROUP_SIZE": "2", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "KAITO_PIPELINE_PARALLEL_SIZE=3 must equal the group size 2" in result.stderr


def test_leader_starts_the_head_waits_for_the_group_then_serves(lws: dict[str, Any]) -> None:
    lines = [ln.strip() for ln in script(container(lws, "leader")).splitlines()]
    text = " ".join(lines).replace("\\ ", "")
    head = text.index("ray start --head")
    wait = text.index('python -m app.ray_wait --nodes "$LWS_GROUP_SIZE"')
    serve = text.index("exec python -m app")
    assert head < wait < serve
    assert f"--port={RAY_PORT}" in text
    assert '--gpus "$((KAITO_TENSOR_PARALLEL_SIZE * LWS_GROUP_SIZE))"' in text
    worker = " ".join(script(container(lws, "worker")).split())
    assert f'ray start --address="$LWS_LEADER_ADDRESS:{RAY_PORT}"' in worker
    assert "--block" in worker and "exit 1" in worker  # joins and blocks; gives up in time
    for role in ("leader", "worker"):
        syntax = subprocess.run(["/bin/sh", "-n", "-c", script(container(lws, role))])
        assert syntax.returncode == 0, f"{role} script: sh syntax error"


def test_dev_shm_on_both_templates(lws: dict[str, Any]) -> None:
    for role in ("leader", "worker"):
        spec = template(lws, role)["spec"]
        c = container(lws, role)
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory", role
        shm = gib(volume["emptyDir"]["sizeLimit"])
        # Memory-backed: counts against the limit. And Ray's object store lives there.
        assert shm <= gib(c["resources"]["limits"]["memory"]) / 4, role
        (store,) = re.findall(r"--object-store-memory=(\d+)", script(c))
        assert int(store) / 2**30 <= shm / 2, role
        # The root filesystem is read-only: Ray's /tmp/ray and every cache are volumes.
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", "/cache", "/home/kaito", "/dev/shm"} <= mounts, role
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, role


def test_probes_on_the_leader(lws: dict[str, Any]) -> None:
    from app.server import create_app

    class NoEngine:
        def is_ready(self) -> bool:
            return False

    app = create_app(Settings(), engine=NoEngine())  # type: ignore[arg-type]
    served = {getattr(r, "path", None) for r in app.routes}
    c = container(lws, "leader")
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in served
        assert c[probe]["httpGet"]["port"] == "http"
    (port,) = c["ports"]
    assert (port["name"], port["containerPort"]) == ("http", CONTAINER_PORT)
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600, "810 GB to load"
    # The workers serve no HTTP: no probes that could never pass.
    worker = container(lws, "worker")
    assert not {"startupProbe", "readinessProbe", "livenessProbe", "ports"} & set(worker)


def test_service_selects_leaders_and_not_workers(
    multinode: list[dict[str, Any]], lws: dict[str, Any]
) -> None:
    service = one(multinode, "Service")
    selector = service["spec"]["selector"]
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    for group in range(2):
        assert selects(selector, pod_labels(lws, "leader", group, 0))
        for index in range(1, size):
            assert not selects(selector, pod_labels(lws, "worker", group, index))
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (80, "http")


def test_network_policies_keep_ray_and_nccl_inside_the_set(
    multinode: list[dict[str, Any]], lws: dict[str, Any]
) -> None:
    group = one(multinode, "NetworkPolicy", "-group")
    http = one(multinode, "NetworkPolicy", "-http")
    leader, worker = pod_labels(lws, "leader"), pod_labels(lws, "worker", 0, 1)
    stranger = {"app.kubernetes.io/name": "kaito-chat", "app.kubernetes.io/instance": "other"}

    # Every pod of the set is covered (so ingress is closed by default) ...
    members = group["spec"]["podSelector"]["matchLabels"]
    assert selects(members, leader) and selects(members, worker)
    assert not selects(members, stranger)
    assert group["spec"]["policyTypes"] == ["Ingress"]
    # ... and every port is open only to the set's own pods (Ray and NCCL pick ports).
    (rule,) = group["spec"]["ingress"]
    assert "ports" not in rule
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}
    allowed = peer["podSelector"]["matchLabels"]
    assert selects(allowed, leader) and selects(allowed, worker)
    assert not selects(allowed, stranger)

    # Clients: the leaders' HTTP port, from anywhere; nothing of the workers.
    targets = http["spec"]["podSelector"]["matchLabels"]
    assert selects(targets, leader) and not selects(targets, worker)
    (rule,) = http["spec"]["ingress"]
    assert "from" not in rule
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_settings_and_image(
    multinode: list[dict[str, Any]], lws: dict[str, Any], dockerfile: Dockerfile
) -> None:
    vllm_names = vllm_env_names()
    unknown: list[str] = []
    for role in ("leader", "worker"):
        c = container(lws, role)
        assert c["image"] == "kaito-chat:gpu", role
        env = settings_env(multinode, c)
        unknown += check_known(set(env) | {e["name"] for e in c.get("env", [])}, role, vllm_names)
        # A token from an optional Secret, on every node (each downloads its weights).
        (token,) = [e for e in c["env"] if e["name"] == "HF_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"]["optional"] is True
    assert not unknown, unknown
    # The GPU image carries ray: its install adds the `ray` extra.
    (run,) = [
        i.args for i in dockerfile.stage("build-gpu").all("RUN") if "scripts/install.sh" in i.args
    ]
    assert re.search(r"scripts/install\.sh gpu\b.*\bray\b", run), run


def test_keda_scales_whole_groups_of_this_set(
    keda: list[dict[str, Any]], lws: dict[str, Any]
) -> None:
    scaled = one(keda, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    ref = scaled["spec"]["scaleTargetRef"]
    assert ref == {
        "apiVersion": lws["apiVersion"],
        "kind": "LeaderWorkerSet",
        "name": one(keda, "LeaderWorkerSet")["metadata"]["name"],
    }
    # The CRD has a scale subresource on spec.replicas (= groups): what KEDA's HPA drives.
    subresource = json.loads(LWS_SCHEMA.read_text())["x-kubernetes-scale-subresource"]
    assert subresource["specReplicasPath"] == ".spec.replicas"
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert query.startswith("sum(vllm:num_requests_waiting{")
    # Only leaders serve /metrics; the pod regex takes leaders (<set>-<group>), not
    # workers (<set>-<group>-<index>).
    (pattern,) = re.findall(r'pod=~"([^"]+)"', query)
    name = lws["metadata"]["name"]
    assert re.fullmatch(pattern, f"{name}-0") and re.fullmatch(pattern, f"{name}-12")
    assert not re.fullmatch(pattern, f"{name}-0-1")


# --- components/multi-gpu -------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_gpu(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    return render_overlay("mistral-7b", ("multi-gpu",), tmp_path_factory.mktemp("multi-gpu"))


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, OLDEST_KUBERNETES_VERSION])
def test_multi_gpu_component_validates(multi_gpu: Rendered, version: str) -> None:
    for doc in multi_gpu.docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_multi_gpu_component_gives_tensor_parallel_its_gpus(
    multi_gpu: Rendered, clean_kaito_env: pytest.MonkeyPatch
) -> None:
    resources = multi_gpu.container["resources"]
    gpus = resources["limits"]["nvidia.com/gpu"]
    assert gpus > 1 and resources["requests"]["nvidia.com/gpu"] == gpus
    for key, value in multi_gpu.config_env.items():
        clean_kaito_env.setenv(key, value)
    settings = Settings()
    assert settings.tensor_parallel_size == gpus
    assert settings.pipeline_parallel_size == 1 and settings.distributed_executor_backend == "mp"
    shm = next(v for v in multi_gpu.pod["volumes"] if v["name"] == "shm")["emptyDir"]
    assert shm["medium"] == "Memory"
    assert gib(shm["sizeLimit"]) >= 2 * gpus  # 2 GiB per GPU
    assert gib(shm["sizeLimit"]) <= gib(resources["limits"]["memory"]) / 4
    # N GPUs apiece: no surge pod.
    assert multi_gpu.deployment["spec"]["strategy"] == {"type": "Recreate"}
