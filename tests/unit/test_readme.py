"""The README stays true: every setting and every endpoint is documented there, and every
link in it and in docs/ reaches a file and heading that exist."""

from pathlib import Path

import pytest

from app.server import create_app
from app.settings import Settings
from tests.markdown_links import broken_links

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
PAGES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted(REPO.glob("bench/*.md")),
]


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


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page: Path) -> None:
    broken = broken_links(page, REPO)
    assert not broken, "\n".join(broken)


def test_readme_maps_every_docs_page():
    missing = [p.name for p in (REPO / "docs").glob("*.md") if f"(docs/{p.name})" not in README]
    assert not missing, f"docs pages the README's documentation map does not link: {missing}"
