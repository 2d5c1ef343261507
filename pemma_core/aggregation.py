"""Modality-aware aggregation of site updates (docs/ARCHITECTURE.md, parameter groups), as pure functions.

Every trainable tensor belongs to a parameter group (``shared``, ``ct``, ``pet``,
``fusion``, ``prognosis``, ``ehr``). A site replies with the tensors it trained and, per
group, the number of examples it trained them on. The server then, for each tensor,
takes the example-weighted mean over the sites that sent it; a tensor no site sent keeps
its global value.

Plain FedAvg over full state dicts (the ``pretrain-ct`` phase) is the same rule with a
single group: ``aggregate_adapters(state, updates, one_group(state))`` with every site
reporting ``examples={FULL_GROUP: n}``.

:func:`aggregate_round` is one federated round: it runs :func:`validate_update` on every
update, aggregates the accepted ones with :func:`aggregate_adapters` (which assumes valid
input and raises on anything inconsistent rather than guessing) and reports the rejected
ones with their reasons. The server strategy, the in-process prognosis federation and
``simulation/lung_cox.py`` all aggregate through it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pemma_core.model.spec import FULL_GROUP

__all__ = [
    "Rejection",
    "RejectedUpdateError",
    "RoundOutcome",
    "SiteUpdate",
    "aggregate_adapters",
    "aggregate_round",
    "one_group",
    "validate_update",
]


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


def one_group(state: Mapping[str, np.ndarray], group: str = FULL_GROUP) -> dict[str, str]:
    """Map every tensor of ``state`` to ``group``: turns :func:`aggregate_adapters` into FedAvg."""
    return {name: group for name in state}


def _dtype_family(dtype: np.dtype) -> str:
    for family, kind in (("bool", np.bool_), ("integer", np.integer), ("floating", np.floating), ("complex", np.complexfloating)):
        if np.issubdtype(dtype, kind):
            return family
    return f"other ({dtype})"


def aggregate_adapters(
    global_state: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate], groups: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """New global state: per tensor, the example-weighted mean over the sites that sent it.

    For a tensor ``w`` of group ``g`` sent by sites ``S_w``::

        new[w] = sum_{k in S_w} n_k[g] * w_k / sum_{k in S_w} n_k[g]

    where ``n_k[g] = updates[k].examples[g]``. A tensor that no site sent keeps its global
    value. The sum is accumulated in float64 whatever the wire dtype (float16 updates
    lose no precision in the mixing) and the result is cast to the global tensor's dtype;
    integer tensors (e.g. step counters in a full state dict) are rounded to nearest.

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
        the wrong shape, or the senders of a tensor report no positive total count.
    TypeError: a sent tensor's global dtype is neither integer nor floating point.
    """
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
        weights = [float(u.examples.get(group, 0)) for u in senders]
        total = sum(weights)
        if not total > 0:
            raise ValueError(f"tensor {name!r}: the sites that sent it report no examples for group {group!r}")
        accumulator = np.zeros(current.shape, dtype=np.float64)
        for weight, update in zip(weights, senders):
            accumulator += (weight / total) * np.asarray(update.tensors[name], dtype=np.float64)
        if family == "integer":
            accumulator = np.rint(accumulator)
        new_state[name] = accumulator.astype(current.dtype)
    return new_state


def validate_update(
    update: SiteUpdate,
    global_state: Mapping[str, np.ndarray],
    groups: Mapping[str, str],
    max_norm: float | None = None,
) -> list[str]:
    """Reasons to reject a site's update; an empty list means it may be aggregated.

    Checks, each reported with the site and the tensor or group it concerns:

    - counts: every count is an integer >= 0 and names a known group;
    - per tensor: known name with a parameter group, same shape as the global tensor,
      same dtype family (floating / integer / bool / complex; float16 for a float32
      global is fine), finite values, and a positive count for its group (a tensor sent
      with a zero or absent count would carry no weight, which means the site's report
      is inconsistent);
    - with ``max_norm``: the L2 norm of ``update - global`` over all sent tensors
      (computed in float64, over the tensors that passed the checks above) is at most
      ``max_norm``; a guard against diverged or malicious updates.
    """
    if max_norm is not None and not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0 or None, got {max_norm}")
    site = update.site
    known_groups = set(groups.values())
    reasons: list[str] = []

    for group, count in update.examples.items():
        if group not in known_groups:
            reasons.append(f"site {site!r}: count for unknown group {group!r}")
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)):
            reasons.append(f"site {site!r}: count for group {group!r} is not an integer: {count!r}")
        elif count < 0:
            reasons.append(f"site {site!r}: negative count {count} for group {group!r}")

    squared_norm = 0.0
    for name, tensor in update.tensors.items():
        if name not in global_state:
            reasons.append(f"site {site!r}: unknown tensor {name!r}")
            continue
        if name not in groups:
            reasons.append(f"site {site!r}: tensor {name!r} has no parameter group")
            continue
        array, reference = np.asarray(tensor), np.asarray(global_state[name])
        group = groups[name]
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
        difference = array.astype(wide) - reference.astype(wide)
        squared_norm += float(np.sum(np.abs(difference) ** 2))

    if max_norm is not None:
        norm = math.sqrt(squared_norm)
        if norm > max_norm:
            reasons.append(f"site {site!r}: update norm {norm:.4g} exceeds max_norm {max_norm:.4g}")
    return reasons


@dataclass(frozen=True)
class Rejection:
    """An update left out of a round, with every reason :func:`validate_update` gave."""

    site: str
    reasons: tuple[str, ...]


class RejectedUpdateError(ValueError):
    """A caller that accepts no rejected update (:meth:`RoundOutcome.raise_for_rejected`)."""


@dataclass(frozen=True)
class RoundOutcome:
    """What :func:`aggregate_round` did.

    Attributes:
        state: the new global state; a copy of the old one when not ``aggregated``.
        accepted: the updates that passed validation, in the order given.
        rejected: the updates that did not, with their reasons, in the order given.
        aggregated: False when fewer than ``min_sites`` updates were accepted.
    """

    state: dict[str, np.ndarray]
    accepted: tuple[SiteUpdate, ...]
    rejected: tuple[Rejection, ...]
    aggregated: bool

    def raise_for_rejected(self) -> RoundOutcome:
        """Raise :class:`RejectedUpdateError` listing every reason if any update was
        rejected (callers whose updates come from their own code, where a rejection is a
        bug); return ``self`` otherwise."""
        if self.rejected:
            raise RejectedUpdateError("; ".join(r for rejection in self.rejected for r in rejection.reasons))
        return self


def aggregate_round(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[SiteUpdate],
    groups: Mapping[str, str],
    max_norm: float | None = None,
    min_sites: int = 1,
) -> RoundOutcome:
    """One federated round: validate every update, aggregate the accepted ones per group.

    Each update goes through :func:`validate_update` (with ``max_norm``); the accepted
    ones, in the order given, are combined by :func:`aggregate_adapters` when there are
    at least ``min_sites`` of them. Otherwise the global state is kept (copied) and
    ``aggregated`` is False. The inputs are not modified.
    """
    if min_sites < 0:
        raise ValueError(f"min_sites must be >= 0, got {min_sites}")
    accepted: list[SiteUpdate] = []
    rejected: list[Rejection] = []
    for update in updates:
        reasons = validate_update(update, global_state, groups, max_norm)
        if reasons:
            rejected.append(Rejection(update.site, tuple(reasons)))
        else:
            accepted.append(update)
    if len(accepted) < min_sites:
        state = {name: np.asarray(array).copy() for name, array in global_state.items()}
        return RoundOutcome(state, tuple(accepted), tuple(rejected), aggregated=False)
    state = aggregate_adapters(global_state, accepted, groups)
    return RoundOutcome(state, tuple(accepted), tuple(rejected), aggregated=True)
