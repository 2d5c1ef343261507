"""``pemma predict``: segment a case (or a table of cases) with a run's or a package's adapters.

::

    pemma predict (--run RUN_DIR | --model PACKAGE) --ct CT [--pet PET] --out MASK.nii.gz
                  [--seg MASK.dcm] [--label LABEL] [--overwrite]
                  [--ehr ROW.csv | --clinical CLINICAL.csv --case-id ID [--id-column COLUMN]]
    pemma predict (--run RUN_DIR | --model PACKAGE) --batch CASES.csv [--clinical CLINICAL.csv] [--overwrite]

``--ct`` / ``--pet``: NIfTI files or DICOM series folders. The mode is ``ctpet`` with a PET,
``ct`` without (``--mode`` to choose). The image is preprocessed as the run recorded
(``run.json`` ``preprocessing``: spacing, CT window, SUV ceiling; an older run: its site
YAMLs; neither: ``--spacing`` is required) or as the package says, and the mask is written
back on the original CT grid (``.nii.gz`` compressed, ``.nii`` not). ``--seg`` also writes
a DICOM Segmentation referencing the CT series (the CT must then be a DICOM series folder).

Nothing is ever written over an input (``--ct``, ``--pet``, ``--label``, ``--clinical``,
``--ehr``; with ``--batch`` any row's), and over an existing file only with ``--overwrite``;
every check is made before anything is computed.

When the adapters carry a survival head (a ``prognosis`` phase ran), the risk score (Cox
log relative hazard, higher = shorter expected survival) of the tumour-centred crop is
printed and written to ``<MASK>.risk.json``. With an EHR branch the covariates come from
``--ehr`` (a CSV whose one row holds them) or ``--clinical`` + ``--case-id``, preprocessed
with the run's EHR preprocessor (kept in the adapter file's metadata); without them the EHR
term is left out, as at a site without EHR.

``--batch``: a CSV with columns ``case_id``, ``ct``, ``out`` and optionally ``pet`` and
``seg`` (paths relative to the CSV's folder); each row is checked and predicted on its own,
a bad row is reported and the others go on; exit status 1 if any row failed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pemma_core import console

BATCH_COLUMNS = ("case_id", "ct", "out")  # required; "pet" and "seg" optional


@dataclass(frozen=True)
class Job:
    """One case to predict: its inputs and the files to write."""

    case_id: str | None
    ct: Path | None
    pet: Path | None
    out: Path
    seg: Path | None = None
    label: Path | None = None


# ----------------------------------------------------------------------------- the model


def load_run_model(run_dir: str | Path, round_: int | None = None):  # -> SegmentationModel
    """The PEMMA model of a run folder: its backbone with the adapters of ``round_`` (default: last)."""
    from simulation.model_package import load_model, run_source

    return load_model(run_source(run_dir, round_))


def preprocessing_for(source, spacing: Sequence[float] | None):  # -> Preprocessing
    """How to prepare inputs for ``source``'s model: as recorded, ``spacing`` replacing the recorded
    spacing; with nothing recorded ``spacing`` is required (the default window and SUV ceiling)."""
    from pemma_core.data.pipeline import Preprocessing

    if source.preprocessing is None:
        if spacing is None:
            raise ValueError(f"{source.where} records no preprocessing (no 'preprocessing' in run.json, no site YAML "
                             "at hand): give --spacing X Y Z, the spacing in mm the sites resampled to")
        return Preprocessing(spacing=tuple(float(v) for v in spacing))  # type: ignore[arg-type]
    if spacing is not None:
        return dataclasses.replace(source.preprocessing, spacing=tuple(float(v) for v in spacing))
    return source.preprocessing


# ----------------------------------------------------------------------------- checks before any work


def risk_file_of(mask: Path) -> Path:
    """``<mask without .nii / .nii.gz>.risk.json`` beside the mask (ValueError for another suffix)."""
    from pemma_core.data.inference_io import mask_suffix

    return mask.with_name(mask.name[: -len(mask_suffix(mask))] + ".risk.json")


def choose_mode(mode: str | None, ct: Path | None, pet: Path | None) -> str:
    """``mode``, or ``ctpet`` with a PET, ``ct`` without (``pet`` with a PET alone); refuses a mode
    whose image was not given."""
    from pemma_core.modes import REQUIRED_MODALITIES

    chosen = mode or ("ctpet" if ct is not None and pet is not None else "pet" if ct is None else "ct")
    given = {"ct": ct, "pet": pet}
    missing = [f"--{m}" for m in sorted(REQUIRED_MODALITIES[chosen]) if given[m] is None]
    if missing:
        raise ValueError(f"--mode {chosen} needs {' and '.join(missing)}: give it, or choose "
                         f"--mode {'ct' if ct is not None else 'pet'}")
    return chosen


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_outputs(outputs: Mapping[str, Path], inputs: Mapping[str, Path | None], overwrite: bool) -> None:
    """Refuse an output that is an input (even with ``overwrite``), a folder, or an existing file
    without ``overwrite``. ``outputs``/``inputs``: what the user calls them (``--out``) -> path."""
    for what, path in outputs.items():
        for name, given in inputs.items():
            if given is not None and _same_file(path, given):
                raise ValueError(f"{what} {path} is an input ({name}): refusing to write over it")
        if path.is_dir():
            raise ValueError(f"{what} {path} is a folder: give the name of the file to write")
        if path.exists() and not overwrite:
            raise FileExistsError(17, "exists: pass --overwrite to replace it", str(path))


def check_job(job: Job, inputs: Mapping[str, Path | None], survival: bool, overwrite: bool) -> dict[str, Path]:
    """The files ``job`` will write (``--out``, the risk file, ``--seg``), each checked; ValueError,
    FileExistsError otherwise."""
    from pemma_core.data.inference_io import mask_suffix

    if job.out.is_dir():
        raise ValueError(f"--out {job.out} is a folder: give the mask's file name (MASK.nii.gz)")
    mask_suffix(job.out)
    outputs = {"--out": job.out}
    if survival:
        outputs["the risk file"] = risk_file_of(job.out)
    if job.seg is not None:
        if job.ct is None or not job.ct.is_dir():
            raise ValueError(f"--seg writes a DICOM-SEG referencing the CT series: --ct must be a DICOM series folder "
                             f"(got {job.ct if job.ct is not None else 'no --ct'})")
        if job.seg.suffix.lower() != ".dcm":
            raise ValueError(f"--seg {job.seg}: a DICOM-SEG file is named .dcm")
        outputs["--seg"] = job.seg
    for name, path in (("--ct", job.ct), ("--pet", job.pet), ("--label", job.label)):
        if path is not None and not path.exists():
            raise FileNotFoundError(2, f"{name}: no such file or folder", str(path))
    check_outputs(outputs, inputs, overwrite)
    return outputs


# ----------------------------------------------------------------------------- EHR


def _raw_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV as text (stripped), to check cells before they are parsed."""
    if not path.is_file():
        raise FileNotFoundError(2, "no such file", str(path))
    with path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        header = [h.strip() for h in next(reader, [])]
        rows = [dict(zip(header, (f.strip() for f in fields))) for fields in reader if any(f.strip() for f in fields)]
    return header, rows


def ehr_problems(row: Mapping[str, str], preprocessor) -> tuple[list[str], list[str]]:
    """(errors, warnings) of one raw covariate row against the run's EHR preprocessor: a missing
    column or a numeric cell that is not a number is an error; a category unseen in training a warning."""
    from pemma_core.data.clinical import MISSING_TOKENS, CategoricalColumn

    errors, notes = [], []
    for column in preprocessor.columns:
        if column.name not in row:
            errors.append(f"column {column.name!r} is missing")
            continue
        value = row[column.name]
        if value.lower() in MISSING_TOKENS:
            continue
        if isinstance(column, CategoricalColumn):
            if value not in column.categories:
                notes.append(f"column {column.name!r}: category {value!r} was not seen in training (encoded as all "
                             f"zeros; known: {', '.join(column.categories)})")
            continue
        try:
            finite = math.isfinite(float(value))
        except ValueError:
            finite = False
        if not finite:
            errors.append(f"column {column.name!r}: {value!r} is not a number")
    return errors, notes


def read_ehr_row(
    model, ehr_csv: Path | None, clinical: Path | None, case_id: str | None, id_column: str = "case_id"
):  # -> pd.DataFrame | None
    """The covariate row of the case (``--ehr`` one-row CSV, or ``--clinical`` + ``--case-id``), checked
    cell by cell (ValueError naming the column and value; a warning for an unseen category), then read
    by :func:`pemma_core.data.clinical.read_clinical` with the run's covariate spec."""
    from pemma_core.data.clinical import read_clinical

    if ehr_csv is None and clinical is None:
        return None
    if model.ehr_preprocessor is None:
        raise ValueError("this model's survival head has no EHR branch: drop --ehr / --clinical")
    spec = model.ehr_preprocessor.spec
    if ehr_csv is not None:
        where = f"--ehr {ehr_csv}"
        _, rows = _raw_rows(ehr_csv)
        if len(rows) != 1:
            raise ValueError(f"{where}: expected one row of covariates, found {len(rows)}")
    else:
        if case_id is None:
            raise ValueError("--clinical needs --case-id")
        where = f"--clinical {clinical}, case {case_id!r}"
        header, everything = _raw_rows(clinical)  # type: ignore[arg-type]
        if id_column not in header:
            raise ValueError(f"--clinical {clinical}: no id column {id_column!r} (it has {header}); see --id-column")
        rows = [r for r in everything if r.get(id_column) == case_id]
        if len(rows) != 1:
            raise ValueError(f"{where}: {'no row' if not rows else f'{len(rows)} rows'} with {id_column} {case_id!r}")
    errors, notes = ehr_problems(rows[0], model.ehr_preprocessor)
    if errors:
        raise ValueError(f"{where}: " + "; ".join(errors))
    for note in notes:
        console.say(f"pemma predict: warning: {where}: {note}", level=console.QUIET)
    if ehr_csv is not None:
        table, problems = read_clinical(ehr_csv, None, covariates=spec)
        if problems:  # e.g. a row with more fields than the header
            raise ValueError(f"{where}: " + "; ".join(str(p) for p in problems))
        return table.reset_index(drop=True)
    table, problems = read_clinical(clinical, id_column, covariates=spec)  # type: ignore[arg-type]
    if case_id not in table.index:
        why = "; ".join(str(p) for p in problems if p.case_id == case_id) or f"no row in column {id_column!r}"
        raise ValueError(f"{where}: no usable row ({why})")
    return table.loc[[case_id]].reset_index(drop=True)


def predict_risk_of(model, image, mask, mode: str, ehr_row) -> dict:
    """Risk of the crop around the predicted tumour (the image centre when nothing is predicted)."""
    import torch

    from pemma_core.training.prognosis import Cohort, crop_around_tumour, predict_risk

    crop = crop_around_tumour(image[0], mask[0].float(), model.roi_size)
    ehr = None
    if ehr_row is not None:
        with warnings.catch_warnings():  # unseen categories were already reported by column and value
            warnings.filterwarnings("ignore", message=".*unseen in training")
            ehr = torch.as_tensor(model.ehr_preprocessor.transform(ehr_row))
    cohort = Cohort(image=crop[None].float(), time=torch.zeros(1), event=torch.zeros(1), ehr=ehr)
    risk = float(predict_risk(model, cohort, mode, omit_ehr=True)[0])
    ehr_used = "yes" if ehr is not None else ("no branch" if not model.spec.ehr_features else "omitted (no --ehr)")
    return {"risk": risk, "mode": mode, "ehr": ehr_used,
            "meaning": "Cox log relative hazard; higher = shorter expected survival (relative, not calibrated)"}


# ----------------------------------------------------------------------------- one case


def dice_against(mask_file: Path, label: Path, ct: Path | None) -> float:
    """Dice of the written mask against a ground-truth label (NIfTI, RTSTRUCT or DICOM-SEG), the label
    put on the mask's grid (nearest neighbour) when it is on another."""
    import nibabel as nib
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from pemma_core.data.volumes import read_volume

    written = nib.load(str(mask_file))
    pred = np.asarray(written.dataobj) > 0
    truth = read_volume(label, kind="label", reference=ct)
    values = np.asarray(truth.array, dtype=np.float32)
    if values.shape != pred.shape or not np.allclose(truth.affine, written.affine, atol=1e-4):
        resample = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float64)
        moved = resample(MetaTensor(torch.as_tensor(values)[None], affine=torch.as_tensor(truth.affine)),
                         dst_affine=torch.as_tensor(np.asarray(written.affine)), spatial_size=pred.shape)
        values = np.asarray(moved)[0]
    truth_mask = values > 0.5
    total = int(pred.sum() + truth_mask.sum())
    return 1.0 if total == 0 else 2.0 * float((pred & truth_mask).sum()) / total


def predict_job(model, prep, job: Job, mode: str, outputs: Mapping[str, Path], device: str = "cpu",
                ehr_row=None) -> dict[str, Any]:
    """Segment ``job`` (already checked: :func:`check_job`) and write its files. Returns
    ``{"mask": path, "mode": mode, "risk": risk info or None, "seg": path or None, "dice": float or None}``."""
    from pemma_core.data import inference_io
    from pemma_core.training import local

    model.check_mode(mode)
    console.say(f"reading and resampling {', '.join(str(p) for p in (job.ct, job.pet) if p is not None)}")
    image, meta = inference_io.load_for_inference(job.ct, job.pet, prep)
    console.say(f"segmenting (mode {mode})")
    mask = local.predict_volume(model, image, mode, device)
    console.say(f"writing the mask on the CT grid: {job.out}")
    result: dict[str, Any] = {"mask": inference_io.write_prediction(mask[0, 0], meta, job.out), "mode": mode,
                              "risk": None, "seg": None, "dice": None}
    if "the risk file" in outputs:
        console.say("scoring the risk of the tumour-centred crop")
        info = predict_risk_of(model, image, mask, mode, ehr_row)
        outputs["the risk file"].write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        result["risk"] = {**info, "file": str(outputs["the risk file"])}
    if job.seg is not None:
        console.say(f"writing the DICOM-SEG: {job.seg}")
        result["seg"] = inference_io.write_dicom_seg(job.out, job.ct, job.seg, overwrite=True)  # checked before
    if job.label is not None:
        result["dice"] = dice_against(job.out, job.label, job.ct)
    return result


def _print_result(result: Mapping[str, Any], label: Path | None) -> None:
    print(result["mask"])
    risk = result["risk"]
    if risk is not None:
        print(f"risk {risk['risk']:.4f} (mode {risk['mode']}, EHR {risk['ehr']}; higher = shorter expected survival) "
              f"-> {risk['file']}")
    if result["seg"] is not None:
        print(result["seg"])
    if result["dice"] is not None:
        print(f"Dice {result['dice']:.4f} against {label}")


# ----------------------------------------------------------------------------- --batch


def read_batch(path: Path) -> list[Job]:
    """The rows of a ``--batch`` CSV as jobs (paths relative to the CSV's folder)."""
    header, rows = _raw_rows(path)
    absent = [c for c in BATCH_COLUMNS if c not in header]
    if absent:
        raise ValueError(f"--batch {path}: missing column(s) {absent}; it has {header} (columns: case_id, ct, "
                         "pet (optional), out, seg (optional))")
    folder = path.resolve().parent

    def at(text: str | None) -> Path | None:
        return (folder / Path(text).expanduser()) if text else None

    return [Job(r["case_id"] or f"line {i}", at(r["ct"]), at(r.get("pet")), at(r["out"]) or folder, at(r.get("seg")))
            for i, r in enumerate(rows, start=2)]


def run_batch(model, prep, jobs: Sequence[Job], args: argparse.Namespace) -> int:
    """Predict every job, each checked on its own; a bad one is reported and the rest go on."""
    survival = bool(getattr(model.spec, "survival", False))
    inputs: dict[str, Path | None] = {"--clinical": args.clinical}
    for row, job in enumerate(jobs, start=1):  # by row: two rows may share a case id
        inputs.update({f"--ct of row {row}, case {job.case_id!r}": job.ct,
                       f"--pet of row {row}, case {job.case_id!r}": job.pet})
    claimed: dict[Path, str] = {}  # output -> the case that writes it
    failed: list[str] = []
    for job in console.progress(jobs, "predicting", label=lambda j: str(j.case_id)):
        try:
            mode = choose_mode(args.mode, job.ct, job.pet)
            outputs = check_job(job, inputs, survival, args.overwrite)
            for path in outputs.values():
                if path.resolve() in claimed:
                    raise ValueError(f"{path} is also written by case {claimed[path.resolve()]!r}")
            ehr_row = read_ehr_row(model, None, args.clinical, job.case_id, args.id_column) if args.clinical else None
            claimed.update({p.resolve(): str(job.case_id) for p in outputs.values()})
            _print_result(predict_job(model, prep, job, mode, outputs, args.device, ehr_row), None)
        except (ValueError, OSError) as exc:
            from pemma_core.cli import _message

            failed.append(str(job.case_id))
            console.say(f"pemma predict: case {job.case_id}: {_message(exc)}", level=console.QUIET)
    done = len(jobs) - len(failed)
    print(f"{done} of {len(jobs)} cases predicted" + (f", {len(failed)} failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


# ----------------------------------------------------------------------------- overlay (simulation report)


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


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="run folder (pemma simulate / flwr run output)")
    source.add_argument("--model", type=Path, metavar="PACKAGE", help="model package folder (pemma export)")
    parser.add_argument("--ct", type=Path, help="CT: NIfTI file or DICOM series folder")
    parser.add_argument("--pet", type=Path, help="PET: NIfTI file or DICOM series folder (optional)")
    parser.add_argument("--out", type=Path, help="mask to write on the CT grid: .nii.gz (compressed) or .nii")
    parser.add_argument("--seg", type=Path, metavar="OUT.dcm",
                        help="also write the mask as a DICOM-SEG referencing the CT series (--ct a DICOM folder)")
    parser.add_argument("--label", type=Path, help="ground truth (NIfTI, RTSTRUCT or DICOM-SEG): print the Dice")
    parser.add_argument("--batch", type=Path, metavar="CASES.csv",
                        help="predict every row of a CSV (case_id, ct, pet (optional), out, seg (optional); paths "
                             "relative to its folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (never an input)")
    parser.add_argument("--mode", choices=("ct", "pet", "ctpet"), help="default: ctpet with a PET, else ct")
    parser.add_argument("--round", type=int, help="adapters of this round (--run; default: the last)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="resampling spacing in mm (default: the one the run recorded)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--ehr", type=Path, metavar="ROW.csv",
                        help="a CSV with one row of the case's EHR covariates (runs whose head has an EHR branch)")
    parser.add_argument("--clinical", type=Path, metavar="CSV",
                        help="a clinical CSV holding the case (with --case-id; with --batch: each row's case_id)")
    parser.add_argument("--case-id", help="the case's id in --clinical")
    parser.add_argument("--id-column", default="case_id", help="the id column of --clinical (default case_id)")


def _check_usage(args: argparse.Namespace) -> None:
    if args.batch is not None:
        single = [f"--{name.replace('_', '-')}" for name in ("ct", "pet", "out", "seg", "label", "ehr", "case_id")
                  if getattr(args, name) is not None]
        if single:
            raise console.UsageError(f"--batch takes its cases from the CSV: drop {', '.join(single)}")
        return
    if args.ct is None and args.pet is None:
        raise console.UsageError("give --ct (and optionally --pet), or --batch CASES.csv")
    if args.out is None:
        raise console.UsageError("give --out MASK.nii.gz")
    if args.model is not None and args.round is not None:
        raise console.UsageError("--round chooses among a run's rounds; a package holds one")


def run(args: argparse.Namespace) -> int:
    _check_usage(args)
    from simulation.model_package import load_model, package_source, run_source

    mode = choose_mode(args.mode, args.ct, args.pet) if args.batch is None else None  # before the model loads

    source = package_source(args.model) if args.model is not None else run_source(args.run, args.round)
    prep = preprocessing_for(source, args.spacing)
    jobs = read_batch(args.batch) if args.batch is not None else None
    console.say(f"loading the model of {source.where} (round {source.round})")
    model = load_model(source)
    console.say(f"preprocessing: spacing {' x '.join(f'{v:g}' for v in prep.spacing)} mm, CT window "
                f"{prep.ct_window[0]:g}..{prep.ct_window[1]:g} HU, SUV ceiling {prep.pet_suv_max:g}")
    if source.differs:
        console.say(f"pemma predict: warning: sites {', '.join(source.differs)} of the run declared another "
                    "preprocessing: the model is used with the majority's", level=console.QUIET)
    if jobs is not None:
        return run_batch(model, prep, jobs, args)
    job = Job(args.case_id, args.ct, args.pet, args.out, args.seg, args.label)
    inputs = {"--ct": job.ct, "--pet": job.pet, "--label": job.label, "--clinical": args.clinical, "--ehr": args.ehr}
    outputs = check_job(job, inputs, bool(getattr(model.spec, "survival", False)), args.overwrite)
    ehr_row = read_ehr_row(model, args.ehr, args.clinical, args.case_id, args.id_column)
    _print_result(predict_job(model, prep, job, mode, outputs, args.device, ehr_row), job.label)  # type: ignore[arg-type]
    return 0
