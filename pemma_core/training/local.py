"""Local training and Dice evaluation, for every model kind and mode.

``train_local`` is what a site runs in a federated round (and what centralized
baselines run): per batch it draws a mode among those the site can serve (modality
dropout) and takes one :func:`train_step`, which updates only the parameter groups that
mode trains, so a CT-only site never changes PET or fusion tensors.
:func:`evaluate_cases` runs MONAI sliding-window inference on whole volumes and scores
Dice with ``monai.metrics``; :func:`evaluate` is the per-mode summary a site reports.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.metrics.utils import do_metric_reduction
from monai.networks.utils import one_hot

from pemma_core.model.pemma import SegmentationModel
from pemma_core.model.spec import DEFAULT_OVERLAP
from pemma_core.modes import DEFAULT_MODE_WEIGHTS, check_mode

__all__ = [
    "EvalResult",
    "TrainResult",
    "autocast",
    "evaluate",
    "evaluate_cases",
    "mode_sampler",
    "predict_volume",
    "train_backbone",
    "train_local",
    "train_step",
]


@dataclass
class TrainResult:
    loss: float  # mean loss over the steps
    steps: int
    examples: dict[str, int]  # parameter group -> examples that trained it
    seconds: float
    mode_steps: dict[str, int] = field(default_factory=dict)


def mode_sampler(modes: Sequence[str], weights: Mapping[str, float] | None, seed: int) -> Iterator[str]:
    """Endless modes among ``modes`` in proportion to ``weights`` (default
    :data:`~pemma_core.modes.DEFAULT_MODE_WEIGHTS`), renormalised: smooth weighted
    round-robin, so every window of steps holds each mode's share up to one step
    (0.6/0.2/0.2 repeats ctpet, ct, ctpet, pet, ctpet). Random draws left a site's few
    local steps of a round without a mode now and then, and an adapter trained by that
    mode alone then sat the round out. ``seed`` only permutes which mode wins a tie."""
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


def train_step(
    model: SegmentationModel,
    image: torch.Tensor,
    label: torch.Tensor,
    mode: str,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: str | torch.device,
) -> float:
    """One optimiser step of ``model`` in ``mode`` on ``image`` ``[B, 2, ...]`` / ``label``
    ``[B, 1, ...]`` (both already on ``device``); returns the loss.

    Gradients of the groups ``mode`` does not train are dropped before the step, so the
    optimiser leaves those tensors untouched. Raises ``FloatingPointError`` on a
    non-finite loss, before it can reach the weights.
    """
    device = torch.device(device)
    trained = model.groups_for_mode(mode)
    groups = model.param_groups
    optimizer.zero_grad(set_to_none=True)
    with autocast(device):
        loss = loss_fn(model(image, mode).float(), label)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss.item()} in mode {mode}")
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and groups[name] not in trained:
            p.grad = None
    optimizer.step()
    return float(loss.detach())


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
    """Run ``steps`` :func:`train_step` calls on batches ``{"image": [B,2,...], "label": [B,1,...]}``
    (AdamW at ``lr`` unless ``optimizer`` is given, DiceCE loss).

    Only ``modes`` that the model runs are drawn, by :func:`mode_sampler`.
    """
    device = torch.device(device)
    modes = [m for m in modes if m in model.modes]
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.to(device).train()
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    all_groups = set(model.param_groups.values())
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    draws = mode_sampler(modes, mode_weights, seed)
    examples: dict[str, int] = {}
    mode_steps: dict[str, int] = {}
    total = 0.0
    start = time.perf_counter()
    for batch in itertools.islice(_cycle(loader), steps):
        mode = next(draws)
        image = batch["image"].to(device)
        total += train_step(model, image, batch["label"].to(device), mode, optimizer, loss_fn, device)
        n = int(image.shape[0])
        for g in model.groups_for_mode(mode) & all_groups:
            examples[g] = examples.get(g, 0) + n
        mode_steps[mode] = mode_steps.get(mode, 0) + 1
    return TrainResult(
        loss=total / steps, steps=steps, examples=examples, seconds=time.perf_counter() - start, mode_steps=mode_steps
    )


@dataclass
class EvalResult:
    dice: dict[str, float]  # mode -> mean Dice over cases
    per_case: dict[str, dict[str, float]]  # mode -> case id -> Dice (stays at the site)
    seconds: dict[str, float] = field(default_factory=dict)  # mode -> inference seconds
    predictions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # mode -> case id -> uint8 mask


@torch.no_grad()
def predict_volume(
    model: SegmentationModel,
    image: torch.Tensor,
    mode: str,
    device: str | torch.device = "cpu",
    overlap: float = DEFAULT_OVERLAP,
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


def evaluate_cases(
    model: SegmentationModel,
    batches: Iterable[Mapping[str, Any]],
    modes: Sequence[str],
    device: str | torch.device = "cpu",
    overlap: float = DEFAULT_OVERLAP,
    keep_predictions: bool = False,
) -> EvalResult:
    """Foreground Dice per case and mode over whole volumes ``{"image", "label", "case_id"}``.

    MONAI ``DiceMetric`` without background; a non-empty label with an empty prediction
    scores 0 (``ignore_empty=False``). A case's Dice is the mean over the foreground
    classes; ``dice`` is the mean over cases. The batches are read once, every mode
    predicted on each. With ``keep_predictions`` the class maps are kept as uint8 masks.
    """
    for mode in modes:
        model.check_mode(mode)
    classes = model.spec.out_channels
    per_case: dict[str, dict[str, float]] = {m: {} for m in modes}
    predictions: dict[str, dict[str, np.ndarray]] = {m: {} for m in modes}
    seconds = {m: 0.0 for m in modes}
    n = 0
    for batch in batches:
        label = batch["label"].cpu().long()
        rows = int(label.shape[0])
        case_ids = [str(c) for c in batch["case_id"]] if "case_id" in batch else [f"case{n + i}" for i in range(rows)]
        n += rows
        for mode in modes:
            start = time.perf_counter()
            pred = predict_volume(model, batch["image"], mode, device, overlap=overlap).cpu()
            seconds[mode] += time.perf_counter() - start
            metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
            scores = metric(one_hot(pred, classes), one_hot(label, classes)).mean(dim=1).tolist()
            for row, (case_id, score) in enumerate(zip(case_ids, scores)):
                per_case[mode][case_id] = float(score)
                if keep_predictions:
                    predictions[mode][case_id] = pred[row, 0].numpy().astype(np.uint8)
    if modes and not n:
        raise ValueError(f"no case to evaluate in mode {modes[0]}")
    dice = {m: float(np.mean(list(v.values()))) for m, v in per_case.items()}
    return EvalResult(dice=dice, per_case=per_case, seconds=seconds, predictions=predictions if keep_predictions else {})


def _metric_mean(scores: Iterable[float]) -> float:
    """Mean of per-case Dice as ``DiceMetric.aggregate()`` takes it (float32), the number
    sites have always reported; it differs from a float64 mean in the last float32 bits."""
    values = torch.tensor(list(scores), dtype=torch.float32)[:, None]
    return float(do_metric_reduction(values, "mean")[0].item())


def evaluate(
    model: SegmentationModel, loader: Iterable, modes: Sequence[str], device: str | torch.device = "cpu"
) -> EvalResult:
    """Mean foreground Dice per mode over whole volumes (:func:`evaluate_cases`), the
    summary a site reports."""
    result = evaluate_cases(model, loader, modes, device)
    result.dice = {m: _metric_mean(cases.values()) for m, cases in result.per_case.items()}
    return result


def train_backbone(
    backbone: torch.nn.Module, loader: Iterable, steps: int, lr: float = 1e-3, seed: int = 0, device: str = "cpu"
) -> TrainResult:
    """Train the whole CT backbone (from :func:`~pemma_core.model.spec.build_backbone`) on
    CT, in place: the ``pretrain-ct`` phase."""
    from pemma_core.model.baselines import FullModel

    spec = getattr(backbone, "pemma_spec", None)
    if spec is None:
        raise ValueError("train_backbone needs a backbone made by pemma_core.model.spec.build_backbone")
    wrapper = FullModel(backbone, spec.with_(kind="ct-only"), fingerprint="", share_weights=True)
    return train_local(wrapper, loader, ["ct"], steps, lr=lr, seed=seed, device=device)
