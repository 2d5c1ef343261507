"""Secure aggregation and DP-SGD on IBSI: what they cost (BENCHMARKS.md, "Privacy on IBSI").

One CT backbone (the bench's, trained first), then the bench's federated row
(:func:`benchmarks.federated.run_federated`: PEMMA-LoRA, the three IBSI sites, Flower's
simulation engine) once per variant, side by side in one process on one machine:

* ``plain``: the product defaults;
* ``secure``: ``secure-aggregation = true`` (bytes up and seconds per round against plain);
* ``dp-<eps>``: patient-level DP-SGD at each epsilon (delta 1e-5, clip 1), plain aggregation.

Every option of ``pemma bench`` applies (budget, test cases, preset...); the default is the
quick budget. Results: ``OUT/privacy.json`` and a table on stdout.

    python -m benchmarks.privacy --data-root /work/shared/data/ibsi-sts --out OUT --epsilons 1 4 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.cli import add_arguments
from benchmarks.config import config_from_args
from benchmarks.federated import run_federated
from benchmarks.many_sites import machine
from benchmarks.rows import BackboneBench
from benchmarks.sites import load_test_batches, prepare_sites
from pemma_core.modes import MODES


def variants(epsilons: list[float]) -> list[tuple[str, dict[str, Any]]]:
    return [("plain", {}), ("secure", {"fed_secure": True}),
            *[(f"dp-{eps:g}", {"fed_dp_epsilon": float(eps)}) for eps in epsilons]]


def summary(name: str, row: dict[str, Any]) -> dict[str, Any]:
    rounds = [s for s in row.get("round_wall_seconds", []) if s is not None]
    return {
        "variant": name, "dice": row["dice"], "per_case": row.get("per_case"),
        "bytes_up_per_round": row["bytes_up_per_round"], "round_wall_seconds": row.get("round_wall_seconds"),
        "round_train_wall_seconds": row.get("round_train_wall_seconds"),
        "mean_round_wall_seconds": sum(rounds) / len(rounds) if rounds else None,
        "train_seconds": row["train_seconds"], "dp": row.get("dp"), "secure_aggregation": row.get("secure_aggregation"),
        "sites_failed": row.get("sites_failed"), "wall_seconds": row["wall_seconds"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    plain = next(r for r in rows if r["variant"] == "plain")
    lines = ["| variant | Dice " + " / ".join(MODES) + " | epsilon spent (max over sites) | bytes up / round | "
             "x plain | s / round | x plain |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = max((e for e in (r["dp"] or {}).get("epsilon_spent", {}).values() if e is not None), default=None)
        dice = " / ".join(f"{r['dice'].get(m, float('nan')):.3f}" for m in MODES)
        lines.append(f"| {r['variant']} | {dice} | {'-' if eps is None else f'{eps:.2f}'} | {r['bytes_up_per_round']:,} | "
                     f"{r['bytes_up_per_round'] / max(1, plain['bytes_up_per_round']):.3f} | "
                     f"{r['mean_round_wall_seconds']:.1f} | "
                     f"{r['mean_round_wall_seconds'] / plain['mean_round_wall_seconds']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    args = parser.parse_args(argv)
    if not any(getattr(args, k) is not None for k in ("fed_rounds", "fed_local_steps", "pretrain_steps")):
        args.quick = True
    args.backbones, args.cnn = ["unetr"], False
    config = config_from_args(args)
    config.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {text}", flush=True)

    sites = prepare_sites(config, say)
    bench = BackboneBench(config, sites, "unetr", load_test_batches(sites.test), say)
    bench.train_backbone()
    rows = []
    for name, change in variants(args.epsilons):
        bench.config = dataclasses.replace(config, **change)
        say(f"variant {name}")
        row = run_federated(bench)
        shutil.copytree(row["run_dir"], config.out / "runs" / name, dirs_exist_ok=True)
        rows.append(summary(name, row))
        (config.out / "privacy.json").write_text(json.dumps(
            {"machine": machine(), "config": config.to_json(), "epsilons": args.epsilons, "rows": rows}, indent=2))
    print(f"\nmachine: {machine()}\n\n{table(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
