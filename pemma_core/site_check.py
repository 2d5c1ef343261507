"""``pemma check-site SITE.yaml [--json]``: every data check of a site, without training.

Hospital IT runs it before joining a federation. Per case it prints ``ok`` or the
problems (file and what is wrong) plus warnings; ``--json`` prints one object::

    {"site", "config", "modalities", "modes", "on_bad_case", "purpose",
     "cases": [{"case_id", "split", "status": "ok" | "bad", "problems": [...], "warnings": [...]}],
     "site_problems": [...],            # manifest / clinical table as a whole
     "summary": {"cases", "ok", "bad", "with_warnings", "usable": {split: n}},
     "ready": bool, "reason": str}

Exit status: 0 ready; 1 the site could not train (no usable training case, a bad case
while ``on_bad_case`` is ``fail``, an unusable manifest / clinical CSV / data root);
2 the YAML itself is invalid. ``--purpose eval`` asks for a usable labelled test case
instead of a training case; the default ``auto`` means ``eval`` for a site whose manifest
lists no training case at all (a held-out test site, e.g. ``sites/ibsi/test.yaml``) and
``train`` otherwise.

Checks run afresh (the cached results of :func:`pemma_core.data.site_cases` are neither
read nor written) and nothing is modified.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pemma_core.data import CaseProblem, SiteDataError, check_clinical_table, inspect_case, read_manifest
from pemma_core.site import SiteConfig, SiteConfigError, load_site_config

__all__ = ["HELP", "check_site", "add_arguments", "run"]

HELP = "check a site's YAML, manifest, clinical CSV and every image without training"


def _clinical_findings(cfg: SiteConfig, case_ids: list[str]) -> tuple[list[str], dict[str, list[str]], str]:
    """(site-level problems, per-case warnings, state) of the clinical table.

    ``state``: ``"ok"``, ``"bad_rows"`` (some rows left out) or ``"unusable"``.
    """
    spec = cfg.clinical
    if spec is None:
        return [], {}, "ok"
    site_problems: list[str] = []
    per_case: dict[str, list[str]] = {}
    state = "ok"
    if spec.time is not None and spec.event is not None:
        from pemma_core.clinical import ClinicalDataError, read_clinical  # the survival table's own checks

        try:
            table, rows = read_clinical(spec.path, spec.id_column, spec.time, spec.event, spec.covariates)
        except (ClinicalDataError, FileNotFoundError) as exc:
            return [str(exc)], {}, "unusable"
        for row in rows:
            site_problems.append(f"clinical CSV {spec.path}: {row}")
        state = "bad_rows" if rows else "ok"
        known_ids = {str(i) for i in table.index}
    else:
        import pandas as pd

        known_ids = set(pd.read_csv(spec.path, dtype=str, keep_default_na=False)[spec.id_column].str.strip())
    for case_id in case_ids:
        if case_id not in known_ids:
            per_case.setdefault(case_id, []).append(f"no usable row in the clinical CSV {spec.path}")
    return site_problems, per_case, state


def check_site(cfg: SiteConfig, purpose: str = "auto") -> dict[str, Any]:
    """Run every check of a site; the report described in the module docstring (never raises for data).

    ``purpose``: ``train``, ``eval`` or ``auto`` (``eval`` when the manifest lists no train case).
    """
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
        check_clinical_table(cfg)
        cases, manifest_problems = read_manifest(cfg)
    except SiteDataError as exc:
        report["site_problems"].append(str(exc))
        return finish(False, "manifest or clinical CSV unusable")

    if purpose == "auto":
        purpose = "train" if any(c.split == "train" for c in cases) or not cases else "eval"
        report["purpose"] = purpose
    clinical_problems, clinical_warnings, clinical_state = _clinical_findings(cfg, [c.case_id for c in cases])
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
    for case in cases:
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
    if clinical_state == "unusable":
        return finish(False, "clinical CSV unusable")
    if cfg.on_bad_case == "fail" and (any_bad or clinical_state == "bad_rows"):
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
    except SiteConfigError as exc:
        if args.json:
            failure = {"config": str(args.site), "ready": False, "reason": "config error", "error": str(exc)}
            failure["cases"] = []
            print(json.dumps(failure))
        else:
            print(f"config error: {exc}")
        return 2
    report = check_site(cfg, purpose=args.purpose)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0 if report["ready"] else 1
