"""The server's cost of one round for many sites, on paper (BENCHMARKS.md, "Server cost per round for many sites").

One :func:`pemma_core.aggregation.aggregate_round` (validation, outlier bound with the default
``outlier_factor`` 5, per-site allowances, per-group example-weighted mean) over N synthetic site
updates of the real adapter tensors (names, shapes, groups) of a model preset, each site sending
every group with its own random float32 delta. Measured per N: wall seconds, and the peak of the
memory the round allocates on top of the updates it is given (tracemalloc, in a second run so
that tracing does not slow the timed one). An N whose updates would not fit in the machine's
available memory with a margin is not run; it is extrapolated linearly from the two largest
measured N and labelled so.

    python -m benchmarks.scale --out DIR            # paper-size UNETR LoRA, N = 16, 64, 256, 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pemma_core.aggregation import Allowance, SiteUpdate, aggregate_round

__all__ = [
    "DEFAULT_SITES",
    "MEMORY_FACTOR",
    "adapter_layout",
    "adapter_bytes",
    "synthetic_updates",
    "allowances_for",
    "fits",
    "measure_round",
    "scale_table",
    "main",
]

DEFAULT_SITES = (16, 64, 256, 1024)
OUTLIER_FACTOR = 5.0  # the server's default (pemma_core.config.run)
# Bytes needed per byte of float32 updates held: the updates themselves, their float64 deltas while
# each is validated (transient, one site at a time) and slack for the allocator: a deliberately loose bound.
MEMORY_FACTOR = 3.0
MARGIN = 0.5  # use at most this share of the available memory


def adapter_layout(backbone: str = "unetr", preset: str = "paper", adapter: str = "lora") -> tuple[
        dict[str, np.ndarray], dict[str, str]]:
    """The global adapter state (float32 arrays by tensor name) and each tensor's parameter group."""
    from pemma_core.model.factory import build_model
    from pemma_core.model.files import trainable_state
    from pemma_core.model.spec import ModelSpec

    model = build_model(ModelSpec(backbone=backbone, preset=preset, adapter=adapter))
    state = {name: tensor.numpy().astype(np.float32) for name, tensor in trainable_state(model).items()}
    return state, dict(model.param_groups)


def adapter_bytes(state: Mapping[str, np.ndarray], itemsize: int = 4) -> int:
    """Bytes of one full update of ``state`` at ``itemsize`` bytes per element (4: float32, 2: float16)."""
    return sum(int(array.size) for array in state.values()) * itemsize


def synthetic_updates(state: Mapping[str, np.ndarray], groups: Mapping[str, str], sites: int, seed: int = 0,
                      step: float = 1e-3) -> list[SiteUpdate]:
    """``sites`` updates sending every tensor: global + a float32 N(0, ``step``^2) delta of their own,
    and 8 to 64 examples per group (unequal weights in the mean)."""
    sent = sorted(set(groups.values()))
    updates = []
    for index in range(sites):
        rng = np.random.default_rng([seed, index])
        tensors = {name: array + step * rng.standard_normal(array.shape, dtype=np.float32) for name, array in state.items()}
        updates.append(SiteUpdate(f"site-{index:05d}", tensors, {g: int(rng.integers(8, 65)) for g in sent}))
    return updates


def allowances_for(updates: Sequence[SiteUpdate]) -> dict[str, Allowance]:
    """What a server roster would allow each site: its groups, its counts as the weight caps."""
    return {u.site: Allowance(groups=frozenset(u.examples), max_examples=max(u.examples.values()),
                              weight_cap=dict(u.examples)) for u in updates}


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux); elsewhere the total physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits(sites: int, update_bytes: int, available: int) -> bool:
    """Whether ``sites`` float32 updates of ``update_bytes`` each fit with the margin (see MEMORY_FACTOR)."""
    return sites * update_bytes * MEMORY_FACTOR <= MARGIN * available


def measure_round(state: Mapping[str, np.ndarray], groups: Mapping[str, str], sites: int,
                  seed: int = 0) -> dict[str, Any]:
    """Seconds and peak extra memory of one ``aggregate_round`` over ``sites`` synthetic updates."""
    built = time.perf_counter()
    updates = synthetic_updates(state, groups, sites, seed)
    allowances = allowances_for(updates)
    build_seconds = time.perf_counter() - built

    def one_round() -> Any:
        return aggregate_round(state, updates, groups, allowances=allowances, outlier_factor=OUTLIER_FACTOR)

    started = time.perf_counter()
    outcome = one_round()
    seconds = time.perf_counter() - started
    if len(outcome.accepted) != sites or not outcome.aggregated:  # a benchmark of a round that dropped sites is wrong
        raise RuntimeError(f"N={sites}: {len(outcome.rejected)} synthetic update(s) rejected: "
                           f"{outcome.rejected[:1]}")
    del outcome
    tracemalloc.start()
    one_round()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = sum(array.nbytes for u in updates for array in u.tensors.values())
    return {"sites": sites, "seconds": seconds, "peak_round_mib": peak / 2**20, "held_updates_mib": held / 2**20,
            "build_seconds": build_seconds, "measured": True}


def _extrapolated(rows: Sequence[Mapping[str, Any]], sites: int) -> dict[str, Any]:
    """Linear in N through the two largest measured rows (labelled ``measured: False``)."""
    measured = sorted((r for r in rows if r["measured"]), key=lambda r: r["sites"])[-2:]
    if len(measured) < 2:
        raise RuntimeError(f"N={sites} does not fit and fewer than two smaller N were measured to extrapolate from")
    (a, b) = measured
    out: dict[str, Any] = {"sites": sites, "measured": False}
    for key in ("seconds", "peak_round_mib", "held_updates_mib"):
        slope = (b[key] - a[key]) / (b["sites"] - a["sites"])
        out[key] = b[key] + slope * (sites - b["sites"])
    return out


def scale_table(state: Mapping[str, np.ndarray], groups: Mapping[str, str], sites: Sequence[int],
                available: int | None = None, say: Any = print) -> dict[str, Any]:
    """Measure (or, where it would not fit, extrapolate) every N of ``sites``; the JSON-ready result."""
    available = available_bytes() if available is None else available
    one_update = adapter_bytes(state)
    rows: list[dict[str, Any]] = []
    skipped = []
    for n in sorted(sites):
        if not fits(n, one_update, available):
            say(f"N={n}: {n} x {one_update / 2**20:.2f} MiB x {MEMORY_FACTOR:g} would exceed "
                f"{MARGIN:.0%} of the {available / 2**30:.1f} GiB available: not run, extrapolated")
            skipped.append(n)
            continue
        rows.append(measure_round(state, groups, n))
        say(f"N={n}: {rows[-1]['seconds']:.2f} s, peak {rows[-1]['peak_round_mib']:.1f} MiB")
    rows += [_extrapolated(rows, n) for n in skipped]
    for row in rows:
        row["bytes_up_float32"] = row["sites"] * one_update
        row["bytes_up_float16"] = row["sites"] * adapter_bytes(state, 2)
    return {
        "tensors": len(state),
        "elements": sum(int(a.size) for a in state.values()),
        "group_elements": {g: sum(int(state[n].size) for n in state if groups[n] == g) for g in sorted(set(groups.values()))},
        "update_bytes_float32": one_update,
        "update_bytes_float16": adapter_bytes(state, 2),
        "available_bytes": available,
        "outlier_factor": OUTLIER_FACTOR,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "rows": sorted(rows, key=lambda r: r["sites"]),
    }


def format_table(result: Mapping[str, Any]) -> str:
    """The Markdown table of :func:`scale_table`'s result."""
    lines = ["| N sites | seconds | peak MiB of the round | MiB of updates held | MiB up per round float32 / float16 | |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['sites']} | {r['seconds']:.2f} | {r['peak_round_mib']:.1f} | {r['held_updates_mib']:.0f} | "
                     f"{r['bytes_up_float32'] / 2**20:.0f} / {r['bytes_up_float16'] / 2**20:.0f} | "
                     f"{'measured' if r['measured'] else 'extrapolated (linear)'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for scale.json")
    parser.add_argument("--sites", type=int, nargs="+", default=list(DEFAULT_SITES), help="the N to measure")
    parser.add_argument("--preset", default="paper", help="model preset (paper, small, tiny)")
    args = parser.parse_args(argv)
    if min(args.sites) < 1:
        parser.error(f"--sites must be positive, got {args.sites}")
    state, groups = adapter_layout(preset=args.preset)
    print(f"unetr/{args.preset} + lora: {len(state)} tensors, {adapter_bytes(state) / 2**20:.2f} MiB per update (float32)")
    result = {"backbone": "unetr", "preset": args.preset, "adapter": "lora", **scale_table(state, groups, args.sites)}
    print(format_table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'scale.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
