"""A site's AdamW carried from one federated round to the next (pemma_core.training.optimizer)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pemma_core.training.optimizer import carried_moments, load_moments, make_optimizer, save_moments

LR = 0.01


class _LowRank(nn.Module):
    """A frozen weight with a peft-named low-rank pair and a plain trainable bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(6, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 5, bias=False)})
        self.bias = nn.Parameter(torch.zeros(5))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One optimiser step with the given gradients; returns how far each tensor moved."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    optimizer.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_a_carried_optimizer_averages_a_flipped_gradient_where_a_fresh_one_takes_a_full_step() -> None:
    """The failure this module fixes: a fresh AdamW moves every element by the full rate
    whatever the gradient; with the site's moments carried, a gradient that flips sign
    between rounds (noise) moves it by a small fraction of the rate."""
    model = nn.Linear(4, 3)
    grads = {n: torch.randn_like(p) * 1e-3 for n, p in model.named_parameters()}
    first = make_optimizer(model, LR)
    _step(model, first, grads)
    moments = carried_moments(first, model)
    flipped = {n: -g for n, g in grads.items()}
    fresh = _step(model, make_optimizer(model, LR), flipped)
    assert all(torch.allclose(d.abs(), torch.full_like(d, LR), rtol=1e-3) for d in fresh.values())
    carried = _step(model, make_optimizer(model, LR, moments), flipped)
    assert all(float(d.abs().max()) < 0.2 * LR for d in carried.values())
    assert all(float(moments[f"step/{n}"]) == 1.0 for n in grads)


def test_low_rank_factors_restart_their_momentum_and_keep_only_the_gradient_scale() -> None:
    """The server may return a low-rank pair re-factorised (rotated), so per-element moments
    of its factors mean nothing: momentum restarts, the second moment becomes its mean."""
    model = nn.ModuleDict({"attn": _LowRank()})  # peft's names: <module>.lora_A.<adapter>.weight
    first = make_optimizer(model, LR)
    _step(model, first, {n: torch.randn_like(p) for n, p in model.named_parameters()})
    moments = carried_moments(first, model)
    resumed = make_optimizer(model, LR, moments)
    state = {n: resumed.state[p] for n, p in model.named_parameters()}
    for factor in ("attn.lora_A.default.weight", "attn.lora_B.default.weight"):
        assert torch.count_nonzero(state[factor]["exp_avg"]) == 0
        np.testing.assert_allclose(state[factor]["exp_avg_sq"].numpy(),
                                   np.full(moments[f"exp_avg_sq/{factor}"].shape, moments[f"exp_avg_sq/{factor}"].mean()),
                                   rtol=1e-6)
        assert float(state[factor]["step"]) == 1.0
    np.testing.assert_array_equal(state["attn.bias"]["exp_avg"].numpy(), moments["exp_avg/attn.bias"])
    np.testing.assert_array_equal(state["attn.bias"]["exp_avg_sq"].numpy(), moments["exp_avg_sq/attn.bias"])


def test_moments_of_another_shape_start_fresh() -> None:
    model = nn.Linear(4, 3)
    moments = carried_moments(_trained(model), model)
    other = nn.Linear(4, 2)  # same names, other shapes
    assert make_optimizer(other, LR, moments).state == {}


def _trained(model: nn.Module) -> torch.optim.Optimizer:
    optimizer = make_optimizer(model, LR)
    _step(model, optimizer, {n: torch.ones_like(p) for n, p in model.named_parameters()})
    return optimizer


def test_the_moments_file_is_read_back_only_for_its_model_and_a_later_round(tmp_path: Path, caplog) -> None:
    model = nn.Linear(4, 3)
    moments = carried_moments(_trained(model), model)
    path = tmp_path / "optimizer" / "run.safetensors"
    assert load_moments(path, "model-1", 2) is None  # nothing kept yet
    save_moments(path, moments, "model-1", round_=1)
    read = load_moments(path, "model-1", 2)
    assert read is not None and set(read) == set(moments)
    assert all(np.array_equal(read[k], moments[k]) for k in moments)
    assert load_moments(path, "model-2", 2) is None  # another backbone or spec
    assert load_moments(path, "model-1", 1) is None  # round 1 trained again (a resume): its moments are not the start
    assert not path.with_name(path.name + ".partial").exists()
    path.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="pemma.site"):
        assert load_moments(path, "model-1", 2) is None
    assert str(path) in caplog.text and "fresh optimiser" in caplog.text


def test_each_pemma_group_learns_at_its_scale_of_the_rate() -> None:
    """The CT adapter learns at GROUP_LR_SCALES' fraction of the adapt rate, every other group at the
    rate; a fully trained baseline has no scales."""
    from pemma_core.model.factory import build_model
    from pemma_core.model.pemma import GROUP_LR_SCALES
    from pemma_core.model.spec import ModelSpec, build_backbone

    spec = ModelSpec()
    torch.manual_seed(0)
    backbone = build_backbone(spec)
    model = build_model(spec, backbone)
    rate_of = {id(p): g["lr"] for g in make_optimizer(model, LR).param_groups for p in g["params"]}
    groups = model.param_groups
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rate_of[id(p)] == pytest.approx(LR * GROUP_LR_SCALES.get(groups[name], 1.0)), name
    assert len(set(rate_of.values())) > 1  # some group is scaled, so the loop above checked two rates
    full = build_model(spec.with_(kind="early-fusion"), backbone)
    assert {g["lr"] for g in make_optimizer(full, LR).param_groups} == {LR}


def test_a_site_keeps_the_moments_of_its_last_few_runs_only(tmp_path: Path) -> None:
    """The run id comes from the server: one that sent a new id every round must not fill the
    site's disk. The current run's moments are kept, other sites' are left alone."""
    from types import SimpleNamespace

    from client import task

    class _Model(nn.Linear):
        fingerprint = "f" * 64
        spec = SimpleNamespace(to_json=lambda: "{}")

    model = _Model(4, 3)
    site, other = (SimpleNamespace(name=n, cache_dir=tmp_path) for n in ("site-a", "site-b"))
    runs = [f"run-{i}" for i in range(task.OPTIMIZER_RUNS_KEPT + 3)]
    for i, run in enumerate([runs[0], *runs]):  # site-b first, then site-a under every run id
        who = other if i == 0 else site
        optimizer, keep = task._site_optimizer(who, SimpleNamespace(run=run, round=1, lr=LR), model, "cpu")
        _step(model, optimizer, {n: torch.ones_like(p) for n, p in model.named_parameters()})
        keep()
    kept = list((tmp_path / "optimizer").rglob("*.safetensors"))
    assert len(kept) == task.OPTIMIZER_RUNS_KEPT + 1  # site-a's last few runs, and site-b's one
    assert task._optimizer_file(other, runs[0]).is_file()
    assert all(task._optimizer_file(site, run).is_file() for run in runs[-task.OPTIMIZER_RUNS_KEPT:])
    assert not task._optimizer_file(site, runs[0]).exists()
