"""Local training and evaluation, for every model kind and mode.

``train_local`` is what a site runs in a federated round (and what centralized
baselines run): per batch it draws a mode among those the site can serve
(modality dropout), and updates only the parameter groups that mode trains, so a
CT-only site never changes PET or fusion tensors. ``evaluate`` runs MONAI
sliding-window inference on whole volumes and scores Dice with ``monai.metrics``.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from pemma_core.modes import DEFAULT_MODE_WEIGHTS, check_mode
from pemma_core.model import SegmentationModel


@dataclass
class TrainResult:
    loss: float  # mean loss over the steps
    steps: int
    examples: dict[str, int]  # parameter group -> examples that trained it
    seconds: float
    mode_steps: dict[str, int] = field(default_factory=dict)


def mode_sampler(modes: Sequence[str], weights: Mapping[str, float] | None, seed: int) -> Iterator[str]:
    """Endless modes among ``modes`` in proportion to ``weights`` (default DESIGN.md's
    0.6/0.2/0.2), renormalised: smooth weighted round-robin, so every window of steps
    holds each mode's share up to one step (0.6/0.2/0.2 repeats ctpet, ct, ctpet, pet,
    ctpet). Random draws left a site's few local steps of a round without a mode now and
    then, and an adapter trained by that mode alone then sat the round out. ``seed``
    only permutes which mode wins a tie."""
    for mode in modes:
        check_mode(mode)
    if not modes:
        raise ValueError("no mode to train: the site serves none of the model's modes")
    weights = weights or DEFAULT_MODE_WEIGHTS
    w = [float(weights.get(m, 0.0)) for m in modes]
    if sum(w) <= 0:
        w = [1.0] * len(modes)
    total = sum(w)
    order = list(range(len(modes)))
    random.Random(seed).shuffle(order)
    credit = [0.0] * len(modes)
    while True:
        for i in order:
            credit[i] += w[i]
        pick = max(order, key=lambda i: credit[i])  # first in ``order`` among equals
        credit[pick] -= total
        yield modes[pick]


def _cycle(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training loader yielded no batch (no usable training case?)")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 mixed precision on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_local(
    model: SegmentationModel,
    loader: Iterable,
    modes: Sequence[str],
    steps: int,
    lr: float = 1e-3,
    mode_weights: Mapping[str, float] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainResult:
    """Run ``steps`` optimiser steps on batches ``{"image": [B,2,...], "label": [B,1,...]}``.

    Only ``modes`` that the model runs are drawn. Gradients of groups a mode does not
    train are dropped before the step (Adam then leaves those tensors untouched).
    """
    device = torch.device(device)
    modes = [m for m in modes if m in model.modes]
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.to(device).train()
    torch.manual_seed(seed)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = model.param_groups
    optimizer = optimizer or torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    draws = mode_sampler(modes, mode_weights, seed)
    examples: dict[str, int] = {}
    mode_steps: dict[str, int] = {}
    total = 0.0
    start = time.perf_counter()
    for batch in itertools.islice(_cycle(loader), steps):
        mode = next(draws)
        image = batch["image"].to(device)
        label = batch["label"].to(device)
        trained = model.groups_for_mode(mode)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = loss_fn(model(image, mode).float(), label)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} in mode {mode}")
        loss.backward()
        for name, p in params.items():
            if groups[name] not in trained:
                p.grad = None
        optimizer.step()
        total += float(loss.detach())
        n = int(image.shape[0])
        for g in trained & set(groups.values()):
            examples[g] = examples.get(g, 0) + n
        mode_steps[mode] = mode_steps.get(mode, 0) + 1
    return TrainResult(
        loss=total / steps, steps=steps, examples=examples, seconds=time.perf_counter() - start, mode_steps=mode_steps
    )


@dataclass
class EvalResult:
    dice: dict[str, float]  # mode -> mean Dice over cases
    per_case: dict[str, dict[str, float]]  # mode -> case id -> Dice (stays at the site)


@torch.no_grad()
def predict_volume(
    model: SegmentationModel, image: torch.Tensor, mode: str, device: str | torch.device = "cpu", overlap: float = 0.25
) -> torch.Tensor:
    """Class map ``[B, 1, X, Y, Z]`` of a whole volume by sliding-window inference."""
    device = torch.device(device)
    model.to(device).eval()
    with autocast(device):
        logits = sliding_window_inference(
            image.to(device),
            roi_size=model.roi_size,
            sw_batch_size=4,
            predictor=lambda x: model(x, mode),
            overlap=overlap,
            mode="gaussian",
        )
    return logits.float().argmax(dim=1, keepdim=True)


def evaluate(
    model: SegmentationModel, loader: Iterable, modes: Sequence[str], device: str | torch.device = "cpu"
) -> EvalResult:
    """Mean foreground Dice per mode over whole volumes (batch size 1)."""
    dice: dict[str, float] = {}
    per_case: dict[str, dict[str, float]] = {}
    num_classes = model.spec.out_channels
    for mode in modes:
        model.check_mode(mode)
        metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
        cases: dict[str, float] = {}
        for batch in loader:
            pred = predict_volume(model, batch["image"], mode, device).cpu()
            label = batch["label"].cpu().long()
            scores = metric(one_hot(pred, num_classes), one_hot(label, num_classes))
            for case_id, score in zip(batch.get("case_id", [f"case{len(cases)}"]), scores.mean(dim=1).tolist()):
                cases[str(case_id)] = float(score)
        if not cases:
            raise ValueError(f"no case to evaluate in mode {mode}")
        per_case[mode] = cases
        dice[mode] = float(metric.aggregate().item())
    return EvalResult(dice=dice, per_case=per_case)


def train_backbone(
    backbone: torch.nn.Module, loader: Iterable, steps: int, lr: float = 1e-3, seed: int = 0, device: str = "cpu"
) -> TrainResult:
    """Train the whole CT backbone (from :func:`build_backbone`) on CT, in place: the
    ``pretrain-ct`` phase."""
    from pemma_core.model import FullModel

    spec = getattr(backbone, "pemma_spec", None)
    if spec is None:
        raise ValueError("train_backbone needs a backbone made by pemma_core.model.build_backbone")
    wrapper = FullModel(backbone, spec.with_(kind="ct-only"), fingerprint="", share_weights=True)
    return train_local(wrapper, loader, ["ct"], steps, lr=lr, seed=seed, device=device)
