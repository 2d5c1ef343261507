"""``pemma evaluate``: Dice per site and per mode of a run's global adapters.

::

    pemma evaluate --run RUN_DIR --sites site-1.yaml site-2.yaml [--round N] [--split test] [--json OUT]

Each site is evaluated locally (the data of every site must be on this machine: the
simulation case, or a site evaluating the published adapters on its own data) in every
mode it can serve, on whole volumes of its ``split`` cases.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pemma_core import console


def evaluate_run(
    run_dir: str | Path, sites: Sequence[Path], round_: int | None = None, split: str = "test", device: str = "cpu"
) -> dict[str, Any]:
    """``{"run", "round", "split", "sites": {name: {mode: dice}}, "cases": {name: {mode: n}}}``."""
    from pemma_core.config.site import load_site_config
    from pemma_core.data.pipeline import eval_loader
    from pemma_core.modes import servable_modes
    from pemma_core.training.local import evaluate
    from server.run_dir import RunDir
    from simulation.predict import load_run_model

    run = RunDir(run_dir)
    chosen = max(run.checkpoints("adapt")) if round_ is None else round_
    model = load_run_model(run.path, chosen)
    out: dict[str, Any] = {"run": str(run.path), "round": chosen, "split": split, "sites": {}, "cases": {}}
    for path in console.progress(sites, "evaluating site", label=str):
        site = load_site_config(path)
        modes = [m for m in site.modes if m in servable_modes(site.modalities)]
        result = evaluate(model, eval_loader(site, split=split), modes, device=device)
        out["sites"][site.name] = {m: float(v) for m, v in result.dice.items()}
        out["cases"][site.name] = {m: len(c) for m, c in result.per_case.items()}
    return out


def format_table(result: dict[str, Any]) -> str:
    modes = ("ct", "pet", "ctpet")
    lines = [f"run {result['run']}, adapters of round {result['round']}, split {result['split']}", "",
             f"{'site':<14}" + "".join(f"{m:>10}" for m in modes)]
    for site, dice in result["sites"].items():
        lines.append(f"{site:<14}" + "".join(f"{dice[m]:>10.3f}" if m in dice else f"{'-':>10}" for m in modes))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="run folder")
    parser.add_argument("--sites", type=Path, nargs="+", help="site YAMLs (default: the run's own sites)")
    parser.add_argument("--round", type=int, help="adapters of this round (default: the last)")
    parser.add_argument("--split", default="test", help="manifest split to evaluate (default test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")


def run(args: argparse.Namespace) -> int:
    from server.run_dir import RunDir

    sites = args.sites or [Path(p) for p in RunDir(args.run).metrics()["run"].get("sites", [])]
    if not sites:
        raise console.UsageError("give --sites (the run folder names none)")
    result = evaluate_run(args.run, sites, args.round, args.split, args.device)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
