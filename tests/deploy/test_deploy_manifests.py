"""The Kubernetes manifests, as `kubectl kustomize` renders each overlay (alone and with
the optional components): valid objects for a named Kubernetes version, lint-clean
YAML, and wired to what the server and its image really do (routes, port, settings,
writable paths, shutdown)."""

import ast
import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

from app.settings import Settings
from tests.deploy.deploy_support import (
    CACHE_VARS,
    CPU_OVERLAYS,
    GPU_OVERLAYS,
    KUBERNETES_VERSION,
    LWS_OVERLAYS,
    MANIFESTS,
    OLDEST_KUBERNETES_VERSION,
    REPO,
    Dockerfile,
    Rendered,
    validate_object,
)

# Kaito's operator gives a model 30 minutes to load.
STARTUP_BUDGET_S = 30 * 60
CONTAINER_PORT = 5000

# Variables the image or the manifests set that are not the server's settings (KAITO_*)
# nor vLLM's (VLLM_*, checked against vLLM's own list): each one named, so a typo fails.
OTHER_ENV = {
    "PATH": "the venv's python first",
    "PYTHONUNBUFFERED": "logs reach the container runtime at once",
    "PYTHONDONTWRITEBYTECODE": "no .pyc writes on a read-only root filesystem",
    "HOME": "a writable home (a volume in the manifests)",
    "XDG_CACHE_HOME": "caches that follow XDG go to /cache",
    "HF_HOME": "Hugging Face hub cache",
    "HF_TOKEN": "hub token for gated models",
    "HF_HUB_DISABLE_TELEMETRY": "no telemetry",
    "DO_NOT_TRACK": "no telemetry (vLLM and others honour it)",
    "TORCHINDUCTOR_CACHE_DIR": "torch.compile's cache",
    "TRITON_CACHE_DIR": "Triton's kernel cache (GPU)",
    "TRITON_HOME": "Triton's ~/.triton (dump and override dirs)",
    "FLASHINFER_WORKSPACE_BASE": "FlashInfer's JIT cache (it appends .cache/flashinfer)",
    "CUDA_CACHE_PATH": "the CUDA driver's compute cache (default ~/.nv/ComputeCache)",
    "OMP_NUM_THREADS": "OpenMP threads of vLLM's CPU backend",
    "NVIDIA_DRIVER_CAPABILITIES": "NVIDIA container toolkit: which driver libraries to mount",
    "LD_LIBRARY_PATH": "GKE's managed driver at /usr/local/nvidia/lib64",
    "PIP_CACHE_DIR": "build stage only: pip's cache mount",
}


def render_id(r: Rendered) -> str:
    return r.id


def vllm_env_names() -> set[str]:
    """The variable names vLLM reads (the keys of vllm/envs.py's environment_variables),
    read from the source: importing vllm takes seconds."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("vllm is not installed: run `make install` (scripts/install.sh)")
    source = Path(next(iter(spec.submodule_search_locations))) / "envs.py"
    tree = ast.parse(source.read_text())
    for node in tree.body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "environment_variables":
            assert isinstance(node.value, ast.Dict)
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    pytest.fail(f"no environment_variables dict in {source}")


@pytest.fixture(scope="session")
def served_paths() -> set[str]:
    """The paths the FastAPI app serves, from the app factory (with a stub engine: no
    engine starts, the lifespan does not run)."""
    from app.server import create_app

    class StubEngine:
        def is_ready(self) -> bool:
            return False

    app = create_app(Settings(), engine=StubEngine())  # type: ignore[arg-type]
    return {path for route in app.routes if (path := getattr(route, "path", None))}


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"no container port named {port!r}")


def effective_env(r: Rendered, dockerfile: Dockerfile) -> dict[str, str]:
    """The container's environment: the image's ENV, then the ConfigMap, then env values."""
    env = dockerfile.env(r.target)
    env.update(r.config_env)
    env.update({e["name"]: e["value"] for e in r.container.get("env", []) if "value" in e})
    return env


# --- rendering, schemas, lint ----------------------------------------------------------


def test_every_overlay_is_classified(overlay_names: list[str]) -> None:
    assert sorted(GPU_OVERLAYS + CPU_OVERLAYS + LWS_OVERLAYS) == overlay_names


def test_overlays_render_the_expected_objects(renders: list[Rendered]) -> None:
    for r in renders:
        kinds = sorted(d["kind"] for d in r.docs)
        expected = ["ConfigMap", "Deployment", "Service"]
        if "model-cache-pvc" in r.components:
            expected.append("PersistentVolumeClaim")
        if "servicemonitor" in r.components:
            expected.append("ServiceMonitor")
        if "prometheus-rules" in r.components:
            expected.append("PrometheusRule")
        if "grafana-dashboard" in r.components:
            expected.append("ConfigMap")
        assert kinds == sorted(expected), r.id


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, OLDEST_KUBERNETES_VERSION])
def test_objects_validate_against_kubernetes_schemas(renders: list[Rendered], version: str) -> None:
    for r in renders:
        for doc in r.docs:
            validate_object(doc, version, f"{r.id}: {doc['kind']}/{doc['metadata']['name']}")


@pytest.fixture(scope="session")
def yamllint_config() -> YamlLintConfig:
    return YamlLintConfig(file=str(REPO / ".yamllint.yaml"))


def test_manifest_sources_pass_yamllint(yamllint_config: YamlLintConfig) -> None:
    files = sorted(MANIFESTS.rglob("*.yaml")) + [REPO / ".yamllint.yaml"]
    problems = [
        f"{f.relative_to(REPO)}:{p.line}:{p.column}: {p.message} ({p.rule})"
        for f in files
        for p in linter.run(f.read_text(), yamllint_config, str(f))
    ]
    assert not problems, "\n".join(problems)


def test_rendered_manifests_pass_yamllint(
    renders: list[Rendered], yamllint_config: YamlLintConfig
) -> None:
    problems = [
        f"{r.id}:{p.line}:{p.column}: {p.message} ({p.rule})"
        for r in renders
        for p in linter.run(without_dashboard(r.text), yamllint_config)
    ]
    assert not problems, "\n".join(problems)


def without_dashboard(text: str) -> str:
    """The rendered text less the dashboard's ConfigMap: its data is a JSON file (checked
    in test_dashboard.py), whose lines are as long as its panel descriptions."""
    docs = text.split("\n---\n")
    return "\n---\n".join(d for d in docs if "grafana_dashboard:" not in d)


# --- probes, ports, Service -------------------------------------------------------------


def test_probes_use_paths_the_app_serves(renders: list[Rendered], served_paths: set[str]) -> None:
    for r in renders:
        c = r.container
        # Started and ready: the engine has loaded and is alive (503 while loading or dead).
        assert c["startupProbe"]["httpGet"]["path"] == "/health", r.id
        assert c["readinessProbe"]["httpGet"]["path"] == "/health", r.id
        # Alive: the process answers HTTP, whatever the engine does; a liveness probe on
        # /health would restart a pod that is still loading its model.
        assert c["livenessProbe"]["httpGet"]["path"] == "/livez", r.id
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            assert get["path"] in served_paths, f"{r.id}: {probe} path {get['path']} not served"
            assert port_number(c, get["port"]) == CONTAINER_PORT, f"{r.id}: {probe} port"


def test_startup_probe_allows_a_7b_model_to_load(renders: list[Rendered]) -> None:
    for r in renders:
        probe = r.container["startupProbe"]
        budget = (
            probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
        )
        assert budget >= STARTUP_BUDGET_S, f"{r.id}: startup probe gives up after {budget}s"
        # Otherwise `kubectl rollout status` reports a stalled rollout while the model loads.
        assert r.deployment["spec"]["progressDeadlineSeconds"] > budget, r.id


def test_service_targets_the_container_port(renders: list[Rendered]) -> None:
    for r in renders:
        service = r.one("Service")
        (port,) = service["spec"]["ports"]
        assert (port["name"], port["port"]) == ("http", 80), (
            f"{r.id}: Kaito's mapping is 80 -> 5000"
        )
        assert port_number(r.container, port["targetPort"]) == CONTAINER_PORT, r.id
        pod_labels = r.deployment["spec"]["template"]["metadata"]["labels"]
        selector = service["spec"]["selector"]
        assert selector.items() <= pod_labels.items(), f"{r.id}: the Service selects no pod"
        assert selector == r.deployment["spec"]["selector"]["matchLabels"], r.id


def test_server_listens_on_the_container_port(
    renders: list[Rendered], dockerfile: Dockerfile, clean_kaito_env: pytest.MonkeyPatch
) -> None:
    for r in renders:
        for key, value in effective_env(r, dockerfile).items():
            clean_kaito_env.setenv(key, value)
        settings = Settings()
        assert settings.port == CONTAINER_PORT, r.id
        assert settings.host == "0.0.0.0", f"{r.id}: the server must listen on the pod's IP"


def test_instances_select_only_their_own_pods(renders: list[Rendered]) -> None:
    """Two overlays in one namespace must not share pods behind their Services."""
    plain = [r for r in renders if not r.components]
    selectors = [tuple(sorted(r.one("Service")["spec"]["selector"].items())) for r in plain]
    assert len(set(selectors)) == len(plain)


# --- hardware -----------------------------------------------------------------------------


def test_gpu_overlays_request_one_gpu(renders: list[Rendered], dockerfile: Dockerfile) -> None:
    for r in renders:
        if not r.gpu:
            continue
        resources = r.container["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == 1, r.id
        assert resources["limits"]["nvidia.com/gpu"] == 1, r.id
        tolerations = r.pod.get("tolerations", [])
        assert any(
            t["key"] == "nvidia.com/gpu"
            and t["operator"] == "Exists"
            and t["effect"] == "NoSchedule"
            for t in tolerations
        ), r.id
        assert r.container["image"].endswith("-gpu"), r.id
        env = effective_env(r, dockerfile)
        assert env["KAITO_DEVICE"] == "cuda", r.id
        # vLLM 0.32 defaults to Model Runner V2 on GPUs, which rejects the server's
        # V1-interface logits processors (manifests/base/kustomization.yaml says so).
        assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0", r.id


def test_cpu_overlays_request_no_gpu(renders: list[Rendered], dockerfile: Dockerfile) -> None:
    for r in renders:
        if r.gpu:
            continue
        assert "nvidia.com/gpu" not in r.text, f"{r.id} mentions nvidia.com/gpu"
        assert not r.pod.get("tolerations"), r.id
        assert r.container["image"].endswith("-cpu"), r.id
        env = effective_env(r, dockerfile)
        assert env["KAITO_DEVICE"] == "cpu", r.id
        # vLLM's OpenMP threads must match the CPU limit (not the node's cores).
        limits = r.container["resources"]["limits"]
        assert env.get("VLLM_CPU_OMP_THREADS_BIND") == "nobind", r.id
        assert int(env["OMP_NUM_THREADS"]) == int(limits["cpu"]), r.id


def test_memory_requests_fit_their_limits(renders: list[Rendered]) -> None:
    def gib(quantity: str) -> float:
        number, unit = re.fullmatch(r"([0-9.]+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
        return float(number) / (1024 if unit == "Mi" else 1)

    for r in renders:
        resources = r.container["resources"]
        request, limit = gib(resources["requests"]["memory"]), gib(resources["limits"]["memory"])
        assert request <= limit, r.id
        # /dev/shm is memory-backed: what it holds counts against the limit.
        shm = next(v for v in r.pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory", r.id
        assert gib(shm["emptyDir"]["sizeLimit"]) <= limit / 4, r.id


# --- settings and environment -------------------------------------------------------------


def env_names(r: Rendered) -> set[str]:
    return set(r.config_env) | {e["name"] for e in r.container.get("env", [])}


def check_known(
    names: set[str], where: str, vllm_names: set[str], adapters: frozenset[str] = frozenset()
) -> list[str]:
    settings = {f"KAITO_{name.upper()}" for name in Settings.model_fields}
    unknown = []
    for name in sorted(names):
        if name in adapters:
            ok = True  # an adapter's strength: Kaito names the variable after the adapter
        elif name.startswith("KAITO_"):
            ok = name in settings
        elif name.startswith("VLLM_"):
            ok = name in vllm_names
        else:
            ok = name in OTHER_ENV
        if not ok:
            unknown.append(f"{where}: {name}")
    return unknown


def test_env_vars_are_settings_the_app_knows(
    renders: list[Rendered], dockerfile: Dockerfile
) -> None:
    vllm_names = vllm_env_names()
    unknown = check_known(dockerfile.all_env_keys(), "Dockerfile ENV", vllm_names)
    for r in renders:
        unknown += check_known(env_names(r), r.id, vllm_names, frozenset(r.adapter_mounts))
    assert not unknown, "variables no one reads (typo?):\n" + "\n".join(unknown)


def test_settings_accept_the_values(
    renders: list[Rendered], dockerfile: Dockerfile, clean_kaito_env: pytest.MonkeyPatch
) -> None:
    """The image's ENV and the ConfigMap, as the server will read them, pass its validation."""
    for r in renders:
        for key in [k for k in effective_env(r, dockerfile) if k.startswith("KAITO_")]:
            clean_kaito_env.delenv(key, raising=False)
        for key, value in effective_env(r, dockerfile).items():
            if key.startswith("KAITO_"):
                clean_kaito_env.setenv(key, value)
        settings = Settings()
        if r.gpu:
            # Weights 14.5 GB + KV cache must fit; leave the rest of the GPU to others.
            assert 0.5 <= settings.gpu_memory_utilization <= 0.95, r.id
            assert settings.max_model_len is not None, f"{r.id}: set KAITO_MAX_MODEL_LEN"
            assert settings.model.startswith("mistralai/Mistral-7B"), r.id
        else:
            assert settings.model == "/opt/model", f"{r.id}: the model baked into the cpu image"
        # A model from a path or the image is named by its directory (`model` for the
        # image's /opt/model) unless the overlay names it: clients type this name.
        if Path(settings.model).is_absolute():
            assert settings.served_model_name, f"{r.id}: set KAITO_SERVED_MODEL_NAME"


def test_hub_token_comes_from_an_optional_secret(renders: list[Rendered]) -> None:
    for r in renders:
        assert "HF_TOKEN" not in r.config_env, f"{r.id}: a token does not belong in a ConfigMap"
        (token,) = [e for e in r.container.get("env", []) if e["name"] == "HF_TOKEN"]
        ref = token["valueFrom"]["secretKeyRef"]
        assert ref["optional"] is True, r.id


# --- security, writable paths, shutdown ----------------------------------------------------


def test_security_context(renders: list[Rendered]) -> None:
    for r in renders:
        pod_sc = r.pod["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, r.id
        assert pod_sc["runAsUser"] != 0, r.id
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", r.id
        sc = r.container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, r.id
        # Read-only unless the GPU component for runtimes whose CDI hooks write into the
        # container's root asks otherwise (docs/GPU.md).
        writable = "gpu-writable-root" in r.components
        assert sc["readOnlyRootFilesystem"] is not writable, r.id
        assert sc["capabilities"]["drop"] == ["ALL"], r.id
        assert not sc.get("capabilities", {}).get("add"), r.id
        assert not sc.get("privileged"), r.id
        assert r.pod["automountServiceAccountToken"] is False, r.id
        # Service links would inject <SERVICE>_PORT=tcp://...: a Service named "kaito"
        # would set KAITO_PORT.
        assert r.pod["enableServiceLinks"] is False, r.id


def test_image_runs_as_the_manifests_user(renders: list[Rendered], dockerfile: Dockerfile) -> None:
    for r in renders:
        (user,) = [i.args for i in dockerfile.stage(r.target).all("USER")]
        uid, _, gid = user.partition(":")
        pod_sc = r.pod["securityContext"]
        # Numeric, so runAsNonRoot can verify it without a user database.
        assert int(uid) == pod_sc["runAsUser"] and int(gid) == pod_sc["runAsGroup"], r.id


def test_every_path_the_server_writes_is_a_volume(
    renders: list[Rendered], dockerfile: Dockerfile
) -> None:
    """The root filesystem is read-only: HOME, every cache and /tmp must be on volumes.
    And HOME is a small emptyDir (a pod that outgrows it is evicted), so every cache,
    including the GPU ones that ignore XDG_CACHE_HOME and default to ~, goes to the
    cache volume."""
    for r in renders:
        mounts = [m["mountPath"].rstrip("/") for m in r.container["volumeMounts"]]
        env = effective_env(r, dockerfile)
        paths = {"HOME": env["HOME"]} | {name: env[name] for name in CACHE_VARS}
        paths |= {"tmp": "/tmp", "shm": "/dev/shm"}
        for name, path in paths.items():
            assert any(path == m or path.startswith(m + "/") for m in mounts), (
                f"{r.id}: {name}={path} is on the read-only root filesystem"
            )
            mount = next(m for m in r.container["volumeMounts"] if path.startswith(m["mountPath"]))
            assert not mount.get("readOnly"), f"{r.id}: {path} is mounted read-only"
        (cache_mount,) = [m for m in r.container["volumeMounts"] if m["name"] == "cache"]
        for name in CACHE_VARS:
            assert (env[name] + "/").startswith(cache_mount["mountPath"].rstrip("/") + "/"), (
                f"{r.id}: {name}={env[name]} is not on the cache volume"
            )
        home = next(v for v in r.pod["volumes"] if v["name"] == "home")
        assert "sizeLimit" in home["emptyDir"], f"{r.id}: HOME's size is what makes this matter"


def test_every_volume_has_one_source(renders: list[Rendered]) -> None:
    """A volume with two sources (a component that patched an emptyDir into a volume
    another component had made a claim) renders and passes the schemas, but the API
    server refuses it."""
    sources = {"emptyDir", "persistentVolumeClaim", "configMap", "secret", "hostPath", "image"}
    for r in renders:
        for volume in r.pod["volumes"]:
            found = sorted(sources & volume.keys())
            assert len(found) == 1, f"{r.id}: volume {volume['name']} has sources {found}"


def test_model_cache_component_uses_the_claim(renders: list[Rendered]) -> None:
    for r in renders:
        cache = next(v for v in r.pod["volumes"] if v["name"] == "cache")
        if "model-cache-pvc" in r.components:
            claim = r.one("PersistentVolumeClaim")["metadata"]["name"]
            assert cache == {"name": "cache", "persistentVolumeClaim": {"claimName": claim}}, r.id
            # A ReadWriteOnce claim follows one pod at a time.
            assert r.deployment["spec"]["strategy"] == {"type": "Recreate"}, r.id
        else:
            assert "emptyDir" in cache, r.id


def test_termination_grace_covers_the_drain(
    renders: list[Rendered], dockerfile: Dockerfile
) -> None:
    """SIGTERM comes after preStop; the kubelet kills the pod terminationGracePeriodSeconds
    after the start of preStop. The server's drain must fit in between, with time for the
    engine to shut down."""
    engine_shutdown_s = 10
    for r in renders:
        command = r.container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", r.id
        pre_stop_s = int(command[1])
        if "shutdown_grace_seconds" in Settings.model_fields:
            env = effective_env(r, dockerfile)
            default = Settings.model_fields["shutdown_grace_seconds"].default
            drain_s = float(env.get("KAITO_SHUTDOWN_GRACE_SECONDS", default))
        else:
            # The server waits for in-flight requests until it is killed: give long
            # generations at least a minute.
            drain_s = 60
        grace = r.pod["terminationGracePeriodSeconds"]
        assert grace >= pre_stop_s + drain_s + engine_shutdown_s, (
            f"{r.id}: terminationGracePeriodSeconds={grace} < preStop {pre_stop_s}s + drain "
            f"{drain_s}s + engine shutdown {engine_shutdown_s}s"
        )


# --- Prometheus ------------------------------------------------------------------------------


def test_prometheus_annotations(renders: list[Rendered], served_paths: set[str]) -> None:
    for r in renders:
        annotations = r.deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", r.id
        assert int(annotations["prometheus.io/port"]) == CONTAINER_PORT, r.id
        assert annotations["prometheus.io/path"] == "/metrics", r.id
        assert "/metrics" in served_paths


def test_servicemonitor_scrapes_this_instance(renders: list[Rendered]) -> None:
    for r in renders:
        if "servicemonitor" not in r.components:
            continue
        monitor, service = r.one("ServiceMonitor"), r.one("Service")
        selector = monitor["spec"]["selector"]["matchLabels"]
        # The same labels as the Service's own selector (instance included), so it picks
        # this overlay's Service and no other in the namespace.
        assert selector == service["spec"]["selector"], r.id
        assert selector.items() <= service["metadata"]["labels"].items(), r.id
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, r.id
        annotations = r.deployment["spec"]["template"]["metadata"]["annotations"]
        assert endpoint["path"] == annotations["prometheus.io/path"], r.id
