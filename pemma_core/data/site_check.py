"""``pemma check-site SITE.yaml [--json]``: every data check of a site, without training.

Hospital IT runs it before joining a federation. Per case it prints ``ok`` or the
problems (file and what is wrong) plus warnings; ``--json`` prints one object::

    {"site", "config", "modalities", "modes", "on_bad_case", "purpose",
     "cases": [{"case_id", "split", "status": "ok" | "bad", "problems": [...], "warnings": [...]}],
     "site_problems": [...],            # manifest / clinical table as a whole
     "summary": {"cases", "ok", "bad", "with_warnings", "usable": {split: n}},
     "ready": bool, "reason": str}

Exit status: 0 ready; 1 the site could not train (no usable training case, a bad case
while ``on_bad_case`` is ``fail``, an unusable manifest / clinical CSV / data root) or
the YAML itself is missing or invalid (``pemma check-site: error: ...`` on stderr; with
``--json`` also an object with ``"reason": "config error"`` on stdout); 2 bad options.
Progress (one line per case inspected) goes to stderr; ``-q`` silences it. ``--purpose eval`` asks for a usable labelled test case
instead of a training case; the default ``auto`` means ``eval`` for a site whose manifest
lists no training case at all (a held-out test site, e.g. ``sites/ibsi/test.yaml``) and
``train`` otherwise.

Checks run afresh (the cached results of :func:`pemma_core.data.cases.site_cases` are
neither read nor written) and nothing is modified.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pemma_core.config.site import SiteConfig, SiteConfigError, load_site_config
from pemma_core.console import progress

if TYPE_CHECKING:
    import pandas as pd

    from pemma_core.data.clinical import ClinicalProblem
    from pemma_core.data.manifest import CaseProblem

__all__ = ["check_site", "add_arguments", "run"]


def _clinical_findings(
    cfg: SiteConfig, clinical: tuple[pd.DataFrame, list[ClinicalProblem]] | None, case_ids: list[str]
) -> tuple[list[str], dict[str, list[str]], bool]:
    """(site-level problems, per-case warnings, whether rows were left out) of the clinical table."""
    if clinical is None or cfg.clinical is None:
        return [], {}, False
    table, rows = clinical
    path = cfg.clinical.path
    site_problems = [f"clinical CSV {path}: {row}" for row in rows]
    known_ids = {str(i) for i in table.index}
    per_case = {c: [f"no usable row in the clinical CSV {path}"] for c in case_ids if c not in known_ids}
    return site_problems, per_case, bool(rows)


def check_site(cfg: SiteConfig, purpose: str = "auto") -> dict[str, Any]:
    """Run every check of a site; the report described in the module docstring (never raises for data).

    ``purpose``: ``train``, ``eval`` or ``auto`` (``eval`` when the manifest lists no train case).
    Shows one progress line per case inspected (:func:`pemma_core.console.progress`).
    """
    # The image checks (nibabel, pandas) are imported here, so that `pemma check-site --help` is instant.
    from pemma_core.data.checks import inspect_case, read_site_clinical
    from pemma_core.data.manifest import SiteDataError, read_manifest

    if purpose not in ("auto", "train", "eval"):
        raise ValueError(f"purpose must be 'auto', 'train' or 'eval', got {purpose!r}")
    report: dict[str, Any] = {
        "site": cfg.name,
        "config": str(cfg.path),
        "modalities": list(cfg.modalities),
        "modes": list(cfg.modes),
        "on_bad_case": cfg.on_bad_case,
        "purpose": purpose,
        "cases": [],
        "site_problems": [],
    }

    def finish(ready: bool, reason: str) -> dict[str, Any]:
        cases = report["cases"]
        usable: dict[str, int] = {}
        for entry in cases:
            if entry["status"] == "ok":
                usable[entry["split"]] = usable.get(entry["split"], 0) + 1
        report["summary"] = {
            "cases": len(cases),
            "ok": sum(e["status"] == "ok" for e in cases),
            "bad": sum(e["status"] == "bad" for e in cases),
            "with_warnings": sum(bool(e["warnings"]) for e in cases),
            "usable": usable,
        }
        report["ready"] = ready
        report["reason"] = reason
        return report

    if not cfg.data_root.is_dir():
        report["site_problems"].append(f"data_root {cfg.data_root} is not a folder")
        return finish(False, "data root missing")
    try:
        clinical = read_site_clinical(cfg)
        cases, manifest_problems = read_manifest(cfg)
    except SiteDataError as exc:
        report["site_problems"].append(str(exc))
        return finish(False, "manifest or clinical CSV unusable")

    if purpose == "auto":
        purpose = "train" if any(c.split == "train" for c in cases) or not cases else "eval"
        report["purpose"] = purpose
    clinical_problems, clinical_warnings, bad_rows = _clinical_findings(cfg, clinical, [c.case_id for c in cases])
    report["site_problems"] += clinical_problems

    def describe(problem: CaseProblem) -> str:
        return f"{problem.file}: {problem.problem}" if problem.file is not None else problem.problem

    entries: dict[str, dict[str, Any]] = {}
    for problem in manifest_problems:  # rows that did not become cases (duplicates, bad split...)
        entry = entries.setdefault(
            problem.case_id, {"case_id": problem.case_id, "split": "", "status": "ok", "problems": [], "warnings": []}
        )
        if problem.severity == "error":
            entry["status"] = "bad"
            entry["problems"].append(describe(problem))
        else:
            entry["warnings"].append(describe(problem))
    for case in progress(cases, f"checking {cfg.name}: case", label=lambda c: c.case_id):
        entry = entries.setdefault(
            case.case_id, {"case_id": case.case_id, "split": "", "status": "ok", "problems": [], "warnings": []}
        )
        entry["split"] = case.split
        for problem in inspect_case(case, cfg):
            if problem.severity == "error":
                entry["status"] = "bad"
                entry["problems"].append(describe(problem))
            else:
                entry["warnings"].append(describe(problem))
        entry["warnings"] += clinical_warnings.get(case.case_id, [])
    report["cases"] = list(entries.values())

    needed_split = "train" if purpose == "train" else "test"
    labelled_ok = [
        c for c in cases if entries[c.case_id]["status"] == "ok" and c.split == needed_split and c.label is not None
    ]
    any_bad = any(e["status"] == "bad" for e in entries.values())
    if cfg.on_bad_case == "fail" and (any_bad or bad_rows):
        return finish(False, "bad case(s) or clinical row(s) while on_bad_case is 'fail'")
    if not labelled_ok:
        return finish(False, f"no usable labelled {needed_split} case")
    skipped = sum(e["status"] == "bad" for e in entries.values())
    reason = f"{len(labelled_ok)} usable {needed_split} case(s)"
    if skipped:
        reason += f", {skipped} bad case(s) will be skipped"
    return finish(True, reason)


def _print_text(report: dict[str, Any]) -> None:
    print(
        f"site {report['site']} ({report['config']}): modalities {', '.join(report['modalities'])}; "
        f"modes {', '.join(report['modes'])}; on_bad_case {report['on_bad_case']}"
    )
    width = max([len(e["case_id"]) for e in report["cases"]] + [7])
    for entry in report["cases"]:
        print(f"  {entry['case_id']:<{width}}  {entry['split'] or '-':<5}  {entry['status']}")
        for text in entry["problems"]:
            print(f"      problem: {text}")
        for text in entry["warnings"]:
            print(f"      warning: {text}")
    for text in report["site_problems"]:
        print(f"  site problem: {text}")
    summary = report["summary"]
    usable = ", ".join(f"{split} {n}" for split, n in sorted(summary["usable"].items())) or "none"
    print(
        f"summary: {summary['cases']} case(s): {summary['ok']} ok, {summary['bad']} bad, "
        f"{summary['with_warnings']} with warnings; usable: {usable}"
    )
    print(f"result: {'READY' if report['ready'] else 'NOT READY'}: {report['reason']}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("site", type=Path, help="the site YAML file")
    parser.add_argument("--json", action="store_true", help="print a JSON report instead of text")
    parser.add_argument(
        "--purpose",
        choices=("auto", "train", "eval"),
        default="auto",
        help="what the site must be ready for: train (a usable training case), eval (a labelled test case), "
        "auto (default: eval when the manifest lists no train case, else train)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_site_config(args.site)
    except SiteConfigError as exc:  # `pemma` prints it on stderr and exits with status 1
        if args.json:
            print(json.dumps({"config": str(args.site), "ready": False, "reason": "config error", "error": str(exc),
                              "cases": []}))
        raise
    report = check_site(cfg, purpose=args.purpose)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0 if report["ready"] else 1
