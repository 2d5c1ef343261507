"""Seed means and targets of a bench run that did not finish (pemma bench --report-only needs a finished one).

PYTHONPATH=. python benchmarks/results/swin-standard-seeds3/summary.py [bench.json]
"""

import json
import statistics
import sys
from pathlib import Path

from benchmarks.targets import targets

path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("bench.json"))
results = json.loads(path.read_text())
for name, entry in results["backbones"].items():
    print(f"## {name}, budget {entry['budget']}\n")
    print("| row | seeds | Dice per seed | seed mean |")
    print("|---|---|---|---|")
    for row in entry["rows"]:
        runs = row.get("per_seed") or [{"seed": row.get("seed", 0), "dice": row["dice"]}]
        for mode in row["dice"]:
            values = [r["dice"][mode] for r in runs if mode in r.get("dice", {})]
            print(f"| {row['label']} ({mode}) | {len(values)} | {' / '.join(f'{v:.3f}' for v in values)} "
                  f"| {statistics.fmean(values):.3f} |")
print("\n| target | measured (points) | 95% interval (seeds and cases) | met |")
print("|---|---|---|---|")
for t in targets(results):
    if t["measured"] is None or "Dice" not in t["unit"]:
        continue
    ci = f"[{t['ci95'][0]:+.1f}, {t['ci95'][1]:+.1f}]" if t["ci95"] else "-"
    met = "-" if t["met"] is None else ("met" if t["met"] else "missed") + ("" if t["settled"] or t["met"] is None else " (within noise)")
    print(f"| {t['target']} | {t['measured']:+.1f} | {ci} | {met} |")
