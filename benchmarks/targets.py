"""The targets of ``pemma bench`` (Dice gaps, step time and memory ratios), from its results.

Dice gaps are in points (x100) with a paired bootstrap 95% interval over the test cases:
with 8 test cases a single case moves a mean by several points.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks.result_json import row_dice, rows_by_id
from pemma_core.modes import MODES

__all__ = ["MEMORY_TARGET", "TIME_TARGET", "paired_bootstrap_ci", "seed_case_bootstrap_ci", "targets"]

TIME_TARGET = 0.8  # PEMMA step time <= 0.8 x full fine-tuning
MEMORY_TARGET = 0.7  # PEMMA peak memory <= 0.7 x full fine-tuning


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


def seed_case_bootstrap_ci(a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]],
                           reps: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Interval of the mean Dice gap ``a - b`` in points when rows were trained at several
    seeds: ``a`` and ``b`` map seed -> case -> Dice. Each resample draws seeds and cases with
    replacement (the gap paired by seed and case), so the interval covers training noise as
    well as the choice of test cases. A ``b`` trained once (one seed, e.g. the CT backbone)
    is paired with every seed of ``a``. With one seed it is the case bootstrap of :func:`paired_bootstrap_ci`."""
    if len(b) == 1 and len(a) > 1:
        only = next(iter(b.values()))
        b = {s: only for s in a}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    cases = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    if len(cases) < 2:
        return None
    diff = 100.0 * np.array([[a[s][c] - b[s][c] for c in cases] for s in seeds], dtype=float)  # [seeds, cases]
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, len(seeds), size=(reps, len(seeds)))
    case_draws = rng.integers(0, len(cases), size=(reps, len(cases)))
    means = diff[seed_draws[:, :, None], case_draws[:, None, :]].mean(axis=(1, 2))
    low, high = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


def _by_seed(row: Mapping[str, Any] | None, mode: str) -> dict[int, dict[str, float]]:
    if row is None:
        return {}
    runs = row.get("per_seed") or [{"seed": row.get("seed", 0), "per_case": row.get("per_case", {})}]
    return {int(r["seed"]): dict(r["per_case"].get(mode, {})) for r in runs if r["per_case"].get(mode)}


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


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else 100.0 * (a - b)


def _dice_targets(name: str, rows: Mapping[str, Mapping[str, Any]], cnn: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def dice_gap(label: str, key_a: str, mode_a: str, key_b: str, mode_b: str, threshold: float | None,
                 unit: str, row_b: Mapping[str, Any] | None = None) -> None:
        a, b = rows.get(key_a), row_b if row_b is not None else rows.get(key_b)
        da, db = row_dice(a, mode_a), row_dice(b, mode_b)
        ci = seed_case_bootstrap_ci(_by_seed(a, mode_a), _by_seed(b, mode_b))
        out.append(_target(label, name, _points(da, db), threshold, True, unit, f"{da} vs {db}", ci))

    dice_gap("PEMMA-LoRA (ctpet) within 1 Dice point of early fusion", "pemma-lora", "ctpet", "early-fusion", "ctpet",
             -1.0, "Dice points (LoRA - early fusion)")
    for key, label in (("pemma-lora", "PEMMA-LoRA"), ("pemma-dora", "PEMMA-DoRA")):
        dice_gap(f"{label} (ctpet) above CT-only (ct)", key, "ctpet", "ct-only", "ct", 0.0,
                 "Dice points (PEMMA - CT-only)")
    for mode in MODES:  # federated against centralized, per mode
        dice_gap(f"Federated PEMMA-LoRA ({mode}) within 2 Dice points of centralized", "pemma-lora-fed", mode,
                 "pemma-lora", mode, -2.0, "Dice points (federated - centralized)")
    for key in ("pemma-lora", "pemma-dora", "pemma-lora-fed"):
        label = rows[key]["label"] if key in rows else key
        dice_gap(f"No forgetting: {label} CT-mode Dice loses <= 1 point", key, "ct", "ct-backbone", "ct", -1.0,
                 "Dice points (after - backbone before)")
    if cnn is not None:
        dice_gap("Gap PEMMA-LoRA (ctpet) - CNN early fusion", "pemma-lora", "ctpet", "cnn", "ctpet", None,
                 "Dice points (PEMMA - CNN)", row_b=cnn)
    return out


def _speed_targets(name: str, entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
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


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every target per backbone (Dice gaps in points = x100, each with a paired bootstrap
    95% interval over the test cases; step time and memory ratios), from the measured numbers."""
    out: list[dict[str, Any]] = []
    for name, entry in results.get("backbones", {}).items():
        out += _dice_targets(name, rows_by_id(entry), results.get("cnn"))
        out += _speed_targets(name, entry)
    return out
