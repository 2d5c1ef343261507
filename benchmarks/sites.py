"""The bench's data: site YAMLs and manifests under ``OUT/sites``, their checks, the
PET/CT alignment audit, and the batches every row trains and is evaluated on.

The bench reads the IBSI sites of ``sites/ibsi`` in place and writes copies (absolute
paths, the bench's device and cache, the sites' own ``limits:``) plus two pooled training sets: every site's CT
(``pooled-ct``) and the CT+PET sites' cases (``pooled-ctpet``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib

from benchmarks.config import SITE_NAMES, BenchConfig, Say
from pemma_core.config.site import SiteConfig, load_site_config
from pemma_core.data.manifest import Case, read_manifest, write_manifest
from pemma_core.data.cases import site_cases
from pemma_core.data.pipeline import Preprocessing, deterministic_transform, eval_loader, train_loader

__all__ = [
    "QUIRK_CASES",
    "BenchSites",
    "alignment_audit",
    "first_batch",
    "load_test_batches",
    "prepare_sites",
]

QUIRK_CASES = ("STS_019", "STS_031", "STS_035", "STS_041")  # named in the IBSI README


@dataclass
class BenchSites:
    """The bench's site YAMLs (all under ``OUT/sites``) and what the data layer reported."""

    federation: list[Path]  # site-a, site-b, site-c (copies: absolute paths, bench device and cache)
    pooled_ct: Path  # every training case of the three sites, CT only
    pooled_ctpet: Path  # training cases of the CT+PET sites (b, c)
    test: Path  # the held-out test cases
    warnings: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _row(case: Case, **override: Any) -> dict[str, Any]:
    return {"case_id": case.case_id, "ct": case.ct, "pet": case.pet, "label": case.label, "split": case.split, **override}


def _write_site_yaml(path: Path, cfg: SiteConfig, name: str, modalities: Sequence[str], manifest: Path,
                     cache_dir: Path, device: str) -> Path:
    import yaml

    data = {
        "name": name,
        "data_root": str(cfg.data_root),
        "modalities": list(modalities),
        "manifest": str(manifest),
        "spacing": list(cfg.spacing),
        "patch_size": None,
        "cache_dir": str(cache_dir),
        "device": "cuda" if device.startswith("cuda") else device,
        "on_bad_case": cfg.on_bad_case,
        "ct_window": list(cfg.ct_window),
        "pet_suv_max": cfg.pet_suv_max,
        # The copy keeps what the site accepts (sites/ibsi lower min_examples_per_round for the tiny CPU budgets).
        "limits": {**dataclasses.asdict(cfg.limits), "pet_embed": list(cfg.limits.pet_embed)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by pemma bench\n" + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _write_sites(config: BenchConfig) -> BenchSites:
    """The bench's site YAMLs and manifests (nothing checked yet)."""
    if config.data_root is not None:
        os.environ["PEMMA_IBSI_ROOT"] = str(Path(config.data_root).expanduser().resolve())
    folder = config.out / "sites"
    originals = {n: load_site_config(config.sites_dir / f"{n}.yaml") for n in (*SITE_NAMES, "test")}
    if not originals["site-a"].data_root.is_dir():
        raise FileNotFoundError(
            f"IBSI data not found at {originals['site-a'].data_root} (give --data-root or set PEMMA_IBSI_ROOT)"
        )
    cache = Path(config.cache_dir) if config.cache_dir else originals["site-a"].cache_dir.parent / "ibsi-bench"
    cases = {n: read_manifest(cfg)[0] for n, cfg in originals.items()}
    if config.train_cases is not None:
        for n in SITE_NAMES:
            cases[n] = [c for c in cases[n] if c.split == "train"][: config.train_cases]
    if config.test_cases is not None:
        cases["test"] = cases["test"][: config.test_cases]

    def site_yaml(stem: str, cfg: SiteConfig, name: str, modalities: Sequence[str], rows: list[dict[str, Any]]) -> Path:
        manifest = write_manifest(folder / f"{stem}-manifest.csv", rows)
        return _write_site_yaml(folder / f"{stem}.yaml", cfg, name, modalities, manifest, cache, config.device)

    federation = [site_yaml(n, originals[n], originals[n].name, originals[n].modalities, [_row(c) for c in cases[n]])
                  for n in SITE_NAMES]
    ct_rows = [_row(c, pet=None) for n in SITE_NAMES for c in cases[n] if c.split == "train"]
    ctpet_rows = [_row(c) for n in SITE_NAMES if originals[n].has_pet for c in cases[n] if c.split == "train"]
    reference = originals["site-b"]
    return BenchSites(
        federation=federation,
        pooled_ct=site_yaml("pooled-ct", reference, "ibsi-pooled-ct", ["ct"], ct_rows),
        pooled_ctpet=site_yaml("pooled-ctpet", reference, "ibsi-pooled-ctpet", ["ct", "pet"], ctpet_rows),
        test=site_yaml("test", originals["test"], originals["test"].name, originals["test"].modalities,
                       [_row(c) for c in cases["test"]]),
    )


def _check_cases(sites: BenchSites) -> None:
    """Every case through the data layer's checks: usable counts, skipped cases, warnings."""
    handler = _Collect()
    logger = logging.getLogger("pemma.data")
    logger.addHandler(handler)
    try:
        seen: set[str] = set()
        for path in (*sites.federation, sites.test):
            cfg = load_site_config(path)
            usable, problems = site_cases(cfg)
            sites.counts[cfg.name] = len(usable)
            for p in problems:
                sites.skipped.append({"site": cfg.name, **p.to_dict()})
        for message in handler.messages:
            if message not in seen:
                seen.add(message)
                site, _, text = message.partition(": ")
                sites.warnings.append({"site": site.removeprefix("site "), "message": text})
        for path in (sites.pooled_ct, sites.pooled_ctpet):
            cfg = load_site_config(path)
            sites.counts[cfg.name] = len(site_cases(cfg, "train")[0])
    finally:
        logger.removeHandler(handler)


def prepare_sites(config: BenchConfig, say: Say) -> BenchSites:
    """Write the bench's site YAMLs and manifests; check every case (collecting the data
    layer's warnings and skipped cases); fill the preprocessing cache."""
    sites = _write_sites(config)
    _check_cases(sites)
    # Fill the preprocessing cache once, so no row pays for it.
    started = time.perf_counter()
    for path, split in ((sites.pooled_ct, "train"), (sites.pooled_ctpet, "train"), (sites.test, "test"),
                        *((p, "train") for p in sites.federation)):
        for _ in eval_loader(load_site_config(path), split=split):
            pass
    say(f"data: {sum(sites.counts.get(load_site_config(p).name, 0) for p in sites.federation)} training cases at 3 sites, "
        f"{sites.counts.get('ibsi-test', 0)} test cases, cache ready in {time.perf_counter() - started:.0f} s")
    return sites


def alignment_audit(config: BenchConfig, sites: BenchSites, say: Say) -> list[dict[str, Any]]:
    """For CT+PET cases: PET_mask carried onto the CT-derived grid by the pipeline's own
    transform (through both affines) against CT_mask on that grid, plus header facts.

    A Dice well below the others means the headers disagree with the masks (STS_019)."""
    cases: list[tuple[str, str, Path]] = []
    held: dict[str, bool] = {}
    for path in (*sites.federation, sites.test):
        cfg = load_site_config(path)
        held[cfg.name] = cfg.has_pet
        for case in read_manifest(cfg)[0]:
            cases.append((cfg.name, case.case_id, cfg.data_root / case.case_id))
    if config.audit == "named":
        cases = [c for c in cases if c[1] in QUIRK_CASES]
    prep = Preprocessing.from_site(load_site_config(sites.test))
    transform = deterministic_transform(prep, has_ct=True, has_pet=False, has_label=True)
    out = []
    started = time.perf_counter()
    for site, case_id, folder in cases:
        ct_file, pet_file = folder / "CT_image.nii.gz", folder / "PET_image.nii.gz"
        if not pet_file.is_file() or not (folder / "PET_mask.nii.gz").is_file():
            continue
        ct_h, pet_h = nib.load(str(ct_file)), nib.load(str(pet_file))
        on_ct = transform({"ct": str(ct_file), "label": str(folder / "CT_mask.nii.gz")})["label"][0].numpy() > 0.5
        on_pet = transform({"ct": str(ct_file), "label": str(folder / "PET_mask.nii.gz")})["label"][0].numpy() > 0.5
        dice = 2 * float((on_ct & on_pet).sum()) / max(1.0, float(on_ct.sum() + on_pet.sum()))
        out.append({
            "site": site, "case_id": case_id,
            "pet_used": held[site],
            "ct_slices": int(ct_h.shape[2]), "pet_slices": int(pet_h.shape[2]),
            "z_origin_offset_mm": round(float(pet_h.affine[2, 3] - ct_h.affine[2, 3]), 2),
            "pet_mask_vs_ct_mask_dice": round(dice, 3),
        })
    say(f"alignment audit: {len(out)} CT+PET cases in {time.perf_counter() - started:.0f} s")
    return out


def load_test_batches(test_yaml: Path) -> list[dict[str, Any]]:
    """Every test case as an :func:`pemma_core.data.pipeline.eval_loader` batch (kept in memory)."""
    return list(eval_loader(load_site_config(test_yaml), split="test"))


def first_batch(yaml_path: Path, roi: tuple[int, int, int], batch_size: int, seed: int) -> dict[str, Any]:
    """The first training batch of a site (random crop and augmentation of ``seed``)."""
    return next(iter(train_loader(load_site_config(yaml_path), roi, batch_size=batch_size, seed=seed)))
