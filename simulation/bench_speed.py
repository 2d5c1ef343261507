"""Speed and memory measurements of ``pemma bench``.

* :func:`speed_pair`: PEMMA-LoRA vs full fine-tuning (early fusion) of the same backbone on
  the same real CT+PET batch, each variant in a fresh Python process (this module run as
  ``python -m simulation.bench_speed``): seconds per training step (wall and process CPU),
  peak memory as the growth of ``ru_maxrss`` over the process after model build (CPU) or
  ``torch.cuda.max_memory_allocated`` (CUDA), the profiler's peak tensor bytes, and FLOPs.
* :func:`profile_before_after`: ``torch.profiler`` on one PEMMA-LoRA step with MONAI's own
  modules ("before") and with :func:`pemma_core.model.speed_up_monai_modules` ("after"),
  top operators, and interleaved step timings of both, for PEMMA and full fine-tuning.
* :func:`inference_timing`: sliding-window inference of one IBSI case, before/after.
* :func:`loading_timing`: data loading per case (cold / cached, ``measure_loading``) and
  per training batch (random crop and augmentation) against the step time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_SPEED_RESULT "
VARIANTS = {"pemma-lora": ("pemma", "lora"), "full-ft": ("early-fusion", "lora")}


# ----------------------------------------------------------------------------- helpers


def monai_reference(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with MONAI's original modules back in place of
    :func:`pemma_core.model.speed_up_monai_modules`' replacements (the "before" of the profile)."""
    from monai.networks.nets.swin_unetr import WindowAttention

    from pemma_core.model import ChannelInstanceNorm, SdpaWindowAttention

    reference = copy.deepcopy(model)
    for parent in list(reference.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ChannelInstanceNorm):
                setattr(parent, name, nn.InstanceNorm3d(child.num_features, eps=child.eps))
            elif type(child) is SdpaWindowAttention:
                child.__class__ = WindowAttention
    return reference


def make_step(model: nn.Module, batch: Mapping[str, Any], mode: str, device: torch.device,
              optimizer: torch.optim.Optimizer | None = None) -> Callable[[], float]:
    """One training step exactly as :func:`pemma_core.train.train_local` takes it (AdamW, DiceCE),
    with ``optimizer`` when given (default: AdamW at lr 1e-6 over the trainable tensors)."""
    from monai.losses import DiceCELoss

    from pemma_core.train import autocast

    model.to(device).train()
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.0)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    image, label = batch["image"].to(device), batch["label"].to(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = loss_fn(model(image, mode).float(), label)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def step_flops(model: nn.Module, batch: Mapping[str, Any], mode: str, device: torch.device) -> int:
    """FLOPs of one forward + backward (``torch.utils.flop_counter``), no optimiser step."""
    from monai.losses import DiceCELoss
    from torch.utils.flop_counter import FlopCounterMode

    model.to(device).train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss = DiceCELoss(to_onehot_y=True, softmax=True)(model(batch["image"].to(device), mode), batch["label"].to(device))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: kilobytes


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> tuple[int, str]:
    """Start a fresh peak-RSS window; returns (current RSS bytes, method).

    On Linux, writing 5 to ``/proc/self/clear_refs`` resets the high-water mark (VmHWM, which
    ``ru_maxrss`` reports) to the current RSS, so model building's transient peak is not
    counted; elsewhere the baseline is ``ru_maxrss`` itself."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        current = _status_kib("VmRSS")
        if current is not None:
            return current * 1024, "peak RSS (VmHWM, reset after model build) minus RSS after model build"
    except OSError:
        pass
    return _rss_bytes(), "ru_maxrss growth over the process after model build"


def peak_rss() -> int:
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else _rss_bytes()


# ----------------------------------------------------------------------------- worker


def worker(task: Mapping[str, Any]) -> dict[str, Any]:
    """One variant in this (fresh) process. ``task``: variant, backbone_file, batch_file,
    device, steps, threads."""
    from pemma_core.adapters import load_backbone
    from pemma_core.model import build_model, count_parameters
    from simulation.bench_core import profiled_step_peak

    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    device = torch.device(task["device"])
    kind, adapter = VARIANTS[task["variant"]]
    batch = torch.load(task["batch_file"], weights_only=False)
    backbone, spec = load_backbone(task["backbone_file"])
    torch.manual_seed(0)
    model = build_model(spec.with_(kind=kind, adapter=adapter), backbone)
    del backbone
    step = make_step(model, batch, "ctpet", device)
    total, trainable = count_parameters(model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline, rss_method = reset_peak_rss()
    timed(step, device)  # warm-up: optimiser state, allocator, oneDNN kernels
    times = [timed(step, device) for _ in range(int(task["steps"]))]
    out: dict[str, Any] = {
        "variant": task["variant"], "backbone": spec.backbone, "preset": spec.preset, "device": str(device),
        "threads": torch.get_num_threads(), "total_params": total, "trainable_params": trainable,
        "wall_seconds": [round(t[0], 4) for t in times], "cpu_seconds": [round(t[1], 4) for t in times],
        "seconds_per_step": statistics.median(t[0] for t in times),
        "cpu_seconds_per_step": statistics.median(t[1] for t in times),
    }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_memory_method"] = "torch.cuda.max_memory_allocated (warm-up + timed steps)"
    else:
        out["rss_baseline_bytes"] = baseline
        out["rss_peak_bytes"] = peak_rss()
        out["peak_memory_bytes"] = out["rss_peak_bytes"] - baseline
        out["peak_memory_method"] = rss_method + " (fresh process)"
        persistent = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        optimizer_state = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        out["tensor_peak_bytes"] = persistent + optimizer_state + profiled_step_peak(step)
    out["flops_per_step"] = step_flops(model, batch, "ctpet", device)
    return out


def run_worker(task: Mapping[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter; its result is the last ``RESULT_PREFIX`` line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if task.get("threads"):
        env["OMP_NUM_THREADS"] = str(task["threads"])
    proc = subprocess.run(
        [sys.executable, "-m", "simulation.bench_speed", "--task", json.dumps(dict(task))],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"speed worker {task.get('variant')} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def speed_pair(backbone_file: Path, batch_file: Path, device: str, steps: int, threads: int | None,
               say: Callable[[str], None]) -> dict[str, Any]:
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
                     say: Callable[[str], None]) -> dict[str, Any]:
    """:func:`speed_pair` at the ``paper`` preset, batch 1 of one real CT+PET 96^3 crop.

    The backbone is untrained (seed 0): step time and memory do not depend on the weights,
    and training a paper-size backbone is not possible in the bench's CPU budget. Its
    file (about 370 MB) is deleted afterwards."""
    from pemma_core.adapters import save_backbone
    from pemma_core.model import ModelSpec, build_backbone
    from simulation.bench_core import first_batch

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
    events = prof.key_averages()
    attr = "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events)
    out = [{"op": e.key, "self_ms": getattr(e, attr) / 1000.0, "share": getattr(e, attr) / total if total else 0.0,
            "calls": int(e.count)} for e in rows[:limit]]
    return out, total / 1000.0


def profile_before_after(backbone_file: Path, batch: Mapping[str, Any], device: str, reps: int,
                         say: Callable[[str], None]) -> dict[str, Any]:
    """Profile one PEMMA-LoRA ctpet step with MONAI's modules and with pemma's replacements;
    time both (and full fine-tuning both ways), interleaved, ``reps`` steps each."""
    from torch.profiler import ProfilerActivity, profile

    from pemma_core.adapters import load_backbone
    from pemma_core.model import build_model

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


def threads_timing(backbone_file: Path, batch: Mapping[str, Any], reps: int, say: Callable[[str], None]) -> dict[str, Any]:
    """PEMMA-LoRA step wall time with 1 intra-op thread vs all cores, interleaved (CPU only).
    On a machine whose cores other jobs also use, more threads can be much slower."""
    from pemma_core.adapters import load_backbone
    from pemma_core.model import build_model

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


def inference_timing(backbone_file: Path, case: Mapping[str, Any], device: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Sliding-window inference of one whole IBSI case (PEMMA-LoRA, ctpet): seconds with
    MONAI's modules and pemma's, and at overlaps 0.25 (the default) and 0."""
    import math

    from pemma_core.adapters import load_backbone
    from pemma_core.model import build_model
    from pemma_core.train import predict_volume

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
        _sync(dev)
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
                   say: Callable[[str], None]) -> dict[str, Any]:
    """``measure_loading`` on the pooled CT+PET cases, and seconds per training batch."""
    from pemma_core import data
    from pemma_core.site import load_site_config

    cfg = load_site_config(pooled_yaml)
    result = dict(data.measure_loading(cfg, n_cases))
    loader = data.train_loader(cfg, roi, batch_size=batch_size, seed=0)
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


# ----------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pemma bench speed worker (one variant in this process)")
    parser.add_argument("--task", required=True, help="JSON task (see simulation.bench_speed.worker)")
    args = parser.parse_args(argv)
    result = worker(json.loads(args.task))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
