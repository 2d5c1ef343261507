"""The AdamW of every training run, and a site's AdamW carried from one federated round to the next.

:func:`make_optimizer` builds it: AdamW without weight decay over the model's trainable
tensors, each parameter group at the adapt rate times the model's ``lr_scales`` entry for
that group (1 where it has none; :data:`pemma_core.model.pemma.GROUP_LR_SCALES` says which
PEMMA groups learn slower, and why).

Carrying the moments, and why: a fresh AdamW's first step moves every element of every
tensor it steps by the full learning rate, whatever the gradient's size (the bias-corrected
``m / sqrt(v)`` is ``sign(g)``). A site that takes one CT step in a round (a PET site draws ``ct`` about one
step in four) then sends a pure sign step of ``lr`` per element, every round, where a
centralized AdamW would by now be averaging noisy gradients down. In the IBSI bench that
noise in the CT groups (the patch embedding's CT adapter, the shared LoRA) took the
federated CT mode from 0.374 to 0.250 in one round (BENCHMARKS.md, "The federated CT
collapse: a fresh optimiser every round"). Carrying the moments makes a site's later steps what they would be in one
long run.

The state never leaves the site (it is derived from the site's own gradients). The site
keeps it in a file of its cache per run (:func:`save_moments`, :func:`load_moments`), so a
resumed run, or a restarted SuperNode, carries it on too. It is keyed by tensor name:

* every tensor keeps ``exp_avg``, ``exp_avg_sq`` and ``step`` as the site left them, after
  the server replaced the tensor itself by the aggregate;
* the factors of a low-rank pair (:func:`pemma_core.lora_aggregation.low_rank_pairs`) may
  come back re-factorised (``lora-aggregation = exact`` rotates them into the SVD's basis),
  where per-element moments no longer mean anything: their momentum restarts at zero and
  their second moment becomes its mean over the tensor, the gradient's scale, which a
  rotation keeps. Their first step is then small, not a full sign step.

A tensor with no carried state, or whose carried state has another shape, starts fresh.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from pemma_core.lora_aggregation import low_rank_pairs

__all__ = ["carried_moments", "load_moments", "make_optimizer", "save_moments"]

log = logging.getLogger("pemma.site")

_MOMENTS = ("exp_avg", "exp_avg_sq")


def make_optimizer(model: torch.nn.Module, lr: float,
                   carried: Mapping[str, np.ndarray] | None = None) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable tensors, each at ``lr`` times its group's scale in
    ``model.lr_scales`` (a model without one: all at ``lr``), resuming the moments that
    :func:`carried_moments` took from the site's previous round."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scales: Mapping[str, float] = getattr(model, "lr_scales", {})
    groups: Mapping[str, str] = getattr(model, "param_groups", {}) if scales else {}
    by_scale: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in named:
        by_scale.setdefault(float(scales.get(groups.get(name, ""), 1.0)), []).append(p)
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr * scale} for scale, params in by_scale.items()],
                                  lr=lr, weight_decay=0.0)
    if not carried:
        return optimizer
    factors = {n for pair in low_rank_pairs(n for n, _ in named).items() for n in pair}
    for name, p in named:
        key = {m: f"{m}/{name}" for m in (*_MOMENTS, "step")}
        if not all(k in carried for k in key.values()) or any(carried[key[m]].shape != tuple(p.shape) for m in _MOMENTS):
            continue
        exp_avg, exp_avg_sq = carried[key["exp_avg"]], carried[key["exp_avg_sq"]]
        if name in factors:
            exp_avg = np.zeros(p.shape, dtype=np.float32)
            exp_avg_sq = np.full(p.shape, exp_avg_sq.mean(dtype=np.float64), dtype=np.float32)
        optimizer.state[p] = {"step": torch.tensor(float(carried[key["step"]])), "exp_avg": _state_tensor(exp_avg, p),
                              "exp_avg_sq": _state_tensor(exp_avg_sq, p)}
    return optimizer


def _state_tensor(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``values`` as a new tensor of ``like``'s dtype and device. Built in numpy and wrapped, not
    by PyTorch ops: a site sets up its optimiser while other sites' threads train, and each
    small PyTorch op releases the interpreter lock and then waits to get it back
    (BENCHMARKS.md, the default demo's wall time)."""
    array = np.array(values, dtype=np.float32)  # a copy: the carried arrays stay as loaded
    tensor = torch.from_numpy(array)
    return tensor if tensor.dtype == like.dtype and tensor.device == like.device else tensor.to(like.device, like.dtype)


def carried_moments(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The moments of ``optimizer`` (built by :func:`make_optimizer`) by tensor name, as
    float32 numpy arrays (``exp_avg/<name>``, ``exp_avg_sq/<name>``, ``step/<name>``);
    tensors it never stepped have none."""
    out: dict[str, np.ndarray] = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if not state:
            continue
        for m in _MOMENTS:
            out[f"{m}/{name}"] = state[m].detach().float().cpu().numpy().copy()
        out[f"step/{name}"] = np.asarray(float(state["step"]), dtype=np.float32)
    return out


def save_moments(path: Path, moments: Mapping[str, np.ndarray], owner: str, round_: int) -> None:
    """Write ``moments`` (:func:`carried_moments`) after round ``round_`` of the model ``owner``
    (any string naming the model, e.g. its backbone fingerprint and spec), replacing the file
    whole: a crash mid-write leaves the previous round's file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(dict(moments), str(partial), metadata={"owner": owner, "round": str(int(round_))})
    os.replace(partial, path)


def load_moments(path: Path, owner: str, round_: int) -> dict[str, np.ndarray] | None:
    """The moments :func:`save_moments` wrote for ``owner`` before round ``round_``; None when
    there are none to carry: no file, another model, a file from this round or a later one
    (the round is being trained again, after a resume), or an unreadable file (said, not raised:
    the site then trains with a fresh optimiser, as in the first round)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as reader:
            meta = reader.metadata() or {}
        if meta.get("owner") != owner or int(meta.get("round", round_)) >= round_:
            return None
        return load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        log.warning("optimiser moments %s are unreadable (%s): this round starts a fresh optimiser", path, exc)
        return None
