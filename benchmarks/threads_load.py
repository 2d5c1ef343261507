"""Training-step time at 1 and 2 intra-op threads, on idle cores and with another job keeping
one core busy: ``python -m benchmarks.threads_load [--preset tiny] [--steps 5] [--out FILE]``.

What :mod:`pemma_core.training.threads` rests on (BENCHMARKS.md, "Threads on a shared
machine"). The other job is a second Python process spinning on one core; the conditions
are interleaved (idle, busy, idle, busy), each the median of ``--steps`` timed steps after
one untimed one. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.measure import make_step, timed
from pemma_core.model.factory import build_model
from pemma_core.model.spec import ModelSpec, build_backbone
from pemma_core.training.threads import available_cores

__all__ = ["main", "measure"]

BUSY = "while True: pass"


def _median_step(step, steps: int) -> float:
    step()
    return statistics.median(timed(step, torch.device("cpu"))[0] for _ in range(steps))


def measure(preset: str = "tiny", steps: int = 5, repeats: int = 2) -> dict:
    """Median step seconds per (condition, threads), ``repeats`` interleaved passes."""
    torch.manual_seed(0)
    spec = ModelSpec(preset=preset)
    model = build_model(spec, build_backbone(spec))
    size = spec.roi_size
    batch = {"image": torch.randn(2, 2, *size), "label": (torch.rand(2, 1, *size) > 0.9).long()}
    step = make_step(model, batch, "ctpet", torch.device("cpu"))
    before = torch.get_num_threads()
    load_at_start = list(os.getloadavg())
    rows = []
    try:
        for repeat in range(repeats):
            for condition in ("idle", "one core busy"):
                other = subprocess.Popen([sys.executable, "-c", BUSY]) if condition != "idle" else None
                try:
                    time.sleep(0.5 if other else 0.0)
                    for threads in (1, 2):
                        torch.set_num_threads(threads)
                        rows.append({"repeat": repeat, "condition": condition, "threads": threads,
                                     "step_seconds": _median_step(step, steps)})
                finally:
                    if other is not None:
                        other.kill()
                        other.wait()
    finally:
        torch.set_num_threads(before)
    return {"preset": preset, "steps": steps, "cores": available_cores(), "platform": platform.platform(),
            "processor": platform.processor(), "load_average_start": load_at_start,
            "load_average_end": list(os.getloadavg()), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.threads_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the result as JSON here (refused if it exists)")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists():
        parser.error(f"{args.out} exists: refusing to write over it")
    result = measure(args.preset, args.steps)
    for row in result["rows"]:
        print(f"pass {row['repeat']}  {row['condition']:13}  {row['threads']} thread(s)  {row['step_seconds']:.3f} s/step")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
