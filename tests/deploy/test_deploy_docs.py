"""The deployment files and the deployment guide (docs/DEPLOY.md) agree: every Markdown
file or heading that the Dockerfile, manifests/ and tests/deploy point at exists, and what
the guide tells an operator to do (the Recreate patch, the Kubernetes versions) works."""

import re
import shutil
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy.deploy_support import (
    CACHE_VARS,
    DOCKERFILE,
    GPU_OVERLAYS,
    KUBERNETES_VERSION,
    MANIFESTS,
    OLDEST_KUBERNETES_VERSION,
    REPO,
    kustomize,
)
from tests.markdown_links import heading_anchors

# A Markdown path, optionally with a heading anchor (docs/DEPLOY.md#shutdown), as the
# deployment files name them in comments: relative to the repository root.
MD_REFERENCE = re.compile(r"(?<![\w./-])((?:\.\./)*[\w./-]*\w\.md)(?:#([\w-]+))?")
DEPLOY_GUIDE = REPO / "docs/DEPLOY.md"


def deploy_files() -> list[Path]:
    files = [DOCKERFILE, REPO / ".dockerignore"]
    files += [p for p in sorted(MANIFESTS.rglob("*")) if p.is_file()]
    files += sorted((REPO / "tests" / "deploy").glob("*.py"))
    return files


def section(guide: str, heading: str) -> str:
    """The guide's "## <heading>" section, up to the next second-level heading."""
    start = guide.index(f"\n## {heading}\n")
    end = guide.find("\n## ", start + 1)
    return guide[start : end if end != -1 else len(guide)]


@pytest.fixture(scope="session")
def guide() -> str:
    return DEPLOY_GUIDE.read_text()


def test_markdown_references_resolve() -> None:
    """No reference may point at a file or heading that is gone, or at a file outside the
    repository."""
    broken = []
    checked = 0
    for f in deploy_files():
        for number, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for match in MD_REFERENCE.finditer(line):
                path, anchor = match.groups()
                where = f"{f.relative_to(REPO)}:{number}: {match.group(0)}"
                target = (REPO / path).resolve()
                checked += 1
                if not target.is_relative_to(REPO):
                    broken.append(f"{where} (outside the repository)")
                elif not target.is_file():
                    broken.append(f"{where} (no such file)")
                elif anchor and anchor not in heading_anchors(target.read_text()):
                    broken.append(f"{where} (no such heading)")
    assert checked, "no Markdown reference found: the pattern no longer matches"
    assert not broken, "\n".join(broken)


def test_guide_names_the_validated_kubernetes_versions(guide: str) -> None:
    text = section(guide, "Apply an overlay")
    for version in (OLDEST_KUBERNETES_VERSION, KUBERNETES_VERSION):
        minor = ".".join(version.split(".")[:2])
        assert re.search(rf"\b{re.escape(minor)}\b", text), (
            f"docs/DEPLOY.md does not name Kubernetes {minor}, which the tests use"
        )


def test_guide_names_every_cache_variable(guide: str) -> None:
    missing = [name for name in CACHE_VARS if f"`{name}`" not in guide]
    assert not missing, f"docs/DEPLOY.md does not say where {missing} go"


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_guide_recreate_patch_works(guide: str, overlay: str, tmp_path: Path) -> None:
    """The base rolls out with a surge pod (a second GPU); the guide's patch for a
    single-GPU node turns that into Recreate, and the result is still valid."""
    (block,) = re.findall(r"```yaml\n(.*?)```", section(guide, "Rollouts"), flags=re.S)
    patches = yaml.safe_load(block)["patches"]

    base = yaml.safe_load((MANIFESTS / "base" / "deployment.yaml").read_text())
    assert base["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 1, "the guide says maxSurge 1"

    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy)
    kfile = copy / "overlays" / overlay / "kustomization.yaml"
    kustomization = yaml.safe_load(kfile.read_text())
    kustomization.setdefault("patches", []).extend(patches)
    kfile.write_text(yaml.safe_dump(kustomization, sort_keys=False))
    docs = [d for d in yaml.safe_load_all(kustomize(kfile.parent)) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    for version in (KUBERNETES_VERSION, OLDEST_KUBERNETES_VERSION):
        kubernetes_validate.validate(deployment, version, strict=True)


def test_guide_lora_adapters_names_what_exists(guide: str) -> None:
    """The LoRA section's components and Workspace example are the ones in manifests/, and
    it names the Kubernetes version image volumes need (the component's own comment says
    the same)."""
    text = section(guide, "LoRA adapters")
    (block,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    for component in yaml.safe_load(block)["components"]:
        assert (MANIFESTS / "overlays" / "cpu" / component / "kustomization.yaml").is_file()
    paths = re.findall(r"`(manifests/[\w./-]+|\.\./\.\./components/[\w./-]+)`", text)
    assert len(paths) >= 4, paths
    for path in paths:
        where = REPO / path if path.startswith("manifests/") else MANIFESTS / path[6:]
        assert where.exists(), path
    image_volume = (
        MANIFESTS / "components/lora-adapters/image-volume/kustomization.yaml"
    ).read_text()
    for claim in ("1.33", "ImageVolume", "1.35"):
        assert claim in text and claim in image_volume, claim
