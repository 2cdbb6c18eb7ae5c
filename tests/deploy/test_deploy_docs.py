"""The deployment files and the README's "Deploy" section agree: every Markdown file or
README heading that the Dockerfile, manifests/ and tests/deploy point at exists, and what
the README tells an operator to do (the Recreate patch, the Kubernetes versions) works."""

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

# A Markdown path, optionally with a heading anchor (README.md#shutdown, or a page under
# docs/).
MD_REFERENCE = re.compile(r"(?<![\w./-])((?:\.\./)*[\w./-]*\w\.md)(?:#([\w-]+))?")
FENCE = re.compile(r"^\s*(```|~~~)")


def deploy_files() -> list[Path]:
    files = [DOCKERFILE, REPO / ".dockerignore"]
    files += [p for p in sorted(MANIFESTS.rglob("*")) if p.is_file()]
    files += sorted((REPO / "tests" / "deploy").glob("*.py"))
    return files


def heading_anchors(markdown: str) -> dict[str, int]:
    """{anchor: line index} of the headings, anchored as GitHub renders them: lower case,
    punctuation dropped, spaces to hyphens, a repeated anchor suffixed -1, -2, ...
    Headings in code blocks do not count."""
    anchors: dict[str, int] = {}
    seen: dict[str, int] = {}
    in_code = False
    for index, line in enumerate(markdown.splitlines()):
        if FENCE.match(line):
            in_code = not in_code
            continue
        match = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if in_code or not match:
            continue
        heading = match.group(1)
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors[slug if count == 0 else f"{slug}-{count}"] = index
    return anchors


def deploy_section(readme: str) -> str:
    """README.md's "## Deploy" section, up to the next second-level heading."""
    start = readme.index("\n## Deploy\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else len(readme)]


def subsection(section: str, heading: str) -> str:
    start = section.index(f"\n### {heading}\n")
    end = section.find("\n### ", start + 1)
    return section[start : end if end != -1 else len(section)]


@pytest.fixture(scope="session")
def readme() -> str:
    return (REPO / "README.md").read_text()


def test_markdown_references_resolve() -> None:
    """The deployment guide moved from docs/ into the README: no reference may point at a
    file or heading that is gone, or at a file outside the repository."""
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


def test_deploy_references_point_into_the_deploy_section(readme: str) -> None:
    """The deployment files' README anchors land in "Deploy", not on a heading of the
    same name elsewhere (README has two "Metrics": #metrics is not Deploy's)."""
    anchors = heading_anchors(readme)
    lines = readme.splitlines()
    start = anchors["deploy"]
    end = min(
        (i for i in anchors.values() if i > start and lines[i].startswith("## ")),
        default=len(lines),
    )
    for f in deploy_files():
        for match in MD_REFERENCE.finditer(f.read_text(errors="replace")):
            path, anchor = match.groups()
            if path == "README.md" and anchor:
                assert start <= anchors.get(anchor, -1) < end, (
                    f"{f.relative_to(REPO)}: README.md#{anchor} is not in the Deploy section"
                )


def test_readme_names_the_validated_kubernetes_versions(readme: str) -> None:
    section = subsection(deploy_section(readme), "Apply an overlay")
    for version in (OLDEST_KUBERNETES_VERSION, KUBERNETES_VERSION):
        minor = ".".join(version.split(".")[:2])
        assert re.search(rf"\b{re.escape(minor)}\b", section), (
            f"README's Deploy section does not name Kubernetes {minor}, which the tests use"
        )


def test_readme_names_every_cache_variable(readme: str) -> None:
    section = deploy_section(readme)
    missing = [name for name in CACHE_VARS if f"`{name}`" not in section]
    assert not missing, f"README's Deploy section does not say where {missing} go"


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_readme_recreate_patch_works(readme: str, overlay: str, tmp_path: Path) -> None:
    """The base rolls out with a surge pod (a second GPU); the README's patch for a
    single-GPU node turns that into Recreate, and the result is still valid."""
    section = subsection(deploy_section(readme), "Rollouts")
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    patches = yaml.safe_load(block)["patches"]

    base = yaml.safe_load((MANIFESTS / "base" / "deployment.yaml").read_text())
    assert base["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 1, "README says maxSurge 1"

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
