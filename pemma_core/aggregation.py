"""Modality-aware, robust aggregation of site updates (docs/ARCHITECTURE.md, parameter groups), as pure functions.

Every trainable tensor belongs to a parameter group (``shared``, ``ct``, ``pet``,
``fusion``, ``prognosis``, ``ehr``). A site replies with the tensors it trained and, per
group, the number of examples it trained them on. The server then, for each tensor,
combines the sites that sent it (by default the example-weighted mean); a tensor no site
sent keeps its global value.

Plain FedAvg over full state dicts (the ``pretrain-ct`` phase) is the same rule with a
single group: ``aggregate_adapters(state, updates, one_group(state))`` with every site
reporting ``examples={FULL_GROUP: n}``.

:func:`aggregate_round` is one federated round, in this order:

1. :func:`validate_update` on every update (shapes, dtypes, finite values, counts, and the
   site's :class:`Allowance`: groups it may send, largest count, weight caps);
2. the automatic outlier bound (``outlier_factor``): a site whose per-element update size
   (:func:`delta_rms`) in any group is far above the round's median (one vote per site) is rejected;
3. the user bound ``max_norm``: rejected beyond it, or with ``clip=True`` scaled back to it
   (:func:`clip_update`);
4. :func:`aggregate_adapters` per group with the group's rule (:data:`RULES`);
5. low-rank adapter pairs of ``mean`` groups (:mod:`pemma_core.lora_aggregation`): the naive
   rule's error is measured, and with ``lora_aggregation="exact"`` each pair is replaced by
   the re-factorised weighted mean of the sites' products.

The server strategy, the in-process prognosis federation and ``simulation/lung_cox.py``
all aggregate through it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pemma_core.lora_aggregation import LORA_AGGREGATIONS, exact_low_rank, low_rank_pairs, pooled_error
from pemma_core.model.spec import FULL_GROUP

__all__ = [
    "RULES",
    "Allowance",
    "Clip",
    "Rejection",
    "RejectedUpdateError",
    "RoundOutcome",
    "SiteUpdate",
    "aggregate_adapters",
    "aggregate_round",
    "clip_update",
    "delta_rms",
    "one_group",
    "validate_update",
]

RULES = ("mean", "median", "trimmed-mean")
"""How the senders of a tensor are combined: ``mean`` (example-weighted), ``median``
(coordinate-wise, unweighted), ``trimmed-mean`` (coordinate-wise, unweighted, without the
k largest and k smallest values, k = max(1, floor(0.2 n)) for n >= 3 senders, else 0)."""

# Counts are used as float64 weights; above 2**53 they are no longer exact, and no cohort
# of cases or steps comes near it: such a count is a bug or an attempt to dominate a mean.
ABSURD_COUNT = 2**53


@dataclass(frozen=True)
class SiteUpdate:
    """What one site sends back after a round of local training.

    Attributes:
        site: site name (used in messages only).
        tensors: the tensors the site trained, by name (a subset of the global state).
        examples: group name -> number of examples the site trained that group on.
    """

    site: str
    tensors: dict[str, np.ndarray]
    examples: dict[str, int]


@dataclass(frozen=True)
class Allowance:
    """What the server can justify for one site in a round (``aggregate_round(allowances=...)``).

    Attributes:
        groups: the groups the site may send; a tensor (or a positive count) of another
            group rejects the update. None: any group.
        max_examples: the largest count the site may report for any group. None: no limit.
        weight_cap: group -> most weight the site's tensors of that group get in the mean
            (its declared training cases): the weight used is ``min(count, cap)``. A group
            missing here is not capped; a cap of 0 means the site may not send that group.
    """

    groups: frozenset[str] | None = None
    max_examples: int | None = None
    weight_cap: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.groups, str):
            raise TypeError(f"Allowance.groups must be a set of group names, got the string {self.groups!r}")
        if self.groups is not None:
            object.__setattr__(self, "groups", frozenset(self.groups))
        if self.max_examples is not None and not self.max_examples >= 0:
            raise ValueError(f"Allowance.max_examples must be >= 0 or None, got {self.max_examples}")
        for group, cap in (self.weight_cap or {}).items():
            if not cap >= 0:
                raise ValueError(f"Allowance.weight_cap[{group!r}] must be >= 0, got {cap}")


def one_group(state: Mapping[str, np.ndarray], group: str = FULL_GROUP) -> dict[str, str]:
    """Map every tensor of ``state`` to ``group``: turns :func:`aggregate_adapters` into FedAvg."""
    return {name: group for name in state}


@functools.lru_cache(maxsize=64)  # a round asks for every tensor of every update, in few dtypes
def _dtype_family(dtype: np.dtype) -> str:
    for family, kind in (("bool", np.bool_), ("integer", np.integer), ("floating", np.floating), ("complex", np.complexfloating)):
        if np.issubdtype(dtype, kind):
            return family
    return f"other ({dtype})"


def _rule_of(rule: str | Mapping[str, str], group: str) -> str:
    return rule if isinstance(rule, str) else rule.get(group, "mean")


def _check_rule(rule: str | Mapping[str, str]) -> None:
    for name in [rule] if isinstance(rule, str) else list(rule.values()):
        if name not in RULES:
            raise ValueError(f"unknown aggregation rule {name!r}; valid rules: {', '.join(RULES)}")


def _combine(values: np.ndarray, weights: np.ndarray, rule: str) -> np.ndarray:
    """Combine ``values`` (senders stacked on axis 0, float64) by ``rule``; ``weights`` sum to 1."""
    if rule == "mean":
        return np.tensordot(weights, values, axes=1)
    if rule == "median":
        return np.median(values, axis=0)
    senders = values.shape[0]
    k = max(1, math.floor(0.2 * senders)) if senders >= 3 else 0
    return np.sort(values, axis=0)[k : senders - k].mean(axis=0)


def aggregate_adapters(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[SiteUpdate],
    groups: Mapping[str, str],
    *,
    rule: str | Mapping[str, str] = "mean",
) -> dict[str, np.ndarray]:
    """New global state: per tensor, the senders' values combined by their group's rule.

    With rule ``mean``, for a tensor ``w`` of group ``g`` sent by sites ``S_w``::

        new[w] = sum_{k in S_w} n_k[g] * w_k / sum_{k in S_w} n_k[g]

    where ``n_k[g] = updates[k].examples[g]``; ``median`` and ``trimmed-mean`` (see
    :data:`RULES`) are unweighted, per coordinate. ``rule`` is one rule for every group or
    a mapping group -> rule (groups not in it use ``mean``). A tensor that no site sent
    keeps its global value. The combination is computed in float64 whatever the wire
    dtype (float16 updates lose no precision in the mixing) and the result is cast to the
    global tensor's dtype; integer tensors (e.g. step counters in a full state dict) are
    rounded to nearest.

    Parameters
    ----------
    global_state: tensor name -> current global array.
    updates: the validated site replies (see :func:`validate_update`).
    groups: tensor name -> parameter group, for every tensor any update contains.

    Returns
    -------
    dict with exactly the keys of ``global_state``; new arrays, the inputs are not modified.

    Raises
    ------
    ValueError: an update holds an unknown tensor, a tensor without a group, a tensor of
        the wrong shape, the senders of a tensor report no positive total count (rule
        ``mean``), or ``rule`` names an unknown rule.
    TypeError: a sent tensor's global dtype is neither integer nor floating point.
    """
    _check_rule(rule)
    for update in updates:
        for name, tensor in update.tensors.items():
            if name not in global_state:
                raise ValueError(f"site {update.site!r} sent unknown tensor {name!r}")
            if name not in groups:
                raise ValueError(f"tensor {name!r} (from site {update.site!r}) has no parameter group")
            if np.shape(tensor) != np.shape(global_state[name]):
                raise ValueError(
                    f"site {update.site!r} sent {name!r} with shape {np.shape(tensor)}, global is {np.shape(global_state[name])}"
                )

    new_state: dict[str, np.ndarray] = {}
    for name, current in global_state.items():
        current = np.asarray(current)
        senders = [u for u in updates if name in u.tensors]
        if not senders:
            new_state[name] = current.copy()
            continue
        family = _dtype_family(current.dtype)
        if family not in ("floating", "integer"):
            raise TypeError(f"cannot average tensor {name!r} of dtype {current.dtype}")
        group = groups[name]
        group_rule = _rule_of(rule, group)
        weights = np.array([float(u.examples.get(group, 0)) for u in senders])
        total = float(weights.sum())
        if group_rule == "mean" and not total > 0:
            raise ValueError(f"tensor {name!r}: the sites that sent it report no examples for group {group!r}")
        values = np.stack([np.asarray(u.tensors[name], dtype=np.float64) for u in senders])
        combined = _combine(values, weights / total if total > 0 else weights, group_rule)
        if family == "integer":
            combined = np.rint(combined)
        new_state[name] = np.asarray(combined).astype(current.dtype)
    return new_state


def _l2(array: np.ndarray) -> float:
    """L2 norm in float64 that neither overflows for huge finite entries nor underflows for
    tiny ones (then scaled by the largest)."""
    norm = float(np.linalg.norm(array))
    if 1e-150 < norm < 1e150:
        return norm
    largest = float(np.max(np.abs(array), initial=0.0))
    return largest * float(np.linalg.norm(array / largest)) if largest > 0 else 0.0


def _float_deltas(update: SiteUpdate, global_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``update - global`` in float64 for every floating tensor the site sent."""
    return {
        name: np.asarray(tensor, dtype=np.float64) - np.asarray(global_state[name], dtype=np.float64)
        for name, tensor in update.tensors.items()
        if _dtype_family(np.asarray(global_state[name]).dtype) == "floating"
    }


def delta_rms(update: SiteUpdate, global_state: Mapping[str, np.ndarray], groups: Mapping[str, str]) -> dict[str, float]:
    """Per group, the RMS per element of the site's update: ``||delta_g||_2 / sqrt(numel_g)``.

    ``delta_g`` is ``update - global`` (float64) over the floating tensors of group ``g``
    the site sent; groups with no such tensor (or only empty ones) are absent. Expects a
    validated update (known tensors of the global shapes, finite values).
    """
    norms: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    for name, delta in _float_deltas(update, global_state).items():
        norms.setdefault(groups[name], []).append(_l2(delta))
        sizes[groups[name]] = sizes.get(groups[name], 0) + delta.size
    return {group: math.hypot(*norms[group]) / math.sqrt(size) for group, size in sizes.items() if size > 0}


def clip_update(update: SiteUpdate, global_state: Mapping[str, np.ndarray], factor: float) -> SiteUpdate:
    """The update with its delta scaled: ``global + factor * (update - global)`` (float64) for
    every floating tensor; integer tensors (counters, not learned weights) are kept as sent.
    Same site and counts; the input is not modified."""
    tensors = dict(update.tensors)
    for name, delta in _float_deltas(update, global_state).items():
        tensors[name] = np.asarray(global_state[name], dtype=np.float64) + factor * delta
    return SiteUpdate(update.site, tensors, dict(update.examples))


def validate_update(
    update: SiteUpdate,
    global_state: Mapping[str, np.ndarray],
    groups: Mapping[str, str],
    max_norm: float | None = None,
    *,
    allowance: Allowance | None = None,
) -> list[str]:
    """Reasons to reject a site's update; an empty list means it may be aggregated.

    Checks, each reported with the site and the tensor or group it concerns:

    - counts: every count is an integer >= 0, at most :data:`ABSURD_COUNT`, and names a
      known group;
    - per tensor: known name with a parameter group, same shape as the global tensor,
      same dtype family (floating / integer / bool / complex; float16 for a float32
      global is fine), finite values, and a positive count for its group (a tensor sent
      with a zero or absent count would carry no weight, which means the site's report
      is inconsistent);
    - with ``allowance``: no tensor or positive count of a group outside
      ``allowance.groups``, no count above ``allowance.max_examples``, no tensor of a group
      whose ``weight_cap`` is 0;
    - with ``max_norm``: the L2 norm of ``update - global`` over all sent tensors
      (computed in float64, over the tensors that passed the checks above) is at most
      ``max_norm``; a guard against diverged or malicious updates.
    """
    if max_norm is not None and not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0 or None, got {max_norm}")
    site = update.site
    known_groups = set(groups.values())
    allowed_groups = allowance.groups if allowance is not None else None
    max_examples = allowance.max_examples if allowance is not None else None
    caps = (allowance.weight_cap if allowance is not None else None) or {}
    reasons: list[str] = []

    for group, count in update.examples.items():
        if group not in known_groups:
            reasons.append(f"site {site!r}: count for unknown group {group!r}")
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)):
            reasons.append(f"site {site!r}: count for group {group!r} is not an integer: {count!r}")
            continue
        if count < 0:
            reasons.append(f"site {site!r}: negative count {count} for group {group!r}")
        elif count > ABSURD_COUNT:
            reasons.append(f"site {site!r}: absurd count {count} for group {group!r} (more than 2**53)")
        elif max_examples is not None and count > max_examples:
            reasons.append(f"site {site!r}: count {count} for group {group!r} exceeds what the round allowed ({max_examples})")
        if allowed_groups is not None and count > 0 and group in known_groups and group not in allowed_groups:
            reasons.append(f"site {site!r}: reports {count} examples for group {group!r}, which it may not train")

    norms: list[float] = []  # per tensor; combined by hypot, which neither overflows nor raises
    for name, tensor in update.tensors.items():
        if name not in global_state:
            reasons.append(f"site {site!r}: unknown tensor {name!r}")
            continue
        if name not in groups:
            reasons.append(f"site {site!r}: tensor {name!r} has no parameter group")
            continue
        array, reference = np.asarray(tensor), np.asarray(global_state[name])
        group = groups[name]
        if allowed_groups is not None and group not in allowed_groups:
            reasons.append(f"site {site!r}: tensor {name!r} is of group {group!r}, which it may not send")
        if caps.get(group) == 0:
            reasons.append(f"site {site!r}: tensor {name!r} sent for group {group!r}, where it declared no training cases")
        count = update.examples.get(group)
        if count is None or (isinstance(count, (int, np.integer, float)) and count == 0):
            reasons.append(f"site {site!r}: tensor {name!r} sent with zero count for its group {group!r}")
        if array.shape != reference.shape:
            reasons.append(f"site {site!r}: tensor {name!r} has shape {array.shape}, expected {reference.shape}")
            continue
        if _dtype_family(array.dtype) != _dtype_family(reference.dtype):
            reasons.append(
                f"site {site!r}: tensor {name!r} has dtype {array.dtype} ({_dtype_family(array.dtype)}), "
                f"expected {_dtype_family(reference.dtype)} like the global {reference.dtype}"
            )
            continue
        if _dtype_family(array.dtype) in ("floating", "complex") and not np.all(np.isfinite(array)):
            reasons.append(f"site {site!r}: tensor {name!r} has non-finite values")
            continue
        wide = np.complex128 if np.iscomplexobj(array) else np.float64
        norms.append(_l2(np.abs(array.astype(wide) - reference.astype(wide))))

    if max_norm is not None:
        norm = math.hypot(*norms)
        if norm > max_norm:
            reasons.append(f"site {site!r}: update norm {norm:.4g} exceeds max_norm {max_norm:.4g}")
    return reasons


@dataclass(frozen=True)
class Rejection:
    """An update left out of a round, with every reason it was left out for."""

    site: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Clip:
    """An accepted update whose delta was scaled by ``factor`` (< 1) to the round's ``max_norm``."""

    site: str
    factor: float
    reason: str


class RejectedUpdateError(ValueError):
    """A caller that accepts no rejected update (:meth:`RoundOutcome.raise_for_rejected`)."""


@dataclass(frozen=True)
class RoundOutcome:
    """What :func:`aggregate_round` did.

    Attributes:
        state: the new global state; a copy of the old one when not ``aggregated``.
        accepted: the updates that were aggregated (clipped ones included, as the original
            objects), in the order given.
        rejected: the updates that were not, with their reasons, in the order given.
        aggregated: False when fewer than ``min_sites`` updates were accepted.
        clipped: the accepted updates scaled back to ``max_norm`` (``clip=True``).
        weights: site -> group -> weight its tensors of that group had (the count after
            the allowance's cap for rule ``mean``; 1.0 for the unweighted rules).
        contributors: group -> sorted names of the sites whose tensors of it were aggregated.
        reference_rms: the median (one vote per site) of ``rms`` the outlier bound used; None when not applied.
        rms: site -> group -> :func:`delta_rms` of every update that passed validation.
        lora_naive_error: group -> the naive rule's relative error on its low-rank pairs,
            ``sqrt(sum_pairs ||M - (sum w B)(sum w A)||^2) / sqrt(sum_pairs ||M||^2)`` with
            ``M = sum w B A`` (0 when every ``M`` is 0); only groups with rule ``mean`` and a
            pair sent this round. Measured whichever ``lora_aggregation`` the round used.
        lora_naive_error_max: group -> the largest of that error over the group's pairs.
    """

    state: dict[str, np.ndarray]
    accepted: tuple[SiteUpdate, ...]
    rejected: tuple[Rejection, ...]
    aggregated: bool
    clipped: tuple[Clip, ...] = ()
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    contributors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reference_rms: float | None = None
    rms: dict[str, dict[str, float]] = field(default_factory=dict)
    lora_naive_error: dict[str, float] = field(default_factory=dict)
    lora_naive_error_max: dict[str, float] = field(default_factory=dict)

    def raise_for_rejected(self) -> RoundOutcome:
        """Raise :class:`RejectedUpdateError` listing every reason if any update was
        rejected (callers whose updates come from their own code, where a rejection is a
        bug); return ``self`` otherwise."""
        if self.rejected:
            raise RejectedUpdateError("; ".join(r for rejection in self.rejected for r in rejection.reasons))
        return self


def _capped(update: SiteUpdate, allowance: Allowance | None) -> SiteUpdate:
    """The update with each count replaced by ``min(count, cap)`` of its allowance."""
    caps = (allowance.weight_cap if allowance is not None else None) or {}
    examples = {g: min(n, caps[g]) if g in caps else n for g, n in update.examples.items()}
    return SiteUpdate(update.site, update.tensors, examples)


def aggregate_round(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[SiteUpdate],
    groups: Mapping[str, str],
    max_norm: float | None = None,
    min_sites: int = 1,
    *,
    clip: bool = False,
    allowances: Mapping[str, Allowance] | None = None,
    outlier_factor: float | None = None,
    rule: str | Mapping[str, str] = "mean",
    lora_aggregation: str = "naive",
) -> RoundOutcome:
    """One federated round: validate, drop outliers, bound, aggregate per group.

    1. Each update goes through :func:`validate_update` with its site's allowance (when
       ``allowances`` is given, a site missing from it is rejected: nothing about it can
       be justified).
    2. With ``outlier_factor``, the reference is the median over the validated updates of
       each one's median :func:`delta_rms` over the groups it sent (one vote per site). It is
       pooled over groups because a per-group median cannot tell an outlier apart among one
       or two senders; one vote per site, because a site that trains more groups than the
       others must not outvote them. A group that moves faster by design (the few fusion
       weights; the CT groups learn at a fraction of the rate) is judged against the larger of
       that reference and its median rms among the other senders of the group: against the
       pooled reference alone, honest IBSI sites were rejected (BENCHMARKS.md, "The long bench").
       A site whose rms in any group exceeds ``outlier_factor`` times that is *rejected*,
       not clipped: a k-times-larger update cannot be told from a scaled attack, and
       clipping it to the bound would still let a hostile site pull ``k/n`` typical steps
       every round. A reference of 0 (every site sent the global values) rejects nobody.
    3. ``max_norm`` bounds ``||update - global||_2`` over the sent tensors: beyond it an
       update is rejected, or with ``clip=True`` its floating tensors' delta is scaled by
       ``max_norm / norm`` (integer tensors are left out of that norm and never scaled)
       and the clip is reported in ``clipped``.
    4. With at least ``min_sites`` accepted updates, :func:`aggregate_adapters` combines
       them by ``rule`` (one of :data:`RULES`, or a mapping group -> rule), the weights
       being the counts capped by each allowance's ``weight_cap``. Otherwise the global
       state is kept (copied) and ``aggregated`` is False.
    5. Low-rank pairs (:func:`pemma_core.lora_aggregation.low_rank_pairs` over the global
       tensors) of groups combined by ``mean`` and sent this round: the naive rule's error
       is measured (``lora_naive_error``) and, with ``lora_aggregation="exact"``, both
       factors are replaced by the truncated SVD of ``sum_k w_k B_k A_k`` at the pair's own
       rank (:func:`pemma_core.lora_aggregation.exact_low_rank`), ``w`` being the same
       capped (and clipped) weights the mean used. Exact aggregation of a group with a
       robust rule is refused (ValueError): a coordinate-wise median of products is not
       what those rules bound. Under ``exact``, an update holding only one factor of a
       pair is rejected; under ``naive`` that pair's error is simply not measured. DoRA's
       magnitude vectors are not pairs: they get the example-weighted mean like any tensor.

    The inputs are not modified; ``accepted`` holds the original update objects.
    """
    if min_sites < 0:
        raise ValueError(f"min_sites must be >= 0, got {min_sites}")
    if max_norm is not None and not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0 or None, got {max_norm}")
    if outlier_factor is not None and not outlier_factor > 0:
        raise ValueError(f"outlier_factor must be > 0 or None, got {outlier_factor}")
    _check_rule(rule)
    if lora_aggregation not in LORA_AGGREGATIONS:
        raise ValueError(f"lora_aggregation must be one of {', '.join(LORA_AGGREGATIONS)}, got {lora_aggregation!r}")
    pairs = low_rank_pairs(global_state)
    for a_name, b_name in pairs.items():
        if groups.get(a_name) != groups.get(b_name):
            raise ValueError(f"low-rank pair {a_name!r} (group {groups.get(a_name)!r}) and {b_name!r} "
                             f"(group {groups.get(b_name)!r}) must be in one parameter group")
    if lora_aggregation == "exact":
        robust = sorted({groups[a] for a in pairs if a in groups and _rule_of(rule, groups[a]) != "mean"})
        if robust:
            raise ValueError(f"lora_aggregation 'exact' needs rule 'mean' for every group with low-rank pairs; "
                             f"group(s) {', '.join(robust)} use a robust rule (median, trimmed-mean)")

    reasons: list[list[str]] = []  # per update, in the order given
    for update in updates:
        if allowances is not None and update.site not in allowances:
            reasons.append([f"site {update.site!r}: no allowance for this site in the round"])
            continue
        allowance = allowances.get(update.site) if allowances is not None else None
        reasons.append(validate_update(update, global_state, groups, None if clip else max_norm, allowance=allowance))
    if lora_aggregation == "exact":  # the product needs both factors from every sender
        for update, why in zip(updates, reasons):
            for a_name, b_name in pairs.items():
                if (a_name in update.tensors) != (b_name in update.tensors):
                    half, other = (a_name, b_name) if a_name in update.tensors else (b_name, a_name)
                    why.append(f"site {update.site!r}: sent {half!r} without its low-rank partner {other!r}")
    rms_of = [delta_rms(u, global_state, groups) if not why else {} for u, why in zip(updates, reasons)]
    rms = {u.site: values for u, values, why in zip(updates, rms_of, reasons) if not why}

    # one vote per site (its median over the groups it sent): pooling the (site, group) pairs
    # let a site that trains more groups than the others hold half the pairs on its own
    per_site = [float(np.median(list(values.values()))) for values in rms_of if values]
    reference = float(np.median(per_site)) if outlier_factor is not None and per_site else None
    if reference:  # neither None nor 0
        for update, values, why in zip(updates, rms_of, reasons):
            if why:
                continue
            for group, value in sorted(values.items()):
                others = [moves[group] for site, moves in rms.items() if site != update.site and group in moves]
                group_reference = float(np.median(others)) if others else 0.0
                if value > outlier_factor * max(reference, group_reference):
                    against = (f"the round's median rms {reference:.3g}" if reference >= group_reference else
                               f"the median rms {group_reference:.3g} of the group's other senders")
                    why.append(f"site {update.site!r}: group {group!r} update rms {value:.3g} exceeds "
                               f"{outlier_factor:g} x {against}")

    accepted = [u for u, why in zip(updates, reasons) if not why]
    rejected = tuple(Rejection(u.site, tuple(why)) for u, why in zip(updates, reasons) if why)
    effective = [_capped(u, allowances.get(u.site) if allowances is not None else None) for u in accepted]
    clips: list[Clip] = []
    if clip and max_norm is not None:
        for index, update in enumerate(effective):
            norm = math.hypot(*(_l2(d) for d in _float_deltas(update, global_state).values()))
            if norm > max_norm:
                factor = max_norm / norm
                effective[index] = clip_update(update, global_state, factor)
                reason = f"site {update.site!r}: update norm {norm:.3g} clipped to max-update-norm {max_norm:g} (factor {factor:.2g})"
                clips.append(Clip(update.site, factor, reason))

    if len(accepted) < min_sites:
        state = {name: np.asarray(array).copy() for name, array in global_state.items()}
        return RoundOutcome(state, tuple(accepted), rejected, False, tuple(clips), rms=rms, reference_rms=reference)
    state = aggregate_adapters(global_state, effective, groups, rule=rule)
    naive_error, naive_error_max = _low_rank_pass(state, global_state, effective, groups, rule, pairs, lora_aggregation)
    weights: dict[str, dict[str, float]] = {}
    contributors: dict[str, set[str]] = {}
    for update in effective:
        for group in sorted({groups[name] for name in update.tensors}):
            unweighted = _rule_of(rule, group) != "mean"
            weights.setdefault(update.site, {})[group] = 1.0 if unweighted else float(update.examples[group])
            contributors.setdefault(group, set()).add(update.site)
    return RoundOutcome(
        state,
        tuple(accepted),
        rejected,
        True,
        tuple(clips),
        weights=weights,
        contributors={group: tuple(sorted(sites)) for group, sites in sorted(contributors.items())},
        reference_rms=reference,
        rms=rms,
        lora_naive_error=naive_error,
        lora_naive_error_max=naive_error_max,
    )


def _low_rank_pass(
    state: dict[str, np.ndarray],
    global_state: Mapping[str, np.ndarray],
    effective: Sequence[SiteUpdate],
    groups: Mapping[str, str],
    rule: str | Mapping[str, str],
    pairs: Mapping[str, str],
    lora_aggregation: str,
) -> tuple[dict[str, float], dict[str, float]]:
    """Step 5 of :func:`aggregate_round`: per ``mean`` group, the naive error over its pairs
    (pooled, largest) and, under ``exact``, ``state``'s pairs replaced (in place)."""
    bundles: dict[tuple[str, tuple[int, ...]], dict[str, str]] = {}  # (group, senders) -> its pairs, one call each
    for a_name, b_name in sorted(pairs.items()):
        group = groups.get(a_name)
        if group is None or _rule_of(rule, group) != "mean":
            continue
        senders = tuple(i for i, u in enumerate(effective) if a_name in u.tensors or b_name in u.tensors)
        if not senders or any(a_name not in effective[i].tensors or b_name not in effective[i].tensors for i in senders):
            continue  # nobody trained it, or (naive only: exact rejected them) a half-sent pair
        bundles.setdefault((group, senders), {})[a_name] = b_name
    errors: dict[str, list] = {}
    for (group, senders), bundle in bundles.items():
        result = exact_low_rank([effective[i].tensors for i in senders],
                                [float(effective[i].examples.get(group, 0)) for i in senders], bundle)
        errors.setdefault(group, []).extend(result.errors[a_name] for a_name in bundle)
        if lora_aggregation == "exact":
            for name, value in result.tensors.items():
                state[name] = value.astype(np.asarray(global_state[name]).dtype)
    pooled = {group: pooled_error(values) for group, values in sorted(errors.items())}
    return {g: p for g, (p, _) in pooled.items()}, {g: m for g, (_, m) in pooled.items()}
