"""``pemma predict``: segment one case with a run's global adapters.

::

    pemma predict --run RUN_DIR --ct CT.nii.gz [--pet PET.nii.gz] --out MASK.nii.gz
                  [--ehr ROW.csv | --clinical CLINICAL.csv --case-id ID [--id-column COLUMN]]

The mode is ``ctpet`` with a PET, ``ct`` without (``--mode`` to choose). The image is
preprocessed like a site's data (:func:`pemma_core.data.inference_io.load_for_inference`) and the
mask written back on the original CT grid (:func:`pemma_core.data.inference_io.write_prediction`).

When the run's adapters carry a survival head (a ``prognosis`` phase ran), the risk score
(Cox log relative hazard, higher = shorter expected survival) of the tumour-centred crop
is printed and written to ``<MASK>.risk.json``. With an EHR branch the covariates come
from ``--ehr`` (a CSV whose one row holds them) or ``--clinical`` + ``--case-id``,
preprocessed with the run's EHR preprocessor (kept in the adapter file's metadata);
without them the EHR term is left out, as at a site without EHR.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pemma_core import console


def load_run_model(run_dir: str | Path, round_: int | None = None):  # -> SegmentationModel
    """The PEMMA model of a run folder: its backbone with the adapters of ``round_`` (default: last)."""
    from pemma_core.model.factory import build_model
    from pemma_core.model.files import load_adapters, load_backbone, read_adapter_file
    from pemma_core.model.spec import ModelSpec
    from server.run_dir import RunDir

    run = RunDir(run_dir)
    if not run.backbone_file.exists():
        raise FileNotFoundError(f"{run.path} is not a run folder: {run.backbone_file.name} missing")
    files = {**run.checkpoints("adapt"), **run.checkpoints("prognosis")}
    if not files:
        raise FileNotFoundError(f"{run.path}: no adapters/round-<n>.safetensors yet")
    chosen = max(files) if round_ is None else round_
    if chosen not in files:
        raise FileNotFoundError(f"{run.path}: no adapters for round {chosen} (have {sorted(files)})")
    backbone, _ = load_backbone(run.backbone_file)
    metadata = read_adapter_file(files[chosen])[1]
    settings = run.read_json(run.run_json, {})
    if "spec" in metadata:  # the file's own spec: a prognosis round adds the survival head
        spec = ModelSpec.from_json(metadata["spec"])
    else:
        spec = ModelSpec.from_json(json.dumps(settings["model_spec"])) if "model_spec" in settings else backbone.pemma_spec
    model = build_model(spec, backbone)
    load_adapters(files[chosen], model)  # refuses adapters of another backbone
    model.eval()
    model.ehr_preprocessor = None
    if spec.ehr_features:
        from pemma_core.data.clinical import EhrPreprocessor

        model.ehr_preprocessor = EhrPreprocessor.from_metadata(metadata)
    return model


def run_spacing(run_dir: str | Path) -> tuple[float, float, float]:
    """The spacing the run's sites resampled to (first site YAML of the run), else the default."""
    from pemma_core.config.site import DEFAULT_SPACING, load_site_config
    from server.run_dir import RunDir

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
    ehr_csv: Path | None = None,
    clinical: Path | None = None,
    case_id: str | None = None,
    id_column: str = "case_id",
) -> tuple[Path, dict | None]:
    """Write the mask; with a survival head also ``<out>.risk.json``. Returns (mask, risk info or None)."""
    from pemma_core.data.inference_io import load_for_inference, write_prediction
    from pemma_core.training.local import predict_volume

    console.say(f"loading the model of {run_dir}" + (f" (round {round_})" if round_ is not None else ""))
    model = load_run_model(run_dir, round_)
    mode = mode or ("ctpet" if ct is not None and pet is not None else "pet" if ct is None else "ct")
    console.say(f"reading and resampling {', '.join(str(p) for p in (ct, pet) if p is not None)}")
    image, meta = load_for_inference(ct, pet, tuple(spacing) if spacing else run_spacing(run_dir))
    console.say(f"segmenting (mode {mode}, {device})")
    mask = predict_volume(model, image, mode, device)
    console.say(f"writing the mask on the CT grid: {out}")
    written = write_prediction(mask[0, 0], meta, out)
    if not getattr(model.spec, "survival", False):
        return written, None
    console.say("scoring the risk of the tumour-centred crop")
    info = predict_risk_of(model, image, mask, mode, read_ehr_row(model, ehr_csv, clinical, case_id, id_column))
    risk_file = written.with_name(written.name.removesuffix(".gz").removesuffix(".nii") + ".risk.json")
    risk_file.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    info["file"] = str(risk_file)
    return written, info


def read_ehr_row(
    model, ehr_csv: Path | None, clinical: Path | None, case_id: str | None, id_column: str = "case_id"
):  # -> pd.DataFrame | None
    """The covariate row of the case (``--ehr`` one-row CSV, or ``--clinical`` + ``--case-id``),
    read by :func:`pemma_core.data.clinical.read_clinical` with the run's covariate spec."""
    from pemma_core.data.clinical import read_clinical

    if ehr_csv is None and clinical is None:
        return None
    if model.ehr_preprocessor is None:
        raise ValueError("this run's survival head has no EHR branch: drop --ehr / --clinical")
    spec = model.ehr_preprocessor.spec
    if ehr_csv is not None:
        table, _ = read_clinical(ehr_csv, None, covariates=spec, on_bad_case="fail")
        if len(table) != 1:
            raise ValueError(f"--ehr {ehr_csv}: expected one row of covariates, found {len(table)}")
        return table.reset_index(drop=True)
    if case_id is None:
        raise ValueError("--clinical needs --case-id")
    table, problems = read_clinical(clinical, id_column, covariates=spec)
    if case_id not in table.index:
        why = "; ".join(str(p) for p in problems if p.case_id == case_id) or f"no row in column {id_column!r}"
        raise ValueError(f"--clinical {clinical}: case {case_id!r} has no usable row ({why})")
    return table.loc[[case_id]].reset_index(drop=True)


def predict_risk_of(model, image, mask, mode: str, ehr_row) -> dict:
    """Risk of the crop around the predicted tumour (the image centre when nothing is predicted)."""
    import torch

    from pemma_core.training.prognosis import Cohort, crop_around_tumour, predict_risk

    crop = crop_around_tumour(image[0], mask[0].float(), model.roi_size)
    ehr = torch.as_tensor(model.ehr_preprocessor.transform(ehr_row)) if ehr_row is not None else None
    cohort = Cohort(image=crop[None].float(), time=torch.zeros(1), event=torch.zeros(1), ehr=ehr)
    risk = float(predict_risk(model, cohort, mode, omit_ehr=True)[0])
    ehr_used = "yes" if ehr is not None else ("no branch" if not model.spec.ehr_features else "omitted (no --ehr)")
    return {"risk": risk, "mode": mode, "ehr": ehr_used,
            "meaning": "Cox log relative hazard; higher = shorter expected survival (relative, not calibrated)"}


def write_overlay(run, sites: Sequence[Path]) -> Path:
    """``RUN/plots/overlay.png``: the final adapters on the first test case of a CT+PET site
    (the simulation has every site's data at hand; a deployed server never does)."""
    from pemma_core.config.site import load_site_config
    from pemma_core.data.pipeline import eval_loader
    from pemma_core.training.local import predict_volume
    from server.report import plot_overlay

    model = load_run_model(run.path)
    configs = [load_site_config(p) for p in sites]
    config = next((c for c in configs if c.has_ct and c.has_pet), configs[0])
    # Show the mode that did best at that site in the last round (ctpet when nothing was evaluated).
    from server.run_dir import phase_rounds

    last = (phase_rounds(run.metrics(), "adapt") or [{}])[-1]
    dice = next((s.get("dice", {}) for s in last.get("sites", []) if s["name"] == config.name), {})
    default = "ctpet" if config.has_pet and config.has_ct else ("ct" if config.has_ct else "pet")
    mode = max(dice, key=dice.get) if dice else default
    batch = next(iter(eval_loader(config, split="test")))
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
    parser.add_argument("--ehr", type=Path, metavar="ROW.csv",
                        help="a CSV with one row of the case's EHR covariates (runs whose head has an EHR branch)")
    parser.add_argument("--clinical", type=Path, metavar="CSV", help="a clinical CSV holding the case (with --case-id)")
    parser.add_argument("--case-id", help="the case's id in --clinical")
    parser.add_argument("--id-column", default="case_id", help="the id column of --clinical (default case_id)")


def run(args: argparse.Namespace) -> int:
    if args.ct is None and args.pet is None:
        raise console.UsageError("give --ct (and optionally --pet)")
    out, risk = predict_files(args.run, args.ct, args.pet, args.out, args.mode, args.round, args.spacing, args.device,
                              args.ehr, args.clinical, args.case_id, args.id_column)
    print(out)
    if risk is not None:
        print(f"risk {risk['risk']:.4f} (mode {risk['mode']}, EHR {risk['ehr']}; higher = shorter expected survival) -> {risk['file']}")
    return 0
