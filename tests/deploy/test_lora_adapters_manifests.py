"""components/lora-adapters (and its image-volume variant) on every Deployment overlay, and
the Kaito Workspace example with adapters: valid objects, and what a schema cannot see:
each adapter at /mnt/adapter/<name> where Kaito mounts it, read-only, in the server's own
container, with its strength in a variable named after the adapter."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_support import (
    ADAPTERS_DIR,
    KUBERNETES_VERSION,
    MANIFESTS,
    OLDEST_KUBERNETES_VERSION,
    Rendered,
    kustomize,
    render_overlay,
    validate_object,
)

PVC = ("lora-adapters",)
IMAGE = ("lora-adapters", "lora-adapters/image-volume")
# Image volumes: alpha in 1.31, subPath on them from 1.33 (the variant mounts /data).
IMAGE_VOLUME_VERSION = "1.33.0"
# Kaito's rule for an adapter's name (source.name): a DNS-1123 subdomain.
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
CONTAINER = "server"


@pytest.fixture(scope="module")
def adapter_renders(
    deployment_overlay_names: list[str], tmp_path_factory: pytest.TempPathFactory
) -> list[Rendered]:
    return [
        render_overlay(name, components, tmp_path_factory.mktemp(name))
        for name in deployment_overlay_names
        for components in (PVC, IMAGE)
    ]


@pytest.fixture(scope="module")
def plain_renders(
    deployment_overlay_names: list[str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Rendered]:
    return {
        name: render_overlay(name, (), tmp_path_factory.mktemp(name))
        for name in deployment_overlay_names
    }


def env_by_name(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def volume(r: Rendered, name: str) -> dict[str, Any]:
    (found,) = [v for v in r.pod["volumes"] if v["name"] == name]
    return found


def test_objects_validate(adapter_renders: list[Rendered]) -> None:
    for r in adapter_renders:
        versions = [KUBERNETES_VERSION]
        versions += [IMAGE_VOLUME_VERSION] if r.components == IMAGE else [OLDEST_KUBERNETES_VERSION]
        for version in versions:
            for doc in r.docs:
                validate_object(doc, version, f"{r.id}: {doc['kind']}/{doc['metadata']['name']}")


def test_image_volumes_need_a_newer_kubernetes(adapter_renders: list[Rendered]) -> None:
    """Why the PersistentVolumeClaim is the default: the oldest Kubernetes the manifests
    support has no image volumes (docs/DEPLOY.md#lora-adapters says so)."""
    r = next(r for r in adapter_renders if r.components == IMAGE)
    with pytest.raises(pytest.fail.Exception, match="image"):
        validate_object(r.deployment, OLDEST_KUBERNETES_VERSION, r.id)


def test_adapters_mount_where_kaito_does(adapter_renders: list[Rendered]) -> None:
    for r in adapter_renders:
        # Merged into the base's container by its name: a misspelt name would render a
        # second container (with no image) instead, which Rendered.container refuses.
        assert r.container["name"] == CONTAINER, r.id
        adapters = r.adapter_mounts
        assert adapters, f"{r.id}: no adapter under {ADAPTERS_DIR}"
        for name, mount in adapters.items():
            # One directory level, as Kaito's server lists them; the directory is the name.
            assert mount["mountPath"] == f"{ADAPTERS_DIR}/{name}", r.id
            assert DNS_SUBDOMAIN.match(name), f"{r.id}: {name!r} is not a name Kaito accepts"
            assert mount["readOnly"] is True, f"{r.id}: {name} is writable"
            source = volume(r, mount["name"])
            if r.components == IMAGE:
                assert source["image"]["reference"], r.id
                assert "persistentVolumeClaim" not in source, r.id
                # Kaito's adapter images keep the files under /data.
                assert mount["subPath"] == "data", r.id
            else:
                assert source["persistentVolumeClaim"]["readOnly"] is True, r.id
                assert "subPath" not in mount, f"{r.id}: files at the claim's root"
        # Nothing else sits under the adapters directory, nor is the directory itself a
        # mount that would hide the adapters' (each adapter is its own mount).
        mounts = [m["mountPath"].rstrip("/") for m in r.container["volumeMounts"]]
        assert ADAPTERS_DIR not in mounts, r.id
        assert len([m for m in mounts if m.startswith(ADAPTERS_DIR + "/")]) == len(adapters)


def test_each_adapter_has_its_strength_variable(
    adapter_renders: list[Rendered], plain_renders: dict[str, Rendered]
) -> None:
    """Kaito's convention: the variable's name is the adapter's directory name, its value
    a float (Kaito's operator accepts 0 to 1). The component adds exactly those."""
    for r in adapter_renders:
        env = env_by_name(r.container)
        added = env.keys() - env_by_name(plain_renders[r.name].container).keys()
        assert added == r.adapter_mounts.keys(), r.id
        for name in added:
            assert 0 <= float(env[name]["value"]) <= 1, f"{r.id}: {name}={env[name]['value']}"
        assert not added & r.config_env.keys(), r.id


def test_the_component_changes_nothing_else(
    adapter_renders: list[Rendered], plain_renders: dict[str, Rendered]
) -> None:
    """Only the adapters' volumes, mounts and variables: probes, resources, security and
    the rollout strategy stay the overlay's."""
    for r in adapter_renders:
        plain = plain_renders[r.name]
        assert [d["kind"] for d in r.docs] == [d["kind"] for d in plain.docs], r.id
        ours = {m["name"] for m in r.adapter_mounts.values()}
        container = dict(r.container)
        container["env"] = [e for e in container["env"] if e["name"] not in r.adapter_mounts]
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] not in ours]
        assert container == plain.container, r.id
        pod = dict(r.pod, containers=plain.pod["containers"])
        pod["volumes"] = [v for v in pod["volumes"] if v["name"] not in ours]
        assert pod == plain.pod, r.id
        assert r.deployment["spec"]["strategy"] == plain.deployment["spec"]["strategy"], r.id


# --- the Kaito Workspace with adapters ----------------------------------------------------


@pytest.fixture(scope="module")
def workspace_render() -> list[dict[str, Any]]:
    return [
        d for d in yaml.safe_load_all(kustomize(MANIFESTS / "kaito-workspace" / "adapters")) if d
    ]


def test_workspace_example_carries_the_adapters_in_its_template(
    workspace_render: list[dict[str, Any]], tmp_path: Path
) -> None:
    assert sorted(d["kind"] for d in workspace_render) == ["ConfigMap", "Workspace"]
    workspace = next(d for d in workspace_render if d["kind"] == "Workspace")
    template = workspace["inference"]["template"]
    for version in (KUBERNETES_VERSION, OLDEST_KUBERNETES_VERSION):
        validate_object(workspace, version, "kaito-workspace/adapters: Workspace")
        pod_template = {"metadata": {"name": "t"}, "template": template}
        validate_object(
            {"apiVersion": "v1", "kind": "PodTemplate", **pod_template}, version, "its template"
        )
    # The overlay's pod with the component, exactly: one source for both.
    overlay = render_overlay("mistral-7b-instruct", PVC, tmp_path)
    assert template == overlay.deployment["spec"]["template"]
    assert overlay.adapter_mounts
    # Kaito's operator applies inference.adapters to preset workspaces only: on a template
    # it would be accepted and ignored (the committed schema subset rejects it).
    assert "adapters" not in workspace["inference"]
    # A second Workspace beside ../ must not take its name or its nodes.
    base = [d for d in yaml.safe_load_all(kustomize(MANIFESTS / "kaito-workspace")) if d]
    (other,) = [d for d in base if d["kind"] == "Workspace"]
    assert workspace["metadata"]["name"] != other["metadata"]["name"]
    assert workspace["resource"]["labelSelector"] != other["resource"]["labelSelector"]
