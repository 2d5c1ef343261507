"""Which site YAMLs make up a simulated federation, and the phantom one made on the fly.

Used by the server app (to generate the phantom federation when no site is given) and by
the client app in simulation (to find the YAML of its ``partition-id``). A deployed
SuperNode never comes here: it names its own YAML (node config ``site-config``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import yaml

log = logging.getLogger("flwr.pemma")


def federation_site_files(folder: str | Path) -> list[Path]:
    """The site YAMLs of a federation folder written by ``pemma phantoms``: those listed in its
    ``federation.yaml`` (the held-out test set excluded), else every ``*/site.yaml``, sorted."""
    folder = Path(folder)
    listing = folder / "federation.yaml"
    if listing.is_file():
        sites = (yaml.safe_load(listing.read_text(encoding="utf-8")) or {}).get("sites") or []
        files = [(folder / str(p)).resolve() for p in sites]
    else:
        files = sorted(p.resolve() for p in folder.glob("*/site.yaml"))
    if not files:
        raise FileNotFoundError(f"no federation in {folder} (no federation.yaml, no */site.yaml)")
    return files


def ensure_federation(
    site_configs: Sequence[Path], folder: Path, phantom_sites: int = 3, phantom_cases: int = 6, seed: int = 0
) -> list[Path]:
    """The site YAMLs: ``site_configs`` if given (checked to exist), else the phantom federation
    in ``folder``, generated there first if absent (``pemma_core.phantoms``)."""
    if site_configs:
        missing = [p for p in site_configs if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"site config(s) not found: {', '.join(map(str, missing))}")
        return [Path(p) for p in site_configs]
    if not (Path(folder) / "federation.yaml").is_file():
        from pemma_core.phantoms import make_federation

        log.info("generating a phantom federation of %d sites (%d cases each) into %s", phantom_sites, phantom_cases, folder)
        make_federation(folder, n_sites=phantom_sites, cases_per_site=phantom_cases, seed=seed, test_cases=0)
    return federation_site_files(folder)
