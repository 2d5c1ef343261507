"""Writing a synthetic PET/CT federation to disk (the data behind ``pemma phantoms``).

:func:`make_federation` writes::

    OUT/federation.yaml            site YAML paths (sites + held-out test set)
    OUT/phantom_truth.csv          ground truth per case (simulation only, not site data)
    OUT/site-1/site.yaml           one site: YAML, manifest.csv, clinical.csv,
    OUT/site-1/cases/<id>/ct.nii.gz, pet.nii.gz (sites holding PET only), label.nii.gz
    ...
    OUT/test/site.yaml             held-out test cases holding CT, PET and EHR

Each site cycles through modalities ``[ct]``, ``[ct, pet]``, ``[ct, pet, ehr]`` (site-1,
site-2, site-3, site-4 ...) with its own scanner (:mod:`pemma_core.phantoms.physics`).
A third of each site's cases are ``test``. Sites without ``ehr`` get time and event
only in their clinical CSV. A site too small for the default privacy floors of
:class:`~pemma_core.config.site.SiteLimits` (fewer than 3 test cases, or an EHR site with
fewer than 10 training rows) gets a ``limits:`` block lowering them to what it holds, so a
tiny test federation still reports Dice and EHR statistics. Case ``j`` of site ``i`` draws from
``numpy.random.default_rng([seed, i, j])``, so a seed fixes every file.
:func:`federation_site_files` lists a federation folder's sites.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from pemma_core.config.site import SiteLimits
from pemma_core.data.manifest import write_manifest
from pemma_core.modes import MODALITIES
from pemma_core.phantoms.physics import Scanner, case_survival, draw_case, make_case_images, site_scanner

__all__ = [
    "PHANTOM_SPACING",
    "Federation",
    "parse_modalities",
    "phantom_limits",
    "make_federation",
    "federation_site_files",
]

# The target spacing written into phantom site YAMLs (a property of the phantoms: their
# 110 x 110 x 111 mm CT fields of view become 32 voxels a side, one tiny-preset window), not the
# site config default.
PHANTOM_SPACING: tuple[float, float, float] = (3.5, 3.5, 3.5)
DEFAULT_MODALITY_CYCLE: tuple[tuple[str, ...], ...] = (("ct",), ("ct", "pet"), ("ct", "pet", "ehr"))
# A third of each site's cases are held out: the default demo's 18 cases per site then hold 6
# test cases, whose within-site pairs pool to at least 30 for the prognosis C-index.
TEST_FRACTION = 1 / 3


@dataclass(frozen=True)
class Federation:
    """What :func:`make_federation` wrote."""

    root: Path
    site_yamls: tuple[Path, ...]
    test_yaml: Path | None
    truth_csv: Path
    modalities: dict[str, tuple[str, ...]] = field(default_factory=dict)  # site name -> modalities


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def phantom_limits(modalities: Sequence[str], ehr_values: int, n_test: int) -> dict[str, int]:
    """The privacy floors a phantom site must lower to report at all: ``min_eval_cases`` when it holds
    fewer test cases than the default, ``min_ehr_rows`` at an EHR site whose sparsest covariate has
    fewer training values (``ehr_values``); each lowered to what the site holds, at least 1. Such a
    small federation is a test federation, which also trains on tiny budgets: its
    ``min_examples_per_round`` is 1. Empty when the defaults fit (the default federation)."""
    floors = SiteLimits()
    lowered = {}
    if n_test < floors.min_eval_cases:
        lowered["min_eval_cases"] = max(1, n_test)
    if "ehr" in modalities and ehr_values < floors.min_ehr_rows:
        lowered["min_ehr_rows"] = max(1, ehr_values)
    if lowered:
        lowered["min_examples_per_round"] = 1
    return lowered


def _write_site(
    folder: Path,
    name: str,
    site_index: int,
    modalities: tuple[str, ...],
    scanner: Scanner,
    n_cases: int,
    n_test: int,
    seed: int,
    spacing: tuple[float, float, float],
    case_prefix: str,
) -> tuple[Path, list[dict[str, object]]]:
    cases_dir = folder / "cases"
    cases_dir.mkdir(parents=True)
    manifest_rows, clinical_rows, truth_rows = [], [], []
    for j in range(n_cases):
        rng = np.random.default_rng([seed, site_index, j])
        case = draw_case(rng)
        images = make_case_images(case, scanner, rng)
        case_id = f"{case_prefix}-{j:03d}"
        split = "test" if j >= n_cases - n_test else "train"
        case_dir = cases_dir / case_id
        case_dir.mkdir()
        _save(images.ct, images.ct_affine, case_dir / "ct.nii.gz")
        _save(images.label, images.ct_affine, case_dir / "label.nii.gz")
        pet_rel = ""
        if "pet" in modalities:
            _save(images.pet, images.pet_affine, case_dir / "pet.nii.gz")
            pet_rel = f"cases/{case_id}/pet.nii.gz"
        manifest_rows.append(
            {
                "case_id": case_id,
                "ct": f"cases/{case_id}/ct.nii.gz",
                "pet": pet_rel,
                "label": f"cases/{case_id}/label.nii.gz",
                "split": split,
            }
        )
        event_time, observed, event, parts = case_survival(case, images.volume_ml)
        row: dict[str, object] = {"case_id": case_id}
        if "ehr" in modalities:
            row.update(
                age=round(case.age, 1), sex=case.sex, grade=case.grade, ecog="" if case.ecog_missing else case.ecog
            )
        row.update(time=observed, event=event)
        clinical_rows.append(row)
        truth_rows.append(
            {
                "site": name,
                "case_id": case_id,
                "split": split,
                "modalities": "+".join(modalities),
                "volume_ml": round(images.volume_ml, 3),
                "suv_mean": round(case.suv_mean, 3),
                "suv_max": round(images.suv_max, 3),
                "tumour_contrast_hu": round(case.tumour_contrast_hu, 1),
                "age": round(case.age, 1),
                "sex": case.sex,
                "grade": case.grade,
                "ecog": case.ecog,
                "lp_ct": round(parts["ct"], 4),
                "lp_pet": round(parts["pet"], 4),
                "lp_ehr": round(parts["ehr"], 4),
                "lp_total": round(parts["total"], 4),
                "event_time": round(event_time, 2),
                "censor_time": round(case.censor_months, 2),
                "time": observed,
                "event": event,
            }
        )

    write_manifest(folder / "manifest.csv", manifest_rows)
    with (folder / "clinical.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(clinical_rows[0]))
        writer.writeheader()
        writer.writerows(clinical_rows)

    covariates = {"age": "numeric", "sex": "categorical", "grade": "categorical", "ecog": "numeric"}
    config = {
        "name": name,
        "data_root": ".",
        "modalities": list(modalities),
        "manifest": "manifest.csv",
        "clinical": {
            "path": "clinical.csv",
            "id_column": "case_id",
            "time": "time",
            "event": "event",
            "covariates": covariates if "ehr" in modalities else {},
        },
        "spacing": list(spacing),
        "patch_size": None,
        "cache_dir": "cache",
        "device": "auto",  # CUDA when the node has a GPU (client.task.resolve_device)
        "on_bad_case": "skip",
        "ct_window": [-200.0, 300.0],
        "pet_suv_max": 20.0,
    }
    site_yaml = folder / "site.yaml"
    header = (
        f"# Synthetic phantom site {name} (pemma phantoms, seed {seed}): modalities {list(modalities)}; "
        f"CT {scanner.ct_inplane_mm:g} mm, noise {scanner.ct_noise_hu:g} HU; "
        + (
            f"PET {scanner.pet_spacing_mm[0]:g} mm, FWHM {scanner.pet_fwhm_mm:g} mm.\n"
            if "pet" in modalities
            else "no PET.\n"
        )
        + "# Schema: sites/README.md in the pemma repository.\n"
    )
    train_rows = [row for row, case in zip(clinical_rows, manifest_rows) if case["split"] == "train"]
    ehr_values = min((sum(row.get(c, "") != "" for row in train_rows) for c in covariates), default=0)
    limits = phantom_limits(modalities, ehr_values=ehr_values, n_test=n_test)
    limits_block = "" if not limits else (
        "# synthetic phantom data: the privacy floors are lowered so a small test federation still reports\n"
        + yaml.safe_dump({"limits": limits}, sort_keys=False)
    )
    site_yaml.write_text(header + yaml.safe_dump(config, sort_keys=False) + limits_block)
    return site_yaml, truth_rows


def parse_modalities(token: str) -> tuple[str, ...]:
    """``"ct+pet"`` (or ``"ct,pet"``) -> ``("ct", "pet")`` in MODALITIES order; ValueError naming the token."""
    names = [n.strip() for n in token.replace(",", "+").split("+") if n.strip()]
    bad = [n for n in names if n not in MODALITIES]
    if bad or not names or not {"ct", "pet"} & set(names):
        raise ValueError(f"bad modalities {token!r}: use names from {list(MODALITIES)} joined by '+', with ct or pet")
    return tuple(m for m in MODALITIES if m in names)


def make_federation(
    out: Path | str,
    n_sites: int = 3,
    cases_per_site: int = 8,
    seed: int = 0,
    test_cases: int = 8,
    modalities: Sequence[Sequence[str]] | None = None,
    spacing: tuple[float, float, float] = PHANTOM_SPACING,
) -> Federation:
    """Write a synthetic federation under ``out`` (must be absent or empty; nothing is overwritten).

    ``modalities``: per site (cycled), default ``[ct]``, ``[ct, pet]``, ``[ct, pet, ehr]``.
    ``test_cases``: size of the held-out ``test`` site (CT+PET+EHR, its own scanner);
    0 writes none. ``spacing``: target spacing written into every site YAML.
    """
    root = Path(out)
    if n_sites < 1 or cases_per_site < 1 or test_cases < 0:
        raise ValueError("need n_sites >= 1, cases_per_site >= 1 and test_cases >= 0")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty folder: refusing to write over it")
    cycle = [tuple(m) for m in modalities] if modalities else list(DEFAULT_MODALITY_CYCLE)
    cycle = [parse_modalities("+".join(m)) for m in cycle]
    root.mkdir(parents=True, exist_ok=True)
    n_test = max(1, round(TEST_FRACTION * cases_per_site)) if cases_per_site >= 2 else 0

    site_yamls, truth, held = [], [], {}
    for i in range(n_sites):
        name = f"site-{i + 1}"
        mods = cycle[i % len(cycle)]
        path, rows = _write_site(
            root / name, name, i, mods, site_scanner(i), cases_per_site, n_test, seed, spacing, case_prefix=name
        )
        site_yamls.append(path)
        truth += rows
        held[name] = mods
    test_yaml = None
    if test_cases:
        mods = ("ct", "pet", "ehr")
        test_yaml, rows = _write_site(
            root / "test", "test", 1000, mods, site_scanner(1), test_cases, test_cases, seed, spacing, case_prefix="test"
        )
        truth += rows
        held["test"] = mods

    truth_csv = root / "phantom_truth.csv"
    with truth_csv.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(truth[0]))
        writer.writeheader()
        writer.writerows(truth)
    federation = {
        "seed": seed,
        "sites": [str(p.relative_to(root)) for p in site_yamls],
        "test": None if test_yaml is None else str(test_yaml.relative_to(root)),
        "truth": truth_csv.name,
    }
    (root / "federation.yaml").write_text(
        "# Written by 'pemma phantoms'. Paths are relative to this file.\n"
        + yaml.safe_dump(federation, sort_keys=False)
    )
    return Federation(root, tuple(site_yamls), test_yaml, truth_csv, held)


def federation_site_files(folder: str | Path) -> list[Path]:
    """The site YAMLs of a federation folder written by :func:`make_federation`: those listed
    in its ``federation.yaml`` (the held-out test set excluded), else every ``*/site.yaml``, sorted."""
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
