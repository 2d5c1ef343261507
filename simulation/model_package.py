"""Where a model comes from: a run folder, or a self-contained model package (``pemma export``).

A package is a folder in MONAI bundle layout::

    OUT/configs/metadata.json     MONAI bundle metadata; "pemma": model spec, preprocessing (spacing,
                                  CT window, SUV ceiling, orientation RAS), backbone fingerprint,
                                  round, modes served, pemma version, SHA-256 of each model file
    OUT/models/backbone.safetensors  the frozen CT backbone
    OUT/models/adapters.safetensors  the adapters of the chosen round (with the survival head and the
                                  EHR preprocessor in its metadata, when the run has them)
    OUT/README.md                 model card: data (sites, declared cases), metrics, licences, intended use

``pemma predict --model OUT`` needs nothing else: no run folder, no site YAML.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PACKAGE_FORMAT = "pemma-model-package/1"
ORIENTATION = "RAS"  # the reference grid's axes (pemma_core.data.pipeline)
METADATA_FILE = Path("configs") / "metadata.json"
BACKBONE_FILE = Path("models") / "backbone.safetensors"
ADAPTERS_FILE = Path("models") / "adapters.safetensors"
MONAI_BUNDLE_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


@dataclass(frozen=True)
class ModelSource:
    """The files of one model and how its inputs must be prepared (``preprocessing`` None: not recorded)."""

    backbone_file: Path
    adapter_file: Path
    round: int
    preprocessing: Any  # pemma_core.data.pipeline.Preprocessing | None
    where: str  # "run RUN" / "model package OUT", for messages
    differs: tuple[str, ...] = ()  # sites that declared another preprocessing than the one recorded
    run_spec: Mapping[str, Any] | None = None  # the run's model spec, for adapter files that name none


def _preprocessing(entry: Mapping[str, Any]):  # -> Preprocessing
    from pemma_core.data.pipeline import Preprocessing

    return Preprocessing(spacing=tuple(float(v) for v in entry["spacing"]),  # type: ignore[arg-type]
                         ct_window=tuple(float(v) for v in entry["ct_window"]),  # type: ignore[arg-type]
                         pet_suv_max=float(entry["pet_suv_max"]))


def _site_yamls(settings: Mapping[str, Any], info: Mapping[str, Any]) -> list[str]:
    """The site YAML paths an older run recorded (simulation only): metrics' ``site_configs``, run.json's
    comma-separated ``site_configs``, or the oldest form, paths listed as ``sites``."""
    listed = info.get("site_configs") or [p for p in str(settings.get("site_configs") or "").split(",") if p.strip()]
    return [str(p) for p in listed] or [str(s) for s in info.get("sites", []) if isinstance(s, str)]


def recorded_preprocessing(run_dir: str | Path):  # -> tuple[Preprocessing | None, tuple[str, ...]]
    """(preprocessing, sites that differ) of a run: ``run.json`` ``preprocessing`` (what the sites declared
    when they joined); for an older run its first loadable site YAML; (None, ()) when neither is there."""
    from pemma_core.config import site
    from server.run_dir import RunDir

    run = RunDir(run_dir)
    settings = run.read_json(run.run_json, {})
    info = run.metrics()["run"]
    entry = settings.get("preprocessing") or info.get("preprocessing")
    if entry:
        return _preprocessing(entry), tuple(entry.get("differs") or ())
    from pemma_core.data.pipeline import Preprocessing

    for path in _site_yamls(settings, info):
        try:
            return Preprocessing.from_site(site.load_site_config(path)), ()
        except (OSError, ValueError):  # moved or edited since the run: try the next
            continue
    return None, ()


def run_source(run_dir: str | Path, round_: int | None = None) -> ModelSource:
    """The model of a run folder: its backbone with the adapters of ``round_`` (default: the last)."""
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
    preprocessing, differs = recorded_preprocessing(run.path)
    return ModelSource(run.backbone_file, files[chosen], chosen, preprocessing, f"run {run.path}", differs,
                       run.read_json(run.run_json, {}).get("model_spec"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_package_metadata(folder: str | Path) -> dict[str, Any]:
    """``configs/metadata.json`` of a package, checked to be one (ValueError naming what is wrong)."""
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a pemma model package: {METADATA_FILE} missing "
                                "(make one with pemma export)")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
        pemma = metadata["pemma"]
        if pemma["format"] != PACKAGE_FORMAT:
            raise ValueError(f"format {pemma['format']!r}, expected {PACKAGE_FORMAT!r}")
        _preprocessing(pemma["preprocessing"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a usable pemma package metadata ({type(exc).__name__}: {exc})") from None
    return metadata


def package_source(folder: str | Path) -> ModelSource:
    """The model of a package folder; its files are checked against the SHA-256 its metadata records."""
    folder = Path(folder).expanduser().resolve()
    pemma = read_package_metadata(folder)["pemma"]
    for name, expected in pemma["sha256"].items():
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"model package {folder}: {name} missing")
        if _sha256(file) != expected:
            raise ValueError(f"model package {folder}: {name} differs from the file exported (SHA-256 mismatch)")
    return ModelSource(folder / BACKBONE_FILE, folder / ADAPTERS_FILE, int(pemma["round"]),
                       _preprocessing(pemma["preprocessing"]), f"model package {folder}",
                       tuple(pemma.get("differs") or ()))


def load_model(source: ModelSource):  # -> SegmentationModel
    """The PEMMA model of ``source`` in eval mode, with ``ehr_preprocessor`` (None without an EHR branch)."""
    from pemma_core.model.factory import build_model
    from pemma_core.model.files import load_adapters, load_backbone, read_adapter_file
    from pemma_core.model.spec import ModelSpec

    backbone, _ = load_backbone(source.backbone_file)
    metadata = read_adapter_file(source.adapter_file)[1]
    if "spec" in metadata:  # the file's own spec: a prognosis round adds the survival head
        spec = ModelSpec.from_json(metadata["spec"])
    else:
        spec = ModelSpec.from_json(json.dumps(source.run_spec)) if source.run_spec else backbone.pemma_spec
    model = build_model(spec, backbone)
    load_adapters(source.adapter_file, model)  # refuses adapters of another backbone
    model.eval()
    model.ehr_preprocessor = None
    if spec.ehr_features:
        from pemma_core.data.clinical import EhrPreprocessor

        model.ehr_preprocessor = EhrPreprocessor.from_metadata(metadata)
    return model


# ----------------------------------------------------------------------------- export


def trained_modes(model, metrics: Mapping[str, Any], round_: int) -> list[str]:
    """The model's modes whose every parameter group was aggregated in some adapt round up to ``round_``
    (a mode nobody trained is still the CT backbone: not served); all its modes when nothing was recorded."""
    from server.report import round_contributors
    from server.run_dir import phase_rounds

    rounds = [r for r in phase_rounds(metrics, "adapt") if r["round"] <= round_]
    trained = {group for r in rounds for group, sites in round_contributors(r).items() if sites}
    if not rounds:
        return list(model.modes)
    return [m for m in model.modes if model.groups_for_mode(m) <= trained]


def final_metrics(metrics: Mapping[str, Any], round_: int) -> dict[str, Any]:
    """Dice per mode of the last evaluated adapt round up to ``round_`` and the C-index of the last
    prognosis round up to it (None where not measured), each with its round."""
    from server.run_dir import phase_rounds

    evaluated = [r for r in phase_rounds(metrics, "adapt") if r["round"] <= round_ and r.get("eval_metrics")]
    dice = {k.removeprefix("dice-"): float(v) for k, v in (evaluated[-1]["eval_metrics"] if evaluated else {}).items()
            if k.startswith("dice-")}
    scored = [r for r in phase_rounds(metrics, "prognosis")
              if r["round"] <= round_ and "c-index" in r.get("train_metrics", {})]
    return {"dice": dice, "dice_round": evaluated[-1]["round"] if evaluated else None,
            "c_index": float(scored[-1]["train_metrics"]["c-index"]) if scored else None,
            "c_index_round": scored[-1]["round"] if scored else None}


def _versions() -> dict[str, str]:
    import monai
    import numpy
    import torch

    from pemma_core import __version__

    return {"pemma": __version__, "monai": monai.__version__, "torch": torch.__version__, "numpy": numpy.__version__}


def package_metadata(model, source: ModelSource, modes: Sequence[str], sha256: Mapping[str, str],
                     run_name: str, phase: str) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI bundle metadata, pemma's own under ``"pemma"``."""
    prep = source.preprocessing
    versions = _versions()
    spec = json.loads(model.spec.to_json())
    roi = list(model.roi_size)
    return {
        "schema": MONAI_BUNDLE_SCHEMA,
        "version": versions["pemma"],
        "changelog": {versions["pemma"]: f"exported from run {run_name}, round {source.round}"},
        "monai_version": versions["monai"],
        "pytorch_version": versions["torch"],
        "numpy_version": versions["numpy"],
        "required_packages_version": {"pemma": versions["pemma"]},
        "name": f"pemma {spec['backbone']}/{spec['preset']} {spec['adapter']} PET/CT tumour segmentation",
        "task": "tumour segmentation of CT, PET or CT+PET" + (", with a Cox risk score" if spec.get("survival") else ""),
        "description": "A frozen CT backbone with PEMMA adapters trained federated (pemma); see README.md.",
        "authors": "the sites of the federated run (README.md, Data)",
        "copyright": "code Apache-2.0; data licences as the run's sites declare (README.md)",
        "intended_use": "research only; not a medical device, not for diagnosis or treatment decisions",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "CT, PET", "num_channels": 2,
                                 "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                                 "channel_def": {"0": "CT (windowed)", "1": "PET (SUV / ceiling)"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": spec["out_channels"],
                                 "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                                 "channel_def": {"0": "background", "1": "tumour"}}},
        },
        "pemma": {
            "format": PACKAGE_FORMAT,
            "pemma_version": versions["pemma"],
            "model_spec": spec,
            "preprocessing": {"spacing": list(prep.spacing), "ct_window": list(prep.ct_window),
                              "pet_suv_max": prep.pet_suv_max, "orientation": ORIENTATION},
            "differs": list(source.differs),
            "fingerprint": model.fingerprint,
            "round": source.round,
            "phase": phase,
            "modes": list(modes),
            "run": run_name,
            "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {"backbone": str(BACKBONE_FILE), "adapters": str(ADAPTERS_FILE)},
            "sha256": dict(sha256),
        },
    }


def _cell(value: Any) -> str:
    return str(value).replace("|", "/").replace("\n", " ")


def model_card(metadata: Mapping[str, Any], info: Mapping[str, Any], measured: Mapping[str, Any]) -> str:
    """``README.md`` of a package: model, preprocessing, data, metrics, licences, intended use."""
    pemma = metadata["pemma"]
    spec, prep = pemma["model_spec"], pemma["preprocessing"]
    lines = [f"# {metadata['name']}", "",
             "**Intended use: research only.** Not a medical device; not for diagnosis or treatment decisions.", "",
             "## Model", "",
             f"- {spec['kind']} model, backbone {spec['backbone']}/{spec['preset']}, adapter {spec['adapter']} "
             f"(rank {spec['rank']}); modes served: {', '.join(pemma['modes']) or 'none'}",
             f"- survival head: {'yes' if spec.get('survival') else 'no'}"
             + (f" (EHR covariates: {spec['ehr_features']} features)" if spec.get("ehr_features") else ""),
             f"- backbone fingerprint `{pemma['fingerprint']}`",
             f"- adapters of round {pemma['round']} ({pemma['phase']}) of run `{_cell(pemma['run'])}`, "
             f"pemma {pemma['pemma_version']}", "",
             "## Preprocessing", "",
             f"Orientation {prep['orientation']}, spacing {' x '.join(f'{v:g}' for v in prep['spacing'])} mm, "
             f"CT window {prep['ct_window'][0]:g}..{prep['ct_window'][1]:g} HU, PET SUV ceiling {prep['pet_suv_max']:g}."
             + (f" Sites {', '.join(pemma['differs'])} declared another preprocessing." if pemma["differs"] else ""), "",
             "## Data", "",
             "Training cases each site declared when it joined (the data never left the sites).", "",
             "| site | CT | PET | EHR | survival | data licence |", "|---|---|---|---|---|---|"]
    sites = [s for s in info.get("sites", []) if isinstance(s, Mapping)]
    for s in sites:
        declared = s.get("declared") or {}
        licence = s.get("data_licence") or s.get("license") or "not declared: ask the site"
        lines.append(f"| {_cell(s.get('label') or s.get('name'))} | "
                     + " | ".join(_cell(declared.get(k, 0)) for k in ("ct", "pet", "ehr", "survival"))
                     + f" | {_cell(licence)} |")
    if not sites:
        lines.append("| (the run recorded no site) | | | | | |")
    dice = measured["dice"]
    lines += ["", "## Metrics", "",
              "Final Dice per mode (example-weighted over the sites' test splits"
              + (f", adapt round {measured['dice_round']}): " if dice else "): ")
              + (", ".join(f"{m} {v:.3f}" for m, v in dice.items()) if dice else "not measured (the run did not evaluate)")
              + ".",
              "C-index (held-out survival splits"
              + (f", prognosis round {measured['c_index_round']}): {measured['c_index']:.3f}."
                 if measured["c_index"] is not None else "): not measured."), "",
              "## Licence", "",
              "Code: Apache-2.0 (pemma). Weights were trained on the sites' data: their use is bound by each site's "
              "data licence (table above).", "",
              "## Use", "",
              "```", "pemma predict --model THIS_FOLDER --ct CT.nii.gz [--pet PET.nii.gz] --out MASK.nii.gz", "```", ""]
    return "\n".join(lines)


def export_package(run_dir: str | Path, out: str | Path, round_: int | None = None) -> Path:
    """Write the package of ``run_dir``'s adapters of ``round_`` (default: the last) to ``out``.

    Never over an existing ``out`` (FileExistsError); written beside it and renamed once complete.
    """
    from server.run_dir import RunDir, phase_rounds

    out = Path(out).expanduser().resolve()
    if out.exists():
        raise FileExistsError(17, "exists: a package is never written over; choose another folder", str(out))
    source = run_source(run_dir, round_)
    if source.preprocessing is None:
        raise ValueError(f"{source.where} records no preprocessing (no 'preprocessing' in run.json, no site YAML at "
                         "hand): a package must say how its inputs are prepared")
    model = load_model(source)
    run = RunDir(run_dir)
    metrics = run.metrics()
    phase = "prognosis" if source.round in {r["round"] for r in phase_rounds(metrics, "prognosis")} else "adapt"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (staging / "models").mkdir()
        (staging / "configs").mkdir()
        shutil.copyfile(source.backbone_file, staging / BACKBONE_FILE)
        shutil.copyfile(source.adapter_file, staging / ADAPTERS_FILE)
        sha256 = {str(name): _sha256(staging / name) for name in (BACKBONE_FILE, ADAPTERS_FILE)}
        metadata = package_metadata(model, source, trained_modes(model, metrics, source.round), sha256,
                                    run.path.name, phase)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        card = model_card(metadata, {**run.read_json(run.run_json, {}), **metrics["run"]},
                          final_metrics(metrics, source.round))
        (staging / "README.md").write_text(card, encoding="utf-8")
        if out.exists():  # appeared meanwhile
            raise FileExistsError(17, "exists: a package is never written over; choose another folder", str(out))
        os.rename(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


__all__ = ["ModelSource", "PACKAGE_FORMAT", "export_package", "final_metrics", "load_model", "model_card",
           "package_metadata", "package_source", "read_package_metadata", "recorded_preprocessing", "run_source",
           "trained_modes"]
