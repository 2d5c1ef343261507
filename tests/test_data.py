"""Site data on phantoms: every bad-input check, loaders, caching, resampling, predictions, check-site."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from benchmarks.loading import measure_loading
from pemma_core.cli import main as pemma
from pemma_core.config.site import SiteConfig, load_site_config
from pemma_core.data.checks import check_case
from pemma_core.data.inference_io import InferenceMeta, load_for_inference, write_prediction
from pemma_core.data.cases import site_cases
from pemma_core.data.manifest import BadCaseError, SiteDataError, read_manifest
from pemma_core.data.pipeline import Preprocessing, deterministic_transform, eval_loader, train_loader, train_transform
from pemma_core.phantoms.writer import Federation

BAD = "site-2-001"  # the case each corruption test damages (train split of the CT+PET site)


# --------------------------------------------------------------------------- helpers


def private_cfg(yaml_path: Path, tmp_path: Path, **changes) -> SiteConfig:
    """The site's config with its cache in this test's own folder."""
    return dataclasses.replace(load_site_config(yaml_path), cache_dir=tmp_path / "cache", **changes)


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


def save_with_header_geometry(path: Path, array: np.ndarray, sform: np.ndarray | None) -> None:
    """Write with an explicit sform (code 1) or none at all, and no qform."""
    image = nib.Nifti1Image(array, np.eye(4))
    image.set_sform(sform, code=0 if sform is None else 1)
    image.set_qform(None, code=0)
    nib.save(image, str(path))


def loaded(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "cache" not in p.relative_to(folder).parts
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def set_yaml_key(yaml_path: Path, key: str, value: str) -> None:
    lines = [line for line in yaml_path.read_text().splitlines() if not line.startswith(f"{key}:")]
    yaml_path.write_text("\n".join(lines + [f"{key}: {value}"]) + "\n")


# --------------------------------------------------------------------------- corruptions

Corruption = Callable[[Path], str]  # damages case BAD under the site folder; returns the damaged file's name


def _missing(case: Path) -> str:
    (case / "pet.nii.gz").unlink()
    return "pet.nii.gz"


def _truncated(case: Path) -> str:
    raw = (case / "ct.nii.gz").read_bytes()
    (case / "ct.nii.gz").write_bytes(raw[: len(raw) // 2])
    return "ct.nii.gz"


def _two_d(case: Path) -> str:
    ct, affine = loaded(case / "ct.nii.gz")
    save(case / "ct.nii.gz", ct[:, :, 10], affine)
    return "ct.nii.gz"


def _four_d(case: Path) -> str:
    pet, affine = loaded(case / "pet.nii.gz")
    save(case / "pet.nii.gz", np.stack([pet, pet], axis=-1), affine)
    return "pet.nii.gz"


def _nan(case: Path) -> str:
    pet, affine = loaded(case / "pet.nii.gz")
    pet = pet.copy()
    pet[3, 4, 5] = np.nan
    save(case / "pet.nii.gz", pet, affine)
    return "pet.nii.gz"


def _inf(case: Path) -> str:
    ct, affine = loaded(case / "ct.nii.gz")
    ct = ct.astype(np.float32)
    ct[1, 2, 3] = np.inf
    save(case / "ct.nii.gz", ct, affine)
    return "ct.nii.gz"


def _label_values(case: Path) -> str:
    label, affine = loaded(case / "label.nii.gz")
    label = label.copy()
    label[label == 1] = 2
    save(case / "label.nii.gz", label, affine)
    return "label.nii.gz"


def _label_shape(case: Path) -> str:
    label, affine = loaded(case / "label.nii.gz")
    save(case / "label.nii.gz", label[:-4], affine)
    return "label.nii.gz"


def _label_affine(case: Path) -> str:
    label, affine = loaded(case / "label.nii.gz")
    shifted = affine.copy()
    shifted[2, 3] += 6.0
    save(case / "label.nii.gz", label, shifted)
    return "label.nii.gz"


def _pet_elsewhere(case: Path) -> str:
    pet, affine = loaded(case / "pet.nii.gz")
    moved = affine.copy()
    moved[:3, 3] += 1000.0  # a metre away: no overlap with the CT
    save(case / "pet.nii.gz", pet, moved)
    return "pet.nii.gz"


def _zero_affine(case: Path) -> str:
    ct, _ = loaded(case / "ct.nii.gz")
    save_with_header_geometry(case / "ct.nii.gz", ct, np.zeros((4, 4)))
    return "ct.nii.gz"


def _singular_affine(case: Path) -> str:
    pet, affine = loaded(case / "pet.nii.gz")
    flat = affine.copy()
    flat[:3, 2] = 0.0  # no extent along the third axis
    save_with_header_geometry(case / "pet.nii.gz", pet, flat)
    return "pet.nii.gz"


def _no_geometry(case: Path) -> str:
    ct, _ = loaded(case / "ct.nii.gz")
    save_with_header_geometry(case / "ct.nii.gz", ct, None)
    return "ct.nii.gz"


def _not_hu(case: Path) -> str:
    ct, affine = loaded(case / "ct.nii.gz")
    save(case / "ct.nii.gz", np.clip(ct.astype(np.int32) + 1024, 0, 4095).astype(np.uint16), affine)
    return "ct.nii.gz"


def _pet_not_suv(case: Path) -> str:
    pet, affine = loaded(case / "pet.nii.gz")
    save(case / "pet.nii.gz", (pet * 5000.0).astype(np.float32), affine)  # Bq/mL-like
    return "pet.nii.gz"


CORRUPTIONS: dict[str, tuple[Corruption, str]] = {
    "missing file": (_missing, "missing file"),
    "truncated gz": (_truncated, "unreadable CT"),
    "2-D image": (_two_d, "CT is 2-D"),
    "4-D image": (_four_d, "PET is 4-D"),
    "NaN voxels": (_nan, "NaN/inf voxel"),
    "inf voxels": (_inf, "NaN/inf voxel"),
    "label values": (_label_values, "label values must be 0/1, found 2"),
    "label grid shape": (_label_shape, "does not match the CT grid"),
    "label grid affine": (_label_affine, "label affine differs"),
    "PET outside CT": (_pet_elsewhere, "does not overlap"),
    "zero affine": (_zero_affine, "zero or singular"),
    "singular affine": (_singular_affine, "zero or singular"),
    "no sform/qform": (_no_geometry, "neither sform nor qform"),
    "CT not in HU": (_not_hu, "not Hounsfield units"),
    "PET not in SUV": (_pet_not_suv, "rather than SUV"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_bad_case_is_named_skipped_and_nothing_changes(
    kind: str, copy_phantom_site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt, expected = CORRUPTIONS[kind]
    yaml_path = copy_phantom_site(1)
    site = yaml_path.parent
    damaged = site / "cases" / BAD / corrupt(site / "cases" / BAD)
    before = folder_digest(site)
    cfg = private_cfg(yaml_path, tmp_path)

    with caplog.at_level(logging.WARNING, logger="pemma.data"):
        cases, problems = site_cases(cfg)
    assert [c.case_id for c in cases] == ["site-2-000", "site-2-002", "site-2-003"]
    assert problems and {p.case_id for p in problems} == {BAD}
    message = "\n".join(str(p) for p in problems)
    assert BAD in message and str(damaged) in message and expected in message
    assert any("skipping" in r.getMessage() and BAD in r.getMessage() for r in caplog.records)
    bad_case = next(c for c in read_manifest(cfg)[0] if c.case_id == BAD)
    assert any(expected in text and str(damaged) in text for text in check_case(bad_case, cfg))

    with pytest.raises(BadCaseError) as error:
        site_cases(dataclasses.replace(cfg, on_bad_case="fail"))
    assert BAD in str(error.value) and str(damaged) in str(error.value) and expected in str(error.value)
    assert folder_digest(site) == before  # nothing overwritten or deleted


def test_good_cases_have_no_problems(phantom_federation: Federation, tmp_path: Path) -> None:
    for yaml_path in (*phantom_federation.site_yamls, phantom_federation.test_yaml):
        cfg = private_cfg(yaml_path, tmp_path / yaml_path.parent.name)
        cases, problems = site_cases(cfg)
        assert problems == [] and len(cases) == len(read_manifest(cfg)[0])
        assert all(check_case(c, cfg) == [] for c in cases)
        assert [c.case_id for c in site_cases(cfg, "test")[0]] == [c.case_id for c in cases if c.split == "test"]


def test_duplicate_ids_and_bad_split(copy_phantom_site, tmp_path: Path) -> None:
    yaml_path = copy_phantom_site(1)
    manifest = yaml_path.parent / "manifest.csv"
    rows = list(csv.reader(manifest.open()))
    rows.append(rows[2])  # site-2-001 listed twice
    rows[4][4] = "validation"  # site-2-003: unknown split
    with manifest.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    cfg = private_cfg(yaml_path, tmp_path)
    cases, problems = site_cases(cfg)
    assert [c.case_id for c in cases] == ["site-2-000", "site-2-002"]
    text = "\n".join(str(p) for p in problems)
    assert "case site-2-001" in text and "duplicate case id (manifest rows 3, 6)" in text and str(manifest) in text
    assert "case site-2-003" in text and "'validation'" in text
    with pytest.raises(BadCaseError, match="duplicate case id"):
        site_cases(dataclasses.replace(cfg, on_bad_case="fail"))


def test_manifest_missing_column(copy_phantom_site, tmp_path: Path) -> None:
    yaml_path = copy_phantom_site(1)
    manifest = yaml_path.parent / "manifest.csv"
    rows = [row[:3] + row[4:] for row in csv.reader(manifest.open())]  # drop "label"
    with manifest.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    with pytest.raises(SiteDataError, match=r"manifest .*manifest.csv: missing column\(s\) \['label'\]"):
        site_cases(private_cfg(yaml_path, tmp_path))


def test_pet_column_needed_only_where_pet_is_held(copy_phantom_site, tmp_path: Path) -> None:
    yaml_path = copy_phantom_site(0)  # CT only: the pet column may go
    manifest = yaml_path.parent / "manifest.csv"
    rows = [row[:2] + row[3:] for row in csv.reader(manifest.open())]
    with manifest.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    assert len(site_cases(private_cfg(yaml_path, tmp_path))[0]) == 4
    with pytest.raises(SiteDataError, match=r"missing column\(s\) \['pet'\]"):
        site_cases(private_cfg(yaml_path, tmp_path, modalities=("ct", "pet")))


def test_clinical_missing_column(copy_phantom_site, tmp_path: Path) -> None:
    yaml_path = copy_phantom_site(2)
    clinical = yaml_path.parent / "clinical.csv"
    rows = list(csv.reader(clinical.open()))
    keep = [i for i, name in enumerate(rows[0]) if name != "grade"]
    rows = [[row[i] for i in keep] for row in rows]
    with clinical.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    with pytest.raises(SiteDataError, match=r"clinical CSV .*clinical.csv: missing column\(s\) \['grade'\]"):
        site_cases(private_cfg(yaml_path, tmp_path))


def test_manifest_and_clinical_csv_are_parsed_once_per_version_of_the_file(
    copy_phantom_site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A site re-reads both at every round: unchanged files are not parsed again, edited ones are.
    from pemma_core.data import checks, manifest as manifest_module

    yaml_path = copy_phantom_site(2)
    cfg = private_cfg(yaml_path, tmp_path)
    parsed: list[str] = []
    read_table, read_clinical = manifest_module._read_table, checks.read_clinical
    monkeypatch.setattr(manifest_module, "_read_table", lambda path: parsed.append("manifest") or read_table(path))
    monkeypatch.setattr(checks, "read_clinical", lambda *a, **k: parsed.append("clinical") or read_clinical(*a, **k))
    cases = site_cases(cfg)[0]
    assert site_cases(cfg)[0] == cases and parsed == ["clinical", "manifest"]
    read_manifest(cfg)[0].clear()  # what one caller does with its lists does not reach the next
    table = checks.read_site_clinical(cfg)[0]
    table.drop(index=table.index, inplace=True)
    assert read_manifest(cfg)[0] == cases and len(checks.read_site_clinical(cfg)[0]) > 0
    assert parsed == ["clinical", "manifest"]

    manifest = yaml_path.parent / "manifest.csv"
    rows = list(csv.reader(manifest.open()))
    with manifest.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows[:-1])
    clinical = yaml_path.parent / "clinical.csv"
    clinical.write_text(clinical.read_text() + "\n")
    assert [c.case_id for c in site_cases(cfg)[0]] == [c.case_id for c in cases[:-1]]
    assert parsed == ["clinical", "manifest"] * 2


def test_missing_data_root(copy_phantom_site, tmp_path: Path) -> None:
    cfg = private_cfg(copy_phantom_site(0), tmp_path, data_root=tmp_path / "nowhere")
    with pytest.raises(SiteDataError, match="nowhere is not a folder"):
        site_cases(cfg)


# --------------------------------------------------------------------------- loaders


def test_train_batches(phantom_federation: Federation, tmp_path: Path) -> None:
    for index, has_pet in ((0, False), (1, True)):
        cfg = private_cfg(phantom_federation.site_yamls[index], tmp_path / str(index))
        batches = list(train_loader(cfg, roi_size=(32, 32, 24), batch_size=2, seed=0))
        assert len(batches) == 2  # 3 training cases, batch 2
        batch = batches[0]
        assert batch["image"].shape == (2, 2, 32, 32, 24) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (2, 1, 32, 32, 24)
        assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0}
        assert all(isinstance(c, str) and c.startswith(cfg.name) for c in batch["case_id"])
        assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
        pet_channel = torch.cat([b["image"][:, 1] for b in batches])
        assert bool(pet_channel.abs().sum() > 0) == has_pet  # zeros where the site holds no PET
        assert type(batch["image"]) is torch.Tensor  # plain tensors, no MetaTensor overhead


def test_train_crops_exact_size_tumour_biased_and_seeded(phantom_federation: Federation, tmp_path: Path) -> None:
    cfg = private_cfg(phantom_federation.site_yamls[2], tmp_path)
    big = next(iter(train_loader(cfg, roi_size=(48, 48, 48), batch_size=3)))  # larger than the volumes: padded
    assert big["image"].shape == (3, 2, 48, 48, 48)
    # Tumour bias: 2 of 3 crops are centred on tumour; a uniform 16^3 crop of these ~40^3
    # volumes holds tumour only ~20% of the time.
    volumes = [{"image": b["image"][0], "label": b["label"][0]} for b in eval_loader(cfg, split="train")]
    augment = train_transform((16, 16, 16))
    augment.set_random_state(seed=0)
    with_tumour = [float(augment(volumes[i % 3])[0]["label"].sum()) > 0 for i in range(60)]
    assert np.mean(with_tumour) > 0.55
    first = [b["image"] for b in train_loader(cfg, roi_size=(24, 24, 24), seed=7)]
    again = [b["image"] for b in train_loader(cfg, roi_size=(24, 24, 24), seed=7)]
    other = [b["image"] for b in train_loader(cfg, roi_size=(24, 24, 24), seed=8)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_a_round_stats_each_case_file_once_to_find_its_stored_checks(
        phantom_federation: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site lists its cases every round; each stat lets go of the interpreter lock, which a site's
    thread then waits for while the other sites' threads train. Once the checks are stored: one stat
    per case file and one for its stored checks (a changed file is still seen: its stamp changes)."""
    import os

    cfg = private_cfg(phantom_federation.site_yamls[2], tmp_path)
    cases, _ = site_cases(cfg, "train")
    files = sum(1 for c in cases for role in ("ct", "pet", "label") if getattr(c, role) is not None)
    seen: list[str] = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        seen.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)  # pathlib's too
    again, _ = site_cases(cfg, "train")
    assert again == cases
    case_files = {str(getattr(c, role)) for c in cases for role in ("ct", "pet", "label") if getattr(c, role) is not None}
    assert sum(p in case_files for p in seen) == files
    assert sum("/checks/" in p for p in seen) == len(cases)


def test_eval_volumes_on_the_reference_grid(phantom_federation: Federation, tmp_path: Path) -> None:
    cfg = private_cfg(phantom_federation.site_yamls[1], tmp_path)
    batches = list(eval_loader(cfg, split="test"))
    assert [b["case_id"] for b in batches] == [["site-2-003"]]
    batch = batches[0]
    ct, ct_affine = loaded(Path(batch["reference_path"][0]))
    extent = np.abs(np.diag(ct_affine)[:3]) * ct.shape
    grid_shape = batch["image"].shape[-3:]
    assert batch["image"].shape[:2] == (1, 2) and batch["label"].shape == (1, 1, *grid_shape)
    assert np.allclose(np.array(grid_shape), extent / 3.5, atol=1.0)  # whole volume at the site spacing
    assert np.allclose(np.diag(batch["grid_affine"][0].numpy())[:3], [3.5, 3.5, 3.5])  # RAS, target spacing
    image, label = batch["image"][0].numpy(), batch["label"][0, 0].numpy().astype(bool)
    # CT window [-200, 300] -> [0, 1]: air at 0, muscle (~45 HU) ~0.49.
    assert np.quantile(image[0], 0.05) == 0.0  # air, clipped at the window's low end
    soft_tissue = (image[0] > 0.3) & (image[0] < 0.8) & ~label
    assert 0.42 < np.median(image[0][soft_tissue]) < 0.56
    body = image[0] > 0.1
    # PET follows the CT through both affines (the phantom PET is stored with its axes reversed):
    # its uptake lands on the tumour label.
    pet = image[1] * cfg.pet_suv_max
    assert pet[label].mean() > 2.5 * pet[body & ~label].mean()


def test_resampling_uses_affines_not_array_shape(tmp_path: Path) -> None:
    """The same PET stored in reversed voxel order (with its affine saying so) gives the same channel."""
    rng = np.random.default_rng(0)
    ct_affine = np.diag([2.0, 2.0, 3.0, 1.0])
    save(tmp_path / "ct.nii.gz", rng.uniform(-1000, 200, (20, 18, 10)).astype(np.float32), ct_affine)
    pet = rng.uniform(0, 10, (9, 8, 7)).astype(np.float32)
    pet_affine = np.diag([4.5, 4.5, 4.0, 1.0])
    pet_affine[:3, 3] = [-1.0, 0.5, 2.0]
    save(tmp_path / "pet.nii.gz", pet, pet_affine)
    flipped_affine = pet_affine.copy()
    flipped_affine[0, 0] = -4.5
    flipped_affine[0, 3] = pet_affine[0, 3] + 4.5 * (pet.shape[0] - 1)  # same world positions
    save(tmp_path / "pet_flipped.nii.gz", pet[::-1].copy(), flipped_affine)
    transform = deterministic_transform(Preprocessing(spacing=(2.0, 2.0, 3.0)), True, True, False)
    plain = transform({"ct": str(tmp_path / "ct.nii.gz"), "pet": str(tmp_path / "pet.nii.gz")})["image"]
    flipped = transform({"ct": str(tmp_path / "ct.nii.gz"), "pet": str(tmp_path / "pet_flipped.nii.gz")})["image"]
    assert plain.shape == (2, 20, 18, 10)
    assert float(plain[1].abs().sum()) > 0
    torch.testing.assert_close(plain, flipped, atol=1e-5, rtol=0)


def test_pet_only_pipeline_uses_the_pet_grid(phantom_federation: Federation) -> None:
    pet_path = next((phantom_federation.site_yamls[1].parent / "cases").glob("*/pet.nii.gz"))
    out = deterministic_transform(Preprocessing(spacing=(5.0, 5.0, 5.0)), False, True, False)({"pet": str(pet_path)})
    assert float(out["image"][0].abs().sum()) == 0.0 and float(out["image"][1].sum()) > 0
    assert np.allclose(np.diag(out["grid_affine"].numpy())[:3], 5.0)


def test_cache_avoids_rereading_and_follows_file_changes(
    copy_phantom_site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    yaml_path = copy_phantom_site(1)
    cfg = private_cfg(yaml_path, tmp_path)
    first = [b["label"].sum().item() for b in eval_loader(cfg, split="train")]
    cached = list((cfg.cache_dir / Preprocessing.from_site(cfg).fingerprint()).rglob("*.pt"))
    assert len(cached) == 3

    def no_reading(*args, **kwargs):
        raise AssertionError("a cached case was read from disk again")

    with monkeypatch.context() as patch:  # epoch 2: neither checks nor volumes touch the NIfTI files
        patch.setattr(nib, "load", no_reading)
        assert [b["label"].sum().item() for b in eval_loader(cfg, split="train")] == first
        assert len(list(train_loader(cfg, roi_size=(16, 16, 16)))) == 2

    label_path = yaml_path.parent / "cases" / "site-2-000" / "label.nii.gz"
    label, affine = loaded(label_path)
    save(label_path, np.zeros_like(label), affine)  # an edited file is re-read
    assert [b["label"].sum().item() for b in eval_loader(cfg, split="train")][0] == 0
    other = dataclasses.replace(cfg, spacing=(5.0, 5.0, 5.0))  # other settings: another cache folder
    assert next(iter(eval_loader(other, split="train")))["image"].shape[-1] < 35


def test_loader_errors(copy_phantom_site, tmp_path: Path) -> None:
    yaml_path = copy_phantom_site(0)
    _two_d(yaml_path.parent / "cases" / "site-1-001")
    cfg = private_cfg(yaml_path, tmp_path)
    assert len(train_loader(cfg, roi_size=(16, 16, 16), batch_size=1)) == 2  # skipped, training goes on
    with pytest.raises(BadCaseError, match="site-1-001"):
        train_loader(dataclasses.replace(cfg, on_bad_case="fail"), roi_size=(16, 16, 16))
    with pytest.raises(SiteDataError, match="no usable val case"):
        train_loader(cfg, roi_size=(16, 16, 16), split="val")


# --------------------------------------------------------------------------- inference


def test_prediction_goes_back_to_the_original_ct_grid(phantom_federation: Federation, tmp_path: Path) -> None:
    cfg = private_cfg(phantom_federation.site_yamls[1], tmp_path)
    case = next(c for c in site_cases(cfg)[0] if c.split == "test")
    image, meta = load_for_inference(case.ct, case.pet, cfg)
    batch = next(iter(eval_loader(cfg, split="test")))
    assert image.shape == batch["image"].shape and image.dtype == torch.float32
    torch.testing.assert_close(image, batch["image"])
    assert meta.ct_path == case.ct and meta.grid_shape == tuple(image.shape[-3:])

    written = write_prediction(batch["label"], meta, tmp_path / "out" / "pred.nii.gz")  # [1, 1, X, Y, Z]
    ct, ct_affine = loaded(case.ct)
    truth, _ = loaded(case.label)
    prediction, affine = loaded(written)
    assert prediction.shape == ct.shape and prediction.dtype == np.uint8
    np.testing.assert_array_equal(affine, ct_affine)  # exactly the CT's affine
    assert dice(prediction, truth) > 0.75  # 3.5 mm grid and back, nearest neighbour

    probabilities = batch["label"][0, 0] * 0.8 + 0.1  # [X, Y, Z] soft mask
    soft, _ = loaded(write_prediction(probabilities, meta, tmp_path / "soft.nii.gz"))
    assert dice(soft, truth) > 0.75

    from_batch = InferenceMeta.from_batch(batch)
    np.testing.assert_array_equal(from_batch.grid_affine, meta.grid_affine)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        write_prediction(batch["label"], meta, case.ct)
    with pytest.raises(ValueError, match="does not match the grid"):
        write_prediction(torch.zeros(5, 5, 5), meta, tmp_path / "wrong.nii.gz")


def test_inference_inputs_are_checked(phantom_federation: Federation, tmp_path: Path) -> None:
    cfg = load_site_config(phantom_federation.site_yamls[0])  # CT only
    ct = next((phantom_federation.site_yamls[0].parent / "cases").glob("*/ct.nii.gz"))
    image, meta = load_for_inference(ct, None, (3.5, 3.5, 3.5))
    assert image.shape[:2] == (1, 2) and float(image[0, 1].abs().sum()) == 0.0
    assert meta.reference_shape == nib.load(str(ct)).shape
    with pytest.raises(BadCaseError, match="missing file"):
        load_for_inference(tmp_path / "absent.nii.gz", None, cfg)


def test_measure_loading(phantom_federation: Federation, tmp_path: Path) -> None:
    cfg = private_cfg(phantom_federation.site_yamls[1], tmp_path)
    result = measure_loading(cfg, n_cases=2)
    assert result["n_cases"] == 2 and result["spacing"] == [3.5, 3.5, 3.5]
    assert 0 < result["cached_load_s_per_case"] < result["first_load_s_per_case"]
    assert not any(cfg.cache_dir.rglob("*.pt"))  # the site's own cache is left alone


# --------------------------------------------------------------------------- check-site


def test_check_site_command(copy_phantom_site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path = copy_phantom_site(1)
    assert pemma(["check-site", str(yaml_path)]) == 0
    text = capsys.readouterr().out
    assert "site-2-000  train  ok" in text and "READY" in text

    _label_values(yaml_path.parent / "cases" / BAD)
    before = folder_digest(yaml_path.parent)
    assert pemma(["check-site", str(yaml_path), "--json"]) == 0  # skip: 2 usable training cases remain
    report = json.loads(capsys.readouterr().out)
    status = {c["case_id"]: c["status"] for c in report["cases"]}
    assert status == {"site-2-000": "ok", BAD: "bad", "site-2-002": "ok", "site-2-003": "ok"}
    bad = next(c for c in report["cases"] if c["case_id"] == BAD)
    assert "label values must be 0/1" in bad["problems"][0] and "label.nii.gz" in bad["problems"][0]
    assert report["summary"]["bad"] == 1 and report["summary"]["usable"] == {"train": 2, "test": 1}
    assert report["ready"] is True

    set_yaml_key(yaml_path, "on_bad_case", "fail")
    assert pemma(["check-site", str(yaml_path)]) == 1
    text = capsys.readouterr().out
    assert f"{BAD}  train  bad" in text and "problem:" in text and "NOT READY" in text

    set_yaml_key(yaml_path, "on_bad_case", "skipp")
    assert pemma(["check-site", str(yaml_path), "--json"]) == 1  # still a JSON report on stdout
    assert "on_bad_case" in json.loads(capsys.readouterr().out)["error"]
    after = folder_digest(yaml_path.parent)
    assert {k: v for k, v in after.items() if k != "site.yaml"} == {k: v for k, v in before.items() if k != "site.yaml"}


def test_check_site_without_training_cases(copy_phantom_site, capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path = copy_phantom_site(0)
    for case in ("site-1-000", "site-1-001", "site-1-002"):  # every training case
        (yaml_path.parent / "cases" / case / "label.nii.gz").unlink()
    assert pemma(["check-site", str(yaml_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["reason"] == "no usable labelled train case"
    assert pemma(["check-site", str(yaml_path), "--purpose", "eval"]) == 0  # its test case is fine
    capsys.readouterr()


def test_check_site_reports_clinical_rows(copy_phantom_site, capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path = copy_phantom_site(2)
    assert pemma(["check-site", str(yaml_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["site_problems"] == []  # the phantom clinical CSV reads cleanly
    clinical = yaml_path.parent / "clinical.csv"
    rows = list(csv.reader(clinical.open()))
    rows[1][-2] = "-3"  # negative survival time
    with clinical.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    assert pemma(["check-site", str(yaml_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert any("negative time" in p and "site-3-000" in p for p in report["site_problems"])
    first = next(c for c in report["cases"] if c["case_id"] == "site-3-000")
    assert any("no usable row in the clinical CSV" in w for w in first["warnings"])


def test_check_site_without_survival_columns_still_matches_ids(copy_phantom_site, capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path = copy_phantom_site(2)
    text = yaml_path.read_text().replace("  time: time\n", "  time: null\n").replace("  event: event\n", "  event: null\n")
    yaml_path.write_text(text)
    clinical = yaml_path.parent / "clinical.csv"
    rows = list(csv.reader(clinical.open()))
    time_column = rows[0].index("time")
    rows[1][time_column] = "-3"  # not read without survival columns
    rows = [row for row in rows if row[0] != "site-3-002"]
    with clinical.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    assert pemma(["check-site", str(yaml_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["site_problems"] == []
    warned = {c["case_id"] for c in report["cases"] if any("no usable row" in w for w in c["warnings"])}
    assert warned == {"site-3-002"}


def test_many_case_warnings_are_summarised_once(copy_phantom_site, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A site whose every case has a warning shows the first few in full and counts the rest, once."""
    from pemma_core.data import cases as site_case_list
    from pemma_core.data.manifest import CaseProblem

    cfg = private_cfg(copy_phantom_site(1), tmp_path)
    monkeypatch.setattr(site_case_list, "cached_inspect",
                        lambda case, cfg: [CaseProblem(case.case_id, None, "PET field of view short", "warning")])
    with caplog.at_level(logging.WARNING, logger="pemma.data"):
        cases, _ = site_cases(cfg)
        site_cases(cfg)  # loaders list the cases every round: nothing more is said
    lines = [r.getMessage() for r in caplog.records]
    shown = site_case_list.CASE_WARNINGS_SHOWN
    assert len(cases) == shown + 1 and len(lines) == shown + 1
    assert all("PET field of view short" in line for line in lines[:shown])
    assert f"site {cfg.name}: 1 more case warning(s); `pemma check-site {cfg.path}` lists every one" == lines[-1]
