"""Integration on real IBSI PET/CT (the smallest cases): grids, masks, predictions, site checks."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from benchmarks.loading import measure_loading
from pemma_core.config.site import SiteConfig, load_site_config
from pemma_core.data.checks import inspect_case
from pemma_core.data.inference_io import load_for_inference, write_prediction
from pemma_core.data.manifest import Case
from pemma_core.data.cases import site_cases
from pemma_core.data.pipeline import Preprocessing, deterministic_transform, eval_loader, train_loader

pytestmark = pytest.mark.slow  # real IBSI data

REPO = Path(__file__).resolve().parents[1]
# Smallest CT files among cases whose headers agree (STS_019's PET header is shifted, see below).
SMALL_CASES = ("STS_025", "STS_008", "STS_042")


@pytest.fixture(scope="module")
def site_b(ibsi_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SiteConfig:
    """IBSI site-b (CT+PET) limited to two of its cases, cache in a private folder."""
    folder = tmp_path_factory.mktemp("ibsi-site-b")
    cfg = load_site_config(REPO / "sites" / "ibsi" / "site-b.yaml")
    manifest = folder / "manifest.csv"
    with cfg.manifest.open() as source, manifest.open("w", newline="") as target:
        rows = list(csv.DictReader(source))
        writer = csv.DictWriter(target, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["case_id"] in ("STS_024", "STS_002"))  # the two smallest
    return dataclasses.replace(cfg, data_root=ibsi_root, manifest=manifest, cache_dir=folder / "cache")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("case_id", SMALL_CASES)
def test_pet_mask_follows_the_ct_through_both_affines(case_id: str, ibsi_root: Path, tmp_path: Path) -> None:
    """PET_mask (PET grid) resampled onto the CT-derived grid, nearest neighbour, overlaps CT_mask;
    and a prediction written back lands on the original CT grid with its exact affine."""
    folder = ibsi_root / case_id
    transform = deterministic_transform(Preprocessing(spacing=(2.0, 2.0, 3.27)), True, True, True)
    ct, pet = str(folder / "CT_image.nii.gz"), str(folder / "PET_image.nii.gz")
    with_ct_mask = transform({"ct": ct, "pet": pet, "label": str(folder / "CT_mask.nii.gz")})
    with_pet_mask = transform({"ct": ct, "pet": pet, "label": str(folder / "PET_mask.nii.gz")})
    ct_mask = with_ct_mask["label"][0].numpy()
    pet_mask = with_pet_mask["label"][0].numpy()
    assert set(np.unique(pet_mask)) == {0.0, 1.0}  # nearest neighbour keeps a binary mask
    assert dice(pet_mask, ct_mask) > 0.6
    # The PET image is brighter inside the tumour than around it on the common grid.
    suv = with_ct_mask["image"][1].numpy() * 20.0
    assert suv[ct_mask > 0].mean() > 1.5 * suv[(ct_mask == 0) & (suv > 0.1)].mean()

    image, meta = load_for_inference(folder / "CT_image.nii.gz", folder / "PET_image.nii.gz", (2.0, 2.0, 3.27))
    torch.testing.assert_close(image[0], with_ct_mask["image"])
    written = write_prediction(torch.as_tensor(pet_mask), meta, tmp_path / f"{case_id}_pred.nii.gz")
    original = nib.load(ct)
    reloaded = nib.load(str(written))
    assert reloaded.shape == original.shape
    np.testing.assert_array_equal(reloaded.affine, original.affine)
    truth = np.asarray(nib.load(str(folder / "CT_mask.nii.gz")).dataobj)
    assert dice(np.asarray(reloaded.dataobj), truth) > 0.6


def test_sts019_shifted_pet_header_is_a_warning_not_an_error(ibsi_root: Path) -> None:
    cfg = load_site_config(REPO / "sites" / "ibsi" / "site-c.yaml")
    folder = ibsi_root / "STS_019"
    case = Case("STS_019", folder / "CT_image.nii.gz", folder / "PET_image.nii.gz", folder / "CT_mask.nii.gz", "train")
    problems = inspect_case(case, dataclasses.replace(cfg, data_root=ibsi_root))
    assert [p.severity for p in problems] == ["warning"]
    assert "outside the PET's" in problems[0].problem and problems[0].file == case.pet


def test_ibsi_site_loaders(site_b: SiteConfig) -> None:
    cases, problems = site_cases(site_b)
    assert [c.case_id for c in cases] == ["STS_002", "STS_024"] and problems == []
    assert cases[0].ct == site_b.data_root / "STS_002" / "CT_image.nii.gz"  # IBSI names, read in place
    batch = next(iter(train_loader(site_b, roi_size=(48, 48, 32), batch_size=2)))
    assert batch["image"].shape == (2, 2, 48, 48, 32) and batch["label"].shape == (2, 1, 48, 48, 32)
    assert float(batch["image"][:, 1].max()) > 0  # PET present
    volume = next(iter(eval_loader(site_b, split="train")))
    ct = nib.load(str(cases[0].ct))
    extent = np.abs(np.diag(ct.affine)[:3]) * ct.shape
    assert np.allclose(volume["image"].shape[-3:], extent / np.array([2.0, 2.0, 3.27]), atol=1.0)


def test_ct_only_site_ignores_pet(ibsi_root: Path, tmp_path: Path) -> None:
    cfg = load_site_config(REPO / "sites" / "ibsi" / "site-a.yaml")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("case_id,ct,label,split\nSTS_025,STS_025/CT_image.nii.gz,STS_025/CT_mask.nii.gz,train\n")
    cfg = dataclasses.replace(cfg, data_root=ibsi_root, manifest=manifest, cache_dir=tmp_path / "cache")
    batch = next(iter(eval_loader(cfg, split="train")))
    assert float(batch["image"][0, 1].abs().sum()) == 0.0 and float(batch["image"][0, 0].max()) > 0


def test_measure_loading_on_ibsi(site_b: SiteConfig) -> None:
    result = measure_loading(site_b, n_cases=2)
    assert result["n_cases"] == 2
    assert result["cached_load_s_per_case"] * 5 < result["first_load_s_per_case"]
