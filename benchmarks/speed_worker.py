"""One speed variant (PEMMA-LoRA or full fine-tuning) in a fresh Python process, so that its
peak memory is its own: ``python -m benchmarks.speed_worker --task JSON``.

Peak memory on CPU is the growth of the process's peak RSS over its RSS after the model
is built; on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import make_step, profiled_step_peak, step_flops, timed
from pemma_core.model.factory import build_model, count_parameters
from pemma_core.model.files import load_backbone

__all__ = ["RESULT_PREFIX", "VARIANTS", "main", "reset_peak_rss", "run_worker", "worker"]

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_SPEED_RESULT "
VARIANTS = {"pemma-lora": ("pemma", "lora"), "full-ft": ("early-fusion", "lora")}  # variant -> (kind, adapter)


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


def _peak_rss() -> int:
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else _rss_bytes()


def worker(task: Mapping[str, Any]) -> dict[str, Any]:
    """One variant in this (fresh) process. ``task``: variant, backbone_file, batch_file,
    device, steps, threads."""
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
        out["rss_peak_bytes"] = _peak_rss()
        out["peak_memory_bytes"] = out["rss_peak_bytes"] - baseline
        out["peak_memory_method"] = rss_method + " (fresh process)"
        persistent = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        optimizer_state = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        out["tensor_peak_bytes"] = persistent + optimizer_state + profiled_step_peak(step)
    out["flops_per_step"] = step_flops(model, batch, "ctpet", device)
    return out


def run_worker(task: Mapping[str, Any], timeout: float = 3600.0, module: str = "benchmarks.speed_worker",
               flag: str = "--task") -> dict[str, Any]:
    """Run ``module``'s worker (``python -m MODULE FLAG JSON``) in a fresh interpreter; its result is
    the last ``RESULT_PREFIX`` line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if task.get("threads"):
        env["OMP_NUM_THREADS"] = str(task["threads"])
    proc = subprocess.run(
        [sys.executable, "-m", module, flag, json.dumps(dict(task))],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"{module} worker {task.get('variant')} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pemma bench speed worker (one variant in this process)")
    parser.add_argument("--task", required=True, help="JSON task (see benchmarks.speed_worker.worker)")
    args = parser.parse_args(argv)
    result = worker(json.loads(args.task))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
