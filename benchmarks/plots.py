"""The plots of ``pemma bench``: Dice per federated round, and test-case overlays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.result_json import row_dice, rows_by_id

__all__ = ["make_plots"]


def make_plots(results: Mapping[str, Any], folder: Path, test_batches: Sequence[Mapping[str, Any]],
               overlays: Mapping[str, Any]) -> dict[str, str]:
    """Dice per federated round (one plot per backbone) and two test-case overlays (the best
    and the worst PEMMA-LoRA case); returns plot name -> file."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the bench machines
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for name, entry in results.get("backbones", {}).items():
        path = _federated_dice_plot(name, rows_by_id(entry), len(test_batches), folder)
        if path is not None:
            written[f"federated-dice-{name}"] = str(path)
    predictions = overlays.get("predictions", {}).get("ctpet", {}) if overlays else {}
    if predictions:
        for case_id, path in _overlay_plots(results, overlays, predictions, test_batches, folder).items():
            written[f"overlay-{case_id}"] = str(path)
    return written


def _federated_dice_plot(name: str, rows: Mapping[str, Mapping[str, Any]], n_cases: int, folder: Path) -> Path | None:
    import matplotlib.pyplot as plt

    fed = rows.get("pemma-lora-fed")
    if not fed:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    start = row_dice(rows.get("ct-backbone"), "ct")
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
        value = row_dice(rows.get(key), "ctpet")
        if value is not None:
            ax.axhline(value, linestyle=style, color="gray" if key == "early-fusion" else "black", linewidth=1, label=label)
    ax.set_xlabel("round (0 = the CT backbone: PEMMA starts as it)")
    ax.set_ylabel(f"mean Dice, {n_cases} test cases")
    ax.set_xticks(list(xs))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{name}: federated Dice per round", fontsize=9)
    fig.tight_layout()
    path = folder / f"federated-dice-{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _overlay_plots(results: Mapping[str, Any], overlays: Mapping[str, Any], predictions: Mapping[str, np.ndarray],
                   test_batches: Sequence[Mapping[str, Any]], folder: Path) -> dict[str, Path]:
    import matplotlib.pyplot as plt

    name = overlays["backbone"]
    lora = rows_by_id(results["backbones"][name])["pemma-lora"]["per_case"]["ctpet"]
    ranked = sorted(lora, key=lambda c: lora[c])
    chosen = [ranked[-1], ranked[0]] if len(ranked) > 1 else ranked
    by_id = {str(b["case_id"][0]): b for b in test_batches}
    cnn = overlays.get("cnn") or {}
    cnn_dice = results.get("cnn", {}).get("per_case", {}).get("ctpet", {})
    written: dict[str, Path] = {}
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
        written[case_id] = path
    return written
