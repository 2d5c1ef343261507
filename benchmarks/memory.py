"""Peak training memory and step time of full fine-tuning, PEMMA, and PEMMA with
``ModelSpec.checkpointing``, side by side:
``python -m benchmarks.memory [--backbone unetr|swin-unetr|both] [--steps N] [--out DIR]``.

Each variant runs in a fresh Python process (``--worker``), measured as
:mod:`benchmarks.speed_worker` measures its pair: peak RSS over the warm-up and timed steps
(VmHWM reset once the model is built) minus the RSS after building it, the profiler's tensor
peak (params + buffers + optimiser state + peak bytes allocated in one step), and the median
wall / CPU seconds of the timed steps. Small preset, batch 2, mode ctpet, one intra-op thread
by default. The backbone is untrained (seed 0) and the batch synthetic (seed 0): step time
and memory depend on shapes, not values.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.speed_worker import RESULT_PREFIX, run_worker

__all__ = ["TARGETS", "VARIANTS", "machine", "main", "measure_backbone", "run_variant", "worker"]

REPO = Path(__file__).resolve().parents[1]
# variant -> ModelSpec changes on the PEMMA-LoRA spec; the first is the reference of every ratio
VARIANTS: dict[str, dict[str, Any]] = {
    "full-ft": {"kind": "early-fusion"},
    "pemma-lora": {},
    "pemma-lora+checkpointing": {"checkpointing": True},
}
REFERENCE = "full-ft"
TARGETS = {"memory_ratio": 0.6, "time_ratio": 0.9}  # of the checkpointing variant vs full fine-tuning
DEFAULT_OUT = REPO / "benchmarks" / "results" / "memory"


def machine() -> dict[str, Any]:
    """What ran the numbers: CPU model (``/proc/cpuinfo``), cores, load, library versions."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model, "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
    }


def _batch(roi: tuple[int, int, int], batch_size: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, 2, *roi, generator=g)
    label = (torch.rand(batch_size, 1, *roi, generator=g) > 0.9).float()
    return {"image": image, "label": label}


def worker(task: Mapping[str, Any]) -> dict[str, Any]:
    """One variant in this (fresh) process. ``task``: variant, backbone, preset, batch_size, steps, threads."""
    import torch

    from benchmarks.measure import make_step, profiled_step_peak, timed
    from benchmarks.speed_worker import _peak_rss, reset_peak_rss
    from pemma_core.model.factory import build_model, count_parameters
    from pemma_core.model.spec import ModelSpec, build_backbone

    torch.set_num_threads(int(task["threads"]))
    device = torch.device("cpu")
    spec = ModelSpec(backbone=task["backbone"], preset=task["preset"])
    torch.manual_seed(0)
    backbone = build_backbone(spec)
    torch.manual_seed(0)
    model = build_model(spec.with_(**VARIANTS[task["variant"]]), backbone)
    del backbone
    batch = _batch(spec.roi_size, int(task["batch_size"]))
    step = make_step(model, batch, "ctpet", device)
    total, trainable = count_parameters(model)
    gc.collect()
    baseline, rss_method = reset_peak_rss()
    timed(step, device)  # warm-up: optimiser state, allocator, oneDNN kernels
    times = [timed(step, device) for _ in range(int(task["steps"]))]
    rss_peak = _peak_rss()
    persistent = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    optimizer_state = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "variant": task["variant"], "backbone": spec.backbone, "preset": spec.preset,
        "batch_size": int(task["batch_size"]), "mode": "ctpet", "threads": torch.get_num_threads(),
        "spec": json.loads(model.spec.to_json()), "total_params": total, "trainable_params": trainable,
        "wall_seconds": [round(t[0], 4) for t in times], "cpu_seconds": [round(t[1], 4) for t in times],
        "seconds_per_step": statistics.median(t[0] for t in times),
        "cpu_seconds_per_step": statistics.median(t[1] for t in times),
        "rss_baseline_bytes": baseline, "rss_peak_bytes": rss_peak, "peak_memory_bytes": rss_peak - baseline,
        "peak_memory_method": rss_method + " (fresh process)",
        "tensor_peak_bytes": persistent + optimizer_state + profiled_step_peak(step),
        "tensor_peak_method": "params + buffers + optimiser state + torch.profiler peak bytes allocated in one step",
    }


def run_variant(task: Mapping[str, Any], timeout: float = 1800.0) -> dict[str, Any]:
    """:func:`worker` in a fresh interpreter (``speed_worker.run_worker``'s way)."""
    return run_worker(task, timeout, module="benchmarks.memory", flag="--worker")


def measure_backbone(backbone: str, steps: int, threads: int = 1, preset: str = "small",
                     batch_size: int = 2) -> dict[str, Any]:
    """Every variant of ``backbone``, one fresh process each, and its ratios to full fine-tuning."""
    variants: dict[str, Any] = {}
    for variant in VARIANTS:
        task = {"variant": variant, "backbone": backbone, "preset": preset, "batch_size": batch_size,
                "steps": steps, "threads": threads}
        variants[variant] = r = run_variant(task)
        print(f"  {backbone} {variant}: {r['seconds_per_step']:.2f} s/step, "
              f"peak {r['peak_memory_bytes'] / 2**20:.0f} MiB "
              f"(tensor {r['tensor_peak_bytes'] / 2**20:.0f} MiB)", flush=True)
    ref = variants[REFERENCE]
    for r in variants.values():
        r["memory_ratio"] = r["peak_memory_bytes"] / max(1, ref["peak_memory_bytes"])
        r["tensor_memory_ratio"] = r["tensor_peak_bytes"] / max(1, ref["tensor_peak_bytes"])
        r["time_ratio"] = r["seconds_per_step"] / ref["seconds_per_step"]
        r["cpu_time_ratio"] = r["cpu_seconds_per_step"] / ref["cpu_seconds_per_step"]
    ck = variants["pemma-lora+checkpointing"]
    targets = {
        "memory_ratio": {"value": ck["memory_ratio"], "at_most": TARGETS["memory_ratio"],
                         "met": ck["memory_ratio"] <= TARGETS["memory_ratio"]},
        "tensor_memory_ratio": {"value": ck["tensor_memory_ratio"], "at_most": TARGETS["memory_ratio"],
                                "met": ck["tensor_memory_ratio"] <= TARGETS["memory_ratio"]},
        "time_ratio": {"value": ck["time_ratio"], "at_most": TARGETS["time_ratio"],
                       "met": ck["time_ratio"] <= TARGETS["time_ratio"]},
    }
    return {"backbone": backbone, "preset": preset, "batch_size": batch_size, "steps": steps, "threads": threads,
            "variants": variants, "targets": targets}


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table: every variant of every backbone with its ratios to full fine-tuning."""
    lines = [
        "| backbone | variant | trainable | s / step (wall) | x full | CPU s / step | peak memory (RSS) | x full "
        "| tensor peak | x full |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for backbone, res in results.items():
        for name, r in res["variants"].items():
            lines.append(
                f"| {backbone} | {name} | {r['trainable_params']:,} | {r['seconds_per_step']:.2f} "
                f"| {r['time_ratio']:.3f} | {r['cpu_seconds_per_step']:.2f} "
                f"| {r['peak_memory_bytes'] / 2**20:,.0f} MiB | {r['memory_ratio']:.3f} "
                f"| {r['tensor_peak_bytes'] / 2**20:,.0f} MiB | {r['tensor_memory_ratio']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=("unetr", "swin-unetr", "both"), default="both")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON folder (default {DEFAULT_OUT})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    backbones = ("unetr", "swin-unetr") if args.backbone == "both" else (args.backbone,)
    host = machine()
    print(f"machine: {host['cpu_model']}, {host['cores']} cores, load {host['load_average'][0]:.2f}; "
          f"torch {host['torch']}, {args.threads} thread(s); small preset, batch 2, mode ctpet, "
          f"median of {args.steps} step(s) after 1 warm-up", flush=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    results = {b: measure_backbone(b, args.steps, args.threads) for b in backbones}
    print(table(results))
    for b, res in results.items():
        t = res["targets"]
        print(f"{b} with checkpointing: memory x{t['memory_ratio']['value']:.3f} (<= {TARGETS['memory_ratio']}: "
              f"{'met' if t['memory_ratio']['met'] else 'missed'}; tensor x{t['tensor_memory_ratio']['value']:.3f}), "
              f"step time x{t['time_ratio']['value']:.3f} (<= {TARGETS['time_ratio']}: "
              f"{'met' if t['time_ratio']['met'] else 'missed'})")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "memory.json"
    command = ["python", "-m", "benchmarks.memory", *(argv if argv is not None else sys.argv[1:])]
    path.write_text(json.dumps({"started": started, "machine": {**host, "load_average_end": list(os.getloadavg())},
                                "command": command,
                                "results": results, "table": table(results)}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
