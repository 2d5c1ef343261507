"""What the bench measures on one model: its training step (timed, profiled for memory,
counted in FLOPs), its size, and what it would upload per round.

The step is :func:`pemma_core.training.local.train_step`, the one optimiser step that
``train_local`` loops over, so the bench times what a site runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from pemma_core.model.factory import count_parameters
from pemma_core.model.pemma import SegmentationModel
from pemma_core.training.local import segmentation_loss, train_step

__all__ = [
    "make_step",
    "model_sizes",
    "profiled_step_peak",
    "step_flops",
    "step_peak_memory",
    "sync",
    "timed",
    "upload_bytes",
]


def make_step(model: SegmentationModel, batch: Mapping[str, Any], mode: str, device: torch.device,
              optimizer: torch.optim.Optimizer | None = None) -> Callable[[], float]:
    """One training step of ``model`` on ``batch`` in ``mode`` as a callable returning the loss
    (:func:`pemma_core.training.local.train_step`), with ``optimizer`` when given (default:
    AdamW at lr 1e-6 over the trainable tensors)."""
    model.to(device).train()
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.0)
    loss_fn = segmentation_loss()
    image, label = batch["image"].to(device), batch["label"].to(device)
    return lambda: train_step(model, image, label, mode, optimizer, loss_fn, device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall and process CPU seconds of one ``step()``."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def step_flops(model: nn.Module, batch: Mapping[str, Any], mode: str, device: torch.device) -> int:
    """FLOPs of one forward + backward (``torch.utils.flop_counter``), no optimiser step."""
    from torch.utils.flop_counter import FlopCounterMode

    model.to(device).train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss = segmentation_loss()(model(batch["image"].to(device), mode), batch["label"].to(device))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def profiled_step_peak(step: Callable[[], Any]) -> int:
    """Highest running total of CPU bytes allocated while ``step()`` runs (torch.profiler)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    best = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            best = max(best, int(event.extra_fields.total_allocated))
        stack.extend(event.children)
    return best


def step_peak_memory(model: SegmentationModel, batch: Mapping[str, Any], mode: str, device: str) -> dict[str, Any]:
    """Peak tensor memory of one training step in ``mode`` (optimiser state already allocated).

    CPU: parameters + buffers + optimiser state, plus the highest total of the bytes
    allocated during the profiled step (``torch.profiler`` allocation events, so other
    rows' leftovers and allocator caching do not count). CUDA: ``max_memory_allocated``."""
    dev = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    step = make_step(model, batch, mode, dev, optimizer)

    # Optimiser state without a warm-up step: one AdamW step on zero gradients allocates it
    # and leaves the weights unchanged (zero moments give a zero update; no weight decay).
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        peak = int(torch.cuda.max_memory_allocated(dev))
        method = "torch.cuda.max_memory_allocated over one training step"
    else:
        persistent = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        persistent += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t))
        peak = persistent + profiled_step_peak(step)
        method = "torch.profiler: params + buffers + optimiser state + peak bytes allocated in one step"
    optimizer.zero_grad(set_to_none=True)
    return {"peak_memory_bytes": peak, "peak_memory_method": method, "peak_memory_mode": mode}


def model_sizes(model: SegmentationModel) -> dict[str, Any]:
    """Total and trainable parameter counts and their ratio."""
    total, trainable = count_parameters(model)
    return {"total_params": total, "trainable_params": trainable, "trainable_fraction": trainable / total}


def upload_bytes(sizes: Mapping[str, Any]) -> int:
    """fp32 bytes one site would send per round if this model were trained federated:
    the trainable tensors (PEMMA: its adapters; a fully trained model: all of it)."""
    return int(sizes["trainable_params"]) * 4
