"""A site's usable cases: :func:`site_cases` checks every case of the manifest (results cached
per file version), hands DICOM sources on as their NIfTI conversion, and leaves out or stops at a
bad case as the site's ``on_bad_case`` says; :func:`site_ehr_stats` gives the aggregates of the
EHR rows of those cases that a site may send.

No PyTorch or MONAI here: a deployed SuperNode answers ``query.join`` and ``query.ehr_stats`` (which
count and read the cases) in a fresh process, which must not wait seconds for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pemma_core.config.site import SiteConfig
from pemma_core.data.checks import cached_inspect, read_site_clinical
from pemma_core.data.clinical import MIN_EHR_ROWS, partial_stats, present_counts, read_clinical
from pemma_core.data.manifest import SPLITS, BadCaseError, Case, CaseProblem, SiteDataError, read_manifest
from pemma_core.data.volumes import materialise_case

__all__ = ["CASE_WARNINGS_SHOWN", "site_cases", "site_ehr_stats"]

log = logging.getLogger("pemma.data")

_ALREADY_LOGGED: set[str] = set()
# Case warnings logged in full per site and call of site_cases; the rest are counted in one line
# (a site whose every PET is a little short of the CT would otherwise fill the first screen).
CASE_WARNINGS_SHOWN = 3


def _warn_once(cfg: SiteConfig, message: str) -> None:
    """Log a case warning once per process (loaders call :func:`site_cases` every round)."""
    text = f"site {cfg.name}: {message}"
    if text not in _ALREADY_LOGGED:
        _ALREADY_LOGGED.add(text)
        log.warning("%s", text)


def _warn_cases(cfg: SiteConfig, messages: Sequence[str]) -> None:
    """The case warnings of one :func:`site_cases` call: the first few in full, then their count
    and where to read them all (each only once per process)."""
    new = [m for m in dict.fromkeys(messages) if f"site {cfg.name}: {m}" not in _ALREADY_LOGGED]
    for message in new[:CASE_WARNINGS_SHOWN]:
        _warn_once(cfg, message)
    if len(new) > CASE_WARNINGS_SHOWN:
        _ALREADY_LOGGED.update(f"site {cfg.name}: {m}" for m in new[CASE_WARNINGS_SHOWN:])
        log.warning("site %s: %d more case warning(s); `pemma check-site %s` lists every one", cfg.name,
                    len(new) - CASE_WARNINGS_SHOWN, cfg.path)


def site_cases(cfg: SiteConfig, split: str | None = None) -> tuple[list[Case], list[CaseProblem]]:
    """The site's usable cases (manifest order) and the problems of those left out.

    ``split`` selects one split (None: all). Every case is checked (results cached per
    file version in ``cfg.cache_dir/checks``). DICOM sources (series folders, RTSTRUCT,
    DICOM-SEG) come back as their NIfTI conversion in ``cfg.cache_dir/converted/<case_id>/``
    (:func:`pemma_core.data.volumes.materialise_case`), so every loader reads NIfTI. With
    ``on_bad_case: skip`` a bad case is left out with a logged warning and its errors are returned in ``problems`` (one
    entry per error; count distinct ``case_id`` for the number of cases skipped); with
    ``fail`` :class:`BadCaseError` is raised listing every error of every bad case.
    Warnings are logged (once per process), not returned.

    Raises :class:`SiteDataError` when the data root, manifest or clinical CSV is unusable.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)} or None, got {split!r}")
    if not cfg.data_root.is_dir():
        raise SiteDataError(f"site {cfg.name}: data_root {cfg.data_root} is not a folder (config {cfg.path})")
    read_site_clinical(cfg)  # a site whose clinical CSV is unusable stops here
    cases, manifest_problems = read_manifest(cfg)
    errors = [p for p in manifest_problems if p.severity == "error"]
    for warning in (p for p in manifest_problems if p.severity == "warning"):
        _warn_once(cfg, str(warning))
    usable: list[Case] = []
    case_warnings: list[str] = []
    for case in cases:
        if split is not None and case.split != split:
            continue
        found = cached_inspect(case, cfg)
        case_warnings += [str(p) for p in found if p.severity == "warning"]
        case_errors = [p for p in found if p.severity == "error"]
        if not case_errors:
            try:  # DICOM sources -> their NIfTI conversion in the cache (done once, by the checks above)
                case = materialise_case(case, cfg.cache_dir, label_roi=cfg.label_roi, series_uids=cfg.dicom_series)
            except (ValueError, OSError) as exc:  # the series changed since it was checked
                case_errors = [CaseProblem(case.case_id, None, f"DICOM conversion failed: {exc}")]
        if case_errors:
            errors += case_errors
        else:
            usable.append(case)
    _warn_cases(cfg, case_warnings)
    if errors and cfg.on_bad_case == "fail":
        listing = "\n  ".join(str(p) for p in errors)
        raise BadCaseError(f"site {cfg.name}: {len(errors)} problem(s) and on_bad_case is 'fail':\n  {listing}")
    for problem in errors:
        _warn_once(cfg, f"skipping: {problem}")
    return usable, errors


def site_ehr_stats(cfg: SiteConfig, split: str = "train", min_rows: int = MIN_EHR_ROWS) -> tuple[dict | None, str]:
    """:func:`pemma_core.data.clinical.partial_stats` of a site's ``split`` rows: aggregates only
    (per numeric covariate count / sum / centred sum of squares / missing; per categorical
    covariate the set of categories and missing), what the server needs to fit the
    federation's :class:`~pemma_core.data.clinical.EhrPreprocessor` without any row.

    A privacy floor: when any covariate has fewer than ``min_rows`` present values the
    site sends nothing (with 2 rows, count, sum and spread give both values away).
    Returns ``(stats or None, a one-line note saying what was sent or why nothing was)``;
    the note is also logged.
    """
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
        raise ValueError(f"min_rows must be an int >= 1, got {min_rows!r}")
    if cfg.clinical is None or not cfg.clinical.covariates:
        raise ValueError(f"site {cfg.name} ({cfg.path}) declares no EHR covariates (clinical.covariates)")
    table, _problems = read_clinical(
        cfg.clinical.path, cfg.clinical.id_column, cfg.clinical.time or "time", cfg.clinical.event or "event",
        cfg.clinical.covariates, on_bad_case=cfg.on_bad_case,
    )
    cases, _ = site_cases(cfg, split)
    ids = [c.case_id for c in cases if c.case_id in table.index]
    if not ids:
        raise ValueError(f"site {cfg.name}: no {split} case has a row in {cfg.clinical.path}")
    stats = partial_stats(table.loc[ids], cfg.clinical.covariates)
    present = present_counts(stats)
    rows = "training" if split == "train" else f"{split!r}"
    short = [f"covariate {name!r} has {n} {rows} value{'s' * (n != 1)}" for name, n in present.items() if n < min_rows]
    if short:
        note = f"EHR statistics withheld: {', '.join(short)}, fewer than min_ehr_rows {min_rows}"
        log.warning("site %s: %s", cfg.name, note)
        return None, note
    note = (f"EHR statistics sent: {stats['rows']} {rows} rows, at least {min(present.values())} values per covariate "
            f"(min_ehr_rows {min_rows})")
    log.info("site %s: %s", cfg.name, note)
    return stats, note
