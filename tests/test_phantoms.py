"""Synthetic federation: layout, determinism, realistic intensities, survival signal, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from lifelines.utils import concordance_index
from scipy.ndimage import binary_dilation, binary_erosion

from pemma_core.cli import main as pemma
from pemma_core.config.site import SiteLimits, load_site_config
from pemma_core.phantoms import physics
from pemma_core.phantoms.coordination import ensure_phantom_federation
from pemma_core.phantoms.physics import case_survival, ct_shape, draw_case, site_scanner, survival_linear_predictor
from pemma_core.phantoms.writer import Federation, federation_site_files, make_federation, phantom_limits
from pemma_core.training.survival import concordance_pairs

LOWERED_NOTE = "# synthetic phantom data: the privacy floors are lowered so a small test federation still reports"


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def test_layout_and_modalities(phantom_federation: Federation) -> None:
    root = phantom_federation.root
    assert [p.parent.name for p in phantom_federation.site_yamls] == ["site-1", "site-2", "site-3"]
    assert phantom_federation.modalities == {
        "site-1": ("ct",),
        "site-2": ("ct", "pet"),
        "site-3": ("ct", "pet", "ehr"),
        "test": ("ct", "pet", "ehr"),
    }
    listing = yaml.safe_load((root / "federation.yaml").read_text())
    assert listing["sites"] == ["site-1/site.yaml", "site-2/site.yaml", "site-3/site.yaml"]
    assert listing["test"] == "test/site.yaml"
    for yaml_path in phantom_federation.site_yamls:
        site = yaml_path.parent
        manifest = pd.read_csv(site / "manifest.csv", dtype=str, keep_default_na=False)
        assert list(manifest.columns) == ["case_id", "ct", "pet", "label", "split"]
        assert list(manifest["split"]) == ["train", "train", "train", "test"]  # 75/25
        has_pet = "pet" in phantom_federation.modalities[site.name]
        assert (manifest["pet"] != "").all() == has_pet
        for row in manifest.itertuples():
            assert (site / row.ct).is_file() and (site / row.label).is_file()
        assert any(site.rglob("pet.nii.gz")) == has_pet  # a CT-only site writes no PET files
    test_manifest = pd.read_csv(root / "test" / "manifest.csv")
    assert len(test_manifest) == 2 and set(test_manifest["split"]) == {"test"}


def test_clinical_tables(phantom_federation: Federation) -> None:
    for yaml_path in phantom_federation.site_yamls:
        table = pd.read_csv(yaml_path.parent / "clinical.csv")
        if "ehr" in phantom_federation.modalities[yaml_path.parent.name]:
            assert list(table.columns) == ["case_id", "age", "sex", "grade", "ecog", "time", "event"]
        else:
            assert list(table.columns) == ["case_id", "time", "event"]  # survival only, no EHR
        assert (table["time"] > 0).all() and set(table["event"]) <= {0, 1}


def test_missing_ecog_rate() -> None:
    draws = [draw_case(np.random.default_rng([3, i])) for i in range(600)]
    missing = np.mean([c.ecog_missing for c in draws])
    assert 0.07 < missing < 0.18
    assert {c.grade for c in draws} == {"G1", "G2", "G3"}


def test_ct_pet_label_intensities_and_grids(phantom_federation: Federation) -> None:
    truth = pd.read_csv(phantom_federation.truth_csv).set_index("case_id")
    site = phantom_federation.site_yamls[1].parent  # CT + PET
    scanner = site_scanner(1)
    for case_dir in sorted((site / "cases").iterdir()):
        ct, ct_affine = read(case_dir / "ct.nii.gz")
        label, label_affine = read(case_dir / "label.nii.gz")
        pet, pet_affine = read(case_dir / "pet.nii.gz")
        assert ct.shape == label.shape == ct_shape(scanner)
        np.testing.assert_array_equal(label_affine, ct_affine)
        assert set(np.unique(label)) == {0, 1}
        # PET: its own, coarser grid with a different affine (origin and axis directions).
        assert not np.allclose(pet_affine, ct_affine)
        assert np.allclose(np.abs(np.diag(pet_affine)[:3]), scanner.pet_spacing_mm, atol=1e-3)
        assert np.sign(pet_affine[0, 0]) != np.sign(ct_affine[0, 0])
        # CT in HU: air, fat, muscle, bone.
        assert ct.min() <= -990 and ct.max() > 700
        assert np.median(ct[ct < -500]) == pytest.approx(-1000, abs=15)
        row = truth.loc[case_dir.name]
        # Tumour core against the muscle around it, both away from the blurred edge.
        tumour = label.astype(bool)
        core = binary_erosion(tumour, iterations=1)
        ring = binary_dilation(tumour, iterations=4) & ~binary_dilation(tumour, iterations=2)
        ring &= (ct > -30) & (ct < 130)  # muscle only: no fat, no bone
        contrast = ct[core].mean() - ct[ring].mean()
        assert 80 - 8 < contrast < 140 + 8  # contrast-enhanced CT, as drawn
        assert abs(contrast - row.tumour_contrast_hu) < 8
        assert 3 <= row.suv_mean <= 10 and row.suv_max <= 25
        # PET background ~1 SUV in the body, tumour clearly hotter.
        body = pet[pet > 0.5]
        assert 0.6 < np.median(body) < 1.4
        assert pet.max() > 2.0


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    def build(name: str, seed: int) -> Federation:
        return make_federation(tmp_path / name, n_sites=2, cases_per_site=2, seed=seed, test_cases=0)

    first, again, other = build("a", 5), build("b", 5), build("c", 6)
    for relative in ("site-2/cases/site-2-001/pet.nii.gz", "site-1/cases/site-1-000/ct.nii.gz"):
        a, a_affine = read(first.root / relative)
        b, b_affine = read(again.root / relative)
        c, _ = read(other.root / relative)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a_affine, b_affine)
        assert not np.array_equal(a, c)
    for relative in ("site-2/clinical.csv", "site-1/manifest.csv", "phantom_truth.csv"):
        assert (first.root / relative).read_text() == (again.root / relative).read_text()
    assert first.test_yaml is None and not (first.root / "test").exists()


def test_phantom_federation_is_written_once_and_never_over_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "fed"
    files = ensure_phantom_federation(folder, n_sites=2, cases_per_site=1, seed=0)
    assert files == [(folder / f"site-{i}" / "site.yaml").resolve() for i in (1, 2)]
    assert federation_site_files(folder) == files and not (folder / "test").exists()
    written = (folder / "federation.yaml").stat().st_mtime_ns
    assert ensure_phantom_federation(folder, n_sites=2, cases_per_site=1, seed=0) == files  # reused
    assert (folder / "federation.yaml").stat().st_mtime_ns == written
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a federation")
    with pytest.raises(FileExistsError, match="no federation.yaml"):
        ensure_phantom_federation(other, n_sites=1, cases_per_site=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed", "other"]  # no partial copy left behind


def held_counts(site_yaml: Path) -> tuple[int, int]:
    """(train, test) cases in a phantom site's manifest."""
    splits = list(pd.read_csv(site_yaml.parent / "manifest.csv")["split"])
    return splits.count("train"), splits.count("test")


def test_small_phantom_sites_lower_the_privacy_floors_to_what_they_hold(tmp_path: Path) -> None:
    federation = make_federation(tmp_path / "fed", n_sites=3, cases_per_site=2, seed=0, test_cases=2)
    defaults = SiteLimits()
    for site_yaml in (*federation.site_yamls, federation.test_yaml):
        limits = load_site_config(site_yaml).limits
        n_train, n_test = held_counts(site_yaml)
        has_ehr = "ehr" in federation.modalities[site_yaml.parent.name]
        assert LOWERED_NOTE in site_yaml.read_text()
        assert limits.min_eval_cases == max(1, n_test) < defaults.min_eval_cases  # Dice still reported
        assert limits.min_ehr_rows <= (max(1, n_train) if has_ehr else defaults.min_ehr_rows)  # EHR stats still sent
        # A test federation trains on tiny budgets; what else the site accepts keeps the defaults.
        assert limits.min_examples_per_round == 1
        assert (limits.max_rank, limits.pet_embed, limits.max_upload_mb) == (
            defaults.max_rank, defaults.pet_embed, defaults.max_upload_mb)


def test_phantom_limits_rule() -> None:
    assert phantom_limits(("ct", "pet", "ehr"), ehr_values=10, n_test=3) == {}
    assert phantom_limits(("ct",), ehr_values=1, n_test=2) == {  # no EHR: no EHR floor to lower
        "min_eval_cases": 2, "min_examples_per_round": 1}
    assert phantom_limits(("ct", "ehr"), ehr_values=9, n_test=0) == {"min_eval_cases": 1, "min_ehr_rows": 9,
                                                                    "min_examples_per_round": 1}


@pytest.fixture(scope="module")
def default_federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The site YAMLs of the phantom federation at the default size, as ``pemma simulate`` writes it."""
    return ensure_phantom_federation(tmp_path_factory.mktemp("default") / "fed")


def test_the_default_phantom_federation_meets_the_default_floors(default_federation: list[Path]) -> None:
    defaults = SiteLimits()
    for site_yaml in default_federation:
        n_train, n_test = held_counts(site_yaml)
        assert n_test >= defaults.min_eval_cases and n_train >= defaults.min_ehr_rows
        assert "limits" not in yaml.safe_load(site_yaml.read_text()) and LOWERED_NOTE not in site_yaml.read_text()
        assert load_site_config(site_yaml).limits == defaults


def test_the_default_demo_has_30_comparable_pairs_for_its_pooled_c_index(default_federation: list[Path]) -> None:
    """The demo pools the sites' within-site pairs of their test splits; fewer than 30 make the
    C-index noise (its interval spans 0-1), so the default phantoms must hold at least 30."""
    pairs = 0
    for site_yaml in default_federation:
        splits = pd.read_csv(site_yaml.parent / "manifest.csv").set_index("case_id")["split"]
        clinical = pd.read_csv(site_yaml.parent / "clinical.csv").set_index("case_id")
        test = clinical[splits.reindex(clinical.index) == "test"]
        pairs += concordance_pairs(np.zeros(len(test)), test["time"].to_numpy(), test["event"].to_numpy())[1]
    assert pairs >= 30


def test_truth_matches_hazard_formula(phantom_federation: Federation) -> None:
    truth = pd.read_csv(phantom_federation.truth_csv)
    for row in truth.itertuples():
        parts = survival_linear_predictor(row.volume_ml, row.suv_mean, row.age, row.grade, row.ecog)
        assert parts["total"] == pytest.approx(row.lp_total, abs=5e-3)  # age is rounded to 0.1 year
        assert row.time == pytest.approx(min(row.event_time, row.censor_time), abs=0.01)
        assert row.event == int(row.event_time <= row.censor_time)


def test_each_source_adds_survival_signal() -> None:
    """C-index of the true risk parts: CT (volume) < + PET (SUV) < + EHR, on 1500 draws."""
    rows = []
    for i in range(1500):
        case = draw_case(np.random.default_rng([11, i]))
        volume = physics._VOLUME_SCALE * 4 / 3 * math.pi * case.tumour_spheres[0][3] ** 3 / 1000
        _, time, event, parts = case_survival(case, volume)
        rows.append((time, event, parts["ct"], parts["pet"], parts["ehr"]))
    time, event, ct, pet, ehr = map(np.array, zip(*rows))
    assert 0.5 < event.mean() < 0.9  # censoring present, events dominate

    def c_index(risk: np.ndarray) -> float:
        return concordance_index(time, -risk, event)

    c_ct, c_ctpet, c_all = c_index(ct), c_index(ct + pet), c_index(ct + pet + ehr)
    assert 0.55 < c_ct < c_ctpet - 0.03 < c_all - 0.06
    # Independent sources: PET alone and EHR alone also predict.
    assert c_index(pet) > 0.55 and c_index(ehr) > 0.55
    assert abs(np.corrcoef(ct, pet)[0, 1]) < 0.1 and abs(np.corrcoef(ct, ehr)[0, 1]) < 0.1


def test_cli_default_federation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fed"
    assert pemma(["phantoms", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / f"{s}/site.yaml") for s in ("site-1", "site-2", "site-3", "test")]
    assert len(pd.read_csv(out / "phantom_truth.csv")) == 3 * 8 + 8
    assert list(pd.read_csv(out / "site-2" / "manifest.csv")["split"]).count("test") == 3  # a third of 8, rounded
    assert yaml.safe_load((out / "site-1" / "site.yaml").read_text())["spacing"] == [3.5, 3.5, 3.5]
    # Nothing is overwritten: a non-empty folder is refused.
    assert pemma(["phantoms", str(out)]) == 1  # a failure, not a usage error
    assert "refusing" in capsys.readouterr().err


def test_cli_modalities_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fed"
    options = ["--sites", "2", "--cases-per-site", "2", "--test-cases", "0", "--modalities", "ct+pet"]
    code = pemma(["phantoms", str(out), *options])
    assert code == 0
    for site in ("site-1", "site-2"):
        assert yaml.safe_load((out / site / "site.yaml").read_text())["modalities"] == ["ct", "pet"]
    assert pemma(["phantoms", str(tmp_path / "x"), "--modalities", "ct+mri"]) == 2


def test_phantom_sites_train_on_a_gpu_when_the_node_has_one(phantom_federation: Federation) -> None:
    for yaml_path in phantom_federation.site_yamls:
        assert yaml.safe_load(yaml_path.read_text())["device"] == "auto"
        assert load_site_config(yaml_path).device == "auto"


@pytest.mark.parametrize(("available", "count", "gpus"), [(True, 1, 1.0), (True, 4, 1.0), (False, 0, 0.0)])
def test_simulated_sites_reserve_a_gpu_only_where_one_is_visible(
    monkeypatch: pytest.MonkeyPatch, available: bool, count: int, gpus: float
) -> None:
    # The pure backend config only: no Ray, no Flower is started.
    import torch

    from simulation.simulate import backend_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert backend_config(cpus=6) == {"client_resources": {"num_cpus": 6, "num_gpus": gpus}}
