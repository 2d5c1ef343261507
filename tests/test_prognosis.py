"""Survival head on the PEMMA encoder: groups, training signal, EHR branch, errors."""

from __future__ import annotations

import pytest
import torch

from pemma_core.model.factory import build_model
from pemma_core.model.spec import ModelSpec, build_backbone
from pemma_core.training.prognosis import Cohort, evaluate_survival, train_survival


def _cohort(n: int = 40, ehr_width: int = 0, seed: int = 0) -> Cohort:
    """Patients whose hazard grows with a bright PET blob's size (and an EHR covariate)."""
    g = torch.Generator().manual_seed(seed)
    spec = ModelSpec()
    s = spec.roi_size[0]
    image = torch.randn(n, 2, s, s, s, generator=g) * 0.1
    size = torch.randint(2, s // 2, (n,), generator=g)
    for i, r in enumerate(size.tolist()):
        image[i, :, :r, :r, :r] += 1.0
    ehr = torch.randn(n, ehr_width, generator=g) if ehr_width else None
    log_hazard = size.float() / 2 + (2 * ehr[:, 0] if ehr_width else 0)
    time = -torch.log(torch.rand(n, generator=g)) / log_hazard.exp()  # exponential, from g alone
    event = (torch.rand(n, generator=g) < 0.8).float()
    return Cohort(image=image, time=time, event=event, ehr=ehr)


def test_survival_head_and_ehr_encoder_are_their_own_groups():
    model = build_model(ModelSpec(survival=True, ehr_features=3))
    groups = model.param_groups
    assert {n.split(".")[0] for n, g in groups.items() if g == "prognosis"} == {"survival_head"}
    assert {n.split(".")[0] for n, g in groups.items() if g == "ehr"} == {"ehr_encoder"}


def test_head_learns_image_signal_and_leaves_adapters_frozen():
    torch.manual_seed(0)
    spec = ModelSpec(survival=True)
    model = build_model(spec, build_backbone(spec))
    train, test = _cohort(seed=1), _cohort(seed=2)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if model.param_groups.get(n) not in (None, "prognosis")}
    before = evaluate_survival(model, test, "ctpet")
    result = train_survival(model, train, ["ctpet"], steps=30, lr=1e-2)
    assert result.examples == {"prognosis": 30 * len(train)}
    after = evaluate_survival(model, test, "ctpet")
    # The oracle (true blob size) scores about 0.8 on such cohorts; frozen random features less.
    assert after > 0.6 and after > before
    for name, tensor in adapters.items():
        assert torch.equal(dict(model.named_parameters())[name], tensor)


def test_ehr_branch_adds_signal():
    torch.manual_seed(0)
    train, test = _cohort(n=32, ehr_width=3, seed=3), _cohort(n=32, ehr_width=3, seed=4)
    spec = ModelSpec(survival=True)
    backbone = build_backbone(spec)
    scores = {}
    for ehr in (0, 3):
        model = build_model(spec.with_(ehr_features=ehr), backbone)
        cohort_train = train if ehr else Cohort(train.image, train.time, train.event)
        cohort_test = test if ehr else Cohort(test.image, test.time, test.event)
        train_survival(model, cohort_train, ["ctpet"], steps=30, lr=1e-2)
        scores[ehr] = evaluate_survival(model, cohort_test, "ctpet")
    assert scores[3] > scores[0] + 0.05


def test_joint_finetuning_moves_the_mode_groups_only():
    spec = ModelSpec(survival=True)
    model = build_model(spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_survival(model, _cohort(n=6), ["ct"], steps=2, train_adapters=True)
    moved = {model.param_groups[n] for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert "prognosis" in moved and moved <= {"prognosis", "shared", "ct"}


def test_errors_are_clear():
    with pytest.raises(ValueError, match="ehr_features needs survival=True"):
        ModelSpec(ehr_features=3)
    with pytest.raises(ValueError, match="survival training needs"):
        train_survival(build_model(ModelSpec()), _cohort(n=4), ["ct"], steps=1)
    model = build_model(ModelSpec(survival=True, ehr_features=2))
    with pytest.raises(ValueError, match="needs EHR covariates"):
        evaluate_survival(model, _cohort(n=4), "ct")
    with pytest.raises(ValueError, match="cohort time must have shape"):
        Cohort(torch.zeros(3, 2, 32, 32, 32), torch.zeros(2), torch.zeros(3))


def test_site_cohort_crops_and_clinical_rows(phantom_federation):
    from pemma_core.data.clinical import EhrPreprocessor, read_clinical
    from pemma_core.training.prognosis import load_cohort
    from pemma_core.config.site import load_site_config

    cfg = load_site_config(phantom_federation.site_yamls[2])  # CT + PET + EHR
    spec = ModelSpec(survival=True)
    table, _ = read_clinical(cfg.clinical.path, cfg.clinical.id_column, cfg.clinical.time, cfg.clinical.event,
                             cfg.clinical.covariates)
    prep = EhrPreprocessor.fit(table, cfg.clinical.covariates)
    cohort, ids = load_cohort(cfg, spec.roi_size, "train", prep)
    assert len(cohort) == len(ids) == 3
    assert cohort.image.shape == (3, 2, *spec.roi_size)
    assert cohort.ehr.shape == (3, prep.n_features)
    expected = table.loc[ids]
    assert torch.allclose(cohort.time, torch.tensor(expected["time"].astype(float).to_numpy(), dtype=torch.float32))
    # the crop is centred on the tumour: the label's centre voxel is foreground in the PET channel's brightest region
    assert cohort.image[:, 1].amax() > 0


def test_federated_head_with_one_site_equals_local_rounds():
    from pemma_core.training.prognosis import federated_survival

    spec = ModelSpec(survival=True)
    backbone = build_backbone(spec)
    cohort = _cohort(n=8)
    torch.manual_seed(0)
    federated = build_model(spec, backbone)
    torch.manual_seed(0)
    local = build_model(spec, backbone)
    federated_survival(federated, {"only": cohort}, {"only": ["ct"]}, rounds=3, local_steps=2)
    for _ in range(3):
        train_survival(local, cohort, ["ct"], steps=2)
    head = {n: p for n, p in local.named_parameters() if n.startswith("survival_head.")}
    for name, p in federated.named_parameters():
        if name in head:
            torch.testing.assert_close(p, head[name])


def test_a_cohort_without_ehr_trains_only_the_image_term():
    from pemma_core.model.files import trainable_state

    torch.manual_seed(0)
    model = build_model(ModelSpec(survival=True, ehr_features=2))
    before = {k: v.clone() for k, v in trainable_state(model).items()}
    result = train_survival(model, _cohort(n=6), ["ct"], steps=2, omit_ehr=True)
    assert set(result.examples) == {"prognosis"}
    after = trainable_state(model)
    groups = model.param_groups
    assert all(torch.equal(before[k], after[k]) for k in before if groups[k] == "ehr")
    assert any(not torch.equal(before[k], after[k]) for k in before if groups[k] == "prognosis")


def test_site_covariates_must_match_the_federation_spec(phantom_federation):
    from pemma_core.data.clinical import EhrPreprocessor
    from pemma_core.data.cases import site_ehr_stats
    from pemma_core.training.prognosis import check_site_covariates
    from pemma_core.config.site import load_site_config

    ehr_site, ct_site = (load_site_config(p) for p in (phantom_federation.site_yamls[2], phantom_federation.site_yamls[0]))
    stats, _note = site_ehr_stats(ehr_site, min_rows=1)  # 3 training cases: below the default floor
    preprocessor = EhrPreprocessor.from_partial_stats([stats])
    check_site_covariates(ehr_site, preprocessor)
    with pytest.raises(ValueError, match="'age' \\(numeric\\)"):
        check_site_covariates(ct_site, preprocessor)


def _fill_clinical(yaml_path, edit) -> None:
    """Rewrite a site's clinical CSV: every ecog filled in, then ``edit(rows)`` (a list of dicts)."""
    import csv

    path = yaml_path.parent / "clinical.csv"
    with path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    for row in rows:
        row["ecog"] = row["ecog"] or "1"
    edit(rows)
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_site_ehr_stats_privacy_floor(tmp_path):
    from pemma_core.config.site import load_site_config
    from pemma_core.data.clinical import MIN_EHR_ROWS, partial_stats_problems
    from pemma_core.data.cases import site_cases
    from pemma_core.phantoms.writer import make_federation
    from pemma_core.data.cases import site_ehr_stats

    # one CT+PET+EHR site with exactly MIN_EHR_ROWS training cases (15: a third held out)
    federation = make_federation(tmp_path / "fed", n_sites=1, cases_per_site=15, seed=0, test_cases=0,
                                 modalities=[["ct", "pet", "ehr"]])
    yaml_path = federation.site_yamls[0]
    train = [c.case_id for c in site_cases(load_site_config(yaml_path), "train")[0]]
    assert len(train) == MIN_EHR_ROWS == 10

    _fill_clinical(yaml_path, lambda rows: None)
    stats, note = site_ehr_stats(load_site_config(yaml_path))  # 10 values of every covariate: sent
    assert stats is not None and partial_stats_problems(stats) == []
    assert stats["rows"] == 10 and note.startswith("EHR statistics sent: 10 training rows")

    def blank_one_age_and_two_sexes(rows):
        for row in rows:
            if row["case_id"] == train[0]:
                row["age"] = ""
            if row["case_id"] in train[1:3]:
                row["sex"] = "NA"

    _fill_clinical(yaml_path, blank_one_age_and_two_sexes)
    cfg = load_site_config(yaml_path)
    stats, note = site_ehr_stats(cfg)  # 9 ages and 8 sexes: nothing leaves the site
    assert stats is None
    assert note == ("EHR statistics withheld: covariate 'age' has 9 training values, covariate 'sex' has 8 training "
                    "values, fewer than min_ehr_rows 10")
    assert site_ehr_stats(cfg, min_rows=9)[0] is None  # sex is still short
    stats, note = site_ehr_stats(cfg, min_rows=8)
    assert stats["columns"]["age"]["count"] == 9 and "at least 8 values per covariate" in note
    with pytest.raises(ValueError, match="min_rows must be an int >= 1"):
        site_ehr_stats(cfg, min_rows=0)
