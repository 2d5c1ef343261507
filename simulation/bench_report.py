"""``BENCHMARKS.md``, the targets and the plots of ``pemma bench``, from its result dictionary.

Nothing here measures anything: every number printed comes from ``bench.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.run_dir import format_value as _f

MODE_ORDER = ("ct", "pet", "ctpet")
TIME_TARGET = 0.8  # PEMMA step time <= 0.8 x full fine-tuning
MEMORY_TARGET = 0.7  # PEMMA peak memory <= 0.7 x full fine-tuning


# ----------------------------------------------------------------------------- targets


def _rows(entry: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {r["row"]: r for r in entry.get("rows", [])}


def _dice(row: Mapping[str, Any] | None, mode: str) -> float | None:
    if row is None:
        return None
    value = row.get("dice", {}).get(mode)
    return None if value is None else float(value)


def paired_bootstrap_ci(a: Mapping[str, float], b: Mapping[str, float], reps: int = 10_000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float] | None:
    """Interval of ``mean(a - b)`` in Dice points over the cases both hold, resampling cases
    with replacement (paired bootstrap, percentile interval). None under two shared cases.

    With 8 test cases a single case moves a mean by several points: the interval says
    whether a gap is distinguishable from which cases happened to be drawn."""
    cases = sorted(set(a) & set(b))
    if len(cases) < 2:
        return None
    diff = 100.0 * (np.array([a[c] for c in cases], dtype=float) - np.array([b[c] for c in cases], dtype=float))
    draws = np.random.default_rng(seed).integers(0, len(cases), size=(reps, len(cases)))
    low, high = np.quantile(diff[draws].mean(axis=1), [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


def _target(name: str, backbone: str, measured: float | None, threshold: float | None, higher_is_better: bool,
            unit: str, detail: str, ci: tuple[float, float] | None = None) -> dict[str, Any]:
    """A target line: ``met`` is None when there is no threshold (a reported gap) or no number.
    ``settled``: the whole 95% interval ``ci`` (when given) lies on the measured side of the threshold."""
    met = None
    gap = None
    settled = None
    if measured is not None and threshold is not None:
        met = measured >= threshold if higher_is_better else measured <= threshold
        gap = measured - threshold
        if ci is not None:
            settled = (ci[0] >= threshold if higher_is_better else ci[1] <= threshold) if met else \
                      (ci[1] < threshold if higher_is_better else ci[0] > threshold)
    return {"target": name, "backbone": backbone, "measured": measured, "threshold": threshold,
            "higher_is_better": higher_is_better, "unit": unit, "met": met, "gap": gap, "detail": detail,
            "ci95": list(ci) if ci is not None else None, "settled": settled}


def _per_case(row: Mapping[str, Any] | None, mode: str) -> dict[str, float]:
    return dict((row or {}).get("per_case", {}).get(mode, {}))


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every target of issues 4 and 6 per backbone, from the measured numbers (Dice in points
    = x100), with a paired bootstrap 95% interval over the test cases for every Dice gap."""
    out: list[dict[str, Any]] = []
    cnn = results.get("cnn")
    for name, entry in results.get("backbones", {}).items():
        rows = _rows(entry)
        pts = lambda a, b: None if a is None or b is None else 100.0 * (a - b)  # noqa: E731

        def dice_gap(label: str, key_a: str, mode_a: str, key_b: str, mode_b: str, threshold: float | None,
                     unit: str, row_b: Mapping[str, Any] | None = None) -> None:
            a, b = rows.get(key_a), row_b if row_b is not None else rows.get(key_b)
            da, db = _dice(a, mode_a), _dice(b, mode_b)
            ci = paired_bootstrap_ci(_per_case(a, mode_a), _per_case(b, mode_b))
            out.append(_target(label, name, pts(da, db), threshold, True, unit, f"{da} vs {db}", ci))

        dice_gap("PEMMA-LoRA (ctpet) within 1 Dice point of early fusion", "pemma-lora", "ctpet", "early-fusion", "ctpet",
                 -1.0, "Dice points (LoRA - early fusion)")
        for key, label in (("pemma-lora", "PEMMA-LoRA"), ("pemma-dora", "PEMMA-DoRA")):
            dice_gap(f"{label} (ctpet) above CT-only (ct)", key, "ctpet", "ct-only", "ct", 0.0,
                     "Dice points (PEMMA - CT-only)")
        for mode in MODE_ORDER:  # issue 4: federated against centralized, per mode
            dice_gap(f"Federated PEMMA-LoRA ({mode}) within 2 Dice points of centralized", "pemma-lora-fed", mode,
                     "pemma-lora", mode, -2.0, "Dice points (federated - centralized)")
        for key in ("pemma-lora", "pemma-dora", "pemma-lora-fed"):
            label = rows[key]["label"] if key in rows else key
            dice_gap(f"No forgetting: {label} CT-mode Dice loses <= 1 point", key, "ct", "ct-backbone", "ct", -1.0,
                     "Dice points (after - backbone before)")
        if cnn is not None:
            dice_gap("Gap PEMMA-LoRA (ctpet) - CNN early fusion", "pemma-lora", "ctpet", "cnn", "ctpet", None,
                     "Dice points (PEMMA - CNN)", row_b=cnn)
        for key, preset in (("speed", None), ("speed_paper", "paper")):
            speed = entry.get(key)
            if not speed:
                continue
            where = f" ({preset} preset)" if preset else ""
            out.append(_target(f"PEMMA-LoRA step time <= {TIME_TARGET}x full fine-tuning{where}", name,
                               speed.get("time_ratio"), TIME_TARGET, False, "ratio PEMMA / full (wall s per step)",
                               f"CPU-time ratio {speed.get('cpu_time_ratio'):.3f}, FLOPs ratio {speed.get('flops_ratio'):.3f}"))
            out.append(_target(f"PEMMA-LoRA peak memory <= {MEMORY_TARGET}x full fine-tuning{where}", name,
                               speed.get("memory_ratio"), MEMORY_TARGET, False, "ratio PEMMA / full (peak memory)",
                               speed["variants"]["pemma-lora"].get("peak_memory_method", "")))
    return out


# ----------------------------------------------------------------------------- plots


def make_plots(results: Mapping[str, Any], folder: Path, test_batches: Sequence[Mapping[str, Any]],
               overlays: Mapping[str, Any]) -> dict[str, str]:
    """Dice per federated round (one plot per backbone) and two test-case overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for name, entry in results.get("backbones", {}).items():
        rows = _rows(entry)
        fed = rows.get("pemma-lora-fed")
        if not fed:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        start = _dice(rows.get("ct-backbone"), "ct")
        points = [(0, start)] if start is not None else []
        points += [(r["round"], r["dice"]["ctpet"]) for r in fed["per_round"] if "ctpet" in r["dice"]]
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label="federated PEMMA-LoRA, ctpet")
        last = fed["per_round"][-1]
        for mode, marker in (("ct", "s"), ("pet", "^")):
            if mode in last["dice"]:
                ax.scatter([last["round"]], [last["dice"][mode]], marker=marker, zorder=3, label=f"federated, {mode} (last round)")
        for key, style, label in (("pemma-lora", "--", "centralized PEMMA-LoRA, ctpet"),
                                  ("early-fusion", ":", "early fusion, ctpet")):
            value = _dice(rows.get(key), "ctpet")
            if value is not None:
                ax.axhline(value, linestyle=style, color="gray" if key == "early-fusion" else "black", linewidth=1, label=label)
        ax.set_xlabel("round (0 = the CT backbone: PEMMA starts as it)")
        ax.set_ylabel(f"mean Dice, {len(test_batches)} test cases")
        ax.set_xticks(list(xs))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{name}: federated Dice per round", fontsize=9)
        fig.tight_layout()
        path = folder / f"federated-dice-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[f"federated-dice-{name}"] = str(path)

    predictions = overlays.get("predictions", {}).get("ctpet", {}) if overlays else {}
    if predictions:
        name = overlays["backbone"]
        lora = _rows(results["backbones"][name])["pemma-lora"]["per_case"]["ctpet"]
        ranked = sorted(lora, key=lambda c: lora[c])
        chosen = [ranked[-1], ranked[0]] if len(ranked) > 1 else ranked
        by_id = {str(b["case_id"][0]): b for b in test_batches}
        cnn = overlays.get("cnn") or {}
        cnn_dice = results.get("cnn", {}).get("per_case", {}).get("ctpet", {})
        for which, case_id in zip(("best", "worst"), chosen):
            batch = by_id[case_id]
            image = batch["image"][0].numpy()
            label = batch["label"][0, 0].numpy() > 0.5
            pred = predictions[case_id] > 0
            z = int(np.argmax(label.reshape(-1, label.shape[-1]).sum(axis=0))) if label.any() else label.shape[-1] // 2
            fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
            axes[0].imshow(image[0][..., z].T, cmap="gray", origin="lower")
            axes[0].set_title("CT")
            axes[1].imshow(image[1][..., z].T, cmap="hot", origin="lower")
            axes[1].set_title("PET (SUV / 20)")
            axes[2].imshow(image[0][..., z].T, cmap="gray", origin="lower")
            if label[..., z].any():
                axes[2].contour(label[..., z].T, levels=[0.5], colors="lime", linewidths=1.4)
            if pred[..., z].any():
                axes[2].contour(pred[..., z].T, levels=[0.5], colors="red", linewidths=1.2)
            title = f"true (green), PEMMA-LoRA ctpet (red, Dice {lora[case_id]:.3f})"
            if case_id in cnn and cnn[case_id][..., z].any():
                axes[2].contour((cnn[case_id] > 0)[..., z].T, levels=[0.5], colors="cyan", linewidths=1.0, linestyles="dashed")
                title += f"\nCNN (cyan dashed, Dice {cnn_dice.get(case_id, float('nan')):.3f})"
            axes[2].set_title(title, fontsize=8)
            for ax in axes:
                ax.axis("off")
            fig.suptitle(f"{case_id} ({which} PEMMA-LoRA case, {name}), axial slice {z} of the 2 x 2 x 3.27 mm grid",
                         fontsize=9)
            fig.tight_layout()
            path = folder / f"overlay-{case_id}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written[f"overlay-{case_id}"] = str(path)
    return written


# ----------------------------------------------------------------------------- markdown


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def _bytes(value: Any) -> str:
    if value is None:
        return "-"
    if value >= 2**20:
        return f"{value / 2**20:.2f} MiB"
    return f"{value / 2**10:.1f} KiB"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _met(target: Mapping[str, Any]) -> str:
    if target["met"] is None:
        return "reported" if target["measured"] is not None else "not measured"
    word = "**met**" if target["met"] else "**missed**"
    if target.get("settled") is False:
        word += " (within noise)"
    return word


def _all_rows(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rows = [r for entry in results.get("backbones", {}).values() for r in entry.get("rows", [])]
    if results.get("cnn"):
        rows.append(results["cnn"])
    return rows


def write_markdown(results: Mapping[str, Any], path: Path, plots_link: str = "plots", json_link: str = "bench.json") -> Path:
    """Write the report; images are linked as ``plots_link/<file>``, the JSON named as ``json_link``
    (both relative to ``path``)."""
    config, env = results["config"], results["environment"]
    quick = config["mode"] == "quick"
    lines: list[str] = ["# pemma benchmarks", ""]
    lines += [
        f"Written by `{results.get('command') or 'pemma bench'}` ({config['mode']} run) on {env['started']}; "
        f"{results['wall_seconds'] / 60:.1f} min wall time. Every number below comes from that run "
        f"(`{json_link}` holds all of them); nothing is typed by hand."
        + (f" Text regenerated from that `bench.json` on {results['report_rewritten']} (`pemma bench --report-only`)."
           if results.get("report_rewritten") else "")
        + f" Plots: `{plots_link}/`.",
        "",
    ]
    if quick:
        lines += ["> **Quick run**: a handful of steps per row and the first "
                  f"{len(results['data']['test_cases'])} test cases only. The Dice values show that the machinery "
                  "works, not how the models compare; run `pemma bench` for the full benchmark.", ""]
    elif config["mode"] == "custom":
        lines += ["> **Custom run**: budgets or data differ from the full benchmark's defaults (see Setup).", ""]
    lines += [
        "## Setup", "",
        f"- Machine: {env['platform']}, {env['cpu_count']} CPU core(s), torch {env['torch']} ({env['threads']} intra-op "
        f"thread(s){', ' + config['threads_reason'] if config.get('threads') else ''}), MONAI {env['monai']}, peft {env['peft']}; device `{config['device']}`"
        + (f" ({env['cuda_device']}, bf16 autocast)" if env.get("cuda_device") else "") + ". "
        f"Load average (1 min) {env['load_average_start'][0]:.1f} at the start, "
        f"{env.get('load_average_end', [float('nan')])[0]:.1f} at the end: the cores were "
        + ("shared with other jobs, so wall times carry their noise (CPU times and FLOPs are given beside them)."
           if max(env["load_average_start"][0], env.get("load_average_end", [0])[0]) > 0.5 * env["cpu_count"] + 0.5
           else "mostly free."),
        f"- Preset `{config['preset']}`, batch {config['batch_size']}, seed {config['seed']}; AdamW; loss DiceCE; "
        f"learning rates: CT backbone and CNN {config['lr_backbone']}, full fine-tuning {config['lr_full']}, "
        f"PEMMA adapters {config['lr_adapter']}. PEMMA: rank 8, alpha 16, LoRA/DoRA on attention qkv + output "
        "projection; one mode per batch in the proportions ctpet 0.6 / ct 0.2 / pet 0.2 among those a site serves "
        "(smooth weighted round-robin: every 5 steps hold 3 ctpet, 1 ct, 1 pet).",
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
        lines.append(f"- CNN reference: MONAI SegResNet (2 input channels, {_params(results['cnn']['total_params'])} "
                     f"parameters), trained from scratch for {results['cnn']['steps']} steps, as many as the "
                     f"{config['backbones'][0]} rows saw in all (CT backbone + row steps), at the same crop size.")
    lines.append(
        f"- Evaluation: {len(results['data']['test_cases'])} test cases of `sites/ibsi/test.yaml` "
        f"({', '.join(results['data']['test_cases'])}), whole volumes, sliding window (overlap {config['overlap']}, "
        "gaussian), foreground Dice as `pemma_core.train.evaluate` computes it. Bytes up: what one site sends per "
        "round (federated row: measured on the wire; other rows: their trainable tensors in fp32, i.e. what they "
        "would send). Peak memory per row: params + optimiser state + the highest bytes allocated during one "
        "training step (torch.profiler allocation events), in the row's most expensive mode."
    )
    lines.append("")

    # main table
    lines += ["## Results", ""]
    header = "| backbone | model | trained on | eval | Dice mean | trainable params | fraction | bytes up / round | s / step | peak memory |"
    lines += [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in _all_rows(results):
        for i, mode in enumerate(m for m in MODE_ORDER if m in row.get("dice", {})):
            cells = [row["backbone"], row["label"], row["train_data"], mode, _f(row["dice"][mode]),
                     _params(row["trainable_params"]) + " / " + _params(row["total_params"]),
                     "%.2f%%" % (100 * row["trainable_fraction"]), _bytes(row["bytes_up_per_round"]),
                     _f(row["seconds_per_step"], 2), _mib(row.get("peak_memory_bytes"))]
            if i > 0:  # later modes of the same model: only the mode and its Dice
                cells = ["", "", "", mode, cells[4], "", "", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["Bytes up for the centralized rows are what they *would* send per round if trained federated; "
              "the federated row's is measured (sum over its sites, mean over rounds). s / step is wall time "
              "including data loading.", ""]

    # per case
    cases = results["data"]["test_cases"]
    lines += ["### Dice per test case", "", "| backbone | model | eval | " + " | ".join(cases) + " |",
              "|---|---|---|" + "---|" * len(cases)]
    for row in _all_rows(results):
        for mode in (m for m in MODE_ORDER if m in row.get("per_case", {})):
            per = row["per_case"][mode]
            lines.append(f"| {row['backbone']} | {row['label']} | {mode} | "
                         + " | ".join(_f(per.get(c), 2) for c in cases) + " |")
    lines.append("")

    # targets
    lines += ["## Targets", "", "| target | backbone | measured | target | result | gap to target |", "|---|---|---|---|---|---|"]
    for t in results.get("targets", []):
        ratio = "ratio" in t["unit"]
        fmt = (lambda v: _f(v, 3)) if ratio else (lambda v: "-" if v is None else f"{v:+.1f} pts")
        threshold = "-" if t["threshold"] is None else (("<= " if not t["higher_is_better"] else ">= ") + fmt(t["threshold"]))
        gap = "-" if t["gap"] is None else (f"{t['gap']:+.3f}" if ratio else f"{t['gap']:+.1f} pts")
        ci = f" [{t['ci95'][0]:+.1f}, {t['ci95'][1]:+.1f}]" if t.get("ci95") else ""
        lines.append(f"| {t['target']} | {t['backbone']} | {fmt(t['measured'])}{ci} ({t['unit']}) | {threshold} | "
                     f"{_met(t)} | {gap} |")
    lines += ["", "A Dice point is 0.01 Dice. \"Gap to target\" is measured minus threshold (negative: short of a "
              ">= target; positive: over a <= target). Brackets: paired bootstrap 95% interval of the Dice gap over "
              "the test cases (10,000 resamples of the cases); \"within noise\" means that interval reaches across the "
              "threshold, so the test cases cannot tell met from missed.", ""]

    # forgetting
    lines += ["## Forgetting (CT mode before vs after adaptation)", ""]
    for name, entry in results.get("backbones", {}).items():
        rows = _rows(entry)
        before = rows.get("ct-backbone", {}).get("per_case", {}).get("ct", {})
        lines += [f"**{name}**: CT backbone mean CT Dice {_f(_dice(rows.get('ct-backbone'), 'ct'))}.", "",
                  "| model | CT Dice after | change (pts) | cases that lost > 1 pt |", "|---|---|---|---|"]
        for key in ("pemma-lora", "pemma-dora", "pemma-lora-fed"):
            if key not in rows or "ct-backbone" not in rows:
                continue
            after = rows[key]["per_case"].get("ct", {})
            lost = [c for c in after if c in before and after[c] < before[c] - 0.01]
            change = 100 * (_dice(rows[key], "ct") - _dice(rows.get("ct-backbone"), "ct"))
            lines.append(f"| {rows[key]['label']} | {_f(_dice(rows[key], 'ct'))} | {change:+.1f} | "
                         f"{', '.join(lost) if lost else 'none'} |")
        lines.append("")

    # federated
    lines += ["## Federated row", ""]
    for name, entry in results.get("backbones", {}).items():
        fed = _rows(entry).get("pemma-lora-fed")
        if not fed:
            continue
        per_site = ", ".join(f"{k} {_bytes(v)}" for k, v in fed.get("bytes_up_per_site", {}).items())
        oh = fed.get("overhead", {})
        lines += [f"**{name}**: run folder `{fed['run_dir']}`; bytes up per round per site: {per_site} "
                  "(site-a trains only the shared and CT groups, so it sends less).",
                  f"Time outside local training: {100 * oh.get('overhead_share', float('nan')):.0f}% of the rounds' train "
                  f"wall time ({_f(oh.get('train_wall_seconds'), 1)} s; site setup {_f(oh.get('site_setup_seconds'), 1)} s). "
                  + (f"Site problems: {'; '.join(fed['sites_failed'])}." if fed.get("sites_failed") else "Every site reply was accepted."),
                  "", "| round | " + " | ".join(MODE_ORDER) + " |", "|---|---|---|---|"]
        for r in fed["per_round"]:
            lines.append(f"| {r['round']} | " + " | ".join(_f(r["dice"].get(m)) for m in MODE_ORDER) + " |")
        plot = results.get("plots", {}).get(f"federated-dice-{name}")
        if plot:
            lines += ["", f"![federated Dice per round, {name}]({plots_link}/{Path(plot).name})"]
        lines.append("")
    overlays = [k for k in results.get("plots", {}) if k.startswith("overlay-")]
    if overlays:
        lines += ["## Two test cases", "", "Axial slice through the largest true tumour area: CT, PET, and the contours "
                  "of the truth (green), PEMMA-LoRA centralized in mode ctpet (red) and the CNN (cyan, dashed).", ""]
        lines += [f"![{k}]({plots_link}/{Path(results['plots'][k]).name})" for k in overlays]
        lines.append("")

    # speed
    lines += ["## Speed and memory: PEMMA-LoRA vs full fine-tuning", "",
              "Same backbone, same real CT+PET batch (batch "
              f"{config['batch_size']}, mode ctpet), each variant in a fresh Python process; full fine-tuning = the "
              "early-fusion model (the whole 2-channel backbone trained). Median of "
              f"{config['speed_steps']} timed step(s) after a warm-up step. Peak memory on CPU: the process's peak RSS "
              "during those steps (VmHWM, reset once the model is built) minus its RSS after building the model; "
              "on CUDA `max_memory_allocated`. Tensor peak: params + optimiser state + the profiler's peak bytes "
              "allocated in one step.", "",
              "| backbone | variant | trainable | s / step (wall) | CPU s / step | GFLOP / step | peak memory | tensor peak |",
              "|---|---|---|---|---|---|---|---|"]
    for name, entry in results.get("backbones", {}).items():
        for key in ("speed", "speed_paper"):
            speed = entry.get(key)
            if not speed:
                continue
            where = f"{name}, {speed['preset']} preset, batch {speed['batch_size']}" if key == "speed_paper" else name
            for variant, v in speed["variants"].items():
                lines.append(f"| {where} | {variant} | {_params(v['trainable_params'])} | {v['seconds_per_step']:.2f} | "
                             f"{v['cpu_seconds_per_step']:.2f} | {v['flops_per_step'] / 1e9:.0f} | "
                             f"{_mib(v['peak_memory_bytes'])} | {_mib(v.get('tensor_peak_bytes'))} |")
            lines.append(f"| {where} | **ratio PEMMA / full** | | **{speed['time_ratio']:.3f}** | "
                         f"{speed['cpu_time_ratio']:.3f} | {speed['flops_ratio']:.3f} | **{speed['memory_ratio']:.3f}** | "
                         f"{_f(speed.get('tensor_memory_ratio'))} |")
    lines += ["", f"Targets: time ratio <= {TIME_TARGET}, memory ratio <= {MEMORY_TARGET} (see Targets). The paper-preset "
              "pair (full runs, UNETR) uses an untrained backbone of the paper's size on one real 96^3 crop: time and "
              "memory do not depend on the weights. At the small preset the full-resolution decoder block, which every "
              "gradient must pass through, holds most of the saved activations in both variants; at the paper size the "
              "frozen weights' gradients and optimiser state, which PEMMA does not keep, weigh more.", ""]

    # profiling
    lines += ["## Profiling: the costs found and removed", "",
              "`torch.profiler` on one PEMMA-LoRA training step (mode ctpet), with MONAI's own modules (**before**) "
              "and with `pemma_core.model.speed_up_monai_modules` (**after**): (1) MONAI's InstanceNorm returns a view "
              "and its blocks then apply an in-place LeakyReLU and `out += residual` to it, so autograd copies whole "
              "activations twice in backward (`CopySlices`, `aten::copy_`/`clone`); the norm is now computed as "
              "`group_norm` with one group per channel (same maths, no view). (2) Swin UNETR's window attention ran "
              "`bmm` + softmax explicitly in training (MONAI uses `scaled_dot_product_attention` only without "
              "gradients); it now uses the fused kernel always, which also runs backward when the relative-position "
              "bias is frozen (PEMMA). Both are numerically equivalent (tests/test_bench.py checks the outputs). "
              "Step times below are interleaved before/after in one process.", "",
              "| backbone | variant | before s / step | after s / step | after / before (wall) | after / before (CPU) |",
              "|---|---|---|---|---|---|"]
    for name, entry in results.get("backbones", {}).items():
        prof = entry.get("profile", {})
        for variant in ("pemma-lora", "full-ft"):
            if variant in prof:
                p = prof[variant]
                lines.append(f"| {name} | {variant} | {p['before']['seconds_per_step']:.2f} | {p['after']['seconds_per_step']:.2f} | "
                             f"{p['time_ratio_after_before']:.3f} | {p['cpu_ratio_after_before']:.3f} |")
    lines.append("")
    for name, entry in results.get("backbones", {}).items():
        p = entry.get("profile", {}).get("pemma-lora")
        if not p or "top_ops" not in p["before"]:
            continue
        lines += [f"**{name}, PEMMA-LoRA step, top operators by self CPU time** (before: {p['before']['profiled_cpu_ms']:.0f} ms "
                  f"profiled, of which copies {p['before']['copy_ms']:.0f} ms and explicit attention "
                  f"{p['before']['explicit_attention_ms']:.0f} ms; after: {p['after']['profiled_cpu_ms']:.0f} ms, copies "
                  f"{p['after']['copy_ms']:.0f} ms, explicit attention {p['after']['explicit_attention_ms']:.0f} ms)", "",
                  "| before: op | ms | share | after: op | ms | share |", "|---|---|---|---|---|---|"]
        for b, a in zip(p["before"]["top_ops"][:8], p["after"]["top_ops"][:8]):
            lines.append(f"| `{b['op']}` | {b['self_ms']:.0f} | {100 * b['share']:.1f}% | `{a['op']}` | {a['self_ms']:.0f} | "
                         f"{100 * a['share']:.1f}% |")
        lines.append("")
    threads = results.get("threads")
    if threads:
        sps = threads["seconds_per_step"]
        cores = str(threads["cores"])
        faster = "1 thread" if sps["1"] < sps[cores] else f"{cores} threads"
        lines += [f"Intra-op threads, measured at the end of the run (load average {threads['load_average'][0]:.1f}): "
                  f"a PEMMA-LoRA step took {sps['1']:.2f} s with 1 thread and {sps[cores]:.2f} s with {cores}; "
                  f"{faster} won at that load. With other jobs on the cores, OpenMP threads of one process wait "
                  "on each other and a step can become several times slower than with one thread, which is why "
                  "the bench uses one thread when the machine is loaded when it starts "
                  f"(this run: {config.get('threads') or 'default'} thread(s), {config.get('threads_reason', '')}).", ""]

    # inference and loading
    lines += ["## Inference and data loading", ""]
    for name, entry in results.get("backbones", {}).items():
        inf = entry.get("inference")
        if inf:
            lines.append(
                f"- {name}: sliding-window inference of {inf['case_id']} (largest test case, grid {tuple(inf['grid_shape'])}, "
                f"{inf['windows_overlap_0.25']} windows of {inf['roi']}^3 at overlap 0.25, {inf['windows_overlap_0']} at 0), "
                f"PEMMA-LoRA ctpet: **{inf['seconds_after']:.2f} s** ({inf['seconds_before']:.2f} s with MONAI's modules, "
                f"ratio {inf['seconds_after'] / inf['seconds_before']:.3f}); overlap 0: {inf['seconds_after_overlap_0']:.2f} s. "
                "On these crops overlap 0.25 adds few windows, so the default stays."
            )
    loading = results.get("loading")
    if loading:
        lines.append(
            f"- Data loading ({loading['n_cases']} CT+PET cases, `measure_loading`): {loading['first_load_s_per_case']:.2f} s "
            f"per case cold (read, resample both grids, normalise, cache), **{loading['cached_load_s_per_case']:.3f} s per "
            f"case cached** ({loading['speedup']}x); a training batch (random crop + flips + affine of "
            f"{config['batch_size']} cases) {loading['train_batch_seconds']:.3f} s."
        )
    lines.append("")

    # data quirks
    data = results["data"]
    lines += ["## Real data quirks and what the pipeline does with them", ""]
    lines += [f"Usable cases: " + ", ".join(f"{k} {v}" for k, v in data["counts"].items()) + "."]
    if data["skipped"]:
        lines += ["", "Cases left out by the checks (`on_bad_case: skip`):", ""]
        lines += [f"- {s['site']}: {s['case_id']}: {s['problem']}" for s in data["skipped"]]
    else:
        lines.append("No case was left out by the checks.")
    lines += ["", f"Warnings the data layer emitted (`site_cases` / `inspect_case`), {len(data['warnings'])}:", ""]
    lines += [f"- {w['site']}: {w['message']}" for w in data["warnings"]] or ["- none"]
    audit = data.get("alignment", [])
    if audit:
        low = [a for a in audit if a["pet_mask_vs_ct_mask_dice"] < 0.8]
        lines += ["", "Alignment audit: PET_mask carried onto the CT-derived grid by the pipeline's own transform "
                  "(through both headers) against CT_mask on that grid. The pipeline trusts the headers and keeps "
                  "every case; a low Dice means the PET it trains on is shifted against the label.", "",
                  "| site | case | PET used | CT slices | PET slices | PET - CT z origin (mm) | PET_mask vs CT_mask Dice |",
                  "|---|---|---|---|---|---|---|"]
        for a in audit:
            lines.append(f"| {a['site']} | {a['case_id']} | {'yes' if a['pet_used'] else 'no (CT-only site)'} | {a['ct_slices']} | "
                         f"{a['pet_slices']} | {a['z_origin_offset_mm']:+.2f} | {a['pet_mask_vs_ct_mask_dice']:.3f} |")
        others = [a["pet_mask_vs_ct_mask_dice"] for a in audit if a not in low]
        low_text = ", ".join("%s (%.2f, %s)" % (a["case_id"], a["pet_mask_vs_ct_mask_dice"], a["site"]) for a in low)
        warned = [a["case_id"] for a in low if any(f"case {a['case_id']}:" in w["message"] for w in data["warnings"])]
        lines += ["", (f"Below 0.8: {low_text}; the others {min(others):.2f}-{max(others):.2f}. " if low and others else "")
                  + "No check detects a header shift as such (that needs the masks); "
                  + (f"{', '.join(warned)} only shows up indirectly, as part of its CT lying outside the PET field of "
                     "view (warning above). " if warned else "")
                  + "Such a case is kept and trained on with its PET shifted against its label; partial PET coverage "
                  "is only warned about (PET reads 0 outside its field of view), and a CT-only site never reads its PET."]
    lines.append("")

    if results.get("errors"):
        lines += ["## Phases that failed", "", "These parts of the run raised; their numbers are missing above.", ""]
        lines += [f"- {e['phase']}: `{e['error'][:300]}`" for e in results["errors"]]
        lines.append("")
    lines += ["## GPU (`--device cuda`)", "",
              "`pemma bench --device cuda --preset paper` runs the same suite on a GPU: training and inference under "
              "bf16 autocast (`pemma_core.train.autocast`), peak memory from `torch.cuda.max_memory_allocated`, the "
              "federated sites' YAMLs written with `device: cuda`. On a machine without CUDA it stops with a clear "
              "error before doing anything. "
              + ("This run used CUDA." if env.get("cuda_device") else
                 "**Not run here**: this machine has no GPU, so no GPU numbers exist yet; budgets for `paper` can be "
                 "raised with `--pretrain-steps/--fed-rounds/--fed-local-steps`."), ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    lines = ["", "targets:"]
    for t in results.get("targets", []):
        measured = "-" if t["measured"] is None else f"{t['measured']:+.3f}"
        lines.append(f"  [{_met(t).replace('*', ''):<12}] {t['backbone']:<11} {t['target']}: {measured} ({t['unit']})")
    return lines


__all__ = ["make_plots", "summary_lines", "targets", "write_markdown"]
