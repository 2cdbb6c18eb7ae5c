"""The codebase stays easy to pick up: no comment, docstring or page points at an issue
number (a reader has no tracker), and the pure translation layer has no import cycle."""

import ast
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The word issue followed by a number, with or without "#".
TRACKER_REFERENCE = re.compile(r"\bissues?\s*#?\d+\b", re.IGNORECASE)


def test_no_issue_numbers() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for name in tracked:
        path = REPO / name
        if path.suffix in {".json", ".png"} or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if TRACKER_REFERENCE.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "say the reason instead of an issue number:\n" + "\n".join(found)


def _imports_within(package: str) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, type-only imports included."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / package).glob("*.py")):
        module = f"{package}.{path.stem}" if path.stem != "__init__" else package
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[module] = {m for m in imported if m.startswith(f"{package}.")}
    return graph


def test_param_mapping_imports_go_one_way() -> None:
    """The pure translation layer reads top-down: no module imports one that imports it
    back, not even for types."""
    graph = _imports_within("param_mapping")
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = " -> ".join([*path[path.index(module) :], module])
            raise AssertionError(f"import cycle: {cycle}")
        if module in done:
            return
        for child in graph.get(module, ()):
            visit(child, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])
