"""Aggregation of low-rank adapter pairs (LoRA/DoRA ``B A``, ``LowRankConv3d`` ``up @ down``), as pure functions.

A low-rank adapter adds ``B A`` to a frozen weight. Averaging the factors separately (the
*naive* rule, what :func:`pemma_core.aggregation.aggregate_adapters` does to every tensor)
gives ``(sum_k w_k B_k)(sum_k w_k A_k)``, which is not the average of the sites' products
``M = sum_k w_k B_k A_k`` once the sites' ``A`` differ. The *exact* rule (FlexLoRA-style)
forms ``M`` and re-factorises it to the pair's own rank ``r`` by truncated SVD,
``M = U S V^T``::

    B = U_r S_r        A = V_r^T   (rows orthonormal)

which is the best rank-``r`` approximation of ``M`` (Eckart-Young), and ``M`` itself when
its rank is at most ``r``. ``A`` is given orthonormal rows, not a ``sqrt(S)`` split: when
``M`` is zero or rank-deficient (every ``B`` still zero after a first round, say) a split
would give ``A = 0`` too, and with both factors zero neither gets a gradient in the next
round: the adapter would be dead. With orthonormal ``A``, ``B`` gets its gradient as at
initialisation.

Pairs are found by name (:func:`low_rank_pairs`): peft's ``<module>.lora_A.<adapter>.weight``
``[r, in]`` with ``<module>.lora_B.<adapter>.weight`` ``[out, r]``, and
``<module>.lora_down`` ``[r, fan_in]`` with ``<module>.lora_up`` ``[out, r]``. DoRA's
``lora_magnitude_vector`` is not part of a pair: it is aggregated like any other tensor
(the example-weighted mean of its group).

Every quantity is computed in float64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LORA_AGGREGATIONS",
    "LowRankResult",
    "PairError",
    "exact_conflicts",
    "exact_low_rank",
    "low_rank_pairs",
    "pooled_error",
]

LORA_AGGREGATIONS = ("naive", "exact")
"""``naive``: each factor averaged on its own (like every other tensor); ``exact``: the
weighted mean of the products, re-factorised by truncated SVD."""


def exact_conflicts(rule: str, secure: bool, server_optimizer: str) -> list[str]:
    """Why ``exact`` cannot run with these settings (empty: it can): it needs each site's
    factors, combined by their mean, with no server step after."""
    out = []
    if rule != "mean":
        out.append(f"lora-aggregation = exact needs aggregation = mean, not {rule!r}: the robust rules combine "
                   "each coordinate on its own, a mean of products is not one of them")
    if secure:
        out.append("lora-aggregation = exact cannot run with secure-aggregation = true: the server sees only the "
                   "sums of the factors, not each site's product B A")
    if server_optimizer != "none":
        out.append(f"server-optimizer = {server_optimizer} cannot run with lora-aggregation = exact: the "
                   "re-factorisation changes the factors' basis every round, so moments kept over A and B would "
                   "mean nothing")
    return out

# (pattern of the A / down factor, how its B / up partner is named)
_SCHEMES = (
    (re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$"), r"\g<module>.lora_B.\g<adapter>.weight"),
    (re.compile(r"^(?P<module>.+)\.lora_down$"), r"\g<module>.lora_up"),
)
_B_PATTERNS = (
    (re.compile(r"^(?P<module>.+)\.lora_B\.(?P<adapter>[^.]+)\.weight$"), r"\g<module>.lora_A.\g<adapter>.weight"),
    (re.compile(r"^(?P<module>.+)\.lora_up$"), r"\g<module>.lora_down"),
)


def low_rank_pairs(names: Iterable[str]) -> dict[str, str]:
    """The low-rank pairs among ``names``: A (down) factor name -> B (up) factor name.

    Both naming schemes of the module docstring are recognised. Raises ValueError naming
    every factor whose partner is missing from ``names``.
    """
    names = set(names)
    pairs: dict[str, str] = {}
    missing: list[str] = []
    for name in sorted(names):
        for pattern, partner in _SCHEMES:
            if pattern.match(name):
                b_name = pattern.sub(partner, name)
                if b_name in names:
                    pairs[name] = b_name
                else:
                    missing.append(f"{name!r} has no partner {b_name!r}")
        for pattern, partner in _B_PATTERNS:
            if pattern.match(name) and pattern.sub(partner, name) not in names:
                missing.append(f"{name!r} has no partner {pattern.sub(partner, name)!r}")
    if missing:
        raise ValueError("low-rank pairs incomplete: " + "; ".join(missing))
    return pairs


@dataclass(frozen=True)
class PairError:
    """The naive rule's error on one pair: ``||M - (sum w B)(sum w A)||_F^2`` and ``||M||_F^2``."""

    naive_sq: float
    product_sq: float

    @property
    def relative(self) -> float:
        """``||M - naive|| / ||M||`` (0 when ``M`` is 0: nothing to get wrong)."""
        return math.sqrt(self.naive_sq / self.product_sq) if self.product_sq > 0 else 0.0


@dataclass(frozen=True)
class LowRankResult:
    """What :func:`exact_low_rank` computed.

    Attributes:
        tensors: the re-factorised A and B of every pair (float64; cast them to the
            global dtype).
        errors: A name -> the naive rule's :class:`PairError` on that pair.
    """

    tensors: dict[str, np.ndarray]
    errors: dict[str, PairError]


def _svd(m: np.ndarray, left: np.ndarray, right: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The SVD of ``m = left @ right`` (``left`` ``[..., out, c]``, ``right`` ``[..., c, in]``,
    ``c`` = sites x rank; a stack of pairs of one shape at once): through QR of the thin
    factors, so only a ``c x c`` core is decomposed (a dense SVD of every attention
    projection would cost ``out x in`` work per pair). The dense SVD is used where ``rank``
    exceeds ``min(out, in)``, which needs a full set of right vectors."""
    out_dim, in_dim = m.shape[-2:]
    if rank > min(out_dim, in_dim) or left.shape[-1] >= min(out_dim, in_dim):
        return np.linalg.svd(m, full_matrices=rank > min(out_dim, in_dim))
    q_left, r_left = np.linalg.qr(left)
    q_right, r_right = np.linalg.qr(np.swapaxes(right, -1, -2))
    u, s, vt = np.linalg.svd(r_left @ np.swapaxes(r_right, -1, -2))
    return q_left @ u, s, vt @ np.swapaxes(q_right, -1, -2)


def _factors(m: np.ndarray, left: np.ndarray, right: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B, A)`` with ``B`` ``[..., out, rank]``, ``A`` ``[..., rank, in]``, ``B A`` the best
    rank-``rank`` approximation of ``m = left @ right`` and the rows of ``A`` orthonormal (as
    far as ``in`` allows)."""
    out_dim, in_dim = m.shape[-2:]
    u, s, vt = _svd(m, left, right, rank)
    k = min(rank, s.shape[-1])
    b = np.zeros((*m.shape[:-2], out_dim, rank))
    b[..., :k] = u[..., :k] * s[..., None, :k]
    # rank > in: more rows than an orthonormal set can have; the extra rows repeat the first
    # ones (their B columns are 0, so the product is unchanged and they still get gradients).
    rows = vt[..., : min(rank, in_dim), :]
    a = np.concatenate([rows] * -(-rank // rows.shape[-2]), axis=-2)[..., :rank, :]
    return b, a


def exact_low_rank(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    pairs: Mapping[str, str],
    rank: int | Mapping[str, int] | None = None,
) -> LowRankResult:
    """Per pair, the weighted mean of the products re-factorised, and the naive rule's error.

    Parameters
    ----------
    updates: per site, its tensors by name; every update must hold both factors of every
        pair (a site that trained a pair sends both halves).
    weights: one weight per update (>= 0, positive total); normalised here.
    pairs: A name -> B name (:func:`low_rank_pairs`).
    rank: the rank to truncate to, one for all pairs or per A name; None (default): each
        pair's own inner dimension (``A.shape[0]``), so the factors keep their shapes.

    Returns
    -------
    :class:`LowRankResult`: for each pair ``M = sum_k w_k B_k A_k``, ``B = U_r S_r`` and
    ``A = V_r^T`` (see the module docstring), and the naive error
    ``||M - (sum w B)(sum w A)||_F``. Pairs of one shape and rank are computed together,
    as one stack (a round's many small pairs cost a few calls, not a few per pair).

    Raises
    ------
    ValueError: counts of updates and weights differ, the weights are negative or sum to
        0, an update lacks a factor, or factor shapes do not chain (``B [out, r]``,
        ``A [r, in]``, the same in every update).
    """
    if len(updates) != len(weights):
        raise ValueError(f"exact_low_rank: {len(updates)} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"exact_low_rank: weights must be >= 0 with a positive sum, got {list(weights)}")
    w = w / w.sum()
    stacks: dict[tuple, list[tuple[str, str, np.ndarray, np.ndarray]]] = {}  # (shapes, rank) -> pairs
    for a_name, b_name in pairs.items():
        a_list, b_list = [], []
        for index, update in enumerate(updates):
            absent = [n for n in (a_name, b_name) if n not in update]
            if absent:
                raise ValueError(f"exact_low_rank: update {index} lacks {', '.join(map(repr, absent))} "
                                 f"of the pair ({a_name!r}, {b_name!r})")
            a = np.asarray(update[a_name], dtype=np.float64)
            b = np.asarray(update[b_name], dtype=np.float64)
            if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
                raise ValueError(f"exact_low_rank: {b_name!r} {b.shape} and {a_name!r} {a.shape} are not a "
                                 "low-rank pair ([out, r] and [r, in])")
            if a_list and (a.shape != a_list[0].shape or b.shape != b_list[0].shape):
                raise ValueError(f"exact_low_rank: update {index} has pair ({a_name!r}, {b_name!r}) of shapes "
                                 f"{b.shape}, {a.shape}; update 0 has {b_list[0].shape}, {a_list[0].shape}")
            a_list.append(a)
            b_list.append(b)
        r = a_list[0].shape[0] if rank is None else int(rank if isinstance(rank, int) else rank[a_name])
        if r < 1:
            raise ValueError(f"exact_low_rank: rank for {a_name!r} must be >= 1, got {r}")
        stacks.setdefault((b_list[0].shape, a_list[0].shape, r), []).append(
            (a_name, b_name, np.stack(a_list), np.stack(b_list)))
    tensors: dict[str, np.ndarray] = {}
    errors: dict[str, PairError] = {}
    for (_, _, r), members in stacks.items():
        a_all = np.stack([a for _, _, a, _ in members])  # [pairs, sites, r, in]
        b_all = np.stack([b for _, _, _, b in members]) * w[None, :, None, None]  # [pairs, sites, out, r], weighted
        left = np.concatenate(list(np.moveaxis(b_all, 1, 0)), axis=-1)  # [pairs, out, sites x r]
        right = np.concatenate(list(np.moveaxis(a_all, 1, 0)), axis=-2)  # [pairs, sites x r, in]
        product = left @ right  # sum_k w_k B_k A_k
        naive = b_all.sum(axis=1) @ np.einsum("k,pkri->pri", w, a_all)  # (sum w B)(sum w A)
        naive_sq = ((product - naive) ** 2).sum(axis=(-2, -1))
        product_sq = (product**2).sum(axis=(-2, -1))
        b_new, a_new = _factors(product, left, right, r)
        for index, (a_name, b_name, _, _) in enumerate(members):
            errors[a_name] = PairError(float(naive_sq[index]), float(product_sq[index]))
            tensors[b_name], tensors[a_name] = b_new[index], a_new[index]
    return LowRankResult(tensors, {a: errors[a] for a in pairs})


def pooled_error(errors: Iterable[PairError]) -> tuple[float, float]:
    """``(pooled, largest)`` relative naive error over pairs:
    ``sqrt(sum ||M - naive||^2) / sqrt(sum ||M||^2)`` (0 when every ``M`` is 0) and the largest
    per-pair :attr:`PairError.relative` (0 for no pairs)."""
    errors = list(errors)
    naive = sum(e.naive_sq for e in errors)
    product = sum(e.product_sq for e in errors)
    pooled = math.sqrt(naive / product) if product > 0 else 0.0
    return pooled, max((e.relative for e in errors), default=0.0)
