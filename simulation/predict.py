"""``pemma predict``: segment one case with a run's global adapters.

::

    pemma predict --run RUN_DIR --ct CT.nii.gz [--pet PET.nii.gz] --out MASK.nii.gz

The mode is ``ctpet`` with a PET, ``ct`` without (``--mode`` to choose). The image is
preprocessed like a site's data (:func:`pemma_core.data.load_for_inference`) and the
mask written back on the original CT grid (:func:`pemma_core.data.write_prediction`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HELP = "segment a CT (+PET) case with a run's adapters; the mask is written on the CT grid"


def load_run_model(run_dir: str | Path, round_: int | None = None):  # -> SegmentationModel
    """The PEMMA model of a run folder: its backbone with the adapters of ``round_`` (default: last)."""
    from pemma_core.adapters import load_adapters, load_backbone
    from pemma_core.model import ModelSpec, build_model
    from simulation.run_dir import RunDir

    run = RunDir(run_dir)
    if not run.backbone_file.exists():
        raise FileNotFoundError(f"{run.path} is not a run folder: {run.backbone_file.name} missing")
    files = run.checkpoints("adapt")
    if not files:
        raise FileNotFoundError(f"{run.path}: no adapters/round-<n>.safetensors yet")
    chosen = max(files) if round_ is None else round_
    if chosen not in files:
        raise FileNotFoundError(f"{run.path}: no adapters for round {chosen} (have {sorted(files)})")
    backbone, _ = load_backbone(run.backbone_file)
    settings = run.read_json(run.run_json, {})
    spec = ModelSpec.from_dict(settings["model_spec"]) if "model_spec" in settings else backbone.pemma_spec
    model = build_model(spec, backbone)
    load_adapters(files[chosen], model)  # refuses adapters of another backbone
    model.eval()
    return model


def run_spacing(run_dir: str | Path) -> tuple[float, float, float]:
    """The spacing the run's sites resampled to (first site YAML of the run), else the default."""
    from pemma_core.site import DEFAULT_SPACING, load_site_config
    from simulation.run_dir import RunDir

    run = RunDir(run_dir)
    for path in run.metrics()["run"].get("sites", []):
        try:
            return load_site_config(path).spacing
        except Exception:
            continue
    return DEFAULT_SPACING


def predict_files(
    run_dir: str | Path,
    ct: Path | None,
    pet: Path | None,
    out: Path,
    mode: str | None = None,
    round_: int | None = None,
    spacing: Sequence[float] | None = None,
    device: str = "cpu",
) -> Path:
    from pemma_core.data import load_for_inference, write_prediction
    from pemma_core.train import predict_volume

    model = load_run_model(run_dir, round_)
    mode = mode or ("ctpet" if ct is not None and pet is not None else "pet" if ct is None else "ct")
    image, meta = load_for_inference(ct, pet, tuple(spacing) if spacing else run_spacing(run_dir))
    mask = predict_volume(model, image, mode, device)
    return write_prediction(mask[0, 0], meta, out)


def write_overlay(run, sites: Sequence[Path]) -> Path:
    """``RUN/plots/overlay.png``: the final adapters on the first test case of a CT+PET site
    (the simulation has every site's data at hand; a deployed server never does)."""
    from pemma_core import data
    from pemma_core.site import load_site_config
    from pemma_core.train import predict_volume
    from simulation.run_dir import plot_overlay

    model = load_run_model(run.path)
    configs = [load_site_config(p) for p in sites]
    config = next((c for c in configs if c.has_ct and c.has_pet), configs[0])
    # Show the mode that did best at that site in the last round (ctpet when nothing was evaluated).
    last = (run.metrics()["rounds"] or [{}])[-1]
    dice = next((s.get("dice", {}) for s in last.get("sites", []) if s["name"] == config.name), {})
    default = "ctpet" if config.has_pet and config.has_ct else ("ct" if config.has_ct else "pet")
    mode = max(dice, key=dice.get) if dice else default
    batch = next(iter(data.eval_loader(config, split="test")))
    pred = predict_volume(model, batch["image"], mode)[0, 0].numpy()
    image = batch["image"][0].numpy()
    label = batch["label"][0, 0].numpy() > 0.5
    dice = 2 * float((pred * label).sum()) / max(1.0, float(pred.sum() + label.sum()))
    title = f"{config.name}, a test case, mode {mode}, Dice {dice:.3f} (final adapters)"
    return plot_overlay(image[0], image[1] if config.has_pet else None, label, pred.astype(np.uint8),
                        run.plots / "overlay.png", title=title)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="run folder (pemma simulate / flwr run output)")
    parser.add_argument("--ct", type=Path, help="CT NIfTI")
    parser.add_argument("--pet", type=Path, help="PET NIfTI (optional)")
    parser.add_argument("--out", type=Path, required=True, help="mask NIfTI to write (on the CT grid)")
    parser.add_argument("--mode", choices=("ct", "pet", "ctpet"), help="default: ctpet with a PET, else ct")
    parser.add_argument("--round", type=int, help="adapters of this round (default: the last)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="resampling spacing in mm (default: the run's sites')")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")


def run(args: argparse.Namespace) -> int:
    if args.ct is None and args.pet is None:
        print("pemma predict: give --ct (and optionally --pet)", file=sys.stderr)
        return 2
    try:
        out = predict_files(args.run, args.ct, args.pet, args.out, args.mode, args.round, args.spacing, args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"pemma predict: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0
