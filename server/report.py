"""The run's report: ``report.md`` and its plots, from the run folder's ``metrics.json``.

Also the summary numbers of a run (:func:`overhead_share`, :func:`bytes_per_site`), which
``pemma simulate`` prints and the benchmark reports, and :func:`format_value`, the one
number format of the markdown tables (the benchmark report uses it too).

The robustness and privacy sections read what the strategy records (each may be absent
in older runs): per site and round ``status`` (ok / clipped / rejected / failed),
``reason``, ``clip_factor``; per round ``contributors`` (group -> sites aggregated); in
the run info ``sites`` (declared cases), ``duplicate_names``, ``ehr_stats``,
``adversaries`` and ``segments`` (:mod:`server.run_dir`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pemma_core.protocol import DECLARED
from server.roster import ANSI_CODES
from server.run_dir import PHASE_LISTS, RunDir, phase_rounds, run_segments, total_wall_seconds

STATUSES = ("ok", "clipped", "rejected", "failed")
AGGREGATED_STATUSES = ("ok", "clipped")  # replies whose tensors entered the aggregate
MIN_PRIVATE_SITES = 3  # fewer contributors to a group aggregate and each can learn the others' update


def overhead_share(metrics: Mapping[str, Any], phase: str = "adapt") -> dict[str, float]:
    """How much of the rounds' training wall time is not local training.

    Over every round of ``phase``: ``train_wall`` is the server's time from sending the
    global tensors to having aggregated the replies; ``local_training`` the sites' own
    optimiser time on the round's critical path: the simulation runs ``site_workers`` sites
    side by side (the run info; 1 when absent), node ``n`` on worker ``(n - 1) % site_workers``
    (:meth:`simulation.inprocess.InProcessGrid.worker_of`), so a round's local training is
    its busiest worker's sum; ``site_setup`` the sites' model building and data loading, on
    the same path. Everything else, ``flower_and_aggregation``, is message passing,
    (de)serialisation, validation, aggregation and a worker waiting for the busiest one.
    Shares are fractions of ``train_wall``.
    """
    rounds = phase_rounds(metrics, phase)
    workers = max(1, int(metrics.get("run", {}).get("site_workers", 1) or 1))
    wall = sum(float(r.get("train_wall_seconds", 0.0)) for r in rounds)
    train = setup = 0.0
    for r in rounds:
        per_worker: dict[int, tuple[float, float]] = {}
        for s in r.get("sites", []):
            worker = (int(s.get("node_id", 1)) - 1) % workers
            t, u = per_worker.get(worker, (0.0, 0.0))
            per_worker[worker] = (t + float(s.get("train_seconds", 0.0)), u + float(s.get("setup_seconds", 0.0)))
        if per_worker:
            busiest = max(per_worker.values())
            train += busiest[0]
            setup += busiest[1]
    aggregation = sum(float(r.get("aggregation_seconds", 0.0)) for r in rounds)
    if wall <= 0:
        return {"rounds": len(rounds), "train_wall_seconds": 0.0, "overhead_share": math.nan}
    other = max(0.0, wall - train)
    return {
        "rounds": len(rounds),
        "site_workers": workers,
        "train_wall_seconds": wall,
        "local_training_seconds": train,
        "site_setup_seconds": setup,
        "aggregation_seconds": aggregation,
        "overhead_share": other / wall,
        "flower_and_aggregation_share": max(0.0, wall - train - setup) / wall,
    }


def pooled_c_index_text(train_metrics: Mapping[str, Any]) -> str:
    """``0.667 (95% bootstrap interval 0.50-0.83)``: the pooled C-index of a prognosis round."""
    text = f"{train_metrics['c-index-pooled']:.3f}"
    if "c-index-pooled-low" in train_metrics:
        text += (f" (95% bootstrap interval {train_metrics['c-index-pooled-low']:.2f}-"
                 f"{train_metrics['c-index-pooled-high']:.2f})")
    return text


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
            if key.startswith("dice-"):  # eval_metrics also holds agg-dice-, hd95- (mm) and nsd- entries
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


EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Violation|Interrupt|Exit)\b")  # "RuntimeError: disk full"


def one_line(text: Any, limit: int = 200) -> str:
    """``text`` fit for a markdown table cell: no ANSI colour codes, one line, no ``|``, at most
    ``limit`` characters; of a Python traceback only what precedes it and its exception line."""
    plain = ANSI_CODES.sub("", str(text or ""))
    head, traceback, tail = plain.partition("Traceback (most recent call last)")
    if traceback:
        raised = [line.strip() for line in tail.splitlines() if EXCEPTION_LINE.match(line.strip())]
        plain = " ".join(part for part in (head.strip(), raised[-1] if raised else "") if part) or plain
    plain = " ".join(plain.split()).replace("|", "\\|")
    return plain if len(plain) <= limit else plain[: limit - 3] + "..."


def round_ranges(rounds: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    runs: list[list[int]] = []
    for n in sorted(set(rounds)):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def segments_summary(metrics: Mapping[str, Any]) -> str | None:
    """``wall time 212 s over 2 segments; interrupted after adapt round 3, resumed`` (None: nothing recorded)."""
    segments = run_segments(metrics)
    total = total_wall_seconds(metrics)
    if not segments:
        return f"wall time {total:.0f} s" if total else None
    if len(segments) == 1:
        return f"wall time {total:.0f} s" + ("" if segments[0]["ended"] == "finished" else ", interrupted")
    events = []
    for segment in segments[1:]:
        after = segment["resumed_after"] or {}
        last = next(((phase, after[phase]) for phase in reversed(PHASE_LISTS) if phase in after), None)
        events.append(f"interrupted after {last[0]} round {last[1]}, resumed" if last
                      else "interrupted before any finished round, resumed")
    if segments[-1]["ended"] != "finished":
        events.append("the last segment was interrupted")
    return f"wall time {total:.0f} s over {len(segments)} segments; " + "; ".join(events)


def site_replies(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every site entry of every round: ``phase``, ``round``, ``site``, ``status``, ``reason``, ``clip_factor``."""
    out = []
    for phase in PHASE_LISTS:
        for r in phase_rounds(metrics, phase):
            for s in r.get("sites", []):
                out.append({"phase": phase, "round": r["round"], "site": s.get("name", "?"),
                            "status": s.get("status", "ok"), "reason": one_line(s.get("reason")),
                            "clip_factor": s.get("clip_factor")})
    return out


def status_counts(metrics: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Phase -> status -> number of site replies (every status of :data:`STATUSES`, plus any other seen)."""
    counts: dict[str, dict[str, int]] = {}
    for reply in site_replies(metrics):
        phase = counts.setdefault(reply["phase"], dict.fromkeys(STATUSES, 0))
        phase[reply["status"]] = phase.get(reply["status"], 0) + 1
    return counts


def round_contributors(record: Mapping[str, Any]) -> dict[str, list[str]]:
    """Group -> sites whose tensors of that group were aggregated in this round: the round's
    ``contributors``; for a run that did not record them, the accepted sites that counted
    examples of the group (none if the round did not aggregate)."""
    if "contributors" in record:
        return {group: sorted(sites) for group, sites in record["contributors"].items()}
    if not record.get("aggregated"):
        return {}
    out: dict[str, list[str]] = {}
    for s in record.get("sites", []):
        if s.get("status", "ok") in AGGREGATED_STATUSES:
            for group, n in s.get("examples", {}).items():
                if n:
                    out.setdefault(group, []).append(s["name"])
    return {group: sorted(sites) for group, sites in out.items()}


def small_aggregates(metrics: Mapping[str, Any], minimum: int = MIN_PRIVATE_SITES) -> list[dict[str, Any]]:
    """Group aggregates formed from fewer than ``minimum`` sites: ``phase``, ``group``, ``sites``,
    ``rounds`` (one item per phase, group and set of sites)."""
    found: dict[tuple[str, str, tuple[str, ...]], list[int]] = {}
    for phase in PHASE_LISTS:
        for r in phase_rounds(metrics, phase):
            for group, sites in round_contributors(r).items():
                if 0 < len(sites) < minimum:
                    found.setdefault((phase, group, tuple(sites)), []).append(r["round"])
    return [{"phase": p, "group": g, "sites": list(s), "rounds": rounds} for (p, g, s), rounds in found.items()]


def _privacy_line(item: Mapping[str, Any]) -> str:
    sites = item["sites"]
    head = (f"group {item['group']} aggregated from {len(sites)} site{'s' if len(sites) > 1 else ''} "
            f"({', '.join(sites)}) in {item['phase']} round{'s' if len(item['rounds']) > 1 else ''} "
            f"{round_ranges(item['rounds'])}: ")
    if len(sites) == 1:
        return head + "the aggregate is that site's own update, seen by the server and every site"
    if len(sites) == 2:
        return head + "each of them can subtract its own update and recover the other's"
    return head + "fewer sites than a private aggregate needs"


def _status_cell(site: Mapping[str, Any]) -> str:
    status = str(site.get("status", ""))
    if site.get("clip_factor") is not None:
        status += f" (x{float(site['clip_factor']):.3g})"
    if site.get("reason"):
        status += f": {one_line(site['reason'])}"
    return status


def _sites_section(info: Mapping[str, Any]) -> list[str]:
    sites = info.get("sites") or []
    duplicates = info.get("duplicate_names") or {}
    if not sites and not duplicates:
        return []
    lines = ["## Sites", ""]
    declared = [s for s in sites if isinstance(s, Mapping)]
    if declared:
        lines += ["Cases each site declared per modality.", "",
                  "| site | node | " + " | ".join(DECLARED) + " |", "|---|---|" + "---|" * len(DECLARED)]
        for s in declared:
            name = one_line(s.get("name", "?"))
            flag = " **(duplicate name)**" if s.get("name") in duplicates else ""
            counts = s.get("declared") or {}
            lines.append(f"| {name}{flag} | {s.get('node_id', '-')} | "
                         + " | ".join(format_value(counts.get(k)) for k in DECLARED) + " |")
        lines.append("")
    configs = [str(s) for s in sites if not isinstance(s, Mapping)]  # older runs: the simulated sites' YAML paths
    if configs:
        lines += ["Site configs: " + ", ".join(f"`{one_line(c)}`" for c in configs), ""]
    for name, nodes in sorted(duplicates.items()):
        lines.append(f"- **duplicate name** {one_line(name)}: claimed by nodes {', '.join(str(n) for n in nodes)}")
    if duplicates:
        lines.append("")
    return lines


def _robustness_section(metrics: Mapping[str, Any]) -> list[str]:
    counts = status_counts(metrics)
    adversaries = metrics.get("run", {}).get("adversaries") or {}
    if not counts and not adversaries:
        return []
    lines = ["## Robustness", ""]
    if adversaries:
        lines += ["Simulated adversaries: " + ", ".join(f"{one_line(site)} ({one_line(kind)})"
                                                       for site, kind in sorted(adversaries.items())), ""]
    if counts:
        statuses = list(STATUSES) + sorted({k for c in counts.values() for k in c} - set(STATUSES))
        lines += ["| phase | " + " | ".join(statuses) + " |", "|---|" + "---|" * len(statuses)]
        lines += [f"| {phase} | " + " | ".join(str(c.get(k, 0)) for k in statuses) + " |" for phase, c in counts.items()]
        lines.append("")
    flagged = [r for r in site_replies(metrics) if r["status"] != "ok"]
    if flagged:
        lines += ["| phase | round | site | status | reason |", "|---|---|---|---|---|"]
        for r in flagged:
            status = r["status"] + (f" (x{float(r['clip_factor']):.3g})" if r["clip_factor"] is not None else "")
            lines.append(f"| {r['phase']} | {r['round']} | {one_line(r['site'])} | {status} | {r['reason'] or '-'} |")
    elif counts:
        lines.append("Every reply was accepted as sent.")
    lines.append("")
    return lines


def _privacy_section(metrics: Mapping[str, Any]) -> list[str]:
    recorded = any("contributors" in r for key in ("pretrain_rounds", "rounds") for r in metrics.get(key, []))
    small = small_aggregates(metrics)
    ehr = metrics.get("run", {}).get("ehr_stats") or []
    any_round = metrics.get("rounds") or metrics.get("pretrain_rounds")
    if not any_round and not ehr:
        return []
    lines = ["## Privacy", ""]
    if not recorded and any_round:
        lines += ["(This run did not record contributors per group; they are read from the accepted sites' counts.)", ""]
    if small:
        lines += [f"Group aggregates formed from fewer than {MIN_PRIVATE_SITES} sites:", ""]
        lines += [f"- {_privacy_line(item)}" for item in small]
    elif any_round:
        lines.append(f"Every group aggregate was formed from at least {MIN_PRIVATE_SITES} sites.")
    lines.append("")
    if ehr:
        lines += ["EHR statistics (for the federation's EHR preprocessor):", "",
                  "| site | status | reason |", "|---|---|---|"]
        lines += [f"| {one_line(e.get('site', '?'))} | {one_line(e.get('status', '?'))} | {one_line(e.get('reason')) or '-'} |"
                  for e in ehr]
        lines.append("")
    return lines


# What the server checks on a plain reply but cannot on a masked one, and who checks it instead.
MOVED_TO_SITES = (
    "the update's values (finite, shaped like the global tensors): checked by the site before masking",
    "the outlier bound and max-update-norm: each site clips its own update (whole-update norm when the run sets "
    "max-update-norm, then each element to the round's range) and reports how many elements it clipped",
    "the weight cap: each site caps its weight at its declared cases and at the round's weight scale",
    "robust rules (median, trimmed mean): not available on sums; the mean is used",
)


def _secure_section(metrics: Mapping[str, Any]) -> list[str]:
    rounds = [r for key in ("pretrain_rounds", "rounds") for r in metrics.get(key, []) if r.get("secure_aggregation")]
    if not rounds:
        return []
    lines = ["## Secure aggregation", "",
             "The server learned, per parameter group, only the weighted sum over the sites that trained it and the "
             "sum of their weights (pairwise masks per group cohort, Shamir shares of the mask secrets for sites "
             "that vanish). Checks moved to the sites:", ""]
    lines += [f"- {item}" for item in MOVED_TO_SITES]
    lines += ["", "| phase | round | final set | vanished | groups not aggregated | quantisation step |", "|---|---|---|---|---|---|"]
    for r in rounds:
        info = r["secure_aggregation"]
        dropped = "; ".join(f"{s}: {why}" for s, why in info.get("dropped", {}).items()) or "-"
        skipped = "; ".join(f"{g}: {why}" for g, why in info.get("skipped_groups", {}).items()) or "-"
        lines.append(f"| {r['phase']} | {r['round']} | {', '.join(info.get('final', [])) or '-'} | {one_line(dropped)} | "
                     f"{one_line(skipped)} | {info.get('quantisation_step', float('nan')):.2e} |")
    lines.append("")
    return lines


def _lora_section(metrics: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """Per adapt round: the naive low-rank rule's relative error per group (pooled, largest pair) and the server step."""
    rounds = [r for r in metrics.get("rounds", []) if r.get("lora_naive_error") or r.get("server_optimizer")]
    if not rounds:
        return []
    used = sorted({str(r["lora_aggregation"]) for r in rounds if r.get("lora_aggregation")})
    lines = ["## Low-rank aggregation", "",
             f"Low-rank pairs: **{', '.join(used) or settings.get('lora_aggregation', 'naive')}** aggregation; server optimiser "
             f"**{settings.get('server_optimizer', 'none')}** (server-lr {settings.get('server_lr', '-')}). The naive "
             "error is ||sum w B A - (sum w B)(sum w A)|| / ||sum w B A|| over each group's pairs (pooled; largest "
             "pair in brackets): what averaging the factors separately loses (removed by exact aggregation, up to the "
             "rank truncation).", "",
             "| round | naive error per group | server step |", "|---|---|---|"]
    for r in rounds:
        errors = ", ".join(f"{g} {v:.3g} ({r.get('lora_naive_error_max', {}).get(g, float('nan')):.3g})"
                           for g, v in sorted(r.get("lora_naive_error", {}).items())) or "-"
        lines.append(f"| {r['round']} | {errors} | {r.get('server_optimizer') or '-'} |")
    lines.append("")
    return lines


def _dp_section(metrics: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    spent: dict[str, dict[int, Any]] = {}
    for r in metrics.get("rounds", []):
        for s in r.get("sites", []):
            if s.get("dp_epsilon") is not None:
                spent.setdefault(s["name"], {})[r["round"]] = s
    if not spent:
        return []
    target = settings.get("dp_target_epsilon", "?")
    lines = ["## Differential privacy (DP-SGD, patient level)", "",
             f"Each site's adapters were trained with per-patient clipping (norm {settings.get('dp_clip', '?')}) and "
             f"Gaussian noise; the RDP accountant's epsilon (delta {settings.get('dp_delta', '?')}) spent so far, per "
             f"site and adapt round, against the target epsilon {target}. The guarantee covers each site's training "
             f"patients through the adapters (every group the site trains); the test-split Dice and the prognosis "
             f"phase are not covered.", ""]
    rounds = sorted({n for per in spent.values() for n in per})
    lines += ["| site | " + " | ".join(f"round {n}" for n in rounds) + " | stopped |",
              "|---|" + "---|" * (len(rounds) + 1)]
    for name, per in sorted(spent.items()):
        stopped = next((one_line(s.get("dp_stopped")) for s in per.values() if s.get("dp_stopped")), "-")
        cells = [format_value(per[n].get("dp_epsilon"), 3) if n in per else "-" for n in rounds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {stopped} |")
    lines.append("")
    return lines


def _failures_section(metrics: Mapping[str, Any]) -> list[str]:
    failed = [r for r in site_replies(metrics) if r["status"] == "failed"]
    if not failed:
        return []
    lines = ["## Failures", "", "| site | phase | round | cause |", "|---|---|---|---|"]
    lines += [f"| {one_line(r['site'])} | {r['phase']} | {r['round']} | {r['reason'] or '-'} |" for r in failed]
    return lines + [""]


def format_value(value: Any, digits: int = 3) -> str:
    """A number for a markdown table: ``-`` for None, floats to ``digits`` places."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _segmentation_section(metrics: Mapping[str, Any]) -> list[str]:
    """The adapt rounds' metrics beside mean Dice: aggregated Dice, HD95, surface Dice per mode
    for the federation, and per site in the last evaluated round (absent when no site sent them)."""
    from pemma_core.training.seg_metrics import NSD_TOLERANCE_MM

    rounds = [r for r in phase_rounds(metrics, "adapt")
              if any(k.startswith(("agg-dice-", "hd95-", "nsd-")) for k in r.get("eval_metrics", {}))]
    if not rounds:
        return []
    lines = ["## Segmentation metrics (adapt, test split)", "",
             "Mean Dice: case-weighted mean of the sites' per-case means. Aggregated Dice (HECKTOR): "
             "sum over all cases of 2 |P and G| over the sum of |P| + |G|, computed exactly from each site's two sums. "
             f"HD95 (mm): mean over the cases where it is defined (prediction and label both non-empty or both empty). "
             f"Surface Dice at {NSD_TOLERANCE_MM:g} mm. - where not reported.", "",
             "| round | site | mode | mean Dice | aggregated Dice | HD95 mm | surface Dice |", "|---|---|---|---|---|---|---|"]
    for r in rounds:
        ev = r["eval_metrics"]
        for mode in [k.removeprefix("dice-") for k in ev if k.startswith("dice-")]:
            lines.append(f"| {r['round']} | all | {mode} | {format_value(ev.get(f'dice-{mode}'))} | "
                         f"{format_value(ev.get(f'agg-dice-{mode}'))} | {format_value(ev.get(f'hd95-{mode}'), 2)} | "
                         f"{format_value(ev.get(f'nsd-{mode}'))} |")
    last = rounds[-1]
    for s in last.get("sites", []):
        for mode, dice in s.get("dice", {}).items():
            seg = s.get("seg", {}).get(mode, {})
            lines.append(f"| {last['round']} | {s['name']} | {mode} | {format_value(dice)} | "
                         f"{format_value(seg.get('agg-dice'))} | {format_value(seg.get('hd95'), 2)} | "
                         f"{format_value(seg.get('nsd'))} |")
    return lines + [""]


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
    if wall := segments_summary(metrics):
        lines.append(wall[0].upper() + wall[1:] + ".")
    lines.append("")
    lines += _sites_section(info)
    for phase in ("pretrain-ct", "adapt"):
        rounds = phase_rounds(metrics, phase)
        if not rounds:
            continue
        lines += [f"## {phase}", "", "| round | wall s | site | status | loss | train s | bytes up | Dice |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rounds:
            for i, s in enumerate(r.get("sites", [])):
                dice = ", ".join(f"{m} {v:.3f}" for m, v in s.get("dice", {}).items()) or "-"
                status = _status_cell(s)
                lines.append(
                    f"| {r['round'] if i == 0 else ''} | {format_value(r.get('wall_seconds'), 1) if i == 0 else ''} | {s['name']} | "
                    f"{status} | {format_value(s.get('loss'))} | {format_value(s.get('train_seconds'), 2)} | {s.get('bytes_up', 0)} | {dice} |"
                )
            if r.get("note"):
                lines.append(f"| {r['round']} | | | {one_line(r['note'])} | | | | |")
        lines.append("")
    lines += _segmentation_section(metrics)
    prognosis = phase_rounds(metrics, "prognosis")
    if prognosis:
        lines += ["## prognosis", "",
                  "Cox head (+ EHR encoder) on the frozen adapters; C-index on each site's held-out split "
                  "(- where it has no comparable pair).", "",
                  "| round | wall s | site | status | loss | events | C-index |", "|---|---|---|---|---|---|---|"]
        for r in prognosis:
            for i, s in enumerate(r.get("sites", [])):
                status = _status_cell(s)
                events = max(s.get("examples", {}).values(), default=0)
                lines.append(f"| {r['round'] if i == 0 else ''} | {format_value(r.get('wall_seconds'), 1) if i == 0 else ''} | "
                             f"{s['name']} | {status} | {format_value(s.get('loss'))} | {events} | {format_value(s.get('c_index'))} |")
            if "c-index" in r.get("train_metrics", {}):
                lines.append(f"| {r['round']} | | mean | | | | {r['train_metrics']['c-index']:.3f} |")
            if "c-index-pooled" in r.get("train_metrics", {}):
                lines.append(f"| {r['round']} | | pooled over {r['train_metrics']['c-index-pairs']:.0f} within-site pairs | "
                             f"| | | {pooled_c_index_text(r['train_metrics'])} |")
            if r.get("note"):
                lines.append(f"| {r['round']} | | | {one_line(r['note'])} | | | |")
        lines.append("")
    lines += _robustness_section(metrics) + _privacy_section(metrics) + _secure_section(metrics) + _dp_section(metrics, settings) + _failures_section(metrics)
    lines += _lora_section(metrics, settings)
    if dice_png:
        lines += ["## Dice per round", "", f"![Dice per round]({dice_png.relative_to(run.path)})", ""]
    if overlay is not None:
        lines += ["## A prediction", "", f"![prediction overlay]({overlay.relative_to(run.path)})", ""]
    share = overhead_share(metrics)
    if share.get("rounds") and share["train_wall_seconds"] > 0:
        lines += [
            "## Where the time goes (adapt rounds)",
            "",
            f"- round train wall time: {share['train_wall_seconds']:.1f} s over {share['rounds']} round(s)",
            f"- local training: {share.get('local_training_seconds', 0):.1f} s"
            + (f" (the busiest of {share['site_workers']} site workers side by side)" if share.get("site_workers", 1) > 1 else "")
            + f"; site setup (model, data): "
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
    "one_line",
    "overhead_share",
    "plot_dice",
    "plot_overlay",
    "round_contributors",
    "round_ranges",
    "segments_summary",
    "site_replies",
    "small_aggregates",
    "status_counts",
    "write_report",
]
