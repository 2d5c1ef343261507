"""Shared fixtures: a tiny synthetic federation and the real IBSI data folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from pemma_core.phantoms.writer import Federation, make_federation

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def phantom_federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """3 sites ([ct], [ct, pet], [ct, pet, ehr]) x 4 cases (3 train + 1 test) + 2 test cases, seed 0.

    Read-only by convention: tests that alter files use ``copy_phantom_site``. Loaders may
    fill each site's ``cache/`` folder.
    """
    root = tmp_path_factory.mktemp("federation") / "fed"
    return make_federation(root, n_sites=3, cases_per_site=4, seed=0, test_cases=2)


@pytest.fixture
def copy_phantom_site(phantom_federation: Federation, tmp_path: Path) -> Callable[[int], Path]:
    """``copy_phantom_site(i)`` -> a private copy of site ``i`` (0-based) of the federation; its YAML path."""

    def copy(index: int) -> Path:
        source = phantom_federation.site_yamls[index].parent
        target = tmp_path / source.name
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("cache"))
        return target / "site.yaml"

    return copy


@pytest.fixture(scope="session")
def ibsi_root() -> Path:
    """The IBSI STS data: $PEMMA_IBSI_ROOT, else ../shared/data/ibsi-sts beside the repository."""
    root = Path(os.environ.get("PEMMA_IBSI_ROOT") or REPO.parent / "shared" / "data" / "ibsi-sts")
    assert (root / "manifest.csv").is_file(), f"IBSI data not found at {root} (set PEMMA_IBSI_ROOT)"
    return root


@pytest.fixture()
def flower_identity() -> None:
    """Flower's TaskIdentity set as a SuperLink's, so that tests can build ``Message`` objects
    (the in-process grid sets it the same way the simulation engine does)."""
    from simulation.inprocess import InProcessGrid

    InProcessGrid(client_app=None, node_configs=[])
