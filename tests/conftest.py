"""Shared fixtures: a tiny synthetic federation and the real IBSI data folder; how the suite
shares 2 cores between two pytest-xdist workers (pyproject.toml: ``-n 2``)."""

from __future__ import annotations

import os

# Two workers, each running torch, on 2 cores: one intra-op thread per process (and per process a
# test starts), else the workers' threads contend and the suite runs slower than one worker.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pemma_core.phantoms.writer import Federation, make_federation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Tests that start federations of processes and wait on them with timeouts (a TLS deployment,
# Flower's Ray engine, `pemma simulate` stopped by a signal): run one at a time, on one worker,
# so that at most one such federation shares the machine with the other worker's tests.
PROCESS_FEDERATIONS = ("test_deployment.py", "test_simulation_simulate.py", "test_run_dir.py")
# Files in the order the workers take them, longest first (a worker that takes a long file last
# finishes alone; `--durations` shows the costs); the other files follow in file order.
COSTLIEST_FIRST = (*PROCESS_FEDERATIONS, "test_bench.py", "test_simulation_federation.py", "test_secure_federation.py",
                   "test_model.py", "test_predict.py", "test_dicom.py", "test_memory_option.py", "test_privacy.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Each test file goes whole to one worker (a module-scoped fixture is built once), and so do all
    :data:`PROCESS_FEDERATIONS` together. (xdist's ``loadgroup`` marks cannot do it under pytest 9.2,
    whose test ids xdist can no longer suffix with the group.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "process-federations" if Path(file).name in PROCESS_FEDERATIONS else file

    return FileScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The costliest files first (stable: test order kept within a file); the workers' schedule follows
    this order."""
    rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
