"""Speed and memory of ``pemma bench`` beyond the rows' own numbers.

* :func:`speed_pair`: PEMMA-LoRA vs full fine-tuning (early fusion) of the same backbone on
  the same real CT+PET batch, each variant in a fresh Python process
  (:mod:`benchmarks.speed_worker`): seconds per training step (wall and process CPU), peak
  memory, the profiler's peak tensor bytes, and FLOPs.
* :func:`profile_before_after`: ``torch.profiler`` on one PEMMA-LoRA step with MONAI's own
  modules ("before", :func:`monai_reference`) and with pemma's replacements
  (:func:`pemma_core.model.monai_speed.speed_up_monai_modules`, "after"), top operators, and
  interleaved step timings of both, for PEMMA and full fine-tuning.
* :func:`threads_timing`: one intra-op thread against all cores.
* :func:`inference_timing`: sliding-window inference of one IBSI case, before/after.
* :func:`loading_timing`: data loading per case (cold / cached,
  :func:`benchmarks.loading.measure_loading`) and per training batch.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn
from torch.profiler import ProfilerActivity, profile

from benchmarks.config import Say
from benchmarks.loading import measure_loading
from benchmarks.measure import make_step, sync, timed
from benchmarks.sites import first_batch
from benchmarks.speed_worker import VARIANTS, run_worker
from pemma_core.config.site import load_site_config
from pemma_core.data.pipeline import train_loader
from pemma_core.model.factory import build_model
from pemma_core.model.files import load_backbone, save_backbone
from pemma_core.model.monai_speed import ChannelInstanceNorm, SdpaWindowAttention
from pemma_core.model.spec import ModelSpec, build_backbone
from pemma_core.training.local import predict_volume

__all__ = [
    "inference_timing",
    "loading_timing",
    "monai_reference",
    "paper_speed_pair",
    "profile_before_after",
    "speed_pair",
    "threads_timing",
]


def monai_reference(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with MONAI's original modules back in place of
    :func:`pemma_core.model.monai_speed.speed_up_monai_modules`' replacements (the "before" of the profile)."""
    reference = copy.deepcopy(model)
    for parent in list(reference.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ChannelInstanceNorm):
                setattr(parent, name, nn.InstanceNorm3d(child.num_features, eps=child.eps))
            elif type(child) is SdpaWindowAttention:
                child.__class__ = WindowAttention
    return reference


def speed_pair(backbone_file: Path, batch_file: Path, device: str, steps: int, threads: int | None,
               say: Say) -> dict[str, Any]:
    """PEMMA-LoRA vs full fine-tuning, fresh process each; ratios PEMMA / full."""
    results = {}
    for variant in VARIANTS:
        results[variant] = run_worker({"variant": variant, "backbone_file": str(backbone_file), "batch_file": str(batch_file),
                                       "device": device, "steps": steps, "threads": threads})
        r = results[variant]
        say(f"speed {variant}: {r['seconds_per_step']:.2f} s/step (CPU {r['cpu_seconds_per_step']:.2f} s), "
            f"peak {r['peak_memory_bytes'] / 2**20:.0f} MiB, {r['flops_per_step'] / 1e9:.0f} GFLOP")
    p, f = results["pemma-lora"], results["full-ft"]
    ratios = {
        "time_ratio": p["seconds_per_step"] / f["seconds_per_step"],
        "cpu_time_ratio": p["cpu_seconds_per_step"] / f["cpu_seconds_per_step"],
        "memory_ratio": p["peak_memory_bytes"] / max(1, f["peak_memory_bytes"]),
        "flops_ratio": p["flops_per_step"] / max(1, f["flops_per_step"]),
    }
    if "tensor_peak_bytes" in p:
        ratios["tensor_memory_ratio"] = p["tensor_peak_bytes"] / max(1, f["tensor_peak_bytes"])
    return {"variants": results, **ratios}


def paper_speed_pair(out: Path, backbone_name: str, pooled_yaml: Path, device: str, steps: int, threads: int | None,
                     say: Say) -> dict[str, Any]:
    """:func:`speed_pair` at the ``paper`` preset, batch 1 of one real CT+PET 96^3 crop.

    The backbone is untrained (seed 0): step time and memory do not depend on the weights,
    and training a paper-size backbone is not possible in the bench's CPU budget. Its
    file is deleted afterwards."""
    spec = ModelSpec(backbone=backbone_name, preset="paper")
    torch.manual_seed(0)
    backbone_file = out / "backbones" / f"{backbone_name}-paper-untrained.safetensors"
    save_backbone(backbone_file, build_backbone(spec), spec,
                  provenance={"phase": "pemma bench speed and memory only (untrained)"})
    batch = first_batch(pooled_yaml, spec.roi_size, 1, 0)
    batch_file = out / f"speed-batch-{backbone_name}-paper.pt"
    torch.save({"image": batch["image"], "label": batch["label"]}, batch_file)
    try:
        result = speed_pair(backbone_file, batch_file, device, steps, threads, lambda t: say(f"paper preset: {t}"))
    finally:
        backbone_file.unlink(missing_ok=True)
    return {**result, "preset": "paper", "batch_size": 1, "roi": list(spec.roi_size)}


# ----------------------------------------------------------------------------- profiling


def top_operators(prof: Any, limit: int = 10) -> tuple[list[dict[str, Any]], float]:
    """The ``limit`` operators with the most self CPU time, and the profiled total (ms)."""
    events = prof.key_averages()
    attr = "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events)
    out = [{"op": e.key, "self_ms": getattr(e, attr) / 1000.0, "share": getattr(e, attr) / total if total else 0.0,
            "calls": int(e.count)} for e in rows[:limit]]
    return out, total / 1000.0


def profile_before_after(backbone_file: Path, batch: Mapping[str, Any], device: str, reps: int,
                         say: Say) -> dict[str, Any]:
    """Profile one PEMMA-LoRA ctpet step with MONAI's modules and with pemma's replacements;
    time both (and full fine-tuning both ways), interleaved, ``reps`` steps each."""
    dev = torch.device(device)
    backbone, spec = load_backbone(backbone_file)
    out: dict[str, Any] = {"backbone": spec.backbone, "preset": spec.preset}
    for variant, (kind, adapter) in VARIANTS.items():
        torch.manual_seed(0)
        after = build_model(spec.with_(kind=kind, adapter=adapter), backbone)
        before = monai_reference(after)
        steps = {"before": make_step(before, batch, "ctpet", dev), "after": make_step(after, batch, "ctpet", dev)}
        for step in steps.values():
            step()  # warm-up
        times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
        for _ in range(reps):
            for name, step in steps.items():
                times[name].append(timed(step, dev))
        entry: dict[str, Any] = {}
        for name in ("before", "after"):
            entry[name] = {"seconds_per_step": statistics.median(t[0] for t in times[name]),
                           "cpu_seconds_per_step": statistics.median(t[1] for t in times[name])}
        if variant == "pemma-lora":
            for name, step in steps.items():
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
                with profile(activities=activities) as prof:
                    step()
                ops, total_ms = top_operators(prof)
                copy_ms = sum(e.self_cpu_time_total for e in prof.key_averages()
                              if e.key in ("aten::copy_", "aten::clone", "torch::autograd::CopySlices")) / 1000.0
                attention_ms = sum(e.self_cpu_time_total for e in prof.key_averages()
                                   if e.key in ("aten::bmm", "aten::_softmax", "aten::_softmax_backward_data")) / 1000.0
                entry[name].update({"top_ops": ops, "profiled_cpu_ms": total_ms, "copy_ms": copy_ms,
                                    "explicit_attention_ms": attention_ms})
        entry["time_ratio_after_before"] = entry["after"]["seconds_per_step"] / entry["before"]["seconds_per_step"]
        entry["cpu_ratio_after_before"] = entry["after"]["cpu_seconds_per_step"] / entry["before"]["cpu_seconds_per_step"]
        out[variant] = entry
        say(f"profile {variant}: {entry['before']['cpu_seconds_per_step']:.2f} -> {entry['after']['cpu_seconds_per_step']:.2f} "
            f"CPU s/step with pemma's module swaps (x{entry['cpu_ratio_after_before']:.2f})")
        del before, after, steps
        gc.collect()
    return out


def threads_timing(backbone_file: Path, batch: Mapping[str, Any], reps: int, say: Say) -> dict[str, Any]:
    """PEMMA-LoRA step wall time with 1 intra-op thread vs all cores, interleaved (CPU only).
    On a machine whose cores other jobs also use, more threads can be much slower."""
    cores = os.cpu_count() or 1
    original = torch.get_num_threads()
    backbone, spec = load_backbone(backbone_file)
    torch.manual_seed(0)
    step = make_step(build_model(spec, backbone), batch, "ctpet", torch.device("cpu"))
    step()
    times: dict[int, list[float]] = {1: [], cores: []}
    try:
        for _ in range(reps):
            for n in times:
                torch.set_num_threads(n)
                times[n].append(timed(step, torch.device("cpu"))[0])
    finally:
        torch.set_num_threads(original)
    out = {"cores": cores, "load_average": list(os.getloadavg()),
           "seconds_per_step": {str(n): statistics.median(v) for n, v in times.items()}}
    say(f"threads: PEMMA-LoRA step {out['seconds_per_step']['1']:.2f} s with 1 thread, "
        f"{out['seconds_per_step'][str(cores)]:.2f} s with {cores} (load average {out['load_average'][0]:.1f})")
    return out


# ----------------------------------------------------------------------------- inference and loading


def inference_timing(backbone_file: Path, case: Mapping[str, Any], device: str, say: Say) -> dict[str, Any]:
    """Sliding-window inference of one whole IBSI case (PEMMA-LoRA, ctpet): seconds with
    MONAI's modules and pemma's, and at overlaps 0.25 (the default) and 0."""
    backbone, spec = load_backbone(backbone_file)
    model = build_model(spec, backbone).eval()
    before = monai_reference(model).eval()
    dev = torch.device(device)
    image = case["image"]
    roi = spec.roi_size[0]

    def windows(overlap: float) -> int:
        step = max(1, int(roi * (1 - overlap)))
        return math.prod(math.ceil((max(s, roi) - roi) / step) + 1 for s in image.shape[2:])

    def seconds(m: nn.Module, overlap: float) -> float:
        start = time.perf_counter()
        predict_volume(m, image, "ctpet", dev, overlap=overlap)
        sync(dev)
        return time.perf_counter() - start

    window = image[..., :roi, :roi, :roi]
    if min(window.shape[2:]) == roi:  # warm-up on one window (oneDNN kernels, allocator)
        for m in (before, model):
            predict_volume(m, window, "ctpet", dev)
    out = {
        "case_id": str(case["case_id"][0]), "grid_shape": list(image.shape[2:]), "roi": roi,
        "seconds_before": seconds(before, 0.25), "seconds_after": seconds(model, 0.25),
        "seconds_after_overlap_0": seconds(model, 0.0),
        "windows_overlap_0.25": windows(0.25), "windows_overlap_0": windows(0.0),
    }
    say(f"inference {out['case_id']} {tuple(out['grid_shape'])}: {out['seconds_before']:.2f} s (MONAI modules) -> "
        f"{out['seconds_after']:.2f} s; overlap 0: {out['seconds_after_overlap_0']:.2f} s")
    return out


def loading_timing(pooled_yaml: Path, roi: tuple[int, int, int], batch_size: int, n_cases: int, batches: int,
                   say: Say) -> dict[str, Any]:
    """``measure_loading`` on the pooled CT+PET cases, and seconds per training batch."""
    cfg = load_site_config(pooled_yaml)
    result = dict(measure_loading(cfg, n_cases))
    loader = train_loader(cfg, roi, batch_size=batch_size, seed=0)
    it = iter(loader)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
        times.append(time.perf_counter() - start)
    result["train_batch_seconds"] = statistics.median(times)
    say(f"loading: {result['first_load_s_per_case']:.2f} s/case cold, {result['cached_load_s_per_case']:.3f} s/case cached; "
        f"{result['train_batch_seconds']:.3f} s per training batch (crop + augmentation)")
    return result
