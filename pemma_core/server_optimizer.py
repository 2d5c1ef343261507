"""Server-side adaptive optimisers over the aggregated update (FedAdam, FedYogi), as pure functions.

Reddi et al. 2021, "Adaptive Federated Optimization": the server treats the round's
aggregated change as a pseudo-gradient and takes an adaptive step with it. Per tensor::

    d = aggregated - previous                       (the round's pseudo-gradient)
    m = b1 m + (1 - b1) d
    v = b2 v + (1 - b2) d^2                         FedAdam
    v = v - (1 - b2) d^2 sign(v - d^2)              FedYogi
    new = previous + eta m / (sqrt(v) + tau)

with ``m`` and ``v`` starting at 0 and no bias correction (the paper's Algorithm 2 lets
``v`` start anywhere >= ``tau^2``; from 0 the first step is
``eta (1 - b1) d / (sqrt(1 - b2) |d| + tau)``, a bounded move per element).
State is kept per tensor, and a step is taken only for the tensors some site sent this
round (the groups that were aggregated): a tensor nobody trained keeps its value and its
moments.

Resume: the moments are written after every round (:func:`save_state`, beside the round's
checkpoint), and a resumed run reads back those of the round it resumes after
(:func:`load_state`), so it ends where an uninterrupted run ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

__all__ = [
    "BETA1",
    "BETA2",
    "SERVER_LR",
    "SERVER_OPTIMIZERS",
    "TAU",
    "OptimizerState",
    "load_state",
    "save_state",
    "server_step",
]

SERVER_OPTIMIZERS = ("none", "fedadam", "fedyogi")
SERVER_LR = 0.01  # eta, the paper's server learning rate
BETA1 = 0.9  # first-moment decay
BETA2 = 0.99  # second-moment decay
TAU = 1e-3  # adaptivity: bounds the step where v is tiny


@dataclass
class OptimizerState:
    """Per-tensor moments ``m`` and ``v`` (float64) and, per tensor, how many steps it took."""

    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)


def server_step(
    kind: str,
    previous: Mapping[str, np.ndarray],
    aggregated: Mapping[str, np.ndarray],
    moved: Iterable[str],
    state: OptimizerState,
    *,
    lr: float = SERVER_LR,
    beta1: float = BETA1,
    beta2: float = BETA2,
    tau: float = TAU,
) -> dict[str, np.ndarray]:
    """The new global state after one FedAdam / FedYogi step (see the module docstring).

    Parameters
    ----------
    kind: ``fedadam`` or ``fedyogi`` (``none`` returns ``aggregated`` as it is).
    previous: the global state before the round.
    aggregated: what plain aggregation produced this round (same keys).
    moved: the names of the floating tensors some site sent this round; the others are
        copied from ``aggregated`` (which kept their global value) and their moments kept.
    state: the moments, updated in place.

    Returns a new dict with the keys of ``aggregated``, each tensor in its previous dtype.
    """
    if kind not in SERVER_OPTIMIZERS:
        raise ValueError(f"server-optimizer: unknown optimiser {kind!r}; valid: {', '.join(SERVER_OPTIMIZERS)}")
    if not lr > 0 or not tau > 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
        raise ValueError(f"server optimiser: need lr > 0, tau > 0, 0 <= beta1, beta2 < 1; "
                         f"got lr {lr}, tau {tau}, beta1 {beta1}, beta2 {beta2}")
    out = {name: np.asarray(value).copy() for name, value in aggregated.items()}
    if kind == "none":
        return out
    for name in moved:
        if name not in previous or name not in aggregated:
            raise ValueError(f"server optimiser: tensor {name!r} is not in the global state")
        before = np.asarray(previous[name])
        if not np.issubdtype(before.dtype, np.floating):
            continue  # counters, not learned weights: keep the aggregated value
        d = np.asarray(aggregated[name], dtype=np.float64) - before.astype(np.float64)
        m = beta1 * state.m.get(name, np.zeros_like(d)) + (1 - beta1) * d
        v = state.v.get(name, np.zeros_like(d))
        d2 = d * d
        v = beta2 * v + (1 - beta2) * d2 if kind == "fedadam" else v - (1 - beta2) * d2 * np.sign(v - d2)
        state.m[name], state.v[name] = m, v
        state.steps[name] = state.steps.get(name, 0) + 1
        out[name] = (before.astype(np.float64) + lr * m / (np.sqrt(v) + tau)).astype(before.dtype)
    return out


def save_state(path: Path, state: OptimizerState, round_: int) -> None:
    """Write ``state`` as it stands after round ``round_``, replacing ``path`` whole (a crash
    mid-write leaves the previous file)."""
    arrays = {**{f"m/{n}": a for n, a in state.m.items()}, **{f"v/{n}": a for n, a in state.v.items()},
              **{f"steps/{n}": np.asarray(k, dtype=np.int64) for n, k in state.steps.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(arrays, str(partial), metadata={"round": str(int(round_))})
    os.replace(partial, path)


def load_state(path: Path, round_: int) -> OptimizerState:
    """The state :func:`save_state` wrote after round ``round_``; a ``ValueError`` naming the file
    when it is unreadable, incomplete or of another round."""
    try:
        with safe_open(str(path), framework="numpy") as reader:
            written = (reader.metadata() or {}).get("round")
        arrays = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{path}: the server optimiser's moments are unreadable ({exc})") from exc
    if written != str(int(round_)):
        raise ValueError(f"{path}: holds the server optimiser's moments after round {written}, not {round_}")
    state = OptimizerState()
    for key, value in arrays.items():
        kind, _, name = key.partition("/")
        if kind == "m":
            state.m[name] = value.astype(np.float64)
        elif kind == "v":
            state.v[name] = value.astype(np.float64)
        elif kind == "steps":
            state.steps[name] = int(value)
    if set(state.m) != set(state.v) or set(state.m) != set(state.steps):
        raise ValueError(f"{path}: the server optimiser's moments are incomplete (m, v and steps name other tensors)")
    return state
