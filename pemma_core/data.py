"""A site's cases: manifest, checks, MONAI pipelines, loaders and prediction writing.

One case is a row of the site's manifest CSV (``case_id, ct, pet, label, split``; paths
relative to the site's ``data_root``). Every case is checked before use
(:func:`inspect_case`); a bad case is skipped with a warning or stops the site, as the
site's ``on_bad_case`` says (:func:`site_cases`).

Geometry: CT and PET live on different grids and are always resampled with both
affines, never by array shape. The *reference grid* is the CT's (the PET's at a site
without CT) reoriented to RAS and resampled to the site's ``spacing`` (MONAI
``Orientationd`` + ``Spacingd``); PET (bilinear) and label (nearest neighbour) are then
resampled onto it with ``ResampleToMatchd``, which maps through the world coordinates
of both affines. Predictions are resampled back onto the original CT grid
(:func:`write_prediction`).

Intensities (see :mod:`pemma_core.site`)::

    channel 0, CT : (clip(HU, lo, hi) - lo) / (hi - lo)  with (lo, hi) = ct_window   -> [0, 1]
    channel 1, PET: clip(SUV, 0, pet_suv_max) / pet_suv_max                          -> [0, 1]

A missing modality's channel is all zeros. Outside the PET field of view PET reads 0.

Batches are dicts::

    "image":  float32 [B, 2, X, Y, Z]   (channel 0 CT, channel 1 PET)
    "label":  float32 [B, 1, X, Y, Z]   values in {0, 1}
    "case_id": list[str]
    "grid_affine": float64 [B, 4, 4]    affine of the reference grid (world mm, RAS)
    "reference_path": list[str]         the original image whose grid predictions return to

The deterministic part (load, resample, normalise) is cached on disk per site with
MONAI's ``PersistentDataset`` under ``cfg.cache_dir/<preprocessing fingerprint>/``; a
cache entry is keyed by the case's file paths, sizes and modification times, so an
edited file is re-read and a changed spacing or window uses another folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader, Dataset, MetaTensor, PersistentDataset
from monai.transforms import (
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    ResampleToMatchd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    SpatialResample,
)

from pemma_core.site import DEFAULT_CT_WINDOW, DEFAULT_PET_SUV_MAX, SiteConfig

__all__ = [
    "SPLITS",
    "MANIFEST_COLUMNS",
    "Case",
    "CaseProblem",
    "BadCaseError",
    "SiteDataError",
    "Preprocessing",
    "InferenceMeta",
    "read_manifest",
    "inspect_case",
    "check_case",
    "check_clinical_table",
    "site_cases",
    "deterministic_transform",
    "train_transform",
    "train_loader",
    "eval_loader",
    "load_for_inference",
    "write_prediction",
    "measure_loading",
]

log = logging.getLogger("pemma.data")

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST_COLUMNS: tuple[str, ...] = ("case_id", "ct", "pet", "label", "split")
IMAGE_KEYS: tuple[str, str] = ("ct", "pet")  # channel order of "image"
ROLE_NAMES = {"ct": "CT", "pet": "PET", "label": "label"}

# Plausibility limits (why: catch unit mistakes that would silently ruin training).
HU_AIR_FAT_CEILING = -100.0  # a CT in HU always holds fat (-100) or air (-1000) below this
SUV_CEILING = 100.0  # SUVs above this are activity concentrations (Bq/mL), not SUV
PARTIAL_FOV_WARNING = 0.01  # warn when more than 1% of the CT lies outside the PET field of view
AFFINE_ATOL_MM = 1e-2  # label and image affines must agree to 0.01 mm (float32 headers)
_CHECKS_VERSION = 1  # bump when a check changes, to invalidate cached check results
_PIPELINE_VERSION = 1  # bump when the deterministic transform changes, to invalidate the cache


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Case:
    """One row of a site manifest, paths absolute (None: not listed / modality not held)."""

    case_id: str
    ct: Path | None
    pet: Path | None
    label: Path | None
    split: str


@dataclass(frozen=True)
class CaseProblem:
    """Something wrong with one case: which case, which file, what (``severity`` error|warning)."""

    case_id: str
    file: Path | None
    problem: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f" {self.file}:" if self.file is not None else ""
        prefix = "" if self.severity == "error" else "warning: "
        return f"case {self.case_id}:{where} {prefix}{self.problem}"

    def to_dict(self) -> dict[str, str | None]:
        return {
            "case_id": self.case_id,
            "file": None if self.file is None else str(self.file),
            "problem": self.problem,
            "severity": self.severity,
        }


class BadCaseError(ValueError):
    """A case that cannot be used; the message names the case, the file and the problem."""


class SiteDataError(ValueError):
    """The site as a whole cannot be read (manifest/clinical CSV unusable, no usable case...)."""


@dataclass(frozen=True)
class Preprocessing:
    """The settings that fix the reference grid and intensities (a site's or a model's)."""

    spacing: tuple[float, float, float]
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
    pet_suv_max: float = DEFAULT_PET_SUV_MAX

    @classmethod
    def from_site(cls, cfg: SiteConfig) -> Preprocessing:
        return cls(spacing=tuple(cfg.spacing), ct_window=tuple(cfg.ct_window), pet_suv_max=cfg.pet_suv_max)

    def fingerprint(self) -> str:
        """Short hash naming the cache folder of data preprocessed with these settings."""
        text = json.dumps({**asdict(self), "version": _PIPELINE_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- manifest


def _read_csv_text(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise SiteDataError(f"{what} not found: {path}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except Exception as exc:  # pandas raises several types for malformed CSVs
        raise SiteDataError(f"{what} {path} cannot be read as CSV: {exc}") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def read_manifest(cfg: SiteConfig) -> tuple[list[Case], list[CaseProblem]]:
    """Rows of the site manifest as cases (manifest order) plus row-level problems.

    Row-level problems: empty case id, unknown split, duplicate case ids (every row with
    that id is bad: there is no telling which one is right), a file listed for a
    modality the site does not hold (warning; the file is ignored).

    Raises :class:`SiteDataError` when the manifest is missing or lacks a column
    (``case_id``, ``split``, ``label``, plus ``ct``/``pet`` for each image modality held).
    """
    table = _read_csv_text(cfg.manifest, "manifest")
    needed = ["case_id", "split", "label"] + [m for m in IMAGE_KEYS if m in cfg.modalities]
    absent = [c for c in needed if c not in table.columns]
    if absent:
        raise SiteDataError(
            f"manifest {cfg.manifest}: missing column(s) {absent}; it has {list(table.columns)} "
            f"and needs {needed} (columns: {', '.join(MANIFEST_COLUMNS)})"
        )

    def resolve(text: str) -> Path | None:
        text = text.strip()
        if not text:
            return None
        path = Path(text).expanduser()
        return path if path.is_absolute() else cfg.data_root / path

    ids = [str(v).strip() for v in table["case_id"]]
    counts = pd.Series(ids).value_counts()
    cases: list[Case] = []
    problems: list[CaseProblem] = []
    for row_number, (case_id, row) in enumerate(zip(ids, table.to_dict("records")), start=2):
        if not case_id:
            problems.append(CaseProblem(f"<row {row_number}>", cfg.manifest, "empty case_id"))
            continue
        if counts[case_id] > 1:
            rows = [str(i + 2) for i, other in enumerate(ids) if other == case_id]
            problems.append(
                CaseProblem(case_id, cfg.manifest, f"duplicate case id (manifest rows {', '.join(rows)}); all left out")
            )
            continue
        split = str(row["split"]).strip()
        if split not in SPLITS:
            problems.append(CaseProblem(case_id, cfg.manifest, f"split {split!r} is not one of {list(SPLITS)}"))
            continue
        paths: dict[str, Path | None] = {}
        for key in IMAGE_KEYS:
            listed = resolve(str(row.get(key, "")))
            if listed is not None and key not in cfg.modalities:
                problems.append(
                    CaseProblem(
                        case_id,
                        listed,
                        f"{ROLE_NAMES[key]} listed but the site does not hold {key!r}; ignored",
                        "warning",
                    )
                )
                listed = None
            paths[key] = listed
        cases.append(Case(case_id, paths["ct"], paths["pet"], resolve(str(row["label"])), split))
    return cases, problems


def check_clinical_table(cfg: SiteConfig) -> None:
    """Raise :class:`SiteDataError` unless the clinical CSV exists and has every declared column."""
    spec = cfg.clinical
    if spec is None:
        return
    table = _read_csv_text(spec.path, "clinical CSV")
    declared = [spec.id_column, spec.time, spec.event, *spec.covariates]
    absent = [c for c in declared if c is not None and c not in table.columns]
    if absent:
        raise SiteDataError(f"clinical CSV {spec.path}: missing column(s) {absent}; it has {list(table.columns)}")


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class _ImageInfo:
    shape: tuple[int, ...]
    affine: np.ndarray
    minimum: float
    maximum: float
    nonfinite: int
    values: np.ndarray | None  # distinct values (labels only)


def _read_image(path: Path, role: str, case_id: str, want_values: bool) -> tuple[_ImageInfo | None, list[CaseProblem]]:
    """Read a NIfTI fully (a truncated .gz only fails when its data is decompressed)."""

    def problem(text: str) -> tuple[None, list[CaseProblem]]:
        return None, [CaseProblem(case_id, path, text)]

    name = ROLE_NAMES[role]
    if not path.exists():
        return problem(f"missing file ({name})")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel/gzip/zlib/EOF errors all mean the same to a site
        return problem(f"unreadable {name} ({type(exc).__name__}: {exc})")
    if data.ndim != 3:
        return problem(f"{name} is {data.ndim}-D with shape {tuple(data.shape)}, expected a 3-D volume")
    if min(data.shape) < 1:
        return problem(f"{name} is empty (shape {tuple(data.shape)})")
    header = image.header
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        return problem(f"{name} header has neither sform nor qform: voxel positions in space are unknown")
    affine = np.asarray(image.affine, dtype=np.float64)
    linear = affine[:3, :3]
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(linear)) < 1e-6:
        return problem(f"{name} affine is zero or singular (voxel axes {np.round(linear, 4).tolist()})")
    finite = np.isfinite(data)
    nonfinite = int(data.size - np.count_nonzero(finite))
    valid = data[finite] if nonfinite else data
    minimum = float(valid.min()) if valid.size else float("nan")
    maximum = float(valid.max()) if valid.size else float("nan")
    values = np.unique(valid) if want_values else None
    return _ImageInfo(tuple(int(s) for s in data.shape), affine, minimum, maximum, nonfinite, values), []


def _world_box(info: _ImageInfo) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (mm) of the volume's outer voxel corners."""
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in info.shape], indexing="ij")).reshape(3, -1)
    world = info.affine[:3, :3] @ corners + info.affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def _box_overlap(ct: _ImageInfo, pet: _ImageInfo) -> float:
    """Fraction of the CT box's volume inside the PET box (0: no overlap)."""
    ct_lo, ct_hi = _world_box(ct)
    pet_lo, pet_hi = _world_box(pet)
    inter = np.clip(np.minimum(ct_hi, pet_hi) - np.maximum(ct_lo, pet_lo), 0, None)
    return float(np.prod(inter) / np.prod(ct_hi - ct_lo))


def inspect_case(case: Case, cfg: SiteConfig) -> list[CaseProblem]:
    """Run every check on one case; returns errors and warnings (``severity``), empty when fine.

    Errors: a required file not listed or missing; unreadable / truncated NIfTI; not 3-D;
    no sform/qform, zero or singular affine; NaN or inf voxels; CT not in Hounsfield
    units (nothing below -100 HU, e.g. raw 0..4095 values); PET not in SUV (above 100);
    label values other than 0/1; label grid (shape or affine) different from its
    image's; PET field of view not overlapping the CT's at all (world boxes from both
    affines); unknown split.
    Warnings: more than 1% of the CT outside the PET field of view (headers are
    trusted, partial overlap is fine); empty training label.
    Required files: CT if the site holds ``ct``, PET if it holds ``pet``, the label for
    ``train`` cases.
    """
    return _inspect(case, frozenset(cfg.modalities), cfg.manifest)


def _inspect(case: Case, held: frozenset[str], manifest: Path | None) -> list[CaseProblem]:
    """:func:`inspect_case` for a site holding ``held`` modalities (``manifest`` names row problems)."""
    problems: list[CaseProblem] = []
    if case.split not in SPLITS:
        problems.append(CaseProblem(case.case_id, manifest, f"split {case.split!r} is not one of {list(SPLITS)}"))
    infos: dict[str, _ImageInfo] = {}
    required = {"ct": "ct" in held, "pet": "pet" in held, "label": case.split == "train"}
    for role in ("ct", "pet", "label"):
        path: Path | None = getattr(case, role)
        if path is None:
            if required[role]:
                problems.append(CaseProblem(case.case_id, manifest, f"no {ROLE_NAMES[role]} file listed"))
            continue
        info, found = _read_image(path, role, case.case_id, want_values=role == "label")
        problems += found
        if info is None:
            continue
        if info.nonfinite:
            problems.append(
                CaseProblem(case.case_id, path, f"{ROLE_NAMES[role]} has {info.nonfinite} NaN/inf voxel(s)")
            )
            continue
        infos[role] = info

    def add(role: str, text: str, severity: str = "error") -> None:
        problems.append(CaseProblem(case.case_id, getattr(case, role), text, severity))

    if "ct" in infos and infos["ct"].minimum > HU_AIR_FAT_CEILING:
        ct = infos["ct"]
        add(
            "ct",
            f"CT values range {ct.minimum:g}..{ct.maximum:g} with nothing below {HU_AIR_FAT_CEILING:g}: "
            "not Hounsfield units? (raw stored values without rescale slope/intercept)",
        )
    if "pet" in infos and infos["pet"].maximum > SUV_CEILING:
        add(
            "pet",
            f"PET maximum {infos['pet'].maximum:g} is above SUV {SUV_CEILING:g}: activity concentration "
            "(Bq/mL) rather than SUV?",
        )
    if "label" in infos:
        label = infos["label"]
        odd = [v for v in label.values.tolist() if v not in (0, 1)]
        if odd:
            shown = ", ".join(f"{v:g}" for v in odd[:5]) + (", ..." if len(odd) > 5 else "")
            add("label", f"label values must be 0/1, found {shown}")
        elif case.split == "train" and 1 not in label.values.tolist():
            add("label", "label is empty (no tumour voxel); crops will be background only", "warning")
        image_role = "ct" if "ct" in held else "pet"
        image = infos.get(image_role)
        if image is not None:
            if label.shape != image.shape:
                add("label", f"label grid {label.shape} does not match the {ROLE_NAMES[image_role]} grid {image.shape}")
            elif not np.allclose(label.affine, image.affine, atol=AFFINE_ATOL_MM):
                add(
                    "label",
                    f"label affine differs from the {ROLE_NAMES[image_role]} affine "
                    f"(max difference {np.abs(label.affine - image.affine).max():.3g} mm)",
                )
    if "ct" in infos and "pet" in infos:
        inside = _box_overlap(infos["ct"], infos["pet"])
        if inside <= 0:
            lo, hi = _world_box(infos["pet"])
            clo, chi = _world_box(infos["ct"])
            add(
                "pet",
                f"PET field of view {np.round(lo, 1).tolist()}..{np.round(hi, 1).tolist()} mm does not overlap "
                f"the CT's {np.round(clo, 1).tolist()}..{np.round(chi, 1).tolist()} mm",
            )
        elif 1 - inside > PARTIAL_FOV_WARNING:
            add(
                "pet",
                f"{100 * (1 - inside):.1f}% of the CT field of view lies outside the PET's "
                "(headers trusted; PET reads 0 there)",
                "warning",
            )
    return problems


def check_case(case: Case, cfg: SiteConfig) -> list[str]:
    """Every check of :func:`inspect_case`; returns the errors as messages (empty = usable)."""
    return [str(p) for p in inspect_case(case, cfg) if p.severity == "error"]


def _file_stamp(path: Path | None) -> list[Any]:
    if path is None:
        return [None]
    try:
        stat = path.stat()
    except OSError:
        return [str(path), "absent"]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _case_stamp(case: Case) -> list[Any]:
    return [case.case_id, case.split] + [_file_stamp(getattr(case, role)) for role in ("ct", "pet", "label")]


def _cached_inspect(case: Case, cfg: SiteConfig) -> list[CaseProblem]:
    """:func:`inspect_case`, remembered in the cache folder until a file or the config changes."""
    key_text = json.dumps([_CHECKS_VERSION, list(cfg.modalities), str(cfg.manifest), _case_stamp(case)], default=str)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    store = cfg.cache_dir / "checks" / f"{key}.json"
    if store.is_file():
        try:
            return [
                CaseProblem(p["case_id"], None if p["file"] is None else Path(p["file"]), p["problem"], p["severity"])
                for p in json.loads(store.read_text())
            ]
        except (ValueError, KeyError, TypeError):
            pass  # a damaged entry is simply recomputed
    problems = inspect_case(case, cfg)
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(store, json.dumps([p.to_dict() for p in problems]))
    except OSError:
        pass  # a read-only cache only costs time
    return problems


def _atomic_write_text(path: Path, text: str) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(temp, path)


_ALREADY_LOGGED: set[str] = set()


def _warn_once(cfg: SiteConfig, message: str) -> None:
    """Log a case warning once per process (loaders call :func:`site_cases` every round)."""
    text = f"site {cfg.name}: {message}"
    if text not in _ALREADY_LOGGED:
        _ALREADY_LOGGED.add(text)
        log.warning("%s", text)


def site_cases(cfg: SiteConfig, split: str | None = None) -> tuple[list[Case], list[CaseProblem]]:
    """The site's usable cases (manifest order) and the problems of those left out.

    ``split`` selects one split (None: all). Every case is checked (results cached per
    file version in ``cfg.cache_dir/checks``). With ``on_bad_case: skip`` a bad case is
    left out with a logged warning and its errors are returned in ``problems`` (one
    entry per error; count distinct ``case_id`` for the number of cases skipped); with
    ``fail`` :class:`BadCaseError` is raised listing every error of every bad case.
    Warnings are logged (once per process), not returned.

    Raises :class:`SiteDataError` when the data root, manifest or clinical CSV is unusable.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)} or None, got {split!r}")
    if not cfg.data_root.is_dir():
        raise SiteDataError(f"site {cfg.name}: data_root {cfg.data_root} is not a folder (config {cfg.path})")
    check_clinical_table(cfg)
    cases, manifest_problems = read_manifest(cfg)
    errors = [p for p in manifest_problems if p.severity == "error"]
    for warning in (p for p in manifest_problems if p.severity == "warning"):
        _warn_once(cfg, str(warning))
    usable: list[Case] = []
    for case in cases:
        if split is not None and case.split != split:
            continue
        found = _cached_inspect(case, cfg)
        for warning in (p for p in found if p.severity == "warning"):
            _warn_once(cfg, str(warning))
        case_errors = [p for p in found if p.severity == "error"]
        if case_errors:
            errors += case_errors
        else:
            usable.append(case)
    if errors and cfg.on_bad_case == "fail":
        listing = "\n  ".join(str(p) for p in errors)
        raise BadCaseError(f"site {cfg.name}: {len(errors)} problem(s) and on_bad_case is 'fail':\n  {listing}")
    for problem in errors:
        _warn_once(cfg, f"skipping: {problem}")
    return usable, errors


# --------------------------------------------------------------------------- transforms


class _ZerosLiked(MapTransform):
    """Add ``key`` as an all-zero volume shaped like ``like`` (the channel of a modality not held)."""

    def __init__(self, key: str, like: str) -> None:
        super().__init__([key], allow_missing_keys=True)
        self.key, self.like = key, like

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        out[self.key] = torch.zeros_like(out[self.like])
        return out


class _RecordGridd(MapTransform):
    """Store the reference grid's affine as a plain float64 [4, 4] tensor under ``grid_affine``."""

    def __init__(self, reference: str) -> None:
        super().__init__([reference])
        self.reference = reference

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        out["grid_affine"] = torch.as_tensor(np.asarray(out[self.reference].affine), dtype=torch.float64)
        return out


def deterministic_transform(prep: Preprocessing, has_ct: bool, has_pet: bool, has_label: bool) -> Compose:
    """Load, put every volume on the reference grid, normalise, stack channels.

    Input dict: ``"ct"`` / ``"pet"`` / ``"label"`` file paths (those present), anything
    else passes through. Output: ``"image"`` float32 [2, X, Y, Z], ``"label"`` float32
    [1, X, Y, Z] (when ``has_label``), ``"grid_affine"`` float64 [4, 4], plain tensors.
    The reference grid is the CT's (PET's without CT) in RAS at ``prep.spacing``; the
    other volumes follow it through both affines (``ResampleToMatchd``).
    """
    if not (has_ct or has_pet):
        raise ValueError("a case needs a CT or a PET image")
    reference = "ct" if has_ct else "pet"
    held = [k for k in IMAGE_KEYS if (k == "ct" and has_ct) or (k == "pet" and has_pet)]
    files = held + (["label"] if has_label else [])
    followers = [k for k in files if k != reference]
    steps: list[Any] = [
        LoadImaged(files, reader="NibabelReader", image_only=True, dtype=np.float32),
        EnsureChannelFirstd(files, channel_dim="no_channel"),
        Orientationd(reference, axcodes="RAS", labels=None),
        Spacingd(reference, pixdim=prep.spacing, mode="bilinear", padding_mode="border"),
    ]
    if followers:
        steps.append(
            ResampleToMatchd(
                followers,
                key_dst=reference,
                mode=["nearest" if k == "label" else "bilinear" for k in followers],
                padding_mode="zeros",
            )
        )
    lo, hi = prep.ct_window
    if has_ct:
        steps.append(ScaleIntensityRanged("ct", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    if has_pet:
        steps.append(ScaleIntensityRanged("pet", a_min=0.0, a_max=prep.pet_suv_max, b_min=0.0, b_max=1.0, clip=True))
    steps += [_ZerosLiked(k, like=reference) for k in IMAGE_KEYS if k not in held]
    steps += [
        _RecordGridd(reference),
        ConcatItemsd(list(IMAGE_KEYS), "image"),
        DeleteItemsd(list(IMAGE_KEYS)),
        EnsureTyped(["image", "label"] if has_label else ["image"], dtype=torch.float32, track_meta=False),
    ]
    return Compose(steps)


def train_transform(roi_size: tuple[int, int, int]) -> Compose:
    """Random part of training on a deterministic item: pad, tumour-biased crop, flips, small affine.

    Output: ``"image"`` [2, *roi_size], ``"label"`` [1, *roi_size] (a list of one dict, as
    MONAI croppers return; ``monai.data.DataLoader`` flattens it).
    """
    keys = ["image", "label"]
    return Compose(
        [
            # Volumes smaller than the crop are padded first so every crop has exactly roi_size.
            SpatialPadd(keys, spatial_size=roi_size, mode="constant"),
            # Two of three crops centred on tumour: tumours fill ~3% of a volume.
            RandCropByPosNegLabeld(keys, label_key="label", spatial_size=roi_size, pos=2.0, neg=1.0, num_samples=1),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandAffined(
                keys,
                prob=0.3,
                rotate_range=(0.15, 0.15, 0.15),  # about 9 degrees
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            EnsureTyped(keys, dtype=torch.float32, track_meta=False),
        ]
    )


def _case_item(case: Case) -> dict[str, str]:
    item = {"case_id": case.case_id}
    for role in ("ct", "pet", "label"):
        path = getattr(case, role)
        if path is not None:
            item[role] = str(path)
    item["reference_path"] = str(case.ct if case.ct is not None else case.pet)
    return item


def _item_hash(item: Mapping[str, Any]) -> bytes:
    """Cache key of one case: its files' paths, sizes and modification times."""
    stamp = [item.get("case_id")] + [
        _file_stamp(Path(item[role]) if role in item else None) for role in ("ct", "pet", "label")
    ]
    return hashlib.sha256(json.dumps(stamp, default=str).encode()).hexdigest().encode()


def _cached_dataset(
    cfg: SiteConfig, cases: Sequence[Case], with_label: bool, cache_dir: Path | None = None
) -> PersistentDataset:
    prep = Preprocessing.from_site(cfg)
    folder = (cache_dir or cfg.cache_dir) / prep.fingerprint()
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "label" if with_label else "nolabel"
    items = [_case_item(c) for c in cases]
    if not with_label:
        for item in items:
            item.pop("label", None)
    return PersistentDataset(
        items,
        transform=deterministic_transform(prep, cfg.has_ct, cfg.has_pet, with_label),
        cache_dir=folder / suffix,
        hash_func=_item_hash,
        track_meta=False,
    )


def _usable_or_raise(cfg: SiteConfig, split: str, need_label: bool) -> list[Case]:
    cases, _ = site_cases(cfg, split)
    if need_label:
        unlabelled = [c.case_id for c in cases if c.label is None]
        if unlabelled:
            _warn_once(cfg, f"{len(unlabelled)} case(s) without label left out of {split}: {unlabelled}")
        cases = [c for c in cases if c.label is not None]
    if not cases:
        raise SiteDataError(f"site {cfg.name}: no usable {split} case (run 'pemma check-site {cfg.path}')")
    return cases


def train_loader(
    cfg: SiteConfig,
    roi_size: tuple[int, int, int],
    batch_size: int = 2,
    split: str = "train",
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Shuffled random crops of the site's usable ``split`` cases.

    Each batch: ``"image"`` float32 [B, 2, *roi_size], ``"label"`` float32 [B, 1, *roi_size]
    in {0, 1}, ``"case_id"`` list[str] (plus ``"grid_affine"``, ``"reference_path"``).
    Same ``seed``, same crops and order. Raises :class:`SiteDataError` when no case is
    usable and :class:`BadCaseError` when one is bad and ``on_bad_case`` is ``fail``.
    """
    roi = tuple(int(s) for s in roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi_size must be 3 positive integers, got {roi_size!r}")
    cases = _usable_or_raise(cfg, split, need_label=True)
    augment = train_transform(roi)  # type: ignore[arg-type]
    augment.set_random_state(seed=seed)
    dataset = Dataset(_cached_dataset(cfg, cases, with_label=True), transform=augment)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(cfg: SiteConfig, split: str = "test", num_workers: int = 0) -> DataLoader:
    """Whole volumes of the site's usable, labelled ``split`` cases, batch 1, manifest order.

    Each batch: ``"image"`` [1, 2, X, Y, Z], ``"label"`` [1, 1, X, Y, Z], ``"case_id"``,
    ``"grid_affine"`` [1, 4, 4], ``"reference_path"``. Volumes are not padded
    (``monai.inferers.sliding_window_inference`` pads itself).
    :meth:`InferenceMeta.from_batch` turns a batch into what :func:`write_prediction` needs.
    """
    cases = _usable_or_raise(cfg, split, need_label=True)
    dataset = _cached_dataset(cfg, cases, with_label=True)
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers)


# --------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class InferenceMeta:
    """Enough to put a prediction made on the reference grid back onto the original image grid."""

    reference_path: Path  # the original CT (PET without CT)
    reference_affine: np.ndarray  # [4, 4] as nibabel reads it
    reference_shape: tuple[int, int, int]
    grid_affine: np.ndarray  # [4, 4] of the resampled grid the model saw
    grid_shape: tuple[int, int, int]

    @property
    def ct_path(self) -> Path:
        return self.reference_path

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], index: int = 0) -> InferenceMeta:
        """From an :func:`eval_loader` / :func:`train_loader`-style batch (item ``index``)."""
        path = Path(batch["reference_path"][index])
        grid_affine = np.asarray(batch["grid_affine"][index], dtype=np.float64)
        grid_shape = tuple(int(s) for s in batch["image"].shape[-3:])
        return cls._with_reference(path, grid_affine, grid_shape)

    @classmethod
    def _with_reference(cls, path: Path, grid_affine: np.ndarray, grid_shape: tuple[int, ...]) -> InferenceMeta:
        header = nib.load(str(path))  # header only: the data is not read
        return cls(
            reference_path=path,
            reference_affine=np.asarray(header.affine, dtype=np.float64),
            reference_shape=tuple(int(s) for s in header.shape[:3]),  # type: ignore[arg-type]
            grid_affine=grid_affine,
            grid_shape=grid_shape,  # type: ignore[arg-type]
        )


def load_for_inference(
    ct: Path | str | None,
    pet: Path | str | None,
    settings: SiteConfig | Preprocessing | Sequence[float],
) -> tuple[torch.Tensor, InferenceMeta]:
    """One case ready for a model, and what is needed to write its prediction back.

    ``settings``: a site config, a :class:`Preprocessing`, or just a spacing (default
    window and SUV ceiling). Returns ``image`` float32 [1, 2, X, Y, Z] (PET channel zeros
    when ``pet`` is None) and an :class:`InferenceMeta`. Raises :class:`BadCaseError`
    (naming the file and problem) when an input fails the checks.
    """
    if isinstance(settings, SiteConfig):
        prep = Preprocessing.from_site(settings)
    elif isinstance(settings, Preprocessing):
        prep = settings
    else:
        prep = Preprocessing(spacing=tuple(float(s) for s in settings))  # type: ignore[arg-type]
    paths = {"ct": None if ct is None else Path(ct), "pet": None if pet is None else Path(pet)}
    if paths["ct"] is None and paths["pet"] is None:
        raise ValueError("load_for_inference needs a CT or a PET image")
    # The case checks, for a "site" holding exactly what was given.
    case = Case("inference", paths["ct"], paths["pet"], None, "test")
    held = tuple(k for k in IMAGE_KEYS if paths[k] is not None)
    errors = [p for p in _inspect(case, frozenset(held), None) if p.severity == "error"]
    if errors:
        raise BadCaseError("; ".join(str(p) for p in errors))
    item = {k: str(v) for k, v in paths.items() if v is not None}
    out = deterministic_transform(prep, "ct" in held, "pet" in held, has_label=False)(item)
    reference = paths["ct"] if paths["ct"] is not None else paths["pet"]
    meta = InferenceMeta._with_reference(
        reference, out["grid_affine"].numpy(), tuple(int(s) for s in out["image"].shape[-3:])  # type: ignore[arg-type]
    )
    return out["image"].unsqueeze(0), meta


def write_prediction(mask: torch.Tensor | np.ndarray, meta: InferenceMeta, out_path: Path | str) -> Path:
    """Write a mask predicted on the reference grid as NIfTI on the original CT grid.

    ``mask``: [X, Y, Z], [1, X, Y, Z] or [1, 1, X, Y, Z] on the grid of ``meta`` (binary, or
    probabilities in [0, 1]). Binary masks are resampled nearest-neighbour; probabilities
    are resampled bilinearly and thresholded at 0.5. The file holds uint8 0/1 with the
    original CT's exact affine, shape and header geometry. Written atomically (temporary
    file, then rename); never written over the input image itself.
    """
    out_path = Path(out_path)
    if out_path.resolve() == meta.reference_path.resolve():
        raise ValueError(f"refusing to overwrite the input image {meta.reference_path}")
    values = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask.detach().cpu())
    values = values.reshape(values.shape[-3:]) if values.ndim > 3 and np.prod(values.shape[:-3]) == 1 else values
    if values.ndim != 3 or tuple(values.shape) != tuple(meta.grid_shape):
        raise ValueError(
            f"mask shape {tuple(values.shape)} does not match the grid {meta.grid_shape} of {meta.reference_path}"
        )
    values = values.to(torch.float32)
    binary = bool(torch.all((values == 0) | (values == 1)))
    resample = SpatialResample(mode="nearest" if binary else "bilinear", padding_mode="zeros", dtype=torch.float64)
    on_grid = MetaTensor(values[None], affine=torch.as_tensor(meta.grid_affine, dtype=torch.float64))
    back = resample(on_grid, dst_affine=torch.as_tensor(meta.reference_affine), spatial_size=meta.reference_shape)
    array = (np.asarray(back.detach().cpu())[0] >= 0.5).astype(np.uint8)

    reference = nib.load(str(meta.reference_path))
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    image = nib.Nifti1Image(array, reference.affine, header=header)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=out_path.parent, prefix=".tmp-", suffix=".nii.gz")
    os.close(handle)
    try:
        nib.save(image, temp)
        os.replace(temp, out_path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return out_path


# --------------------------------------------------------------------------- benchmark


def measure_loading(cfg: SiteConfig, n_cases: int) -> dict[str, Any]:
    """Seconds per case to preprocess the first ``n_cases`` usable training cases, cold vs cached.

    The cold pass (read, resample, normalise, write) uses a fresh temporary cache, so the
    site's preprocessed volumes in ``cfg.cache_dir`` are neither used nor changed; the
    second pass reads that temporary cache back. Checks run (or are read from their
    cache) before timing. Returns ``{"site", "n_cases", "spacing", "first_load_s_per_case",
    "cached_load_s_per_case", "speedup", "mean_grid_shape"}``.
    """
    cases, _ = site_cases(cfg, "train")
    cases = [c for c in cases if c.label is not None][: max(int(n_cases), 1)]
    if not cases:
        raise SiteDataError(f"site {cfg.name}: no usable train case to measure")
    with tempfile.TemporaryDirectory(prefix="pemma-measure-") as temp:
        dataset = _cached_dataset(cfg, cases, with_label=True, cache_dir=Path(temp))
        start = time.perf_counter()
        shapes = [tuple(dataset[i]["image"].shape[-3:]) for i in range(len(cases))]
        first = (time.perf_counter() - start) / len(cases)
        start = time.perf_counter()
        for i in range(len(cases)):
            dataset[i]
        cached = (time.perf_counter() - start) / len(cases)
    return {
        "site": cfg.name,
        "n_cases": len(cases),
        "spacing": list(cfg.spacing),
        "first_load_s_per_case": round(first, 4),
        "cached_load_s_per_case": round(cached, 4),
        "speedup": round(first / cached, 1) if cached > 0 else float("inf"),
        "mean_grid_shape": [round(float(v), 1) for v in np.mean(np.array(shapes), axis=0)],
    }
