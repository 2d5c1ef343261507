"""Cross-process coordination: one phantom federation shared by simulated nodes starting together."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

__all__ = ["ensure_phantom_federation"]

log = logging.getLogger("pemma.phantoms")


def ensure_phantom_federation(folder: str | Path, n_sites: int = 3, cases_per_site: int = 18, seed: int = 0) -> list[Path]:
    """The site YAMLs of the phantom federation in ``folder`` (no held-out test set), written
    there first if it holds none. Simulation only (``pemma simulate``, or a simulated node of
    ``flwr run .`` without ``site-configs``); a deployed site names its own YAML. The default
    18 cases per site (6 test, 12 training) meet the default privacy floors of ``SiteLimits``;
    smaller sites get lowered floors written into their YAML.

    The federation is written into a temporary sibling folder and renamed into place, so
    simulated nodes starting together write it at most once each and read one whole copy.
    """
    # Here, not at the top: a deployed site's ClientApp imports this module on every message and
    # never writes phantoms (the writer pulls scipy, nibabel and pandas).
    from pemma_core.phantoms.writer import federation_site_files, make_federation

    folder = Path(folder).expanduser().resolve()
    if not (folder / "federation.yaml").is_file():
        log.info("generating a phantom federation of %d sites (%d cases each) into %s", n_sites, cases_per_site, folder)
        partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            make_federation(partial, n_sites=n_sites, cases_per_site=cases_per_site, seed=seed, test_cases=0)
            try:
                os.rename(partial, folder)  # site YAMLs hold relative paths: the copy works where it lands
            except OSError as exc:
                if not (folder / "federation.yaml").is_file():  # not another node's copy
                    raise FileExistsError(
                        f"{folder} exists and holds no phantom federation (no federation.yaml): refusing to write over it"
                    ) from exc
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return federation_site_files(folder)
