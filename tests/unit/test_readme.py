"""The README stays true: every setting and every endpoint is documented there."""

from pathlib import Path

import pytest

from app.server import create_app
from app.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


class NoEngine:
    name = "none"

    def is_ready(self) -> bool:
        return False


@pytest.fixture
def routes() -> set[str]:
    app = create_app(Settings(), engine=NoEngine())  # type: ignore[arg-type]
    return {r.path for r in app.routes if getattr(r, "include_in_schema", False)} | {"/healthz"}


def test_every_setting_is_in_the_readme():
    names = [f"KAITO_{name.upper()}" for name in Settings.model_fields]
    missing = [name for name in names if f"`{name}`" not in README]
    assert not missing, f"settings missing from README.md: {missing}"


def test_every_endpoint_is_in_the_readme(routes):
    missing = sorted(path for path in routes if path not in README)
    assert not missing, f"endpoints missing from README.md: {missing}"
