"""The GPU overlays, checked for what makes a GPU pod fail on a real cluster that a schema
cannot see (docs/GPU.md): the node it lands on (GPU type, memory, sharing), the GPU memory
the transformers fallback would need, the node disk it writes, the components in every
order, the image tag. What only a GPU node can show is scripts/gpu-smoke.sh's."""

import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from app.engines.dispatch import DispatchEngine
from app.server import create_app
from app.settings import DEFAULT_MODEL_DIR, Settings
from tests.deploy.deploy_support import (
    CPU_OVERLAYS,
    GPU_OPTIONAL_COMPONENTS,
    GPU_OVERLAYS,
    MANIFESTS,
    OPTIONAL_COMPONENTS,
    Dockerfile,
    Rendered,
    render_overlay,
)
from tests.deploy.test_deploy_manifests import effective_env

GIB = 2**30
# What a hub model's weights take on disk, as vLLM downloads them (one of a Mistral
# repository's two formats: vLLM 0.32 loads consolidated*.safetensors when present) and
# as the transformers fallback downloads them (the Hugging Face files). A GPU overlay with
# another model needs its size here.
# 16-bit safetensors (7.24 billion parameters; vLLM downloads only the safetensors files).
WEIGHTS_BYTES = {
    "mistralai/Mistral-7B-v0.1": 14.5e9,
    "mistralai/Mistral-7B-Instruct-v0.2": 14.5e9,
    "mistralai/Mistral-7B-v0.3": 14.5e9,
    "mistralai/Mistral-7B-Instruct-v0.3": 14.5e9,
}
# torch.compile's, Triton's and the CUDA driver's caches, with room to spare.
COMPILE_CACHES_BYTES = 2 * GIB
# The transformers fallback beside vLLM: its weights plus activations and its cache.
FALLBACK_HEADROOM_BYTES = 3 * GIB


def quantity_bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "G": 1e9, "M": 1e6}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return float(quantity[: -len(unit)]) * factor
    return float(quantity)


# --- node affinity ---------------------------------------------------------------------


def expression_matches(expression: dict[str, Any], labels: dict[str, str]) -> bool:
    """One nodeSelectorRequirement, with Kubernetes' semantics (NotIn and DoesNotExist
    match a node without the label; Gt/Lt need an integer label)."""
    key, operator = expression["key"], expression["operator"]
    values = expression.get("values", [])
    value = labels.get(key)
    if operator == "In":
        return value is not None and value in values
    if operator == "NotIn":
        return value is None or value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in ("Gt", "Lt"):
        (bound,) = values
        try:
            number = int(value) if value is not None else None
        except ValueError:
            return False
        if number is None:
            return False
        return number > int(bound) if operator == "Gt" else number < int(bound)
    raise AssertionError(f"unknown operator {operator}")


def schedulable(pod: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether the pod's required node affinity admits a node with these labels: any
    term, all of its expressions."""
    affinity = pod.get("affinity", {}).get("nodeAffinity", {})
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return True
    return any(
        all(expression_matches(e, labels) for e in term.get("matchExpressions", []))
        for term in required["nodeSelectorTerms"]
    )


def gfd(memory_mib: int, major: int, product: str, sharing: str | None = "none") -> dict[str, str]:
    """Labels GPU Feature Discovery puts on a node (older releases lack sharing-strategy)."""
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.memory": str(memory_mib),
        "nvidia.com/gpu.compute.major": str(major),
        "nvidia.com/gpu.product": product,
    }
    if sharing is not None:
        labels["nvidia.com/gpu.sharing-strategy"] = sharing
    return labels


def karpenter(name: str, memory_mib: int) -> dict[str, str]:
    return {
        "karpenter.k8s.aws/instance-gpu-manufacturer": "nvidia",
        "karpenter.k8s.aws/instance-gpu-name": name,
        "karpenter.k8s.aws/instance-gpu-memory": str(memory_mib),
    }


NODES = {
    # GPU Feature Discovery (GPU Operator, or the device plugin's chart with GFD).
    "gfd L4": (gfd(23034, 8, "NVIDIA-L4"), True),
    "gfd A10G": (gfd(23028, 8, "NVIDIA-A10G"), True),
    "gfd A100 80GB": (gfd(81920, 8, "NVIDIA-A100-SXM4-80GB"), True),
    "gfd H100, GFD without the sharing label": (gfd(81559, 9, "NVIDIA-H100", None), True),
    "gfd T4 (16 GB)": (gfd(15360, 7, "Tesla-T4"), False),
    "gfd V100 32GB (Volta: no CUDA 13)": (gfd(32768, 7, "Tesla-V100-SXM2-32GB"), False),
    "gfd A100 MIG 1g.10gb slice": (gfd(9728, 8, "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb"), False),
    "gfd A100 MIG 3g.20gb slice": (gfd(19968, 8, "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb"), False),
    "gfd H100 time-sliced": (gfd(81559, 9, "NVIDIA-H100-SHARED", "time-slicing"), False),
    "gfd L4 under MPS": (gfd(23034, 8, "NVIDIA-L4-SHARED", "mps"), False),
    # GKE: no GFD; its own labels.
    "gke L4": ({"cloud.google.com/gke-accelerator": "nvidia-l4"}, True),
    "gke H100": ({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}, True),
    "gke T4": ({"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}, False),
    "gke V100": ({"cloud.google.com/gke-accelerator": "nvidia-tesla-v100"}, False),
    "gke L4 time-shared": (
        {
            "cloud.google.com/gke-accelerator": "nvidia-l4",
            "cloud.google.com/gke-gpu-sharing-strategy": "time-sharing",
        },
        False,
    ),
    "gke A100 MIG partition": (
        {
            "cloud.google.com/gke-accelerator": "nvidia-a100-80gb",
            "cloud.google.com/gke-gpu-partition-size": "1g.10gb",
        },
        False,
    ),
    # EKS with Karpenter.
    "karpenter g6 (L4)": (karpenter("l4", 22888), True),
    "karpenter g5 (A10G)": (karpenter("a10g", 24576), True),
    "karpenter g4dn (T4)": (karpenter("t4", 16384), False),
    "karpenter p3dn (V100 32GB)": (karpenter("v100", 32768), False),
    # Labels neither GFD nor a cloud's GPU type: AKS's, a plain EKS managed node group's.
    # docs/GPU.md says to install GFD or replace the affinity there.
    "aks without GFD": (
        {
            "kubernetes.azure.com/accelerator": "nvidia",
            "node.kubernetes.io/instance-type": "Standard_NC24ads_A100_v4",
        },
        False,
    ),
    "a CPU node": ({"kubernetes.io/os": "linux"}, False),
}


@pytest.mark.parametrize("node", sorted(NODES))
def test_gpu_overlays_land_on_a_whole_recent_gpu_with_room(
    renders: list[Rendered], node: str
) -> None:
    labels, expected = NODES[node]
    for r in renders:
        if r.gpu:
            assert schedulable(r.pod, labels) is expected, f"{r.id} on {node}"


def test_cpu_overlays_have_no_gpu_affinity(renders: list[Rendered]) -> None:
    for r in renders:
        if not r.gpu:
            assert "affinity" not in r.pod, r.id


def gfd_memory_floor_mib(pod: dict[str, Any]) -> int:
    """The smallest GPU memory the affinity admits (its GFD term's bound)."""
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    for term in terms["nodeSelectorTerms"]:
        for e in term["matchExpressions"]:
            if e["key"] == "nvidia.com/gpu.memory":
                assert e["operator"] == "Gt"
                return int(e["values"][0]) + 1
    raise AssertionError("no GFD memory term")


# --- GPU memory: the transformers fallback ---------------------------------------------


def settings_of(r: Rendered, dockerfile: Dockerfile, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(__import__("os").environ):
        if key.startswith("KAITO_"):
            monkeypatch.delenv(key)
    for key, value in effective_env(r, dockerfile).items():
        if key.startswith("KAITO_"):
            monkeypatch.setenv(key, value)
    return Settings()


def test_gpu_overlays_leave_room_for_the_fallback_or_turn_it_off(
    renders: list[Rendered], dockerfile: Dockerfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM takes gpu_memory_utilization of the card; a transformers fallback would load
    a second copy of the weights into the rest. On the smallest GPU the affinity admits,
    that rest must hold them, or the fallback must be off (then a 400, below)."""
    for r in renders:
        if not r.gpu:
            continue
        settings = settings_of(r, dockerfile, monkeypatch)
        if settings.backend == "hf":
            continue  # transformers alone: no second copy
        if not settings.hf_fallback and not settings.hf_preload:
            continue
        weights = WEIGHTS_BYTES[settings.model]
        rest = (1 - settings.gpu_memory_utilization) * gfd_memory_floor_mib(r.pod) * 2**20
        assert rest >= weights + FALLBACK_HEADROOM_BYTES, (
            f"{r.id}: the fallback's {weights / 1e9:.1f} GB of weights do not fit the "
            f"{rest / GIB:.1f} GiB vLLM leaves at KAITO_GPU_MEMORY_UTILIZATION="
            f"{settings.gpu_memory_utilization} on the smallest GPU the affinity admits"
        )


class RefusingHF:
    """Stands for the transformers backend: these tests must never load it."""

    name = "hf"

    async def start(self) -> None:
        raise AssertionError("the transformers backend must not load")

    async def stop(self) -> None:
        pass

    async def generate(self, request: Any) -> Any:
        raise AssertionError("the transformers backend must not serve")

    async def abort(self, request_id: str) -> None:
        pass


@pytest.mark.parametrize(
    ("generate_kwargs", "parameter"),
    [
        ({"do_sample": True, "num_beams": 2}, "generate_kwargs.do_sample"),
        (
            {"do_sample": False, "num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.5},
            "generate_kwargs.num_beam_groups",
        ),
    ],
)
def test_gpu_overlay_settings_answer_a_fallback_request_with_a_400(
    renders: list[Rendered],
    dockerfile: Dockerfile,
    monkeypatch: pytest.MonkeyPatch,
    generate_kwargs: dict[str, Any],
    parameter: str,
) -> None:
    """The GPU overlay's settings, served (a fake vLLM engine, the real dispatch and
    HTTP layers): a request only the fallback serves is a 400 that names its parameter
    and the setting, never an attempt to load a second model."""
    from transformers import AutoTokenizer

    from tests.api.conftest import FakeEngine

    (r,) = [r for r in renders if r.name == GPU_OVERLAYS[0] and not r.components]
    settings = settings_of(r, dockerfile, monkeypatch)
    assert settings.hf_fallback is False
    vllm = FakeEngine(AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR))
    engine = DispatchEngine(
        settings, vllm_factory=lambda _: vllm, hf=RefusingHF(), supports=lambda _: True
    )
    with TestClient(create_app(settings, engine=engine)) as client:  # type: ignore[arg-type]
        body = {"prompt": "Once upon a time", "generate_kwargs": generate_kwargs}
        response = client.post("/chat", json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["parameter"] == parameter
    assert "KAITO_HF_FALLBACK=false" in error["detail"]
    assert not vllm.requests


# --- node disk -------------------------------------------------------------------------


def disk_volume_caps(r: Rendered) -> dict[str, float]:
    """{volume: sizeLimit in bytes} of the emptyDirs on the node's disk."""
    caps = {}
    for volume in r.pod["volumes"]:
        empty = volume.get("emptyDir")
        if empty is not None and empty.get("medium") != "Memory":
            caps[volume["name"]] = quantity_bytes(empty["sizeLimit"])
    return caps


def test_ephemeral_storage_requests_reserve_what_the_pod_writes(
    renders: list[Rendered], dockerfile: Dockerfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler places a pod by its ephemeral-storage request; a pod that writes
    more than it reserved is evicted first when the node's disk fills. Reserve the model
    download (twice with the fallback on), compile caches, and /tmp and HOME at their caps;
    the cache volume's cap must hold the download."""
    for r in renders:
        settings = settings_of(r, dockerfile, monkeypatch)
        request = quantity_bytes(r.container["resources"]["requests"]["ephemeral-storage"])
        caps = disk_volume_caps(r)
        downloads = 0.0
        if r.gpu and not Path(settings.model).is_absolute():
            if settings.model not in WEIGHTS_BYTES:
                pytest.fail(f"{r.id}: add {settings.model}'s weights size to WEIGHTS_BYTES")
            copies = 2 if (settings.hf_fallback or settings.hf_preload) else 1
            downloads = copies * WEIGHTS_BYTES[settings.model]
        cache_on_disk = "cache" in caps
        needed = caps["tmp"] + caps["home"]
        if cache_on_disk:
            needed += downloads + COMPILE_CACHES_BYTES
            assert caps["cache"] >= downloads + COMPILE_CACHES_BYTES, (
                f"{r.id}: the cache volume cannot hold the download"
            )
        assert request >= needed, (
            f"{r.id}: ephemeral-storage request {request / GIB:.1f} GiB < "
            f"{needed / GIB:.1f} GiB written to the node's disk"
        )


# --- components in every order ----------------------------------------------------------


def canonical(r: Rendered) -> list[dict[str, Any]]:
    """The objects, in an order that does not matter to Kubernetes: by kind and name, and
    the pod's volumes (a list keyed by name) by name."""
    docs = yaml.safe_load(yaml.safe_dump(r.docs))
    for doc in docs:
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            pod["volumes"] = sorted(pod["volumes"], key=lambda v: v["name"])
    return sorted(docs, key=lambda d: (d["kind"], d["metadata"]["name"]))


# One GPU overlay stands for both (they list the same components); 24 orders each.
@pytest.mark.parametrize("overlay", GPU_OVERLAYS[:1] + CPU_OVERLAYS)
def test_every_component_order_renders_the_same_objects(overlay: str, tmp_path: Path) -> None:
    """An overlay's components apply in the order it lists them; a component that patches
    what another replaces would make the result depend on it (a volume with two
    sources). Every order renders, and to the same objects."""
    kustomization = yaml.safe_load(
        (MANIFESTS / "overlays" / overlay / "kustomization.yaml").read_text()
    )
    listed = tuple(c.rsplit("/", 1)[-1] for c in kustomization.get("components") or [])
    optional = OPTIONAL_COMPONENTS + (GPU_OPTIONAL_COMPONENTS if overlay in GPU_OVERLAYS else ())
    everything = listed + optional
    first = None
    for n, order in enumerate(itertools.permutations(everything)):
        rendered = render_overlay(overlay, order, tmp_path / str(n), replace=True)
        for volume in rendered.pod["volumes"]:
            kinds = {"emptyDir", "persistentVolumeClaim"} & volume.keys()
            assert len(kinds) == 1, f"{order}: volume {volume['name']} has {sorted(kinds)}"
        if first is None:
            first = canonical(rendered)
        else:
            assert canonical(rendered) == first, f"{order} renders other objects than {everything}"
    assert first is not None


# --- the optional GPU components ------------------------------------------------------------


def test_writable_root_component_changes_only_the_root_filesystem(
    renders: list[Rendered], tmp_path: Path
) -> None:
    for name in GPU_OVERLAYS:
        plain = render_overlay(name, (), tmp_path / f"{name}-plain")
        writable = render_overlay(name, GPU_OPTIONAL_COMPONENTS, tmp_path / name)
        sc = writable.container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is False
        # The rest of the lockdown stays.
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        plain_sc = dict(plain.container["securityContext"], readOnlyRootFilesystem=False)
        assert plain_sc == sc
        # The server still writes only to its volumes (same mounts).
        assert writable.container["volumeMounts"] == plain.container["volumeMounts"]


# --- image tags -------------------------------------------------------------------------


def test_image_tags_name_the_version_and_target(renders: list[Rendered], pyproject: Any) -> None:
    """A moving tag (`gpu`) with imagePullPolicy IfNotPresent lets a node run whatever
    image it pulled under that name last; a tag per version does not."""
    version = pyproject["project"]["version"]
    for r in renders:
        assert r.container["image"] == f"kaito-chat:{version}-{r.target}", r.id


# --- docs/GPU.md's recipes work ---------------------------------------------------------


def test_docs_affinity_patch_for_clusters_without_gfd(tmp_path: Path) -> None:
    """docs/GPU.md's patch for AKS and EKS node groups (no GFD, no GPU-type labels)
    replaces the affinity: the result validates and lands on the instance types listed."""
    import re
    import shutil

    import kubernetes_validate

    from tests.deploy.deploy_support import (
        KUBERNETES_VERSION,
        OLDEST_KUBERNETES_VERSION,
        REPO,
        kustomize,
    )

    doc = (REPO / "docs/GPU.md").read_text()
    section = doc[doc.index("\n## Pick the GPU\n") :]
    section = section[: section.index("\n## ", 1)]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    patches = yaml.safe_load(block)["patches"]
    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy)
    kfile = copy / "overlays" / GPU_OVERLAYS[0] / "kustomization.yaml"
    kustomization = yaml.safe_load(kfile.read_text())
    kustomization.setdefault("patches", []).extend(patches)
    kfile.write_text(yaml.safe_dump(kustomization, sort_keys=False))
    docs = [d for d in yaml.safe_load_all(kustomize(kfile.parent)) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    for version in (KUBERNETES_VERSION, OLDEST_KUBERNETES_VERSION):
        kubernetes_validate.validate(deployment, version, strict=True)
    pod = deployment["spec"]["template"]["spec"]
    aks, _ = NODES["aks without GFD"]
    assert schedulable(pod, aks)
    assert not schedulable(pod, {"node.kubernetes.io/instance-type": "Standard_NC4as_T4_v3"})
