"""``BENCHMARKS.md`` of ``pemma bench``, section by section, from its result dictionary.

Nothing here measures anything: every number printed comes from ``bench.json``. The
sections on speed are in :mod:`benchmarks.report_speed`, those on the data in
:mod:`benchmarks.report_data`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.report_data import data_quirks_section, errors_section, gpu_section
from benchmarks.report_format import byte_size, met_word, mib, param_count
from benchmarks.report_speed import inference_loading_section, profiling_section, speed_section, threads_section
from benchmarks.result_json import all_rows, row_dice, rows_by_id
from pemma_core.modes import MODES
from server.report import format_value

__all__ = ["summary_lines", "write_markdown"]


def write_markdown(results: Mapping[str, Any], path: Path, plots_link: str = "plots", json_link: str = "bench.json") -> Path:
    """Write the report; images are linked as ``plots_link/<file>``, the JSON named as ``json_link``
    (both relative to ``path``)."""
    lines = [
        *_header(results, plots_link, json_link),
        *_setup(results),
        *_results_table(results),
        *_seg_metrics(results),
        *_per_case(results),
        *_targets(results),
        *_forgetting(results),
        *_federated(results, plots_link),
        *_overlays(results, plots_link),
        *speed_section(results),
        *profiling_section(results),
        *threads_section(results),
        *inference_loading_section(results),
        *data_quirks_section(results),
        *errors_section(results),
        *gpu_section(results),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """The targets, one line each, for the end of the command's output."""
    lines = ["", "targets:"]
    for t in results.get("targets", []):
        measured = "-" if t["measured"] is None else f"{t['measured']:+.3f}"
        lines.append(f"  [{met_word(t).replace('*', ''):<12}] {t['backbone']:<11} {t['target']}: {measured} ({t['unit']})")
    return lines


def _header(results: Mapping[str, Any], plots_link: str, json_link: str) -> list[str]:
    """Title, where the numbers come from, and the quick/custom run notice."""
    config = results["config"]
    env = results["environment"]
    lines: list[str] = ["# pemma benchmarks", ""]
    lines += [
        f"Written by `{results.get('command') or 'pemma bench'}` ({config['mode']} run) on {env['started']}; "
        f"{results.get('wall_seconds', 0.0) / 60:.1f} min wall time. Every number below comes from that run "
        f"(`{json_link}` holds all of them); nothing is typed by hand."
        + (f" Text regenerated from that `bench.json` on {results['report_rewritten']} (`pemma bench --report-only`)."
           if results.get("report_rewritten") else "")
        + f" Plots: `{plots_link}/`.",
        "",
    ]
    if not results.get("complete"):
        done = "; ".join(f"{name}: {', '.join(r['row'] for r in entry.get('rows', [])) or 'none'}"
                         for name, entry in results.get("backbones", {}).items()) or "none"
        lines += ["> **Unfinished run**: it stopped before its end, so the sections below hold only what it reached "
                  f"(rows done: {done}; CNN row {'done' if results.get('cnn') else 'not run'}). "
                  "`pemma bench --resume` with the same options continues it.", ""]
    if config["mode"] == "quick":
        lines += ["> **Quick run**: a handful of steps per row and the first "
                  f"{len(results['data']['test_cases'])} test cases only. The Dice values show that the machinery "
                  "works, not how the models compare; run `pemma bench` for the full benchmark.", ""]
    elif config["mode"] == "custom":
        lines += ["> **Custom run**: budgets or data differ from the full benchmark's defaults (see Setup).", ""]
    return lines


def _setup(results: Mapping[str, Any]) -> list[str]:
    """Machine, settings, step budgets and how every column is measured."""
    config = results["config"]
    env = results["environment"]
    lines: list[str] = [
        "## Setup", "",
        f"- Machine: {env['platform']}, {env['cpu_count']} CPU core(s), torch {env['torch']} ({env['threads']} intra-op "
        f"thread(s){', ' + config['threads_reason'] if config.get('threads') else ''}), MONAI {env['monai']}, peft {env['peft']}; device `{config['device']}`"
        + (f" ({env['cuda_device']}, bf16 autocast)" if env.get("cuda_device") else "") + ". "
        f"Load average (1 min) {env['load_average_start'][0]:.1f} at the start, "
        f"{env.get('load_average_end', [float('nan')])[0]:.1f} at the end: the cores were "
        + ("shared with other jobs, so wall times carry their noise (CPU times and FLOPs are given beside them)."
           if max(env["load_average_start"][0], env.get("load_average_end", [0])[0]) > 0.5 * env["cpu_count"] + 0.5
           else "mostly free."),
        f"- Preset `{config['preset']}`, batch {config['batch_size']}, "
        + (f"seeds {', '.join(map(str, config['seeds']))} (every row trained once per seed from the one CT backbone "
           "of seed " + str(config['seed']) + "; Dice is the seed mean, ± its standard deviation across seeds)"
           if len(config.get("seeds", [config["seed"]])) > 1 else f"seed {config['seed']}")
        + f"; AdamW; loss {env.get('loss', 'DiceCE')}; "
        f"learning rates: CT backbone and CNN {config['lr_backbone']}, full fine-tuning {config['lr_full']}, "
        f"PEMMA adapters {config['lr_adapter']}. PEMMA: rank 8, alpha 16, LoRA/DoRA on attention qkv + output "
        "projection, a shared LoRA trained by CT steps and a PET LoRA by the PET-reading modes; one mode per batch "
        "in the proportions ctpet 0.6 / ct 0.2 / pet 0.2 among those a site serves "
        "(smooth weighted round-robin: every 5 steps hold 3 ctpet, 1 ct, 1 pet). The centralized PEMMA rows are the "
        "federated row's fair reference: the same data (site-a's CT-only cases in ct steps) in the federation's mode "
        "mix" + _mix_text(results) + ".",
    ]
    for name, b in config["budgets"].items():
        lines.append(
            f"- **{name}** budget: CT backbone {b['pretrain_steps']} steps on the pooled CT training cases of all 3 sites; "
            f"then **{b['steps']} steps per row** (federated: {b['fed_rounds']} rounds x 3 sites x {b['fed_local_steps']} "
            "local steps). Every PEMMA / early-fusion / PET-only row starts from that same backbone "
            "(identical fingerprint); the **CT-only row is that backbone trained further on CT for the same "
            f"{b['steps']} steps** (the backbone itself is the \"before adaptation\" row)."
        )
    if results.get("cnn"):
        lines.append(f"- CNN reference: MONAI SegResNet (2 input channels, {param_count(results['cnn']['total_params'])} "
                     f"parameters), trained from scratch for {results['cnn']['steps']} steps, as many as the "
                     f"{config['backbones'][0]} rows saw in all (CT backbone + row steps), at the same crop size.")
    lines.append(
        f"- Evaluation: {len(results['data']['test_cases'])} test cases of `sites/ibsi/test.yaml` "
        f"({', '.join(results['data']['test_cases'])}), whole volumes, sliding window (overlap {config['overlap']}, "
        "gaussian), foreground Dice as `pemma_core.training.local.evaluate_cases` computes it. Bytes up: what one site sends per "
        "round (federated row: measured on the wire; other rows: their trainable tensors in fp32, i.e. what they "
        "would send). Peak memory per row: params + optimiser state + the highest bytes allocated during one "
        "training step (torch.profiler allocation events), in the row's most expensive mode."
    )
    lines.append("")
    return lines


def _mix_text(results: Mapping[str, Any]) -> str:
    for entry in results.get("backbones", {}).values():
        for row in entry.get("rows", []):
            if row.get("mode_weights"):
                return " (" + " / ".join(f"{m} {w:.3f}" for m, w in sorted(row["mode_weights"].items())) + ")"
    return ""


def _results_table(results: Mapping[str, Any]) -> list[str]:
    """One line per row and mode: Dice, size, upload, speed, memory."""
    lines: list[str] = ["## Results", ""]
    header = "| backbone | model | trained on | eval | Dice mean | trainable params | fraction | bytes up / round | s / step | peak memory |"
    lines += [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in all_rows(results):
        for i, mode in enumerate(m for m in MODES if m in row.get("dice", {})):
            dice = format_value(row["dice"][mode])
            if len(row.get("per_seed", [])) > 1:
                dice += f" ± {row['dice_seed_sd'][mode]:.3f}"
            cells = [row["backbone"], row["label"], row["train_data"], mode, dice,
                     param_count(row["trainable_params"]) + " / " + param_count(row["total_params"]),
                     "%.2f%%" % (100 * row["trainable_fraction"]), byte_size(row["bytes_up_per_round"]),
                     format_value(row["seconds_per_step"], 2), mib(row.get("peak_memory_bytes"))]
            if i > 0:  # later modes of the same model: only the mode and its Dice
                cells = ["", "", "", mode, cells[4], "", "", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["Bytes up for the centralized rows are what they *would* send per round if trained federated; "
              "the federated row's is measured (sum over its sites, mean over rounds). s / step is wall time "
              "including data loading.", ""]
    return lines


def _seg_metrics(results: Mapping[str, Any]) -> list[str]:
    """Aggregated Dice, HD95 and surface Dice of every row and mode (rows of older runs lack them)."""
    rows = [r for r in all_rows(results) if r.get("agg_dice")]
    if not rows:
        return []
    first = rows[0]
    unit, tolerance = first.get("distance_unit", "mm"), first.get("nsd_tolerance")
    lines = ["### Aggregated Dice, HD95 and surface Dice", "",
             f"Aggregated Dice (HECKTOR): sum over cases of 2|P and G| over the sum of |P| + |G|. HD95 in {unit}, the mean "
             "over the cases where it is defined (prediction and truth both non-empty). Surface Dice at "
             f"{tolerance:g} {unit} tolerance (MONAI's metrics).", "",
             "| backbone | model | eval | Dice mean | aggregated Dice | HD95 | surface Dice |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for mode in (m for m in MODES if m in row.get("dice", {})):
            lines.append(f"| {row['backbone']} | {row['label']} | {mode} | {format_value(row['dice'][mode])} | "
                         f"{format_value(row['agg_dice'].get(mode))} | {format_value(row['hd95'].get(mode), 1)} | "
                         f"{format_value(row['nsd'].get(mode))} |")
    lines.append("")
    return lines


def _per_case(results: Mapping[str, Any]) -> list[str]:
    """Dice of every row and mode on each test case."""
    lines: list[str] = []
    cases = results["data"]["test_cases"]
    lines += ["### Dice per test case", "", "| backbone | model | eval | " + " | ".join(cases) + " |",
              "|---|---|---|" + "---|" * len(cases)]
    for row in all_rows(results):
        for mode in (m for m in MODES if m in row.get("per_case", {})):
            per = row["per_case"][mode]
            lines.append(f"| {row['backbone']} | {row['label']} | {mode} | "
                         + " | ".join(format_value(per.get(c), 2) for c in cases) + " |")
    lines.append("")
    return lines


def _targets(results: Mapping[str, Any]) -> list[str]:
    """Each target: measured, threshold, met or missed (and whether the test cases settle it)."""
    lines: list[str] = ["## Targets", "", "| target | backbone | measured | target | result | gap to target |", "|---|---|---|---|---|---|"]
    for t in results.get("targets", []):
        ratio = "ratio" in t["unit"]
        fmt = (lambda v: format_value(v, 3)) if ratio else (lambda v: "-" if v is None else f"{v:+.1f} pts")
        threshold = "-" if t["threshold"] is None else (("<= " if not t["higher_is_better"] else ">= ") + fmt(t["threshold"]))
        gap = "-" if t["gap"] is None else (f"{t['gap']:+.3f}" if ratio else f"{t['gap']:+.1f} pts")
        ci = f" [{t['ci95'][0]:+.1f}, {t['ci95'][1]:+.1f}]" if t.get("ci95") else ""
        lines.append(f"| {t['target']} | {t['backbone']} | {fmt(t['measured'])}{ci} ({t['unit']}) | {threshold} | "
                     f"{met_word(t)} | {gap} |")
    lines += ["", "A Dice point is 0.01 Dice. \"Gap to target\" is measured minus threshold (negative: short of a "
              ">= target; positive: over a <= target). Brackets: paired bootstrap 95% interval of the Dice gap over "
              "the test cases (10,000 resamples of the cases); \"within noise\" means that interval reaches across the "
              "threshold, so the test cases cannot tell met from missed.", ""]
    return lines


def _forgetting(results: Mapping[str, Any]) -> list[str]:
    """CT-mode Dice of the adapted rows against the CT backbone they started from."""
    lines: list[str] = ["## Forgetting (CT mode before vs after adaptation)", ""]
    for name, entry in results.get("backbones", {}).items():
        rows = rows_by_id(entry)
        before = rows.get("ct-backbone", {}).get("per_case", {}).get("ct", {})
        lines += [f"**{name}**: CT backbone mean CT Dice {format_value(row_dice(rows.get('ct-backbone'), 'ct'))}.", "",
                  "| model | CT Dice after | change (pts) | cases that lost > 1 pt |", "|---|---|---|---|"]
        for key in ("pemma-lora", "pemma-dora", "pemma-lora-fed"):
            if key not in rows or "ct-backbone" not in rows:
                continue
            after = rows[key]["per_case"].get("ct", {})
            lost = [c for c in after if c in before and after[c] < before[c] - 0.01]
            change = 100 * (row_dice(rows[key], "ct") - row_dice(rows.get("ct-backbone"), "ct"))
            lines.append(f"| {rows[key]['label']} | {format_value(row_dice(rows[key], 'ct'))} | {change:+.1f} | "
                         f"{', '.join(lost) if lost else 'none'} |")
        lines.append("")
    return lines


def _federated(results: Mapping[str, Any], plots_link: str) -> list[str]:
    """The federated row per backbone: bytes per site, overhead, Dice per round, its plot."""
    lines: list[str] = ["## Federated row", ""]
    feds = [(name, fed) for name, entry in results.get("backbones", {}).items()
            for key, fed in rows_by_id(entry).items() if key.startswith("pemma-lora-fed")]
    for name, fed in feds:
        per_site = ", ".join(f"{k} {byte_size(v)}" for k, v in fed.get("bytes_up_per_site", {}).items())
        oh = fed.get("overhead", {})
        lines += [f"**{name}, {fed['label']}** (low-rank rule {fed.get('lora_aggregation') or '-'}): run folder "
                  f"`{fed['run_dir']}`; bytes up per round per site: {per_site} "
                  "(site-a trains only the shared and CT groups, so it sends less).",
                  f"Time outside local training: {100 * oh.get('overhead_share', float('nan')):.0f}% of the rounds' train "
                  f"wall time ({format_value(oh.get('train_wall_seconds'), 1)} s; site setup {format_value(oh.get('site_setup_seconds'), 1)} s). "
                  + (f"Site problems: {'; '.join(fed['sites_failed'])}." if fed.get("sites_failed") else "Every site reply was accepted.")
                  + _robust_text(fed),
                  "", "| round | " + " | ".join(MODES) + " | naive rule's relative error per group |",
                  "|---|---|---|---|---|"]
        for r in fed["per_round"]:
            errors = ", ".join(f"{g} {v:.3g}" for g, v in sorted((r.get("lora_naive_error") or {}).items())) or "-"
            lines.append(f"| {r['round']} | " + " | ".join(format_value(r["dice"].get(m)) for m in MODES)
                         + f" | {errors} |")
        plot = results.get("plots", {}).get(f"federated-dice-{name}")
        if plot:
            lines += ["", f"![federated Dice per round, {name}]({plots_link}/{Path(plot).name})"]
        lines.append("")
    return lines


def _robust_text(fed: Mapping[str, Any]) -> str:
    """The server's robust aggregation on the federated row's (honest) updates: target 0 clipped, 0 rejected."""
    robust = fed.get("robust")
    if not robust:
        return ""
    ratio = robust.get("max_rms_ratio")
    floors = sorted(set(fed.get("site_min_examples_per_round", {}).values()))
    return (f" Aggregation `{robust['rule']}`, outlier factor {robust['outlier_factor']:g}: of {robust['updates']} "
            f"honest updates {robust['clipped']} clipped, {robust['rejected']} rejected (target 0)"
            + (f"; largest update RMS {ratio:.2f}x its round's median" if ratio is not None else "") + "."
            + (f" Each round trains {fed['examples_per_round']} examples per site (local steps x batch); the sites "
               f"accept at least {', '.join(map(str, floors))} (`limits.min_examples_per_round`)." if floors else ""))


def _overlays(results: Mapping[str, Any], plots_link: str) -> list[str]:
    """The overlay plots of two test cases."""
    lines: list[str] = []
    overlays = [k for k in results.get("plots", {}) if k.startswith("overlay-")]
    if overlays:
        lines += ["## Two test cases", "", "Axial slice through the largest true tumour area: CT, PET, and the contours "
                  "of the truth (green), PEMMA-LoRA centralized in mode ctpet (red) and the CNN (cyan, dashed).", ""]
        lines += [f"![{k}]({plots_link}/{Path(results['plots'][k]).name})" for k in overlays]
        lines.append("")
    return lines
