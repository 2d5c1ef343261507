"""Data-loading benchmark: seconds per case to preprocess a site's cases, cold vs cached."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pemma_core.config.site import SiteConfig
from pemma_core.data.manifest import SiteDataError
from pemma_core.data.cases import site_cases
from pemma_core.data.pipeline import cached_dataset

__all__ = ["measure_loading"]


def measure_loading(cfg: SiteConfig, n_cases: int) -> dict[str, Any]:
    """Seconds per case to preprocess the first ``n_cases`` usable training cases, cold vs cached.

    The cold pass (read, resample, normalise, write) uses a fresh temporary cache, so the
    site's preprocessed volumes in ``cfg.cache_dir`` are neither used nor changed; the
    second pass reads that temporary cache back. Checks run (or are read from their
    cache) before timing. Returns ``{"site", "n_cases", "spacing", "first_load_s_per_case",
    "cached_load_s_per_case", "speedup", "mean_grid_shape"}``.
    """
    cases, _ = site_cases(cfg, "train")
    cases = [c for c in cases if c.label is not None][: max(int(n_cases), 1)]
    if not cases:
        raise SiteDataError(f"site {cfg.name}: no usable train case to measure")
    with tempfile.TemporaryDirectory(prefix="pemma-measure-") as temp:
        dataset = cached_dataset(cfg, cases, with_label=True, cache_dir=Path(temp))
        start = time.perf_counter()
        shapes = [tuple(dataset[i]["image"].shape[-3:]) for i in range(len(cases))]
        first = (time.perf_counter() - start) / len(cases)
        start = time.perf_counter()
        for i in range(len(cases)):
            dataset[i]
        cached = (time.perf_counter() - start) / len(cases)
    return {
        "site": cfg.name,
        "n_cases": len(cases),
        "spacing": list(cfg.spacing),
        "first_load_s_per_case": round(first, 4),
        "cached_load_s_per_case": round(cached, 4),
        "speedup": round(first / cached, 1) if cached > 0 else float("inf"),
        "mean_grid_shape": [round(float(v), 1) for v in np.mean(np.array(shapes), axis=0)],
    }
