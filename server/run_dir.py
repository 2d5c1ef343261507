"""The run folder: what a federated run leaves behind, and how to read it back.

::

    RUN/
      run.json                       settings of the run (model spec, seed, rounds, sites...)
      federation/                    the phantom federation `pemma simulate` writes when given no site YAML
      backbone.safetensors           the frozen CT backbone (pretrain-ct result or --backbone-file)
      pretrain/round-<n>.safetensors CT backbone after pretraining round n
      adapters/round-<n>.safetensors global adapters after adapt round n (round-0: initial),
                                     then, numbered on, after each prognosis round (the same
                                     adapters + survival head / EHR encoder; metadata also
                                     holds the EHR preprocessor, ``pemma.ehr_preprocessor``);
                                     metadata: fingerprint, spec, groups, provenance
                                     (phase, round, participating sites)
      metrics.json                   {"run": {...}, "pretrain_rounds": [...], "rounds": [...]}
      report.md                      summary, Dice-per-round plot, a prediction overlay
      plots/dice.png, plots/overlay.png

A round is *finished* once its checkpoint file exists and its entry is in
``metrics.json`` (written in that order); ``--resume`` continues after the last finished
round of each phase.

Each item of ``rounds`` (and ``pretrain_rounds``) holds ``phase``, ``round``,
``wall_seconds`` (train + evaluate), ``train_wall_seconds`` (sending the global
tensors to collecting every reply, aggregation included), ``aggregation_seconds``,
``aggregated``, ``note`` and ``sites``: one entry per site with ``name``, ``status``
(ok / rejected / failed), ``reason``, ``bytes_up``, ``bytes_down``, ``train_seconds``,
``setup_seconds``, ``loss``, ``examples`` (per group) and ``dice`` (per evaluated mode),
and in ``prognosis`` rounds (in ``rounds`` too, ``phase: "prognosis"``) ``c_index`` (the
site's held-out split, where it could be computed).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

PHASE_LISTS = {"pretrain-ct": "pretrain_rounds", "adapt": "rounds", "prognosis": "rounds"}


def _phase_of(record: Mapping[str, Any], key: str) -> str:
    return str(record.get("phase") or ("pretrain-ct" if key == "pretrain_rounds" else "adapt"))


def phase_rounds(metrics: Mapping[str, Any], phase: str) -> list[dict[str, Any]]:
    """The ``metrics.json`` entries of one phase (adapt and prognosis share ``rounds``)."""
    key = PHASE_LISTS[phase]
    return [r for r in metrics.get(key, []) if _phase_of(r, key) == phase]


class RunDir:
    """Paths and small readers/writers of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()

    # ------------------------------------------------------------ paths
    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_json(self) -> Path:
        return self.path / "metrics.json"

    @property
    def backbone_file(self) -> Path:
        return self.path / "backbone.safetensors"

    @property
    def federation_dir(self) -> Path:
        return self.path / "federation"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def checkpoint(self, phase: str, round_: int) -> Path:
        folder = "pretrain" if phase == "pretrain-ct" else "adapters"
        return self.path / folder / f"round-{round_}.safetensors"

    def checkpoints(self, phase: str) -> dict[int, Path]:
        """Checkpoint files of ``phase`` by round. ``adapters/`` holds adapt and prognosis
        rounds: a file is prognosis's once ``metrics.json`` records its round as such."""
        folder = self.path / ("pretrain" if phase == "pretrain-ct" else "adapters")
        out: dict[int, Path] = {}
        for file in folder.glob("round-*.safetensors"):
            match = re.fullmatch(r"round-(\d+)\.safetensors", file.name)
            if match:
                out[int(match.group(1))] = file
        if phase != "pretrain-ct":
            prognosis = {r["round"] for r in phase_rounds(self.metrics(), "prognosis")}
            out = {n: f for n, f in out.items() if (n in prognosis) == (phase == "prognosis")}
        return dict(sorted(out.items()))

    # ------------------------------------------------------------ json
    def read_json(self, path: Path, default: Any) -> Any:
        if not path.exists():
            return default
        return json.loads(path.read_text(encoding="utf-8"))

    def write_json(self, path: Path, data: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def metrics(self) -> dict[str, Any]:
        data = self.read_json(self.metrics_json, {})
        data.setdefault("run", {})
        data.setdefault("pretrain_rounds", [])
        data.setdefault("rounds", [])
        return data

    def record_round(self, record: Mapping[str, Any]) -> None:
        """Add (or replace) one round's entry in ``metrics.json``."""
        data = self.metrics()
        items = [r for r in data[PHASE_LISTS[record["phase"]]] if r["round"] != record["round"]]  # one entry per round number
        items.append(dict(record))
        data[PHASE_LISTS[record["phase"]]] = sorted(items, key=lambda r: r["round"])
        self.write_json(self.metrics_json, data)

    def update_run_info(self, **info: Any) -> None:
        data = self.metrics()
        data["run"].update(info)
        self.write_json(self.metrics_json, data)

    def last_finished_round(self, phase: str) -> int:
        """Highest round with both its checkpoint and its metrics entry (0 if none; adapt
        round 0 is the initial adapters, which need no metrics entry)."""
        recorded = {r["round"] for r in phase_rounds(self.metrics(), phase)}
        files = self.checkpoints(phase)
        done = [n for n in files if n in recorded]
        return max(done, default=0)

    def forget_after(self, phase: str, round_: int) -> None:
        """Drop entries and checkpoints of ``phase`` after ``round_`` (an interrupted round)."""
        files = self.checkpoints(phase)
        data = self.metrics()
        key = PHASE_LISTS[phase]
        data[key] = [r for r in data[key] if r["round"] <= round_ or _phase_of(r, key) != phase]
        self.write_json(self.metrics_json, data)
        for n, file in files.items():
            if n > round_:
                file.unlink()

    def forget_phase(self, phase: str) -> None:
        """Drop every entry and checkpoint of ``phase`` (prognosis reruns after adapt)."""
        self.forget_after(phase, -1)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------- numbers


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
    "RunDir",
    "bytes_per_site",
    "overhead_share",
    "phase_rounds",
    "plot_dice",
    "plot_overlay",
    "write_report",
]
