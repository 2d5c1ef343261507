"""Every ``pemma simulate --adversary`` kind on the default demo, beside an honest run.

    python -m benchmarks.adversaries --out bench-out/adversaries [--kinds scale count ...] [-- SIMULATE OPTIONS]

Runs ``pemma simulate`` (the command a researcher types, as a subprocess: its exit status
counts) once without an adversary and once per kind (site-2, or site-1 for ``foreign``,
which needs the CT-only site), then reports per kind: the exit status, how many of the
adversary's replies were marked rejected or clipped (and how many were not), honest
replies refused (target 0), the final mean Dice, and per phase the ratio of the run's
distance from its starting tensors to the honest run's (acceptance: at most 1.5). Results go
to ``OUT/adversaries.json`` and ``OUT/adversaries.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from simulation.adversary import ADVERSARY_KINDS, phase_distances
from server.run_dir import dice_metrics

ADVERSARY_SITE = {"foreign": "site-1"}  # the CT-only site; every other kind plays site-2


def _simulate(out: Path, extra: list[str]) -> tuple[int, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pemma_core.cli", "simulate", "-q", "--out", str(out), *extra],
                          capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-2000:])
    return done.returncode, time.perf_counter() - started


def _statuses(run: Path, site: str) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text())
    rounds = metrics["pretrain_rounds"] + metrics["rounds"]
    mine = [s["status"] for r in rounds for s in r["sites"] if s["name"] == site]
    honest = [s["status"] for r in rounds for s in r["sites"] if s["name"] != site]
    adapt = [r for r in metrics["rounds"] if r.get("phase", "adapt") == "adapt"]
    ehr = {e["site"]: e["status"] for e in metrics["run"].get("ehr_stats", [])}
    return {
        "adversary_replies": len(mine),
        "adversary_refused": sum(s in ("rejected", "clipped") for s in mine),
        "honest_refused": sum(s != "ok" for s in honest),
        "ehr_stats": ehr.get(site),
        "dice": dice_metrics(adapt[-1].get("eval_metrics", {})) if adapt else {},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and the results (must not exist)")
    parser.add_argument("--kinds", nargs="+", choices=list(ADVERSARY_KINDS), default=list(ADVERSARY_KINDS))
    args, simulate_options = parser.parse_known_args(argv)
    simulate_options = [o for o in simulate_options if o != "--"]
    if args.out.exists():
        parser.error(f"{args.out} exists: choose a new folder (nothing is overwritten)")
    args.out.mkdir(parents=True)
    code, seconds = _simulate(args.out / "honest", simulate_options)
    if code:
        print(f"the honest run failed (exit {code})", file=sys.stderr)
        return 1
    honest = phase_distances(args.out / "honest")
    results: dict[str, Any] = {"honest": {"distances": honest, "seconds": seconds, **_statuses(args.out / "honest", "")},
                               "options": simulate_options, "kinds": {}}
    for kind in args.kinds:
        site = ADVERSARY_SITE.get(kind, "site-2")
        run = args.out / kind
        code, seconds = _simulate(run, [*simulate_options, "--adversary", f"{site}={kind}"])
        entry: dict[str, Any] = {"site": site, "exit": code, "seconds": seconds}
        if code == 0:
            distances = phase_distances(run)
            entry.update(_statuses(run, site), distances=distances,
                         ratios={p: distances[p] / honest[p] if honest[p] else None for p in distances})
        results["kinds"][kind] = entry
        print(f"{kind}: exit {code}, " + ", ".join(f"{p} x{r:.3f}" for p, r in (entry.get("ratios") or {}).items()),
              flush=True)
    (args.out / "adversaries.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| kind | site | exit | adversary replies refused | honest replies refused | EHR stats | "
             "distance ratio pretrain-ct / adapt / prognosis | final Dice ct / pet / ctpet |", "|---" * 8 + "|"]
    for kind, e in results["kinds"].items():
        ratios = " / ".join(f"{e['ratios'].get(p, float('nan')):.3f}" for p in ("pretrain-ct", "adapt", "prognosis")) \
            if e.get("ratios") else "-"
        dice = " / ".join(f"{e['dice'].get(f'dice-{m}', float('nan')):.3f}" for m in ("ct", "pet", "ctpet")) \
            if e.get("dice") else "-"
        lines.append(f"| {kind} | {e['site']} | {e['exit']} | {e.get('adversary_refused', '-')} of "
                     f"{e.get('adversary_replies', '-')} | {e.get('honest_refused', '-')} | {e.get('ehr_stats') or '-'} | "
                     f"{ratios} | {dice} |")
    honest_dice = results["honest"]["dice"]
    lines.append(f"\nHonest run: final Dice " + " / ".join(f"{honest_dice.get(f'dice-{m}', float('nan')):.3f}"
                                                         for m in ("ct", "pet", "ctpet"))
                 + f", {results['honest']['honest_refused']} replies refused, {results['honest']['seconds']:.0f} s.")
    (args.out / "adversaries.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(e["exit"] == 0 for e in results["kinds"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
