"""The layout stays walkable: no import circles, a framework-free core, no dangling
references in the docs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pemma_core", "server", "client", "simulation", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (lazy imports included)."""
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != this:
                found.add(name)
    return found


def test_no_import_circle_among_the_project_modules():
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    # Package __init__ files are docstrings; importing a package's module imports the
    # package first, which is not a dependency of the module on its siblings.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_pemma_core_never_imports_flower():
    for path in (REPO / "pemma_core").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            assert not any(n == "flwr" or n.startswith("flwr.") for n in names), f"{path} imports flwr"


def _documents() -> list[Path]:
    tracked = [*REPO.glob("*.md"), *REPO.glob("docs/**/*.md"), *REPO.glob("sites/**/*.md"), *REPO.glob("deploy/**/*.md"),
               *REPO.glob("benchmarks/**/*.md")]
    return sorted(set(tracked))


def test_no_reference_to_a_missing_design_document():
    offenders = []
    for path in [*_documents(), *(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))]:
        if "DESIGN.md" in path.read_text():
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"these cite DESIGN.md, which the repository does not hold: {offenders}"
    assert (REPO / "docs" / "ARCHITECTURE.md").is_file()


def test_every_relative_link_in_the_docs_exists():
    missing = []
    for doc in _documents():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue  # a URL
            if not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not missing, f"links to missing files: {missing}"
