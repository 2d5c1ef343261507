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
from pemma_core.privacy import DpPlan
from pemma_core.training.optimizer import make_optimizer
from pemma_core.training.seg_metrics import NSD_TOLERANCE_MM, CaseMetrics, case_metrics, mean_defined, pooled_dice, spacing_of_affine

__all__ = [
    "SEGMENTATION_LOSS",
    "EvalResult",
    "TrainResult",
    "autocast",
    "dp_train_step",
    "evaluate",
    "evaluate_cases",
    "mode_sampler",
    "on_device",
    "predict_volume",
    "segmentation_loss",
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
    dp_steps: int = 0  # steps taken with DP-SGD (all of them when training had a DpPlan)
    epsilon: float | None = None  # not computed by train_local: the caller's PrivacyLedger knows the run's total


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


SEGMENTATION_LOSS = "cross-entropy + soft Dice of the tumour channel (background left out of the Dice term)"


def segmentation_loss() -> DiceCELoss:
    """The training loss of every segmentation model here: cross-entropy plus the soft Dice of
    the tumour channel only. A background channel in the Dice term (MONAI's default) is near 1
    from the first step on small tumours, so it dilutes the tumour's gradient; nnU-Net's Dice
    also leaves it out (BENCHMARKS.md, why the demo's CT mode read 0)."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)


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


def on_device(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """``model`` with every parameter and buffer on ``device``, moved only if one is elsewhere.

    A site keeps its model between rounds (``client.task``) and reaches this several times a
    round; ``Module.to`` walks every module even when nothing moves, Python work that sites
    training side by side in threads wait on (BENCHMARKS.md, the default demo's wall time)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # tensors always name their CUDA device
        device = torch.device("cuda", torch.cuda.current_device())
    if all(t.device == device for t in itertools.chain(model.parameters(), model.buffers())):
        return model
    return model.to(device)


def _training_setup(model: SegmentationModel, modes: Sequence[str], lr: float, mode_weights: Mapping[str, float] | None,
                    seed: int, device: torch.device, optimizer: torch.optim.Optimizer | None):
    """(optimiser, loss, mode draws, the model's groups) of a local training run, the model on ``device`` in train mode."""
    on_device(model, device).train()
    torch.manual_seed(seed)
    optimizer = optimizer or make_optimizer(model, lr)
    return (optimizer, segmentation_loss(), mode_sampler(modes, mode_weights, seed),
            set(model.param_groups.values()))


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
    dp: DpPlan | None = None,
) -> TrainResult:
    """Run ``steps`` :func:`train_step` calls on batches ``{"image": [B,2,...], "label": [B,1,...]}``
    (:func:`~pemma_core.training.optimizer.make_optimizer` at ``lr`` unless ``optimizer`` is
    given, :func:`segmentation_loss`).

    Only ``modes`` that the model runs are drawn, by :func:`mode_sampler`.

    With ``dp`` every step is a DP-SGD step instead (:func:`dp_train_step`): the patients
    are the items of ``loader.dataset`` (one random crop of case ``i`` at index ``i``, as
    :func:`pemma_core.data.pipeline.train_loader` builds it), the loader's batches are not
    used, and ``examples`` counts the patients sampled. ``loss`` is then the mean over the
    sampled patients (0.0 if none was) and is not itself privatised.
    """
    device = torch.device(device)
    modes = [m for m in modes if m in model.modes]
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if dp is not None:
        return _train_local_dp(model, loader, modes, steps, lr, mode_weights, seed, device, optimizer, dp)
    optimizer, loss_fn, draws, all_groups = _training_setup(model, modes, lr, mode_weights, seed, device, optimizer)
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


def _patients(loader: Any) -> Any:
    dataset = getattr(loader, "dataset", None)
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            "DP training samples patients from loader.dataset, which must be a sized, indexable dataset "
            f"(one item per training case); got {type(loader).__name__} with dataset {type(dataset).__name__}"
        ) from None
    if n < 1 or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"DP training needs at least one indexable training case in loader.dataset, got {n}")
    return dataset


def _one_crop(item: Any, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, 2, ...]`` image and ``[1, 1, ...]`` label of one patient's item (MONAI croppers
    return a list of crops: the first is taken, so a patient counts once)."""
    if isinstance(item, (list, tuple)):
        if not item:
            raise ValueError(f"training case {index} gave no crop")
        item = item[0]
    if not isinstance(item, Mapping) or "image" not in item or "label" not in item:
        raise ValueError(f"training case {index} is not a dict with 'image' and 'label'")
    image, label = torch.as_tensor(item["image"]), torch.as_tensor(item["label"])
    if image.dim() != 4 or label.dim() != 4:
        raise ValueError(
            f"training case {index}: expected image [2, X, Y, Z] and label [1, X, Y, Z], "
            f"got {tuple(image.shape)} and {tuple(label.shape)}"
        )
    return image[None].to(device), label[None].to(device)


def _used_tensors(
    model: SegmentationModel, mode: str, loss_fn: Callable, device: torch.device
) -> list[tuple[str, torch.nn.Parameter]]:
    """The tensors a step in ``mode`` changes: trainable, of a group the mode trains, and on
    the mode's computation graph. Which tensors the graph reaches does not depend on the
    data, so a zero input finds them; the others get neither gradient nor noise, as in
    :func:`train_step` (the PET adapter stays put in mode ``ctpet``)."""
    trained, groups = model.groups_for_mode(mode), model.param_groups
    candidates = [(n, p) for n, p in model.named_parameters() if p.requires_grad and groups[n] in trained]
    if not candidates:
        return []
    image = torch.zeros(1, 2, *model.roi_size, device=device)
    label = torch.zeros(1, 1, *model.roi_size, device=device)
    was_training = model.training
    model.eval()  # the probe must not move normalisation statistics
    try:
        with autocast(device):
            loss = loss_fn(model(image, mode).float(), label)
        grads = torch.autograd.grad(loss, [p for _, p in candidates], allow_unused=True)
    finally:
        model.train(was_training)
    return [c for c, g in zip(candidates, grads) if g is not None]


def dp_train_step(
    model: SegmentationModel,
    dataset: Any,
    mode: str,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: str | torch.device,
    dp: DpPlan,
    generator: torch.Generator,
    tensors: Sequence[tuple[str, torch.nn.Parameter]],
) -> tuple[float, int]:
    """One DP-SGD step in ``mode``; returns (summed loss, patients sampled).

    Each of the ``len(dataset)`` patients is included with probability ``dp.sample_rate``
    (``generator``); each included patient's gradient over ``tensors`` (jointly) is clipped
    to ``dp.clip``; the sum gets Gaussian noise of standard deviation
    ``dp.noise_multiplier * dp.clip`` per element and is divided by the expected batch
    size ``dp.sample_rate * len(dataset)``. An empty draw is a step of noise alone.
    Raises ``FloatingPointError`` on a non-finite loss, before the weights change.
    """
    device = torch.device(device)
    n_patients = len(dataset)
    params = [p for _, p in tensors]
    chosen = torch.nonzero(torch.rand(n_patients, generator=generator) < dp.sample_rate).flatten().tolist()
    summed = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    total = 0.0
    for index in chosen:
        image, label = _one_crop(dataset[index], index, device)
        with autocast(device):
            loss = loss_fn(model(image, mode).float(), label)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} in mode {mode}")
        total += float(loss.detach())
        if not params:
            continue
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(s) if g is None else g.float() for s, g in zip(summed, grads)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = min(1.0, dp.clip / float(norm)) if float(norm) > 0 else 1.0
        for s, g in zip(summed, grads):
            s.add_(g, alpha=scale)
    expected = dp.sample_rate * n_patients
    std = dp.noise_multiplier * dp.clip
    optimizer.zero_grad(set_to_none=True)
    for p, s in zip(params, summed):
        if std > 0:
            s.add_(torch.normal(0.0, std, size=tuple(s.shape), generator=generator).to(s.device))
        p.grad = (s / expected).to(p.dtype)
    optimizer.step()
    return total, len(chosen)


def _train_local_dp(
    model: SegmentationModel,
    loader: Any,
    modes: Sequence[str],
    steps: int,
    lr: float,
    mode_weights: Mapping[str, float] | None,
    seed: int,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None,
    dp: DpPlan,
) -> TrainResult:
    if not isinstance(dp, DpPlan):
        raise ValueError(f"dp must be a DpPlan or None, got {type(dp).__name__}")
    dataset = _patients(loader)
    optimizer, loss_fn, draws, all_groups = _training_setup(model, modes, lr, mode_weights, seed, device, optimizer)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    examples: dict[str, int] = {}
    mode_steps: dict[str, int] = {}
    total, sampled = 0.0, 0
    start = time.perf_counter()
    for _ in range(steps):
        mode = next(draws)
        if mode not in tensors:
            tensors[mode] = _used_tensors(model, mode, loss_fn, device)
        loss, n = dp_train_step(model, dataset, mode, optimizer, loss_fn, device, dp, generator, tensors[mode])
        total += loss
        sampled += n
        for g in model.groups_for_mode(mode) & all_groups:
            examples[g] = examples.get(g, 0) + n
        mode_steps[mode] = mode_steps.get(mode, 0) + 1
    return TrainResult(
        loss=total / sampled if sampled else 0.0,
        steps=steps,
        examples=examples,
        seconds=time.perf_counter() - start,
        mode_steps=mode_steps,
        dp_steps=steps,
    )


@dataclass
class EvalResult:
    dice: dict[str, float]  # mode -> mean Dice over cases
    per_case: dict[str, dict[str, float]]  # mode -> case id -> Dice (stays at the site)
    seconds: dict[str, float] = field(default_factory=dict)  # mode -> inference seconds
    predictions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # mode -> case id -> uint8 mask
    # Beside Dice (pemma_core.training.seg_metrics; empty where a caller built the result without them):
    case_metrics: dict[str, dict[str, CaseMetrics]] = field(default_factory=dict)  # mode -> case id -> HD95, NSD, counts
    hd95: dict[str, float | None] = field(default_factory=dict)  # mode -> mean HD95 over the cases where it is defined
    hd95_cases: dict[str, int] = field(default_factory=dict)  # mode -> cases with a defined HD95 (the mean's weight)
    nsd: dict[str, float | None] = field(default_factory=dict)  # mode -> mean surface Dice over cases
    overlap: dict[str, int] = field(default_factory=dict)  # mode -> sum over cases of 2 |P and G| (voxels)
    volume: dict[str, int] = field(default_factory=dict)  # mode -> sum over cases of |P| + |G| (voxels)
    agg_dice: dict[str, float | None] = field(default_factory=dict)  # mode -> overlap / volume (None: all masks empty)
    distance_unit: str = "mm"  # of HD95 and the NSD tolerance: "voxel" when the batches carry no grid_affine
    nsd_tolerance: float = NSD_TOLERANCE_MM


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
    on_device(model, device).eval()
    return _predict(model, image, mode, device, overlap)


def _predict(model: SegmentationModel, image: torch.Tensor, mode: str, device: torch.device, overlap: float) -> torch.Tensor:
    """:func:`predict_volume` of a model already on ``device`` in eval mode."""
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
    surface: bool = True,
    nsd_tolerance: float = NSD_TOLERANCE_MM,
) -> EvalResult:
    """Foreground Dice per case and mode over whole volumes ``{"image", "label", "case_id"}``,
    with HD95, surface Dice and the overlap counts beside it.

    MONAI ``DiceMetric`` without background; a non-empty label with an empty prediction
    scores 0 (``ignore_empty=False``). A case's Dice is the mean over the foreground
    classes; ``dice`` is the mean over cases. The batches are read once, every mode
    predicted on each. With ``keep_predictions`` the class maps are kept as uint8 masks.

    Per case (:func:`pemma_core.training.seg_metrics.case_metrics`): HD95 and surface Dice
    at ``nsd_tolerance`` in mm on the grid a batch's ``grid_affine`` gives (as
    :func:`pemma_core.data.pipeline.eval_loader` batches carry it), in voxels when the
    batches carry none (``distance_unit``); ``surface`` False skips both (they stay None).
    Summaries per mode: ``hd95`` over the cases where it is defined (``hd95_cases`` of
    them; an empty prediction of a non-empty label has none), ``nsd`` over all cases, and
    the HECKTOR aggregated Dice ``agg_dice`` = ``overlap`` / ``volume`` from the summed counts.
    """
    for mode in modes:
        model.check_mode(mode)
    classes = model.spec.out_channels
    per_case: dict[str, dict[str, float]] = {m: {} for m in modes}
    scored: dict[str, dict[str, CaseMetrics]] = {m: {} for m in modes}
    predictions: dict[str, dict[str, np.ndarray]] = {m: {} for m in modes}
    seconds = {m: 0.0 for m in modes}
    units: set[str] = set()
    n = 0
    device = torch.device(device)
    on_device(model, device).eval()
    for batch in _stacked(batches):
        label = batch["label"].cpu().long()
        rows = int(label.shape[0])
        case_ids = [str(c) for c in batch["case_id"]] if "case_id" in batch else [f"case{n + i}" for i in range(rows)]
        affines = batch.get("grid_affine")
        spacings = [spacing_of_affine(affines[row]) for row in range(rows)] if affines is not None else [None] * rows
        units.add("mm" if affines is not None else "voxel")
        if len(units) > 1:
            raise ValueError(
                f"evaluation batches mix cases with and without 'grid_affine' (at case {case_ids[0]!r}): "
                "HD95 and surface Dice would mix millimetres and voxels"
            )
        n += rows
        for mode in modes:
            start = time.perf_counter()
            pred = _predict(model, batch["image"], mode, device, overlap).cpu()
            seconds[mode] += time.perf_counter() - start
            metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
            scores = metric(one_hot(pred, classes), one_hot(label, classes)).mean(dim=1).tolist()
            for row, (case_id, score) in enumerate(zip(case_ids, scores)):
                per_case[mode][case_id] = float(score)
                scored[mode][case_id] = case_metrics(pred[row, 0], label[row, 0], classes, spacings[row],
                                                     tolerance=nsd_tolerance, surface=surface)
                if keep_predictions:
                    predictions[mode][case_id] = pred[row, 0].numpy().astype(np.uint8)
    if modes and not n:
        raise ValueError(f"no case to evaluate in mode {modes[0]}")
    dice = {m: float(np.mean(list(v.values()))) for m, v in per_case.items()}
    result = EvalResult(dice=dice, per_case=per_case, seconds=seconds, predictions=predictions if keep_predictions else {},
                        case_metrics=scored, distance_unit=units.pop() if units else "mm", nsd_tolerance=float(nsd_tolerance))
    for mode, cases in scored.items():
        result.hd95[mode], result.hd95_cases[mode] = mean_defined(c.hd95 for c in cases.values())
        result.nsd[mode] = float(np.mean([c.nsd for c in cases.values()])) if surface and cases else None
        result.overlap[mode] = sum(2 * c.intersection for c in cases.values())
        result.volume[mode] = sum(c.volume_sum for c in cases.values())
        result.agg_dice[mode] = pooled_dice(result.overlap[mode], result.volume[mode])
    return result


# Cases of one shape are predicted together up to this many voxels: a batch of small volumes
# runs several times faster than one volume at a time on a CPU; a large volume still runs alone.
EVAL_PASS_VOXELS = 2**22


def _stacked(batches: Iterable[Mapping[str, Any]], max_voxels: int = EVAL_PASS_VOXELS) -> Iterator[dict[str, Any]]:
    """``batches`` merged along the batch axis where consecutive ones hold the same entries and
    image shape, each merge at most ``max_voxels`` image voxels (one batch may exceed it alone).
    Tensors are concatenated, per-row lists joined; the rows keep their order."""
    pending: list[Mapping[str, Any]] = []

    def merged() -> dict[str, Any]:
        if len(pending) == 1:
            return dict(pending[0])
        return {k: torch.cat([b[k] for b in pending]) if isinstance(pending[0][k], torch.Tensor)
                else [x for b in pending for x in b[k]] for k in pending[0]}

    for batch in batches:
        if pending and not _stackable(pending, batch, max_voxels):
            yield merged()
            pending = []
        pending.append(batch)
    if pending:
        yield merged()


def _stackable(pending: Sequence[Mapping[str, Any]], batch: Mapping[str, Any], max_voxels: int) -> bool:
    first = pending[0]
    if set(batch) != set(first) or batch["image"].shape[1:] != first["image"].shape[1:]:
        return False
    if not all(isinstance(batch[k], torch.Tensor) or isinstance(batch[k], (list, tuple)) for k in batch):
        return False
    return sum(_voxels(b) for b in pending) + _voxels(batch) <= max_voxels


def _voxels(batch: Mapping[str, Any]) -> int:
    image = batch["image"]
    return image.shape[0] * image[0, 0].numel()


def _metric_mean(scores: Iterable[float]) -> float:
    """Mean of per-case Dice as ``DiceMetric.aggregate()`` takes it (float32), the number
    sites have always reported; it differs from a float64 mean in the last float32 bits."""
    values = torch.tensor(list(scores), dtype=torch.float32)[:, None]
    return float(do_metric_reduction(values, "mean")[0].item())


def evaluate(
    model: SegmentationModel, loader: Iterable, modes: Sequence[str], device: str | torch.device = "cpu"
) -> EvalResult:
    """Mean foreground Dice per mode over whole volumes (:func:`evaluate_cases`, with its
    HD95, surface Dice and overlap counts), the summary a site reports."""
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
