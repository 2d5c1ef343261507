"""``bench.json``: writing it, reading a run back, and finding rows in it.

The result dictionary holds ``backbones -> name -> {"rows": [...], "speed", ...}``, the
CNN row under ``cnn``, the data checks under ``data``; a row holds ``dice`` (mode -> mean)
and ``per_case`` (mode -> case id -> Dice).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT", "all_rows", "read_finished", "read_result", "read_resumable", "row_dice", "row_per_case", "rows_by_id", "write_json"]

FORMAT = "pemma-bench/1"


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_result(source: Path) -> dict[str, Any]:
    """A bench run's results, finished or not; ValueError when ``source`` is missing, not JSON or not
    a pemma bench result."""
    if not source.is_file():
        raise ValueError(f"{source} does not exist")
    try:
        results = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source} is not JSON ({exc})") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise ValueError(f"{source} is not a pemma bench result ({FORMAT})")
    return results


def read_finished(source: Path) -> dict[str, Any]:
    """The results of a finished run; ValueError when ``source`` is missing, foreign or unfinished."""
    results = read_result(source)
    if not results.get("complete"):
        raise ValueError(f"{source} is from a run that did not finish")
    return results


# Settings a resumed run may change: they decide no number the bench reports as a result.
_FREE_ON_RESUME = frozenset({"out", "threads", "threads_reason"})


def read_resumable(source: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """The results of an unfinished run that a run with ``config`` (:meth:`BenchConfig.to_json`)
    may continue; ValueError says why not (missing, finished, foreign, other settings)."""
    if not source.is_file():
        raise ValueError(f"--resume: {source} does not exist: there is no run to continue")
    try:
        results = read_result(source)
    except ValueError as exc:
        raise ValueError(f"--resume: {exc}") from None
    if results.get("complete"):
        raise ValueError(f"--resume: {source} is a finished run: nothing to continue (--report-only rewrites its markdown)")
    before, now = results.get("config", {}), json.loads(json.dumps(config, default=_json_default))
    differ = sorted(k for k in set(before) | set(now) if k not in _FREE_ON_RESUME and before.get(k) != now.get(k))
    if differ:
        said = "; ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in differ)
        raise ValueError(f"--resume: {source} was run with other settings ({said}): give the same options")
    return results


def rows_by_id(entry: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """One backbone's rows by their id (``"pemma-lora"``...)."""
    return {r["row"]: r for r in entry.get("rows", [])}


def row_dice(row: Mapping[str, Any] | None, mode: str) -> float | None:
    """A row's mean Dice in ``mode``; None without that row or mode."""
    if row is None:
        return None
    value = row.get("dice", {}).get(mode)
    return None if value is None else float(value)


def row_per_case(row: Mapping[str, Any] | None, mode: str) -> dict[str, float]:
    """A row's Dice per test case in ``mode`` (empty without that row or mode)."""
    return dict((row or {}).get("per_case", {}).get(mode, {}))


def all_rows(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every row of every backbone, then the CNN row."""
    rows = [r for entry in results.get("backbones", {}).values() for r in entry.get("rows", [])]
    if results.get("cnn"):
        rows.append(results["cnn"])
    return rows
