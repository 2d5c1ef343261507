"""``pemma evaluate``: Dice, aggregated Dice, HD95 and surface Dice per site and per mode of a run's global adapters.

::

    pemma evaluate --run RUN_DIR --sites site-1.yaml site-2.yaml [--round N] [--split test] [--json OUT]

Each site is evaluated locally (the data of every site must be on this machine: the
simulation case, or a site evaluating the published adapters on its own data) in every
mode it can serve, on whole volumes of its ``split`` cases.

Beside mean Dice (the mean over cases): the HECKTOR aggregated Dice (sum over cases of
2 |P and G| over the sum of |P| + |G|; per site, and over all sites from their sums), the
mean HD95 in mm over the cases where it is defined (with that count) and the mean surface
Dice at :data:`~pemma_core.training.seg_metrics.NSD_TOLERANCE_MM`
(:mod:`pemma_core.training.seg_metrics`).
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
    """``{"run", "round", "split", "sites": {name: {mode: dice}}, "cases": {name: {mode: n}},
    "agg_dice": {name: {mode: d}}, "hd95": {name: {mode: mm}}, "hd95_cases": {name: {mode: n}},
    "nsd": {name: {mode: s}}, "overlap": {name: {mode: 2I}}, "volume": {name: {mode: V}},
    "overall": {mode: {"agg_dice", "overlap", "volume", "cases"}}, "distance_unit", "nsd_tolerance"}``.
    ``None`` where a metric is undefined (every mask empty, no defined HD95)."""
    from pemma_core.config.site import load_site_config
    from pemma_core.data.pipeline import eval_loader
    from pemma_core.modes import servable_modes
    from pemma_core.training.local import evaluate
    from pemma_core.training.seg_metrics import NSD_TOLERANCE_MM
    from server.run_dir import RunDir
    from simulation.predict import load_run_model

    run = RunDir(run_dir)
    chosen = max(run.checkpoints("adapt")) if round_ is None else round_
    model = load_run_model(run.path, chosen)
    per_site = ("sites", "cases", "agg_dice", "hd95", "hd95_cases", "nsd", "overlap", "volume")
    out: dict[str, Any] = {"run": str(run.path), "round": chosen, "split": split, **{k: {} for k in per_site},
                           "overall": {}, "distance_unit": "mm", "nsd_tolerance": NSD_TOLERANCE_MM}
    units: set[str] = set()
    for path in console.progress(sites, "evaluating site", label=str):
        site = load_site_config(path)
        modes = [m for m in site.modes if m in servable_modes(site.modalities)]
        result = evaluate(model, eval_loader(site, split=split), modes, device=device)
        units.add(result.distance_unit)
        out["sites"][site.name] = {m: float(v) for m, v in result.dice.items()}
        out["cases"][site.name] = {m: len(c) for m, c in result.per_case.items()}
        out["agg_dice"][site.name] = dict(result.agg_dice)
        out["hd95"][site.name] = dict(result.hd95)
        out["hd95_cases"][site.name] = dict(result.hd95_cases)
        out["nsd"][site.name] = dict(result.nsd)
        out["overlap"][site.name] = dict(result.overlap)
        out["volume"][site.name] = dict(result.volume)
    out["overall"] = overall(out)
    out["distance_unit"] = "mixed" if len(units) > 1 else (units.pop() if units else "mm")
    return out


def overall(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per mode, the aggregated Dice over every site's cases, from the sites' ``overlap`` and
    ``volume`` sums (what a federation computes): ``{mode: {"agg_dice", "overlap", "volume", "cases"}}``."""
    from pemma_core.training.seg_metrics import pooled_dice

    out: dict[str, dict[str, Any]] = {}
    for mode in sorted({m for by_mode in result["overlap"].values() for m in by_mode}):
        names = [n for n in result["overlap"] if mode in result["overlap"][n]]
        overlap = sum(int(result["overlap"][n][mode]) for n in names)
        volume = sum(int(result["volume"][n][mode]) for n in names)
        out[mode] = {"agg_dice": pooled_dice(overlap, volume), "overlap": overlap, "volume": volume,
                     "cases": sum(int(result["cases"][n][mode]) for n in names)}
    return out


def _cell(value: Any, digits: int = 3) -> str:
    return f"{'-':>10}" if value is None else f"{value:>10.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """Mean Dice per site and mode (the table ``pemma evaluate`` always printed), then, for
    results that hold them, aggregated Dice, HD95 and surface Dice per site and mode, and
    the aggregated Dice over all sites."""
    modes = ("ct", "pet", "ctpet")
    lines = [f"run {result['run']}, adapters of round {result['round']}, split {result['split']}", "",
             "mean Dice", f"{'site':<14}" + "".join(f"{m:>10}" for m in modes)]
    for site, dice in result["sites"].items():
        lines.append(f"{site:<14}" + "".join(_cell(dice.get(m)) for m in modes))
    if "agg_dice" not in result:
        return "\n".join(lines)
    unit = result.get("distance_unit", "mm")
    lines += ["", f"{'site':<14}{'mode':>6}{'cases':>7}{'Dice':>10}{'agg Dice':>10}{f'HD95 {unit}':>12}"
                  f"{'HD95 n':>8}{'NSD':>10}"]
    for site, dice in result["sites"].items():
        for mode in (m for m in modes if m in dice):
            lines.append(f"{site:<14}{mode:>6}{result['cases'][site][mode]:>7}{_cell(dice[mode])}"
                         f"{_cell(result['agg_dice'][site].get(mode))}  {_cell(result['hd95'][site].get(mode), 2)}"
                         f"{result['hd95_cases'][site].get(mode, 0):>8}{_cell(result['nsd'][site].get(mode))}")
    for mode, total in result.get("overall", {}).items():
        lines.append(f"{'all sites':<14}{mode:>6}{total['cases']:>7}{'':>10}{_cell(total['agg_dice'])}")
    lines += ["", f"agg Dice: sum of 2 |P and G| over sum of |P| + |G| over all cases; HD95 over the cases where it is "
                  f"defined (HD95 n); NSD: surface Dice at {result.get('nsd_tolerance', 2.0):g} {unit}"]
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
