"""The run's report: ``report.md`` and its plots, from the run folder's ``metrics.json``.

Also the summary numbers of a run (:func:`overhead_share`, :func:`bytes_per_site`), which
``pemma simulate`` prints and the benchmark reports, and :func:`format_value`, the one
number format of the markdown tables (the benchmark report uses it too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from server.run_dir import RunDir, phase_rounds


def overhead_share(metrics: Mapping[str, Any], phase: str = "adapt") -> dict[str, float]:
    """How much of the rounds' training wall time is not local training.

    Over every round of ``phase``: ``train_wall`` is the server's time from sending the
    global tensors to having aggregated the replies; ``local_training`` the sites' own
    optimiser time (summed: the simulation runs one site at a time, as a 2-core machine
    must); ``site_setup`` the sites' model building and data loading. Everything else,
    ``flower_and_aggregation``, is message passing, (de)serialisation, validation and
    aggregation. Shares are fractions of ``train_wall``.
    """
    rounds = phase_rounds(metrics, phase)
    wall = sum(float(r.get("train_wall_seconds", 0.0)) for r in rounds)
    train = sum(float(s.get("train_seconds", 0.0)) for r in rounds for s in r.get("sites", []))
    setup = sum(float(s.get("setup_seconds", 0.0)) for r in rounds for s in r.get("sites", []))
    aggregation = sum(float(r.get("aggregation_seconds", 0.0)) for r in rounds)
    if wall <= 0:
        return {"rounds": len(rounds), "train_wall_seconds": 0.0, "overhead_share": math.nan}
    other = max(0.0, wall - train)
    return {
        "rounds": len(rounds),
        "train_wall_seconds": wall,
        "local_training_seconds": train,
        "site_setup_seconds": setup,
        "aggregation_seconds": aggregation,
        "overhead_share": other / wall,
        "flower_and_aggregation_share": max(0.0, wall - train - setup) / wall,
    }


def bytes_per_site(metrics: Mapping[str, Any], phase: str = "adapt") -> dict[str, float]:
    """Mean bytes sent up per round, per site (tensor data only)."""
    totals: dict[str, list[int]] = {}
    for r in phase_rounds(metrics, phase):
        for s in r.get("sites", []):
            if s.get("status") == "ok":
                totals.setdefault(s["name"], []).append(int(s.get("bytes_up", 0)))
    return {name: sum(v) / len(v) for name, v in sorted(totals.items())}


# ---------------------------------------------------------------------------- report


def plot_dice(metrics: Mapping[str, Any], path: Path) -> Path | None:
    """Dice per round: one line per (site, mode), plus the case-weighted mean per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = metrics.get("rounds", [])
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for s in r.get("sites", []):
            for mode, value in s.get("dice", {}).items():
                series.setdefault(f"{s['name']} {mode}", []).append((r["round"], value))
        for key, value in r.get("eval_metrics", {}).items():
            series.setdefault(f"mean {key.removeprefix('dice-')}", []).append((r["round"], value))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in sorted(series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", linewidth=2.5 if label.startswith("mean") else 1.0,
                linestyle="-" if label.startswith("mean") else "--", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("Dice (test split)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_overlay(ct: np.ndarray, pet: np.ndarray | None, label: np.ndarray | None, pred: np.ndarray, path: Path,
                 title: str = "") -> Path:
    """Axial slice through the largest labelled (else predicted) area: CT, PET, and the
    prediction (red) against the label (green) on CT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = label if label is not None and label.any() else pred
    z = int(np.argmax(mask.reshape(-1, mask.shape[-1]).sum(axis=0))) if mask.any() else ct.shape[-1] // 2
    panels = 3 if pet is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4))
    axes[0].imshow(ct[..., z].T, cmap="gray", origin="lower")
    axes[0].set_title("CT")
    if pet is not None:
        axes[1].imshow(pet[..., z].T, cmap="hot", origin="lower")
        axes[1].set_title("PET")
    last = axes[-1]
    last.imshow(ct[..., z].T, cmap="gray", origin="lower")
    if label is not None and label[..., z].any():
        last.contour(label[..., z].T, levels=[0.5], colors="lime", linewidths=1.2)
    if pred[..., z].any():
        last.imshow(np.ma.masked_where(pred[..., z].T == 0, pred[..., z].T), cmap="autumn", alpha=0.5, origin="lower")
    last.set_title("prediction (red) / label (green)")
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_value(value: Any, digits: int = 3) -> str:
    """A number for a markdown table: ``-`` for None, floats to ``digits`` places."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_report(run: RunDir, overlay: Path | None = None) -> Path:
    """``report.md``: settings, per-round table, Dice plot, overlay (if given), overheads."""
    metrics = run.metrics()
    settings = run.read_json(run.run_json, {})
    dice_png = plot_dice(metrics, run.plots / "dice.png")
    overlay = overlay if overlay is not None and overlay.exists() else (
        run.plots / "overlay.png" if (run.plots / "overlay.png").exists() else None
    )
    lines = ["# pemma federated run", ""]
    spec = settings.get("model_spec", {})
    lines.append(
        f"Backbone **{spec.get('backbone', '?')}/{spec.get('preset', '?')}**, adapter **{spec.get('adapter', '?')}** "
        f"(rank {spec.get('rank', '?')}), seed {settings.get('seed', '?')}, wire dtype {settings.get('wire_dtype', '?')}, "
        f"min-sites {settings.get('min_sites', '?')}."
    )
    info = metrics.get("run", {})
    if info.get("fingerprint"):
        lines.append(f"Backbone fingerprint `{info['fingerprint'][:16]}...` ({info.get('backbone_source', '')}).")
    lines.append("")
    for phase in ("pretrain-ct", "adapt"):
        rounds = phase_rounds(metrics, phase)
        if not rounds:
            continue
        lines += [f"## {phase}", "", "| round | wall s | site | status | loss | train s | bytes up | Dice |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rounds:
            for i, s in enumerate(r.get("sites", [])):
                dice = ", ".join(f"{m} {v:.3f}" for m, v in s.get("dice", {}).items()) or "-"
                status = s.get("status", "")
                if s.get("reason"):
                    status += f": {s['reason'][:200]}"
                lines.append(
                    f"| {r['round'] if i == 0 else ''} | {format_value(r.get('wall_seconds'), 1) if i == 0 else ''} | {s['name']} | "
                    f"{status} | {format_value(s.get('loss'))} | {format_value(s.get('train_seconds'), 2)} | {s.get('bytes_up', 0)} | {dice} |"
                )
            if r.get("note"):
                lines.append(f"| {r['round']} | | | {r['note']} | | | | |")
        lines.append("")
    prognosis = phase_rounds(metrics, "prognosis")
    if prognosis:
        lines += ["## prognosis", "",
                  "Cox head (+ EHR encoder) on the frozen adapters; C-index on each site's held-out split "
                  "(- where it has no comparable pair).", "",
                  "| round | wall s | site | status | loss | events | C-index |", "|---|---|---|---|---|---|---|"]
        for r in prognosis:
            for i, s in enumerate(r.get("sites", [])):
                status = s.get("status", "") + (f": {s['reason'][:200]}" if s.get("reason") else "")
                events = max(s.get("examples", {}).values(), default=0)
                lines.append(f"| {r['round'] if i == 0 else ''} | {format_value(r.get('wall_seconds'), 1) if i == 0 else ''} | "
                             f"{s['name']} | {status} | {format_value(s.get('loss'))} | {events} | {format_value(s.get('c_index'))} |")
            if "c-index" in r.get("train_metrics", {}):
                lines.append(f"| {r['round']} | | mean | | | | {r['train_metrics']['c-index']:.3f} |")
            if r.get("note"):
                lines.append(f"| {r['round']} | | | {r['note']} | | | |")
        lines.append("")
    if dice_png:
        lines += ["## Dice per round", "", f"![Dice per round]({dice_png.relative_to(run.path)})", ""]
    if overlay is not None:
        lines += ["## A prediction", "", f"![prediction overlay]({overlay.relative_to(run.path)})", ""]
    share = overhead_share(metrics)
    if share.get("rounds"):
        lines += [
            "## Where the time goes (adapt rounds)",
            "",
            f"- round train wall time: {share['train_wall_seconds']:.1f} s over {share['rounds']} round(s)",
            f"- local training: {share.get('local_training_seconds', 0):.1f} s; site setup (model, data): "
            f"{share.get('site_setup_seconds', 0):.1f} s; aggregation: {share.get('aggregation_seconds', 0):.2f} s",
            f"- share outside local training: {share['overhead_share']:.1%} "
            f"(Flower, serialisation, aggregation only: {share.get('flower_and_aggregation_share', 0):.1%})",
        ]
        per_site = bytes_per_site(metrics)
        if per_site:
            lines.append("- bytes up per round: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in per_site.items()))
        lines.append("")
    run.report.write_text("\n".join(lines), encoding="utf-8")
    return run.report


__all__ = [
    "bytes_per_site",
    "format_value",
    "overhead_share",
    "plot_dice",
    "plot_overlay",
    "write_report",
]
