"""Cox proportional-hazards maths and the prognosis modules (survival head, EHR encoder).

Functions here are pure; the two ``nn.Module`` classes hold the trainable parameters of
the ``prognosis`` (:class:`SurvivalHead`) and ``ehr`` (:class:`EhrEncoder`) parameter
groups (docs/ARCHITECTURE.md, parameter groups).

Conventions used throughout:

- ``risk`` is the log relative hazard (the linear predictor of a Cox model): higher risk
  means an earlier expected event.
- ``time`` is the observed time (event or censoring), ``event`` is 1 when the event was
  observed and 0 when the case was censored at ``time``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from lifelines.utils import concordance_index
from torch import Tensor, nn

Ties = Literal["breslow", "efron"]
TIES: tuple[str, ...] = ("breslow", "efron")

__all__ = ["TIES", "cox_partial_nll", "concordance", "concordance_pairs", "pooled_concordance", "SurvivalHead", "EhrEncoder"]


def cox_partial_nll(risk: Tensor, time: Tensor, event: Tensor, ties: Ties = "breslow") -> Tensor:
    """Negative Cox partial log-likelihood, averaged over the observed events.

    For events ``i`` (``event[i] == 1``) and risk sets ``R(t) = {j : time[j] >= t}``:

    - Breslow ties::

        loss = -1/D * sum_i [ risk[i] - log sum_{j in R(t_i)} exp(risk[j]) ]

    - Efron ties: the ``d`` events tied at time ``t`` (set ``H_t``) share the risk set,
      with the tied cases' contribution removed step by step::

        loss = -1/D * sum_t [ sum_{i in H_t} risk[i]
                              - sum_{l=0}^{d-1} log( S_R(t) - l/d * S_H(t) ) ]

      where ``S_R(t) = sum_{j in R(t)} exp(risk[j])`` and ``S_H(t) = sum_{i in H_t}
      exp(risk[i])``. Efron is what lifelines' ``CoxPHFitter`` uses. Without tied event
      times the two are identical.

    ``D`` is the number of events in the batch. Dividing by ``D`` keeps the loss scale
    independent of batch size and censoring rate; it does not move the minimiser, which
    is the Cox maximum partial-likelihood estimate. Cases tie when their ``time`` values
    are exactly equal. The risk sets are those of the batch only (a mini-batch gives a
    stochastic estimate of the full-cohort loss).

    Numerical stability: cases are sorted by decreasing time so every risk set is a
    prefix, and ``log S_R`` comes from ``torch.logcumsumexp``; the Efron correction is
    computed as ``log S_R + log1p(-l/d * S_H / S_R)`` with ``S_H / S_R <= 1``, so no
    ``exp`` of an unshifted risk is ever taken. The loss is twice differentiable (a
    Hessian, e.g. for Newton steps or standard errors, is finite; see
    :func:`_log_cumsum_exp`).

    Parameters
    ----------
    risk: Tensor[N]
        predicted log relative hazard (floating point; gradients flow through it).
    time: Tensor[N]
        observed times (event or censoring); any real dtype.
    event: Tensor[N]
        1 for an observed event, 0 for censored (bool, int or float).
    ties: "breslow" or "efron"
        tie handling, see above.

    Returns
    -------
    loss: Tensor[]
        a scalar of ``risk``'s dtype. A batch with no events has no partial likelihood:
        the loss is then ``0`` (``risk.sum() * 0``, so it stays attached to the graph and
        ``backward()`` yields zero gradients instead of failing).

    Raises
    ------
    ValueError
        shapes differ or are not 1-D, ``ties`` unknown, ``risk`` not floating point.
    """
    if ties not in TIES:
        raise ValueError(f"unknown ties {ties!r}: expected one of {', '.join(TIES)}")
    if risk.ndim != 1 or time.shape != risk.shape or event.shape != risk.shape:
        raise ValueError(
            "risk, time and event must be 1-D of equal length, got shapes "
            f"{tuple(risk.shape)}, {tuple(time.shape)}, {tuple(event.shape)}"
        )
    if not risk.is_floating_point():
        raise ValueError(f"risk must be floating point, got {risk.dtype}")

    event = event.to(device=risk.device, dtype=risk.dtype)
    time = time.to(device=risk.device)
    n_events = event.sum()
    if n_events.item() == 0:
        return risk.sum() * 0.0

    # Decreasing time: the risk set of a case is everything up to the end of its tie group.
    order = torch.argsort(time, descending=True, stable=True)
    time_sorted, risk_sorted, event_sorted = time[order], risk[order], event[order]
    _, group_of, group_size = torch.unique_consecutive(time_sorted, return_inverse=True, return_counts=True)
    group_end = torch.cumsum(group_size, 0) - 1
    log_risk_set = _log_cumsum_exp(risk_sorted)[group_end][group_of]  # log S_R per case

    log_denominator = log_risk_set
    if ties == "efron":
        n_groups = group_size.shape[0]
        # S_H / S_R per tie group; each term exp(risk_i - log S_R) <= 1 since i is in R.
        tied_share = torch.zeros(n_groups, dtype=risk.dtype, device=risk.device).index_add(
            0, group_of, event_sorted * torch.exp(risk_sorted - log_risk_set)
        )
        events_in_group = torch.zeros(n_groups, dtype=risk.dtype, device=risk.device).index_add(
            0, group_of, event_sorted
        )
        # l = rank of each event inside its tie group (0 .. d-1). The Efron sum only needs
        # each l once per group, so which tied case receives which l is irrelevant.
        events_before_group = (torch.cumsum(event_sorted, 0) - event_sorted)[group_end - group_size + 1]
        rank_in_group = torch.cumsum(event_sorted, 0) - events_before_group[group_of] - 1
        fraction = torch.where(event_sorted > 0, rank_in_group / events_in_group[group_of], torch.zeros_like(risk_sorted))
        log_denominator = log_risk_set + torch.log1p(-fraction * tied_share[group_of])

    return -(event_sorted * (risk_sorted - log_denominator)).sum() / n_events


class _LogCumSumExp(torch.autograd.Function):
    """``torch.logcumsumexp(x, 0)`` whose backward can itself be differentiated.

    torch's own backward takes ``log|grad|`` and yields NaN second derivatives wherever
    the incoming gradient is 0 and depends on the input (which Efron's correction
    causes). Same values and first derivatives as torch's.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        result = torch.logcumsumexp(x, 0)
        ctx.save_for_backward(x, result)
        return result

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        x, result = ctx.saved_tensors
        # d result_k / d x_j = exp(x_j - result_k) for j <= k, so
        # grad_x_j = sum_{k >= j} grad_k exp(x_j - result_k): a reversed logcumsumexp in
        # log space, split by the sign of grad. log|grad| is only taken where grad != 0
        # (the double where keeps its derivative finite elsewhere).
        lowest = torch.finfo(x.dtype).min
        log_abs = torch.log(torch.where(grad != 0, grad.abs(), torch.ones_like(grad)))
        positive = torch.where(grad > 0, log_abs, torch.full_like(grad, lowest))
        negative = torch.where(grad < 0, log_abs, torch.full_like(grad, lowest))

        def reversed_lcse(v: Tensor) -> Tensor:
            return torch.flip(torch.logcumsumexp(torch.flip(v, [0]), 0), [0])

        return torch.exp(reversed_lcse(positive - result) + x) - torch.exp(reversed_lcse(negative - result) + x)


def _log_cumsum_exp(x: Tensor) -> Tensor:
    """``log(cumsum(exp(x)))`` along dim 0, stable, twice differentiable."""
    return _LogCumSumExp.apply(x)


ArrayLike = Tensor | np.ndarray | Sequence[float]


def concordance(risk: ArrayLike, time: ArrayLike, event: ArrayLike) -> float:
    """Harrell's concordance index (C-index) of predicted risks against observed survival.

    A pair of cases is admissible when the one with the shorter time had an observed
    event; it is concordant when that case also has the higher ``risk``. Ties in risk count
    one half. Computed by :func:`lifelines.utils.concordance_index`, which expects scores
    that grow with survival time, hence it is given ``-risk``.

    - 1.0: risks order every admissible pair correctly,
    - 0.5: the expected value of random risks,
    - 0.0: every admissible pair reversed.

    Parameters
    ----------
    risk: array-like[N]
        predicted log relative hazard (higher = shorter expected survival).
    time: array-like[N]
        observed times.
    event: array-like[N]
        1 for an observed event, 0 for censored.

    Raises
    ------
    ValueError
        no admissible pair exists (e.g. no events), so the C-index is undefined.
    """
    risk_np, time_np, event_np = (_as_numpy_1d(v) for v in (risk, time, event))
    try:
        return float(concordance_index(time_np, -risk_np, event_np))
    except ZeroDivisionError as error:  # lifelines' message for "no admissible pairs"
        raise ValueError("C-index undefined: no admissible pairs (are there any events?)") from error


def concordance_pairs(risk: ArrayLike, time: ArrayLike, event: ArrayLike) -> tuple[int, int]:
    """The counts behind :func:`concordance`: ``(score, pairs)`` with ``pairs`` the admissible
    pairs and ``score`` twice the concordant ones plus the pairs tied in risk (an integer, so
    sites can send it as a count). ``score / (2 * pairs)`` is the C-index lifelines gives.

    Summed over sites, the counts give one C-index over every site's within-site pairs
    (:func:`pooled_concordance`): pairs never cross sites, so no case leaves its site.
    A pair is admissible when the shorter time is an event; at equal times an event
    before a censoring counts (the censored case survived at least as long), two events
    do not.
    """
    r, t, e = (_as_numpy_1d(v) for v in (risk, time, event))
    if not len(r) == len(t) == len(e):
        raise ValueError(f"risk, time and event differ in length ({len(r)}, {len(t)}, {len(e)})")
    e = e.astype(bool)
    earlier = (t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & ~e[None, :])
    admissible = earlier & e[:, None]
    np.fill_diagonal(admissible, False)
    higher = r[:, None] > r[None, :]
    tied = r[:, None] == r[None, :]
    return int(2 * (admissible & higher).sum() + (admissible & tied).sum()), int(admissible.sum())


def pooled_concordance(counts: Sequence[tuple[int, int]]) -> tuple[float, int]:
    """``(C-index, pairs)`` over the summed ``(score, pairs)`` counts of several sites
    (:func:`concordance_pairs`); ValueError when no site has an admissible pair."""
    score = sum(int(s) for s, _ in counts)
    pairs = sum(int(p) for _, p in counts)
    if pairs <= 0:
        raise ValueError("C-index undefined: no admissible pairs over the sites")
    return score / (2 * pairs), pairs


def bootstrap_pair_counts(risk: ArrayLike, time: ArrayLike, event: ArrayLike, replicates: int,
                          seed: int) -> tuple[list[int], list[int]]:
    """:func:`concordance_pairs` of ``replicates`` bootstrap samples of one site's cases (drawn
    with replacement, as many as it has, by a generator seeded ``seed``): ``(scores, pairs)``,
    one count each per replicate. A case and its own copy never make a pair (equal times), so
    a replicate's pairs are at most n(n - 1)/2 as the split's are."""
    r, t, e = (_as_numpy_1d(v) for v in (risk, time, event))
    if not len(r) == len(t) == len(e):
        raise ValueError(f"risk, time and event differ in length ({len(r)}, {len(t)}, {len(e)})")
    rng = np.random.default_rng(seed)
    scores, pairs = [], []
    for _ in range(replicates):
        pick = rng.integers(0, len(r), len(r))
        score, n = concordance_pairs(r[pick], t[pick], e[pick])
        scores.append(score)
        pairs.append(n)
    return scores, pairs


def pooled_bootstrap_interval(sites: Sequence[tuple[Sequence[int], Sequence[int]]],
                              level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of the pooled C-index (:func:`pooled_concordance`) from the sites'
    bootstrap counts (:func:`bootstrap_pair_counts`, the same number of replicates each).

    Replicate ``b`` sums every site's ``b``-th counts: each site resampled only its own cases,
    so this is the bootstrap stratified by site, and pairs still never cross sites. Replicates
    without a pair are left out; None when more than half have none, or no site sent counts.
    """
    if not sites:
        return None
    lengths = {len(s) for s, _ in sites} | {len(p) for _, p in sites}
    if len(lengths) != 1:
        raise ValueError(f"the sites' bootstrap counts differ in length ({sorted(lengths)})")
    scores = np.sum([np.asarray(s, dtype=np.float64) for s, _ in sites], axis=0)
    pairs = np.sum([np.asarray(p, dtype=np.float64) for _, p in sites], axis=0)
    defined = pairs > 0
    if defined.sum() * 2 < len(pairs) or not defined.any():
        return None
    values = scores[defined] / (2 * pairs[defined])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _as_numpy_1d(values: ArrayLike) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {array.shape}")
    return array


def _mlp(in_features: int, hidden: Sequence[int], out_features: int, dropout: float, out_bias: bool) -> nn.Sequential:
    """Linear layers with GELU (+ dropout) between them; the last layer is linear."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.GELU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_features, bias=out_bias))
    return nn.Sequential(*layers)


def _check_widths(name: str, hidden: Sequence[int], dropout: float) -> tuple[int, ...]:
    hidden = tuple(int(h) for h in hidden)
    if any(h <= 0 for h in hidden):
        raise ValueError(f"{name}: hidden widths must be positive, got {hidden}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
    return hidden


class SurvivalHead(nn.Module):
    """Cox risk head on pooled image features and/or an EHR embedding.

    Input: ``image_features [B, in_features]`` (pooled transformer tokens) and
    ``ehr_embedding [B, ehr_features]``; the two are concatenated. Output: ``risk [B]``,
    the log relative hazard to feed :func:`cox_partial_nll`.

    With ``hidden=()`` the head is linear, which is a classic Cox model on its inputs;
    with hidden widths it is an MLP (GELU between layers). The output layer has no bias:
    the Cox partial likelihood is invariant to an additive constant, so a bias would get
    no gradient.

    Args:
        in_features: width of the image features; 0 for an EHR-only head.
        ehr_features: width of the EHR embedding; 0 for an image-only head.
        hidden: hidden layer widths (empty = linear head).
        dropout: dropout after each hidden activation.
    """

    def __init__(self, in_features: int, ehr_features: int = 0, hidden: Sequence[int] = (), dropout: float = 0.0):
        super().__init__()
        if in_features < 0 or ehr_features < 0:
            raise ValueError(f"SurvivalHead: widths must be >= 0, got in_features={in_features}, ehr_features={ehr_features}")
        if in_features + ehr_features == 0:
            raise ValueError("SurvivalHead: needs image features, EHR features or both (both widths are 0)")
        self.in_features = int(in_features)
        self.ehr_features = int(ehr_features)
        self.net = _mlp(self.in_features + self.ehr_features, _check_widths("SurvivalHead", hidden, dropout), 1, dropout, out_bias=False)

    def forward(self, image_features: Tensor | None, ehr_embedding: Tensor | None = None) -> Tensor:
        parts = []
        for name, tensor, width in (
            ("image_features", image_features, self.in_features),
            ("ehr_embedding", ehr_embedding, self.ehr_features),
        ):
            if width == 0:
                if tensor is not None and tensor.shape[-1] != 0:
                    raise ValueError(f"SurvivalHead was built without {name} but got shape {tuple(tensor.shape)}")
                continue
            if tensor is None or tensor.ndim != 2 or tensor.shape[1] != width:
                shape = None if tensor is None else tuple(tensor.shape)
                raise ValueError(f"SurvivalHead expects {name} of shape [B, {width}], got {shape}")
            parts.append(tensor)
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(f"batch sizes differ: image_features {parts[0].shape[0]}, ehr_embedding {parts[1].shape[0]}")
        features = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.net(features).squeeze(-1)


class EhrEncoder(nn.Module):
    """Embed preprocessed clinical covariates.

    Input: ``covariates [B, in_features]`` (the float matrix from
    ``pemma_core.data.clinical.EhrPreprocessor.transform``). Output: ``embedding [B, out_features]``.
    Linear layers with GELU (+ dropout) between them; the output layer is linear so the
    embedding can also feed a linear Cox head unchanged.

    Args:
        in_features: number of preprocessed covariate columns (``P``).
        out_features: embedding width (``E``).
        hidden: hidden layer widths (empty = a single linear map).
        dropout: dropout after each hidden activation.
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (), dropout: float = 0.0):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"EhrEncoder: widths must be positive, got in_features={in_features}, out_features={out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.net = _mlp(self.in_features, _check_widths("EhrEncoder", hidden, dropout), self.out_features, dropout, out_bias=True)

    def forward(self, covariates: Tensor) -> Tensor:
        if covariates.ndim != 2 or covariates.shape[1] != self.in_features:
            raise ValueError(f"EhrEncoder expects covariates of shape [B, {self.in_features}], got {tuple(covariates.shape)}")
        return self.net(covariates)
