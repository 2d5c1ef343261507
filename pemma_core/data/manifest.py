"""A site's manifest CSV: one row per case, read into :class:`Case` objects, and written.

Columns (:data:`MANIFEST_COLUMNS`): ``case_id, ct, pet, label, split``; file paths are
relative to the site's ``data_root`` (absolute paths are kept). A column for a modality
the site does not hold may be absent or empty. ``split`` is one of :data:`SPLITS`.
An image may be a NIfTI file or a DICOM series folder, a label a NIfTI or an RTSTRUCT /
DICOM-SEG file: the cases read here name the sources as listed, and
:func:`pemma_core.data.cases.site_cases` hands the loaders their NIfTI conversion
(:func:`pemma_core.data.volumes.materialise_case`).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pemma_core.config.site import SiteConfig
from pemma_core.data.file_memo import FileMemo

__all__ = [
    "SPLITS",
    "MANIFEST_COLUMNS",
    "IMAGE_KEYS",
    "ROLE_NAMES",
    "Case",
    "CaseProblem",
    "BadCaseError",
    "SiteDataError",
    "read_manifest",
    "write_manifest",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST_COLUMNS: tuple[str, ...] = ("case_id", "ct", "pet", "label", "split")
IMAGE_KEYS: tuple[str, str] = ("ct", "pet")  # channel order of a batch's "image"
ROLE_NAMES = {"ct": "CT", "pet": "PET", "label": "label"}


@dataclass(frozen=True)
class Case:
    """One row of a site manifest, paths absolute (None: not listed / modality not held); each a NIfTI,
    a DICOM series folder (ct, pet) or an RTSTRUCT / DICOM-SEG file (label)."""

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


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SiteDataError(f"manifest not found: {path}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except Exception as exc:  # pandas raises several types for malformed CSVs
        raise SiteDataError(f"manifest {path} cannot be read as CSV: {exc}") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


_MANIFESTS: FileMemo[tuple[list[Case], list[CaseProblem]]] = FileMemo()


def read_manifest(cfg: SiteConfig) -> tuple[list[Case], list[CaseProblem]]:
    """Rows of the site manifest as cases (manifest order) plus row-level problems.

    Row-level problems: empty case id, unknown split, duplicate case ids (every row with
    that id is bad: there is no telling which one is right), a file listed for a
    modality the site does not hold (warning; the file is ignored).

    Raises :class:`SiteDataError` when the manifest is missing or lacks a column
    (``case_id``, ``split``, ``label``, plus ``ct``/``pet`` for each image modality held).
    """
    key = (str(cfg.manifest), str(cfg.data_root), tuple(cfg.modalities))
    cases, problems = _MANIFESTS.get(key, [cfg.manifest], lambda: _parse_manifest(cfg))
    return list(cases), list(problems)


def _parse_manifest(cfg: SiteConfig) -> tuple[list[Case], list[CaseProblem]]:
    table = _read_table(cfg.manifest)
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


def write_manifest(path: Path | str, rows: Iterable[Mapping[str, object]]) -> Path:
    """Write a manifest CSV (UTF-8, header :data:`MANIFEST_COLUMNS`); returns ``path``.

    Each row maps column -> value; an absent or None value is written empty (e.g. ``pet``
    at a CT-only site) and keys outside :data:`MANIFEST_COLUMNS` are left out. The
    parent folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in MANIFEST_COLUMNS})
    return path
