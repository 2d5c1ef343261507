"""Packaging: every imported library is declared, the licence and citation files exist, and
the Flower app bundle carries the app's code but not the benchmark or its results."""

from __future__ import annotations

import ast
import io
import re
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

from project_files import copy_project

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("pemma_core", "server", "client", "simulation", "benchmarks", "deploy")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _declared() -> set[str]:
    project = _pyproject()["project"]
    specs = [*project["dependencies"], *(d for group in project["optional-dependencies"].values() for d in group)]
    names = set()
    for spec in specs:
        name = re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0]
        names.add(name.lower().replace("_", "-"))
    return names


def _imported_modules() -> dict[str, set[Path]]:
    found: dict[str, set[Path]] = {}
    for package in PROJECT_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(path.relative_to(REPO))
    return found


def test_every_imported_library_is_declared_in_pyproject():
    declared = _declared()
    distributions = packages_distributions()
    undeclared = {}
    for module, files in _imported_modules().items():
        if module in sys.stdlib_module_names or module in PROJECT_PACKAGES or module == "tests":
            continue
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(map(str, files))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_licence_and_citation_files():
    assert _pyproject()["project"]["license"]["text"] == "Apache-2.0"
    licence = (REPO / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    titles = " | ".join(ref["title"] for ref in citation["references"])
    for work in ("PEMMA", "UNETR: Transformers", "Swin UNETR", "MONAI", "Flower"):
        assert work in titles, f"CITATION.cff does not cite {work}"


def test_flower_app_bundle_holds_the_app_but_not_the_benchmark(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    copy_project(tmp_path)
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(tmp_path))).namelist()
    assert "server/server_app.py" in names and "client/client_app.py" in names
    assert any(n.startswith("pemma_core/") for n in names)
    leaked = [n for n in names if n.startswith(("benchmarks/", "tests/", "deploy/")) or "bench" in Path(n).name.lower()]
    assert not leaked, f"the Flower app bundle carries benchmark/test files: {leaked}"
