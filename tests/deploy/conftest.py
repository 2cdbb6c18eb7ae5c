"""Fixtures for the deployment checks (helpers in deploy_support.py)."""

import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.deploy_support import (
    ADAPTER_COMPONENTS,
    DOCKERFILE,
    GPU_OPTIONAL_COMPONENTS,
    GPU_OVERLAYS,
    LWS_OVERLAYS,
    MANIFESTS,
    OPTIONAL_COMPONENTS,
    REPO,
    Dockerfile,
    Rendered,
    parse_dockerfile,
    render_overlay,
)


@pytest.fixture(scope="session")
def overlay_names() -> list[str]:
    return sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if p.is_dir())


@pytest.fixture(scope="session")
def deployment_overlay_names(overlay_names: list[str]) -> list[str]:
    """The overlays that serve from a Deployment (not a LeaderWorkerSet), which the
    Deployment components (GPU, cache, autoscaling, routing) apply to."""
    return [name for name in overlay_names if name not in LWS_OVERLAYS]


@pytest.fixture(scope="session")
def renders(
    deployment_overlay_names: list[str], tmp_path_factory: pytest.TempPathFactory
) -> list[Rendered]:
    """Every Deployment overlay, alone and with all the optional components."""
    out = []
    for name in deployment_overlay_names:
        out.append(render_overlay(name, (), tmp_path_factory.mktemp(name)))
        optional = OPTIONAL_COMPONENTS + ADAPTER_COMPONENTS
        if name in GPU_OVERLAYS:
            optional += GPU_OPTIONAL_COMPONENTS
        out.append(render_overlay(name, optional, tmp_path_factory.mktemp(name)))
    return out


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    text = DOCKERFILE.read_text()
    return Dockerfile(text, parse_dockerfile(text))


@pytest.fixture(scope="session")
def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


@pytest.fixture(scope="session")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture
def clean_kaito_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No KAITO_* variable from the developer's shell leaks into a Settings() check."""
    for key in list(os.environ):
        if key.startswith("KAITO_"):
            monkeypatch.delenv(key)
    yield monkeypatch


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
