"""Checks of a site's cases and clinical table, and the on-disk cache of case check results.

Every case is checked before use (:func:`inspect_case`): files present and readable
(the whole gzip stream of a ``.nii.gz``), 3-D with a usable affine, finite values, CT in
Hounsfield units, PET in SUV, 0/1 labels on their image's grid, PET and CT fields of view
overlapping. A DICOM source (series folder, RTSTRUCT, DICOM-SEG) is read with
:func:`pemma_core.data.volumes.read_volume`, whose problems (missing or duplicated
slices, several series, uneven spacing, missing SUV tags, ROI not found, another series)
name the file or folder and the tag; CT and PET must then share a frame of reference.
Results are cached per file version under ``cfg.cache_dir/checks`` (:func:`cached_inspect`),
so a loader called every round does not re-read the images.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from pemma_core.config.site import SiteConfig
from pemma_core.data.clinical import ClinicalDataError, ClinicalProblem, read_clinical
from pemma_core.data.dicom import DicomError, tag_text
from pemma_core.data.file_memo import FileMemo
from pemma_core.data.manifest import ROLE_NAMES, SPLITS, Case, CaseProblem, SiteDataError
from pemma_core.data.volumes import CorruptFileError, Volume, is_dicom_source, read_volume, source_stamp, verify_gzip

__all__ = [
    "inspect_case",
    "inspect_case_files",
    "check_case",
    "cached_inspect",
    "file_stamp",
    "read_site_clinical",
]

# Plausibility limits (why: catch unit mistakes that would silently ruin training).
HU_AIR_FAT_CEILING = -100.0  # a CT in HU always holds fat (-100) or air (-1000) below this
SUV_CEILING = 100.0  # SUVs above this are activity concentrations (Bq/mL), not SUV
PARTIAL_FOV_WARNING = 0.01  # warn when more than 1% of the CT lies outside the PET field of view
AFFINE_ATOL_MM = 1e-2  # label and image affines must agree to 0.01 mm (float32 headers)
_CHECKS_VERSION = 2  # bump when a check changes, to invalidate cached check results


_CLINICAL: FileMemo[tuple[pd.DataFrame, list[ClinicalProblem]]] = FileMemo()  # read once per version of the CSV


def read_site_clinical(cfg: SiteConfig) -> tuple[pd.DataFrame, list[ClinicalProblem]] | None:
    """The site's clinical table (:func:`~pemma_core.data.clinical.read_clinical`, bad rows
    left out and returned), None when the site has no clinical CSV.

    Raises :class:`SiteDataError` when the CSV is missing, unreadable or lacks a declared
    column. Bad rows never raise here: whoever uses the rows applies ``on_bad_case``.
    """
    spec = cfg.clinical
    if spec is None:
        return None
    covariates = tuple(sorted((spec.covariates or {}).items()))
    key = (str(spec.path), spec.id_column, spec.time, spec.event, covariates)
    try:
        table, problems = _CLINICAL.get(key, [spec.path], lambda: read_clinical(
            spec.path, spec.id_column, spec.time, spec.event, spec.covariates))
    except (ClinicalDataError, FileNotFoundError) as exc:
        raise SiteDataError(str(exc)) from None
    return table.copy(), list(problems)


@dataclass(frozen=True)
class _ImageInfo:
    shape: tuple[int, ...]
    affine: np.ndarray
    minimum: float
    maximum: float
    nonfinite: int
    values: np.ndarray | None  # distinct values (labels only)
    volume: Volume | None = None  # a DICOM source as read (the reference of an RTSTRUCT label)


@dataclass(frozen=True)
class _DicomOptions:
    """How a case's DICOM sources are read (site YAML ``label_roi``, ``dicom_series``; the conversion cache)."""

    label_roi: str | None = None
    series_uids: tuple[str, ...] = ()
    cache_dir: Path | None = None  # None: read in memory, write nothing


def _read_image(
    path: Path, role: str, case_id: str, want_values: bool, options: _DicomOptions = _DicomOptions(),
    reference: Path | Volume | None = None,
) -> tuple[_ImageInfo | None, list[CaseProblem]]:
    """Read a NIfTI fully (its whole gzip stream is checked: a reader stops before the CRC), or a DICOM source."""

    def problem(text: str) -> tuple[None, list[CaseProblem]]:
        return None, [CaseProblem(case_id, path, text)]

    name = ROLE_NAMES[role]
    if not path.exists():
        return problem(f"missing file ({name})")
    volume = None
    if is_dicom_source(path):
        try:
            volume = read_volume(path, kind=role, reference=reference, roi=options.label_roi,
                                 series_uids=options.series_uids, cache_dir=options.cache_dir, case_id=case_id)
        except DicomError as exc:
            return None, [CaseProblem(case_id, p.path, f"{name}: {tag_text(p.tag)}: {p.problem}") for p in exc.problems]
        except (ValueError, OSError) as exc:  # a damaged cached conversion, an unreadable reference...
            return problem(f"unreadable {name} ({type(exc).__name__}: {exc})")
        data, affine = volume.array, np.asarray(volume.affine, dtype=np.float64)
    else:
        try:
            if path.name.lower().endswith(".gz"):
                verify_gzip(path)
            image = nib.load(str(path))
            data = np.asanyarray(image.dataobj)
        except CorruptFileError as exc:
            return problem(f"unreadable {name} ({exc.reason})")
        except Exception as exc:  # nibabel/gzip/zlib/EOF errors all mean the same to a site
            return problem(f"unreadable {name} ({type(exc).__name__}: {exc})")
    if data.ndim != 3:
        return problem(f"{name} is {data.ndim}-D with shape {tuple(data.shape)}, expected a 3-D volume")
    if min(data.shape) < 1:
        return problem(f"{name} is empty (shape {tuple(data.shape)})")
    if volume is None:
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
    return _ImageInfo(tuple(int(s) for s in data.shape), affine, minimum, maximum, nonfinite, values, volume), []


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


def inspect_case(case: Case, cfg: SiteConfig, *, convert: bool = False) -> list[CaseProblem]:
    """Run every check on one case; returns errors and warnings (``severity``), empty when fine.

    ``convert``: keep the NIfTI conversion of DICOM sources in ``cfg.cache_dir/converted``
    (False: read them in memory and write nothing, as ``pemma check-site`` does).
    Errors: a required file not listed or missing; unreadable / truncated / corrupt NIfTI;
    a DICOM source that cannot be read (every problem, naming file and tag); CT and PET
    series in different frames of reference; not 3-D;
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
    return inspect_case_files(case, frozenset(cfg.modalities), cfg.manifest, label_roi=cfg.label_roi,
                              series_uids=cfg.dicom_series, cache_dir=cfg.cache_dir if convert else None)


def inspect_case_files(
    case: Case, held: frozenset[str], manifest: Path | None = None, *, label_roi: str | None = None,
    series_uids: tuple[str, ...] = (), cache_dir: Path | None = None,
) -> list[CaseProblem]:
    """:func:`inspect_case` for a site holding ``held`` modalities (``manifest``: the file named by row problems).

    DICOM sources: ``label_roi`` picks the RTSTRUCT ROI / SEG segment, ``series_uids`` the
    series of a folder holding several, ``cache_dir`` keeps their NIfTI conversion
    (:func:`pemma_core.data.volumes.materialise_case`); None reads them in memory.
    """
    problems: list[CaseProblem] = []
    if case.split not in SPLITS:
        problems.append(CaseProblem(case.case_id, manifest, f"split {case.split!r} is not one of {list(SPLITS)}"))
    infos: dict[str, _ImageInfo] = {}
    required = {"ct": "ct" in held, "pet": "pet" in held, "label": case.split == "train"}
    options = _DicomOptions(label_roi, tuple(series_uids), cache_dir)
    image_role = "ct" if "ct" in held else "pet"
    for role in ("ct", "pet", "label"):
        path: Path | None = getattr(case, role)
        if path is None:
            if required[role]:
                problems.append(CaseProblem(case.case_id, manifest, f"no {ROLE_NAMES[role]} file listed"))
            continue
        reference: Path | Volume | None = None
        if role == "label" and is_dicom_source(path):  # an RTSTRUCT/SEG is filled onto its image's grid
            if image_role not in infos:
                problems.append(CaseProblem(case.case_id, path, f"label not read: its {ROLE_NAMES[image_role]} "
                                                                "(the grid it is filled onto) is unusable"))
                continue
            read = infos[image_role].volume
            reference = read if read is not None and cache_dir is None else getattr(case, image_role)  # not read twice
        info, found = _read_image(path, role, case.case_id, role == "label", options, reference)
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
    frames = {role: infos[role].volume.dicom.get("FrameOfReferenceUID") for role in ("ct", "pet")
              if role in infos and infos[role].volume is not None}
    if len(frames) == 2 and frames["ct"] and frames["pet"] and frames["ct"] != frames["pet"]:
        add("pet", f"PET: {tag_text('FrameOfReferenceUID')}: {frames['pet']} differs from the CT's {frames['ct']}: "
                   "the two series' positions cannot be compared (registered elsewhere?)")
    elif "ct" in infos and "pet" in infos:
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


def file_stamp(path: Path | None) -> list[Any]:
    """What identifies a version of a file in cache keys: path, size, modification time (a DICOM
    series folder: those of every file in it; :func:`pemma_core.data.volumes.source_stamp`)."""
    return source_stamp(path)


def _case_stamp(case: Case) -> list[Any]:
    return [case.case_id, case.split] + [file_stamp(getattr(case, role)) for role in ("ct", "pet", "label")]


def _read_checks(store: Path) -> tuple[CaseProblem, ...]:
    return tuple(
        CaseProblem(p["case_id"], None if p["file"] is None else Path(p["file"]), p["problem"], p["severity"])
        for p in json.loads(store.read_text())
    )


_STORED_CHECKS: FileMemo[tuple[CaseProblem, ...]] = FileMemo(size=4096)  # a site's cases are checked every round


def cached_inspect(case: Case, cfg: SiteConfig) -> list[CaseProblem]:
    """:func:`inspect_case`, remembered in the cache folder until a file or the config changes; DICOM
    sources are converted into ``cfg.cache_dir/converted`` on the way (:func:`inspect_case` ``convert``)."""
    key_text = json.dumps([_CHECKS_VERSION, list(cfg.modalities), str(cfg.manifest), cfg.label_roi,
                           list(cfg.dicom_series), _case_stamp(case)], default=str)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    store = cfg.cache_dir / "checks" / f"{key}.json"
    try:  # (a missing entry raises OSError too)
        return list(_STORED_CHECKS.get(store, [store], lambda: _read_checks(store)))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a damaged entry is simply recomputed
    problems = inspect_case(case, cfg, convert=True)
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
