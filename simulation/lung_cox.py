"""Federated EHR-only Cox model on the NCCTG lung cancer data, against a pooled fit.

Evidence that the prognosis maths (:mod:`pemma_core.training.survival`), the federated
covariate preprocessing (:mod:`pemma_core.data.clinical`) and the server's aggregation
(:func:`pemma_core.aggregation.aggregate_round`) reproduce a centrally fitted Cox model on
real data, without any site sharing rows. A pure-python federation (no Flower): the same
pure functions are what the Flower client and strategy call.

Data: ``lifelines.datasets.load_lung()`` (228 patients, 165 deaths, 18 institutions).

Sites: the institutions are too small to be sites on their own (only inst 1 has more
than 23 patients), so they are grouped into four sites of 36 to 79 patients, each with
at least 27 deaths:

============================  ==========================================  ======  ======
site                          institutions (``inst``)                      rows    deaths
============================  ==========================================  ======  ======
``inst_1``                    1                                            36      27
``inst_3_11_12``              3, 11, 12                                    60      44
``inst_13_16_22``             13, 16, 22                                   53      37
``small_institutions``        2, 4, 5, 6, 7, 10, 15, 21, 26, 32, 33,      79      57
                              and the one patient with no ``inst``
============================  ==========================================  ======  ======

Test split: a fixed 25% of all patients, stratified by event (the same seeded draw
within the deaths and within the censored), held out centrally; each site trains on
its remaining patients.

Covariates: age, sex, ph.ecog, ph.karno, pat.karno, meal.cal, wt.loss, all numeric.
The :class:`~pemma_core.data.clinical.EhrPreprocessor` is fitted from the sites'
:func:`~pemma_core.data.clinical.partial_stats` (standardisation, mean imputation, a missing
indicator for each column with missing training values) and used by both models.

Models:

- pooled: lifelines ``CoxPHFitter`` (Efron ties) on all training rows together;
- pooled, stratified by site: the same with ``strata=["site"]``, shown because it is
  exactly the objective the federation optimises (next item);
- federated: ``SurvivalHead(0, ehr_features=P)`` (a linear Cox model). Each round every
  site starts from the global weights, takes ``local_steps`` full-batch gradient steps
  on ``cox_partial_nll`` (Efron) over its own patients, and replies with its weights and
  its death count; ``aggregate_round`` validates the replies and combines them
  (weights = deaths). With event weights and the mean-over-events
  loss, the weighted sum of site losses is the Cox partial likelihood stratified by
  site (each site keeps its own risk sets and baseline hazard): risk sets never cross
  sites, so no FedAvg of local gradients can give the unstratified pooled model.

Local steps: with one step per round the federation is gradient descent on the
stratified objective and converges to the stratified pooled fit. Several local steps
per round at a fixed step size converge to a nearby but different point (client drift:
each site moves towards its own optimum before averaging), further from the pooled fit
(compare ``--local-steps 5 --rounds 100``). Hence the defaults ``local_steps=1, rounds=400``.

Both fits carry the same small ridge penalty (``ridge``, in lifelines' scaling: it
adds ``ridge / 2 * ||beta||^2`` per patient to the negative log partial likelihood),
because a missing-indicator column flagging a single training patient otherwise has a
very flat (within one site, unbounded) maximum-likelihood coefficient. lifelines
penalises internally standardised coefficients; :func:`fit_lifelines_cox` rescales its
per-column penalizer so both penalise the coefficients of the columns as given.

Run ``python -m simulation.lung_cox`` for the table.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from lifelines import CoxPHFitter
from lifelines.datasets import load_lung

from pemma_core.aggregation import SiteUpdate, aggregate_round
from pemma_core.data.clinical import EhrPreprocessor, partial_stats
from pemma_core.training.survival import SurvivalHead, concordance, cox_partial_nll

COVARIATES: dict[str, str] = {
    "age": "numeric",
    "sex": "numeric",  # 1/2; numeric so one column (a full one-hot is collinear in a Cox model)
    "ph.ecog": "numeric",  # ordinal 0-3
    "ph.karno": "numeric",
    "pat.karno": "numeric",
    "meal.cal": "numeric",
    "wt.loss": "numeric",
}
# Explicit institution -> site table (see the module docstring); anything else, including
# a missing inst, belongs to "small_institutions".
SITE_INSTITUTIONS: dict[str, tuple[int, ...]] = {
    "inst_1": (1,),
    "inst_3_11_12": (3, 11, 12),
    "inst_13_16_22": (13, 16, 22),
}
OTHER_SITE = "small_institutions"
SITES: tuple[str, ...] = (*SITE_INSTITUTIONS, OTHER_SITE)
TEST_FRACTION = 0.25
GROUP = "prognosis"  # the survival head's parameter group (docs/ARCHITECTURE.md, parameter groups)


def assign_site(inst: float) -> str:
    """Site of a patient from its institution code (NaN -> the small-institutions site)."""
    for site, institutions in SITE_INSTITUTIONS.items():
        if not math.isnan(inst) and int(inst) in institutions:
            return site
    return OTHER_SITE


def stratified_test_mask(event: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask drawing ``round(fraction * n)`` test rows within each event value."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(event.shape[0], dtype=bool)
    for value in np.unique(event):
        rows = np.flatnonzero(event == value)
        mask[rng.permutation(rows)[: int(round(fraction * rows.size))]] = True
    return mask


def load_lung_sites(seed: int = 0) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """``(training rows per site, pooled test rows)``; columns ``time``, ``event``, covariates."""
    lung = load_lung().rename(columns={"status": "event"})
    lung["site"] = [assign_site(inst) for inst in lung["inst"]]
    test = stratified_test_mask(lung["event"].to_numpy(), TEST_FRACTION, seed)
    train = lung[~test]
    sites = {site: train[train["site"] == site].reset_index(drop=True) for site in SITES}
    return sites, lung[test].reset_index(drop=True)


def _institutions(table: pd.DataFrame) -> list[str]:
    """Institution codes present in ``table`` ("none" for a missing inst), sorted."""
    codes = sorted({int(i) for i in table["inst"] if not math.isnan(i)})
    return [str(c) for c in codes] + (["none"] if table["inst"].isna().any() else [])


def _tensors(table: pd.DataFrame, preprocessor: EhrPreprocessor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(preprocessor.transform(table)).double()
    return x, torch.tensor(table["time"].to_numpy(), dtype=torch.float64), torch.tensor(table["event"].to_numpy())


def _local_training(
    head: SurvivalHead, x: torch.Tensor, time: torch.Tensor, event: torch.Tensor, steps: int, lr: float, ridge_per_event: float
) -> None:
    """``steps`` full-batch gradient steps on the site's Cox loss (+ ridge), in place."""
    optimiser = torch.optim.SGD(head.parameters(), lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = cox_partial_nll(head(None, x), time, event, ties="efron")
        loss = loss + 0.5 * ridge_per_event * sum((p**2).sum() for p in head.parameters())
        loss.backward()
        optimiser.step()


def fit_lifelines_cox(table: pd.DataFrame, features: list[str], ridge: float, strata: str | None = None) -> np.ndarray:
    """Coefficients of lifelines' ``CoxPHFitter`` (Efron) with a ridge on the raw coefficients.

    lifelines standardises each column internally (``X.std(0)``) and penalises the
    standardised coefficients ``beta_j * std_j``; a per-column penalizer
    ``ridge / std_j**2`` turns that into ``ridge / 2 * n * ||beta||^2`` on the columns as
    given, the penalty the federated fit uses.
    """
    std = table[features].std(0).to_numpy()
    penalizer = ridge / np.where(std > 0, std, 1.0) ** 2 if ridge > 0 else 0.0
    fitter = CoxPHFitter(penalizer=penalizer)
    fitter.fit(table, duration_col="time", event_col="event", strata=[strata] if strata else None)
    return fitter.params_[features].to_numpy()


def run_lung_benchmark(
    rounds: int = 400, local_steps: int = 1, seed: int = 0, lr: float = 0.5, ridge: float = 0.01
) -> dict[str, Any]:
    """Federated vs pooled Cox on lung; see the module docstring for the protocol.

    Args:
        rounds: federated rounds.
        local_steps: full-batch gradient steps per site per round.
        seed: seed of the test split (the head starts from zero weights).
        lr: local gradient-descent step size (the loss is a mean over events).
        ridge: ridge penalty, in lifelines' ``penalizer`` scaling, for both fits.

    Returns:
        dict with ``federated_c_index``, ``pooled_c_index``, ``stratified_c_index`` (test
        set), ``rounds``, ``local_steps``, ``sites`` (site -> institutions, train rows,
        train deaths),
        ``test_rows``, ``test_events``, ``features`` and the three coefficient vectors
        (``federated_coefficients``, ``pooled_coefficients``, ``stratified_coefficients``).
    """
    site_tables, test_table = load_lung_sites(seed)

    # Federated preprocessing: only summaries leave the sites.
    preprocessor = EhrPreprocessor.from_partial_stats([partial_stats(t, COVARIATES) for t in site_tables.values()])
    site_data = {site: _tensors(t, preprocessor) for site, t in site_tables.items()}
    x_test, time_test, event_test = _tensors(test_table, preprocessor)
    n_train = sum(len(t) for t in site_tables.values())
    n_train_events = sum(int(t["event"].sum()) for t in site_tables.values())
    # lifelines' penalty ridge/2 * n * ||b||^2 on the summed NLL is ridge/2 * n/D on the
    # mean-over-events loss; the event-weighted FedAvg keeps the same overall scale.
    ridge_per_event = ridge * n_train / n_train_events

    # Federated fit.
    head = SurvivalHead(0, ehr_features=preprocessor.n_features).double()
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()  # the Cox model's usual starting point; also makes runs comparable
    global_state = {k: v.numpy().copy() for k, v in head.state_dict().items()}
    groups = {name: GROUP for name in global_state}
    for _ in range(rounds):
        updates = []
        for site, (x, time, event) in site_data.items():
            head.load_state_dict({k: torch.from_numpy(v) for k, v in global_state.items()})
            _local_training(head, x, time, event, local_steps, lr, ridge_per_event)
            updates.append(
                SiteUpdate(site, {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}, {GROUP: int(event.sum())})
            )
        global_state = aggregate_round(global_state, updates, groups).raise_for_rejected().state
    head.load_state_dict({k: torch.from_numpy(v) for k, v in global_state.items()})
    with torch.no_grad():
        federated_risk = head(None, x_test)
    federated_beta = next(iter(global_state.values())).reshape(-1)

    # Pooled fits on the same preprocessed training rows: the plain Cox model, and the
    # one stratified by site, which is the objective event-weighted FedAvg converges to.
    features = list(preprocessor.feature_names)
    pooled_train = pd.concat(
        [
            pd.DataFrame(x.numpy(), columns=features).assign(time=t.numpy(), event=e.numpy(), site=site)
            for site, (x, t, e) in site_data.items()
        ],
        ignore_index=True,
    )
    pooled_beta = fit_lifelines_cox(pooled_train.drop(columns="site"), features, ridge)
    stratified_beta = fit_lifelines_cox(pooled_train, features, ridge, strata="site")

    return {
        "federated_c_index": concordance(federated_risk, time_test, event_test),
        "pooled_c_index": concordance(x_test.numpy() @ pooled_beta, time_test, event_test),
        "stratified_c_index": concordance(x_test.numpy() @ stratified_beta, time_test, event_test),
        "rounds": rounds,
        "local_steps": local_steps,
        "sites": {
            site: {
                "institutions": _institutions(pd.concat([table, test_table[test_table["site"] == site]])),
                "train_rows": len(table),
                "train_events": int(table["event"].sum()),
            }
            for site, table in site_tables.items()
        },
        "test_rows": len(test_table),
        "test_events": int(test_table["event"].sum()),
        "features": features,
        "federated_coefficients": federated_beta.tolist(),
        "pooled_coefficients": pooled_beta.tolist(),
        "stratified_coefficients": stratified_beta.tolist(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run_lung_benchmark(rounds=args.rounds, local_steps=args.local_steps, seed=args.seed)

    print(f"{'site':<22}{'institutions (inst)':<44}{'train rows':>11}{'deaths':>8}")
    for site, info in result["sites"].items():
        print(f"{site:<22}{', '.join(info['institutions']):<44}{info['train_rows']:>11}{info['train_events']:>8}")
    print(f"test set: {result['test_rows']} patients, {result['test_events']} deaths\n")
    print(f"{'coefficient':<20}{'federated':>12}{'pooled':>12}{'stratified':>12}")
    for row in zip(
        result["features"], result["federated_coefficients"], result["pooled_coefficients"], result["stratified_coefficients"]
    ):
        print(f"{row[0]:<20}{row[1]:>12.4f}{row[2]:>12.4f}{row[3]:>12.4f}")
    print(f"\ntest C-index after {result['rounds']} rounds x {result['local_steps']} local steps:")
    print(f"  federated {result['federated_c_index']:.4f}")
    print(f"  pooled    {result['pooled_c_index']:.4f}")
    print(f"  pooled, stratified by site {result['stratified_c_index']:.4f}")
    print(f"  |difference| {abs(result['federated_c_index'] - result['pooled_c_index']):.4f}")


if __name__ == "__main__":
    main()
