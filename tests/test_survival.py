"""Cox loss against lifelines and a direct transcription of the formulas; C-index; heads."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi

from pemma_core.training.survival import EhrEncoder, SurvivalHead, concordance, cox_partial_nll


def naive_cox_nll(risk: list[float], time: list[float], event: list[int], ties: str) -> float:
    """The textbook formulas, one event time at a time (slow, obviously right)."""
    total, n_events = 0.0, sum(event)
    for t in sorted({t for t, e in zip(time, event) if e}):
        at_risk = [math.exp(r) for r, s in zip(risk, time) if s >= t]
        tied = [r for r, s, e in zip(risk, time, event) if s == t and e]
        d = len(tied)
        total += sum(tied)
        for l in range(d):
            share = l / d if ties == "efron" else 0.0
            total -= math.log(sum(at_risk) - share * sum(math.exp(r) for r in tied))
    return -total / n_events


def tied_table(seed: int = 0, n: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    risk = torch.randn(n, generator=generator, dtype=torch.float64)
    time = torch.randint(1, 8, (n,), generator=generator).double()  # few distinct times: many ties
    event = (torch.rand(n, generator=generator) < 0.7).long()
    return risk, time, event


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_loss_matches_textbook_formula_with_ties(ties):
    risk, time, event = tied_table()
    expected = naive_cox_nll(risk.tolist(), time.tolist(), event.tolist(), ties)
    assert cox_partial_nll(risk, time, event, ties=ties).item() == pytest.approx(expected, rel=1e-12)


def test_efron_and_breslow_differ_with_tied_events_and_agree_without():
    risk, time, event = tied_table()
    assert cox_partial_nll(risk, time, event, "efron").item() < cox_partial_nll(risk, time, event, "breslow").item()

    distinct_time = torch.randperm(len(risk), generator=torch.Generator().manual_seed(1)).double()
    efron = cox_partial_nll(risk, distinct_time, event, "efron")
    breslow = cox_partial_nll(risk, distinct_time, event, "breslow")
    assert efron.item() == pytest.approx(breslow.item(), rel=1e-14)


def test_linear_cox_fit_matches_lifelines_on_rossi():
    rossi = load_rossi()
    covariates = [c for c in rossi.columns if c not in ("week", "arrest")]
    x = rossi[covariates].to_numpy(dtype=np.float64)
    x = (x - x.mean(0)) / x.std(0)  # conditioning only; lifelines gets the same columns
    x_t = torch.from_numpy(x)
    time = torch.tensor(rossi["week"].to_numpy(), dtype=torch.float64)  # weeks: heavily tied
    event = torch.tensor(rossi["arrest"].to_numpy())

    beta = torch.zeros(len(covariates), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [beta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        optimiser.zero_grad()
        loss = cox_partial_nll(x_t @ beta, time, event, ties="efron")
        loss.backward()
        return loss

    optimiser.step(closure)

    table = pd.DataFrame(x, columns=covariates).assign(week=rossi["week"], arrest=rossi["arrest"])
    fitter = CoxPHFitter().fit(table, duration_col="week", event_col="arrest")
    np.testing.assert_allclose(beta.detach().numpy(), fitter.params_[covariates].to_numpy(), atol=1e-5)
    # Same objective: lifelines' log partial likelihood is -(our mean loss) * events.
    at_lifelines = cox_partial_nll(x_t @ torch.from_numpy(fitter.params_[covariates].to_numpy()), time, event, "efron")
    assert at_lifelines.item() == pytest.approx(-fitter.log_likelihood_ / int(event.sum()), rel=1e-9)


def test_no_events_gives_zero_loss_with_zero_gradient():
    risk = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss = cox_partial_nll(risk, torch.arange(5.0), torch.zeros(5), ties="efron")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(risk.grad, torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_loss_ignores_row_order_and_additive_shift(ties):
    risk, time, event = tied_table(seed=3)
    loss = cox_partial_nll(risk, time, event, ties)
    order = torch.randperm(len(risk), generator=torch.Generator().manual_seed(0))
    assert cox_partial_nll(risk[order], time[order], event[order], ties).item() == pytest.approx(loss.item(), rel=1e-12)
    assert cox_partial_nll(risk + 123.0, time, event, ties).item() == pytest.approx(loss.item(), rel=1e-10)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_extreme_risks_stay_finite_in_float32(ties):
    risk, time, event = tied_table(seed=4)
    risk = (risk * 500.0).float().requires_grad_()  # exp() of these overflows float32
    loss = cox_partial_nll(risk, time, event, ties)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(risk.grad).all()
    reference = naive_log_space_nll(risk.detach().double(), time, event, ties)
    assert loss.item() == pytest.approx(reference, rel=1e-5)


def naive_log_space_nll(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: str) -> float:
    """Textbook formula evaluated with logsumexp, for inputs whose exp() overflows."""
    total = torch.tensor(0.0, dtype=torch.float64)
    for t in torch.unique(time[event == 1]):
        log_at_risk = torch.logsumexp(risk[time >= t], 0)
        tied = risk[(time == t) & (event == 1)]
        log_tied = torch.logsumexp(tied, 0)
        total += tied.sum()
        for l in range(len(tied)):
            share = l / len(tied) if ties == "efron" else 0.0
            total -= log_at_risk + torch.log1p(-share * torch.exp(log_tied - log_at_risk))
    return (-total / event.sum()).item()


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_hessian_is_finite_and_matches_finite_differences(ties):
    risk, time, event = tied_table(seed=5, n=12)

    def gradient(r: torch.Tensor) -> torch.Tensor:
        r = r.clone().requires_grad_()
        return torch.autograd.grad(cox_partial_nll(r, time, event, ties), r)[0]

    hessian = torch.autograd.functional.hessian(lambda r: cox_partial_nll(r, time, event, ties), risk)
    step = 1e-6
    eye = torch.eye(len(risk), dtype=torch.float64)
    numeric = torch.stack([(gradient(risk + step * eye[i]) - gradient(risk - step * eye[i])) / (2 * step) for i in range(len(risk))])
    assert torch.isfinite(hessian).all()
    torch.testing.assert_close(hessian, numeric, atol=1e-7, rtol=1e-6)


def test_loss_rejects_bad_arguments():
    risk, time, event = tied_table()
    with pytest.raises(ValueError, match="ties"):
        cox_partial_nll(risk, time, event, ties="exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D of equal length"):
        cox_partial_nll(risk, time[:-1], event)
    with pytest.raises(ValueError, match="floating point"):
        cox_partial_nll(event, time, event)


# --------------------------------------------------------------------------- C-index


def test_concordance_perfect_reversed_and_censoring():
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    event = np.array([1, 1, 1, 1, 0])
    shortest_first = np.array([5.0, 4.0, 3.0, 2.0, 1.0])  # highest risk dies first
    assert concordance(shortest_first, time, event) == 1.0
    assert concordance(-shortest_first, time, event) == 0.0
    assert concordance(torch.tensor(shortest_first), torch.tensor(time), torch.tensor(event)) == 1.0
    # A censored case earliest makes no admissible pair with anyone later, whatever its risk.
    censored_first = np.array([0, 1, 1, 1, 1])
    assert concordance(np.array([-9.0, 4.0, 3.0, 2.0, 1.0]), time, censored_first) == 1.0


def test_concordance_without_events_is_an_error():
    with pytest.raises(ValueError, match="admissible"):
        concordance([1.0, 2.0], [1.0, 2.0], [0, 0])


# --------------------------------------------------------------------------- modules


def test_survival_head_shapes_for_each_input_combination():
    image, ehr = torch.randn(4, 16), torch.randn(4, 3)
    assert SurvivalHead(16)(image).shape == (4,)
    assert SurvivalHead(0, ehr_features=3)(None, ehr).shape == (4,)
    assert SurvivalHead(16, ehr_features=3, hidden=(8,), dropout=0.1)(image, ehr).shape == (4,)


def test_linear_survival_head_is_a_bias_free_linear_cox_model():
    head = SurvivalHead(0, ehr_features=3)
    weights = [p for p in head.parameters()]
    assert [tuple(w.shape) for w in weights] == [(1, 3)]  # no bias: Cox ignores constants
    ehr = torch.randn(5, 3)
    torch.testing.assert_close(head(None, ehr), ehr @ weights[0][0])


def test_survival_head_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="both widths are 0"):
        SurvivalHead(0, ehr_features=0)
    head = SurvivalHead(16, ehr_features=3)
    with pytest.raises(ValueError, match=r"ehr_embedding of shape \[B, 3\]"):
        head(torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"image_features of shape \[B, 16\]"):
        head(torch.randn(4, 15), torch.randn(4, 3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        head(torch.randn(4, 16), torch.randn(5, 3))
    with pytest.raises(ValueError, match="without image_features"):
        SurvivalHead(0, ehr_features=3)(torch.randn(4, 16), torch.randn(4, 3))


def test_ehr_encoder_shape_and_validation():
    encoder = EhrEncoder(7, 5, hidden=(12,))
    assert encoder(torch.randn(3, 7)).shape == (3, 5)
    with pytest.raises(ValueError, match=r"\[B, 7\]"):
        encoder(torch.randn(3, 6))
    with pytest.raises(ValueError, match="positive"):
        EhrEncoder(0, 5)
    with pytest.raises(ValueError, match="dropout"):
        EhrEncoder(7, 5, dropout=1.0)


def test_encoder_and_head_train_end_to_end():
    """Gradients reach both modules and a few steps lower the Cox loss."""
    torch.manual_seed(0)
    covariates = torch.randn(64, 4)
    time = torch.exp(-covariates[:, 0]) + 0.01 * torch.rand(64)  # covariate 0 shortens survival
    event = torch.ones(64)
    encoder, head = EhrEncoder(4, 8), SurvivalHead(0, ehr_features=8)
    optimiser = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=0.05)
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        loss = cox_partial_nll(head(None, encoder(covariates)), time, event)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert concordance(head(None, encoder(covariates)).detach(), time, event) > 0.9


def test_concordance_pairs_give_lifelines_c_index_with_ties():
    from pemma_core.training.survival import concordance_pairs

    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(3, 25))
        time = rng.integers(1, 8, size=n).astype(float)  # many tied times
        event = rng.integers(0, 2, size=n)
        risk = rng.integers(0, 4, size=n).astype(float)  # many tied risks
        if not event.any():
            event[0] = 1
        score, pairs = concordance_pairs(risk, time, event)
        try:
            expected = concordance(risk, time, event)
        except ValueError:
            assert pairs == 0
            continue
        assert pairs > 0 and score / (2 * pairs) == pytest.approx(expected, abs=1e-12)


def test_pooled_concordance_counts_within_site_pairs_only():
    from pemma_core.training.survival import concordance_pairs, pooled_concordance

    # two sites whose risks are right within each site but reversed across them
    a = concordance_pairs([2.0, 1.0], [1.0, 5.0], [1, 1])
    b = concordance_pairs([12.0, 11.0], [10.0, 50.0], [1, 0])
    assert a == (2, 1) and b == (2, 1)
    assert pooled_concordance([a, b]) == (1.0, 2)
    with pytest.raises(ValueError, match="no admissible pairs"):
        pooled_concordance([(0, 0)])


def test_bootstrap_pair_counts_are_the_pair_counts_of_resamples():
    from pemma_core.training.survival import bootstrap_pair_counts, concordance_pairs

    rng = np.random.default_rng(4)
    n = 9
    time, event, risk = rng.integers(1, 6, n).astype(float), rng.integers(0, 2, n), rng.normal(size=n)
    scores, pairs = bootstrap_pair_counts(risk, time, event, replicates=50, seed=11)
    assert (scores, pairs) == bootstrap_pair_counts(risk, time, event, replicates=50, seed=11)  # seeded
    assert scores != bootstrap_pair_counts(risk, time, event, replicates=50, seed=12)[0]
    draw = np.random.default_rng(11)
    for score, count in zip(scores, pairs):
        pick = draw.integers(0, n, n)
        assert (score, count) == concordance_pairs(risk[pick], time[pick], event[pick])
        assert 0 <= score <= 2 * count <= n * (n - 1)  # a case never pairs with its own copy
    assert len(set(zip(scores, pairs))) > 5


def test_pooled_bootstrap_interval_sums_each_replicate_over_the_sites():
    from pemma_core.training.survival import pooled_bootstrap_interval

    # replicate b sums the b-th counts: pooled C of replicate b = (score_a + score_b) / (2 (pairs_a + pairs_b))
    site_a = ([2, 0, 4, 2], [1, 1, 2, 1])
    site_b = ([0, 2, 0, 2], [1, 1, 2, 1])
    pooled = [(2 + 0) / 4, (0 + 2) / 4, (4 + 0) / 8, (2 + 2) / 4]  # 0.5, 0.5, 0.5, 1.0
    low, high = pooled_bootstrap_interval([site_a, site_b], level=0.5)
    assert (low, high) == pytest.approx(tuple(np.percentile(pooled, [25, 75])))
    # replicates without a pair are left out; when most have none there is no interval
    assert pooled_bootstrap_interval([([2, 0, 0], [1, 0, 0])]) is None
    assert pooled_bootstrap_interval([([2, 1, 0], [1, 1, 0])]) == pytest.approx((0.5125, 0.9875))
    assert pooled_bootstrap_interval([]) is None
    with pytest.raises(ValueError, match="differ in length"):
        pooled_bootstrap_interval([site_a, ([1], [1])])
