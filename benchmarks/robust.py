"""What the server's robust aggregation did to the federated row's honest updates, and the
federated row compared across aggregation rules.

:func:`robust_counts` reads the adapt rounds of a run folder's ``metrics.json``: every site
reply that reached aggregation is an update; the outlier bound or ``max_norm`` may have
clipped or rejected it. On the bench's honest sites the target is 0 of each: a default that
throws away honest work is too tight.

``python -m benchmarks.robust MEAN_RUN OTHER_RUN...`` prints the markdown table of
``BENCHMARKS.md``'s "Robust aggregation on IBSI" (each RUN: a bench output folder or its
``bench.json``; the first is the reference every Dice gap is taken against).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.result_json import read_finished, row_per_case, rows_by_id
from benchmarks.targets import paired_bootstrap_ci
from pemma_core.modes import MODES

__all__ = ["compare_rules", "comparison_markdown", "robust_counts"]

UPDATE_STATUSES = ("ok", "clipped", "rejected")  # a "failed" site sent nothing to aggregate


def robust_counts(rounds: Sequence[Mapping[str, Any]], rule: str, outlier_factor: float) -> dict[str, Any]:
    """Clipped, rejected and all updates over ``rounds`` (``metrics.json`` round entries), and
    ``max_rms_ratio``: the largest per-group update RMS of any site over its round's
    ``reference_rms`` (the outlier bound rejects above ``outlier_factor``; None without a reference)."""
    statuses = [str(s.get("status")) for r in rounds for s in r.get("sites", [])]
    ratios = [float(value) / float(r["reference_rms"])
              for r in rounds if r.get("reference_rms")  # None: bound off; 0: every site sent the global values
              for s in r.get("sites", []) for value in (s.get("rms") or {}).values()]
    return {"rule": rule, "outlier_factor": outlier_factor,
            "clipped": statuses.count("clipped"), "rejected": statuses.count("rejected"),
            "updates": sum(statuses.count(s) for s in UPDATE_STATUSES),
            "max_rms_ratio": max(ratios) if ratios else None}


def _load(run: Path) -> dict[str, Any]:
    return read_finished(run / "bench.json" if run.is_dir() else run)


def compare_rules(results: Sequence[Mapping[str, Any]], backbone: str = "unetr") -> list[dict[str, Any]]:
    """One line per bench result: its federated row's rule, Dice per mode, robust counts, wall
    times, and per mode the Dice gap (points) to the first result's federated row with its paired
    bootstrap 95% interval over the test cases."""
    fed_rows = [rows_by_id(r["backbones"][backbone])["pemma-lora-fed"] for r in results]
    reference = fed_rows[0]
    out = []
    for result, row in zip(results, fed_rows):
        gaps = {}
        for mode in MODES:
            ours, theirs = row_per_case(row, mode), row_per_case(reference, mode)
            shared = sorted(set(ours) & set(theirs))
            gap = 100.0 * sum(ours[c] - theirs[c] for c in shared) / len(shared) if shared else None
            gaps[mode] = {"points": gap, "ci95": paired_bootstrap_ci(ours, theirs)}
        out.append({"rule": row.get("aggregation", "mean"), "dice": dict(row["dice"]), "gap": gaps,
                    "robust": row.get("robust"), "fed_wall_seconds": row.get("wall_seconds"),
                    "bench_wall_seconds": result.get("wall_seconds"), "command": result.get("command"),
                    "test_cases": result["data"]["test_cases"]})
    return out


def _gap_text(gap: Mapping[str, Any]) -> str:
    """Two decimals: a robust rule on honest sites moves Dice by hundredths of a point."""
    if gap["points"] is None:
        return "-"
    ci = gap["ci95"]
    return f"{gap['points']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def comparison_markdown(lines: Sequence[Mapping[str, Any]]) -> list[str]:
    """The table of :func:`compare_rules` (gaps in Dice points, the first line is the reference)."""
    out = ["| rule | Dice ct | Dice pet | Dice ctpet | gap vs mean ct | gap vs mean pet | gap vs mean ctpet "
           "| honest updates clipped / rejected (of all) | largest rms / median | federated row wall | bench wall |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in lines:
        robust = line["robust"] or {}
        ratio = robust.get("max_rms_ratio")
        out.append(
            f"| {line['rule']} | " + " | ".join(f"{line['dice'][m]:.3f}" for m in MODES) + " | "
            + " | ".join("reference" if line is lines[0] else _gap_text(line["gap"][m]) for m in MODES) + " | "
            + (f"{robust['clipped']} / {robust['rejected']} (of {robust['updates']})" if robust else "-") + " | "
            + (f"{ratio:.2f}" if ratio is not None else "-") + " | "
            + f"{line['fed_wall_seconds']:.0f} s | {line['bench_wall_seconds'] / 60:.1f} min |")
    return out


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m benchmarks.robust MEAN_RUN OTHER_RUN...", file=sys.stderr)
        return 2
    print("\n".join(comparison_markdown(compare_rules([_load(Path(a)) for a in argv]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
