"""Federated EHR-only Cox on lifelines' lung data, against the pooled lifelines fit."""

from __future__ import annotations

import numpy as np
from lifelines.datasets import load_lung

from simulation.lung_cox import COVARIATES, SITES, assign_site, load_lung_sites, run_lung_benchmark, stratified_test_mask


def test_sites_partition_the_training_rows_and_each_has_enough_deaths():
    sites, test = load_lung_sites(seed=0)
    lung = load_lung()
    assert tuple(sites) == SITES
    assert sum(len(t) for t in sites.values()) + len(test) == len(lung)
    for site, table in sites.items():
        assert (table["site"] == site).all()
        assert table["event"].sum() >= 20, site
    assert assign_site(float("nan")) == "small_institutions"
    assert assign_site(12.0) == "inst_3_11_12"


def test_test_split_is_fixed_and_stratified_by_event():
    event = load_lung()["status"].to_numpy()
    mask = stratified_test_mask(event, 0.25, seed=0)
    np.testing.assert_array_equal(mask, stratified_test_mask(event, 0.25, seed=0))
    assert mask[event == 1].sum() == round(0.25 * (event == 1).sum())
    assert mask[event == 0].sum() == round(0.25 * (event == 0).sum())


def test_federated_cox_matches_pooled_cox_on_lung():
    result = run_lung_benchmark(rounds=150, local_steps=1, seed=0)
    assert result["pooled_c_index"] > 0.55
    assert result["federated_c_index"] > 0.55
    assert abs(result["federated_c_index"] - result["pooled_c_index"]) <= 0.02
    # FedAvg with event weights optimises the site-stratified Cox likelihood: on the
    # standardised clinical columns it must already sit on lifelines' stratified fit.
    features = result["features"]
    numeric = [features.index(name) for name in COVARIATES]
    federated = np.array(result["federated_coefficients"])[numeric]
    stratified = np.array(result["stratified_coefficients"])[numeric]
    np.testing.assert_allclose(federated, stratified, atol=0.02)
    assert result["sites"]["inst_1"]["institutions"] == ["1"]
    assert sum(s["train_rows"] for s in result["sites"].values()) + result["test_rows"] == 228


def test_one_round_is_far_from_converged_so_the_comparison_is_not_vacuous():
    result = run_lung_benchmark(rounds=1, local_steps=1, seed=0)
    numeric = [result["features"].index(name) for name in COVARIATES]
    gap = np.abs(np.array(result["federated_coefficients"]) - result["stratified_coefficients"])[numeric]
    assert gap.max() > 0.1


def test_zero_rounds_leave_the_zero_model():
    result = run_lung_benchmark(rounds=0, seed=0)
    assert result["federated_coefficients"] == [0.0] * len(result["features"])
    assert result["federated_c_index"] == 0.5  # all risks tied
