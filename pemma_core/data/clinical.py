"""A site's clinical table: reading the CSV and turning covariates into a model matrix.

Two steps, kept apart so each can be tested alone:

1. :func:`read_clinical` reads and validates a clinical CSV (case id, survival time and
   event flag when the site has them, declared covariates) and reports every bad row by
   line, case id and column. It is the only clinical CSV reader: site checks, loaders,
   prognosis and ``pemma predict --ehr/--clinical`` all go through it.
2. :class:`EhrPreprocessor` turns the covariates into a ``float32`` matrix: numeric
   columns standardised with statistics of the training rows, categorical columns
   one-hot encoded, missing values imputed *and* flagged by an indicator column. It can
   be fitted on one table (:meth:`EhrPreprocessor.fit`) or, without sharing rows, from
   per-site summaries (:func:`partial_stats` at each site, then
   :meth:`EhrPreprocessor.from_partial_stats` on the server); both paths give the same
   preprocessor. The server trusts no summary: :func:`partial_stats_problems` checks its
   shape, consistency and bounds first, so a malformed one is refused, never a crash.

A covariate spec is an ordered mapping ``{column name: "numeric" | "categorical"}``;
its order is the order of the output columns.
"""

from __future__ import annotations

import csv
import json
import math
import reprlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

CovariateSpec = Mapping[str, str]
COVARIATE_TYPES: tuple[str, ...] = ("numeric", "categorical")
# Cell values read as missing (compared after stripping blanks, case-insensitively).
MISSING_TOKENS: frozenset[str] = frozenset({"", "na", "n/a", "nan", "null", "none", "."})
METADATA_KEY = "pemma.ehr_preprocessor"
_FORMAT_VERSION = 1

# Bounds on the statistics a site sends (checked by :func:`partial_stats_problems`), so a
# malformed or hostile summary can neither crash the server nor steer the fit at will.
# A covariate in clinical units (age, weight, SUV, lab values, calories...) never exceeds
# 1e6 in absolute value; a site's sum is then within count * 1e6 of zero.
MAX_ABS_COVARIATE = 1e6
# The EHR encoder has one input per category: more would make its width explode, and a
# label per patient (an id, a date) would leak rows.
MAX_EHR_CATEGORIES = 50
MAX_EHR_COVARIATES = 64  # likewise for the number of covariates in a spec
# More training rows than any hospital's cohort; keeps counts exact as floats and sums far from overflow.
MAX_EHR_ROWS = 10**7
MAX_NAME_LENGTH = 64  # covariate names and category labels
# A site sends nothing when a covariate has fewer present training values: with 2 rows,
# a count, sum and centred sum of squares give both exact values away.
MIN_EHR_ROWS = 10
_NUMERIC_KEYS = frozenset({"count", "sum", "centred_sum_sq", "missing"})
_CATEGORICAL_KEYS = frozenset({"categories", "missing"})
_STATS_KEYS = frozenset({"spec", "rows", "columns"})
# Floating-point slack on the bounds that hold exactly for exact arithmetic.
_ROUNDING = 1e-9

__all__ = [
    "COVARIATE_TYPES",
    "MISSING_TOKENS",
    "METADATA_KEY",
    "ClinicalProblem",
    "ClinicalDataError",
    "check_spec",
    "read_clinical",
    "partial_stats",
    "partial_stats_problems",
    "present_counts",
    "MAX_ABS_COVARIATE",
    "MAX_EHR_CATEGORIES",
    "MAX_EHR_COVARIATES",
    "MAX_EHR_ROWS",
    "MIN_EHR_ROWS",
    "NumericColumn",
    "CategoricalColumn",
    "EhrPreprocessor",
]


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ClinicalProblem:
    """One bad row of a clinical CSV: where it is and what is wrong with it."""

    line: int  # 1-based line number in the file (the header is line 1)
    case_id: str | None  # None when the id is missing (or the table has no id column)
    column: str
    reason: str

    def __str__(self) -> str:
        case = "<no id>" if self.case_id is None else repr(self.case_id)
        return f"line {self.line}, case {case}, column {self.column!r}: {self.reason}"


class ClinicalDataError(ValueError):
    """A clinical CSV or covariate spec that cannot be used; the message says where."""


def check_spec(spec: CovariateSpec) -> dict[str, str]:
    """Return ``spec`` as a plain ordered dict, or raise naming the first bad entry."""
    for name, kind in spec.items():
        if kind not in COVARIATE_TYPES:
            raise ClinicalDataError(
                f"unknown covariate type {kind!r} for column {name!r}: expected one of {', '.join(COVARIATE_TYPES)}"
            )
    return dict(spec)


def read_clinical(
    path: str | Path,
    id_column: str | None,
    time: str | None = None,
    event: str | None = None,
    covariates: CovariateSpec | None = None,
    on_bad_case: Literal["skip", "fail"] = "skip",
) -> tuple[pd.DataFrame, list[ClinicalProblem]]:
    """Read and validate a clinical CSV: the one reader of every clinical table in pemma.

    Parameters
    ----------
    path: path to a comma-separated file with a header line (UTF-8, a BOM is accepted).
    id_column: column holding the case id (kept as text, so ``007`` stays ``007``); None
        for a table without ids (e.g. one row of covariates), indexed by line number.
    time: column holding the observed time; must be a finite number >= 0.
    event: column holding the event flag; must be 0 (censored) or 1 (event).
        ``time`` and ``event`` are given together, or both None (no survival labels:
        neither column is read).
    covariates: ``{column: "numeric" | "categorical"}``. Missing covariate values
        (any of :data:`MISSING_TOKENS`) are allowed and kept as NaN; a numeric cell that
        is not a finite number is a bad row.
    on_bad_case: ``"skip"`` leaves bad rows out and lists them in ``problems``;
        ``"fail"`` raises :class:`ClinicalDataError` listing every bad row.

    A row is bad when its id is missing or shared with another row (every row with that
    id is bad: there is no telling which one is right), its time is missing, negative or
    not a number, its event is not 0/1, a numeric covariate cannot be parsed, or it has a
    different number of fields from the header.

    Returns
    -------
    (table, problems):
        ``table`` is indexed by case id (index name ``id_column``; without ids by line
        number, index name ``"line"``) with columns ``time`` (float64) and ``event``
        (int64) when read, then the covariates in spec order (numeric: float64 with NaN
        for missing; categorical: text, NaN for missing). ``problems`` lists the rows
        left out, in file order.

    Raises
    ------
    FileNotFoundError: ``path`` does not exist (the message names it).
    ClinicalDataError: a covariate type in the spec is unknown, a covariate clashes with
        the id/time/event columns, a declared column is absent from the header, the file
        is not UTF-8 CSV, or (with ``on_bad_case="fail"``) any row is bad.
    """
    if on_bad_case not in ("skip", "fail"):
        raise ValueError(f"on_bad_case must be 'skip' or 'fail', got {on_bad_case!r}")
    if (time is None) != (event is None):
        raise ValueError(f"time and event are given together or not at all, got time={time!r}, event={event!r}")
    spec = check_spec(covariates or {})
    survival = ("time", "event", time, event) if time is not None else ()
    for name in spec:
        if name == id_column or name in survival:
            raise ClinicalDataError(f"covariate {name!r} clashes with the id/time/event columns")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"clinical CSV not found: {path}")

    try:
        records, problems, id_lines = _read_rows(path, id_column, time, event, spec)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ClinicalDataError(f"clinical CSV {path} cannot be read as CSV: {exc}") from None

    # Duplicate ids: every occurrence is bad (no telling which row is right).
    for case_id, at in id_lines.items():
        for line in at if len(at) > 1 else ():
            others = ", ".join(str(x) for x in at if x != line)
            problems.append(ClinicalProblem(line, case_id, str(id_column), f"duplicate case id (also on line {others})"))
    kept = [record for record in records if id_column is None or len(id_lines[record["id"]]) == 1]
    problems.sort(key=lambda p: p.line)

    if problems and on_bad_case == "fail":
        listing = "\n  ".join(str(p) for p in problems)
        raise ClinicalDataError(f"{path}: {len(problems)} bad row(s):\n  {listing}")

    columns = (["time", "event"] if time is not None else []) + list(spec)
    table = pd.DataFrame.from_records(kept, columns=["id", *columns])
    table = table.set_index("id").rename_axis(id_column or "line")
    if time is not None:
        table["time"] = table["time"].astype(np.float64)
        table["event"] = table["event"].astype(np.int64)
    for name, kind in spec.items():
        table[name] = table[name].astype(np.float64) if kind == "numeric" else table[name].astype(object)
    return table, problems


def _read_rows(
    path: Path, id_column: str | None, time: str | None, event: str | None, spec: dict[str, str]
) -> tuple[list[dict[str, Any]], list[ClinicalProblem], dict[str, list[int]]]:
    """Parsed good rows, bad-row problems and the lines of every id (duplicates are judged after)."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        declared = [c for c in (id_column, time, event) if c is not None] + list(spec)
        absent = [c for c in declared if c not in header]
        if absent:
            raise ClinicalDataError(f"clinical CSV {path}: missing column(s) {absent}; it has {header}")
        position = {name: header.index(name) for name in declared}

        records: list[dict[str, Any]] = []
        problems: list[ClinicalProblem] = []
        id_lines: dict[str, list[int]] = {}  # every row with an id, bad or not, for duplicates
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue  # blank line
            line = reader.line_num
            case_id: str | None = None
            if id_column is not None:
                text = fields[position[id_column]].strip() if position[id_column] < len(fields) else ""
                case_id = None if _is_missing(text) else text
                if case_id is not None:
                    id_lines.setdefault(case_id, []).append(line)
            row_problems = _check_row(fields, len(header), position, line, case_id, id_column, time, event, spec)
            if row_problems:
                problems += row_problems
                continue
            records.append(_parse_row(fields, position, line if case_id is None else case_id, time, event, spec))
    return records, problems, id_lines


def _is_missing(text: str) -> bool:
    return text.strip().lower() in MISSING_TOKENS


def _parse_float(text: str) -> float | None:
    """A finite float, or None when ``text`` is not one."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _check_row(
    fields: list[str],
    n_header: int,
    position: dict[str, int],
    line: int,
    case_id: str | None,
    id_column: str | None,
    time: str | None,
    event: str | None,
    spec: dict[str, str],
) -> list[ClinicalProblem]:
    def problem(column: str, reason: str) -> ClinicalProblem:
        return ClinicalProblem(line, case_id, column, reason)

    if len(fields) != n_header:
        return [problem("*", f"row has {len(fields)} fields, the header has {n_header}")]
    found = []
    if id_column is not None and case_id is None:
        found.append(problem(id_column, "missing case id"))
    if time is not None and event is not None:
        raw_time = fields[position[time]].strip()
        if _is_missing(raw_time):
            found.append(problem(time, "missing time"))
        else:
            value = _parse_float(raw_time)
            if value is None:
                found.append(problem(time, f"time {raw_time!r} is not a finite number"))
            elif value < 0:
                found.append(problem(time, f"negative time {raw_time}"))
        raw_event = fields[position[event]].strip()
        if _parse_float(raw_event) not in (0.0, 1.0):
            found.append(problem(event, f"event must be 0 or 1, got {raw_event!r}"))
    for name, kind in spec.items():
        raw = fields[position[name]].strip()
        if kind == "numeric" and not _is_missing(raw) and _parse_float(raw) is None:
            found.append(problem(name, f"numeric covariate {raw!r} is not a finite number"))
    return found


def _parse_row(
    fields: list[str],
    position: dict[str, int],
    key: str | int,
    time: str | None,
    event: str | None,
    spec: dict[str, str],
) -> dict[str, Any]:
    record: dict[str, Any] = {"id": key}
    if time is not None and event is not None:
        record["time"] = float(fields[position[time]])
        record["event"] = int(float(fields[position[event]]))
    for name, kind in spec.items():
        raw = fields[position[name]].strip()
        if _is_missing(raw):
            record[name] = np.nan
        else:
            record[name] = float(raw) if kind == "numeric" else raw
    return record


# --------------------------------------------------------------------------- statistics


def _category_label(value: Any) -> str | None:
    """Canonical text of a category (None for missing).

    Needed so sites agree: a column read as numbers at one site and as text at another
    (``2.0`` vs ``"2"``) names the same category.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    text = str(value).strip()
    return None if _is_missing(text) else text


def _numeric_column(df: pd.DataFrame, name: str) -> np.ndarray:
    try:
        return pd.to_numeric(df[name], errors="raise").to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as error:
        raise ClinicalDataError(f"numeric covariate {name!r} holds non-numeric values: {error}") from error


def _require_columns(df: pd.DataFrame, spec: Mapping[str, str]) -> None:
    absent = [name for name in spec if name not in df.columns]
    if absent:
        raise ClinicalDataError(f"covariate column(s) {absent} absent from the table (columns: {list(df.columns)})")


def partial_stats(df: pd.DataFrame, spec: CovariateSpec) -> dict[str, Any]:
    """Summaries of one site's training rows, enough to fit an :class:`EhrPreprocessor`.

    Nothing row-level leaves the site: per numeric column the count of present values,
    their sum, their sum of squared deviations from the site mean (numerically safer to
    merge than raw sums of squares) and the number missing; per categorical column the
    set of categories seen and the number missing.

    Returns a JSON-serialisable dict that :func:`partial_stats_problems` accepts::

        {"spec": [[name, type], ...], "rows": n,
         "columns": {name: {"count", "sum", "centred_sum_sq", "missing"}      # numeric
                     name: {"categories": [sorted labels], "missing"}}}       # categorical

    Raises :class:`ClinicalDataError` when the table's statistics would be refused (a
    numeric value beyond ``MAX_ABS_COVARIATE``, too many categories, a label too long...),
    so a site learns why before anything is sent.
    """
    spec = check_spec(spec)
    _require_columns(df, spec)
    columns: dict[str, dict[str, Any]] = {}
    for name, kind in spec.items():
        if kind == "numeric":
            values = _numeric_column(df, name)
            present = values[~np.isnan(values)]
            if present.size and not np.abs(present).max() <= MAX_ABS_COVARIATE:
                raise ClinicalDataError(
                    f"numeric covariate {name!r} has a value {present[np.argmax(np.abs(present))]:g} beyond "
                    f"+-{MAX_ABS_COVARIATE:g}: not a covariate in clinical units"
                )
            total = float(present.sum())
            mean = total / present.size if present.size else 0.0
            columns[name] = {
                "count": int(present.size),
                "sum": total,
                "centred_sum_sq": float(((present - mean) ** 2).sum()),
                "missing": int(values.size - present.size),
            }
        else:
            labels = [_category_label(v) for v in df[name].tolist()]
            columns[name] = {
                "categories": sorted({label for label in labels if label is not None}),
                "missing": sum(label is None for label in labels),
            }
    stats = {"spec": [[name, kind] for name, kind in spec.items()], "rows": int(len(df)), "columns": columns}
    problems = partial_stats_problems(stats)
    if problems:
        raise ClinicalDataError("these EHR statistics would be refused: " + "; ".join(problems))
    return stats


def present_counts(stats: Mapping[str, Any]) -> dict[str, int]:
    """Per covariate of valid ``stats``, the number of rows holding a value
    (numeric: ``count``; categorical: ``rows - missing``)."""
    columns = stats["columns"]
    return {
        name: int(columns[name]["count"]) if kind == "numeric" else int(stats["rows"]) - int(columns[name]["missing"])
        for name, kind in stats["spec"]
    }


# --------------------------------------------------------------------------- checking statistics

_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = _SHOW.maxlong = 40
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = 4
_SHOW.maxlevel = 2


def _show(value: Any) -> str:
    """A short repr for a problem message: the value may be huge or deeply nested."""
    try:
        return _SHOW.repr(value)
    except Exception:  # e.g. an int with more digits than Python agrees to print
        return f"<{type(value).__name__}>"


def _as_count(value: Any) -> int | None:
    """``value`` as an int in ``[0, MAX_EHR_ROWS]`` (a bool is not a count), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value) if 0 <= value <= MAX_EHR_ROWS else None


def _as_finite(value: Any) -> float | None:
    """``value`` as a finite float when it is a number (not a bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        return None
    return number if math.isfinite(number) else None


def _is_label(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_LENGTH


def _key_problems(where: str, entry: Mapping[Any, Any], expected: frozenset[str]) -> list[str]:
    absent = sorted(expected - set(entry))
    extra = [key for key in entry if key not in expected]
    return ([f"{where} lacks {', '.join(absent)}"] if absent else []) + (
        [f"{where} has unexpected key(s) {_show(extra)}"] if extra else []
    )


def _read_spec(value: Any, problems: list[str]) -> list[tuple[str, str]] | None:
    """The spec's (name, kind) pairs, or None (after adding its problems) when it is malformed."""
    if not isinstance(value, (list, tuple)) or not value:
        problems.append(f"spec must be a non-empty list of [name, kind] pairs, got {_show(value)}")
        return None
    if len(value) > MAX_EHR_COVARIATES:
        problems.append(f"spec has {len(value)} covariates, more than {MAX_EHR_COVARIATES}")
        return None
    pairs: list[tuple[str, str]] = []
    for index, item in enumerate(value):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            problems.append(f"spec[{index}] must be a [name, kind] pair, got {_show(item)}")
            continue
        name, kind = item
        if not _is_label(name):
            problems.append(
                f"spec[{index}] name must be a string of 1 to {MAX_NAME_LENGTH} characters, got {_show(name)}"
            )
        elif not (isinstance(kind, str) and kind in COVARIATE_TYPES):
            problems.append(
                f"spec[{index}] kind of {name!r} must be one of {', '.join(COVARIATE_TYPES)}, got {_show(kind)}"
            )
        elif any(name == seen for seen, _ in pairs):
            problems.append(f"spec[{index}] repeats covariate {name!r}")
        else:
            pairs.append((name, kind))
    return pairs if len(pairs) == len(value) else None


def _numeric_problems(where: str, entry: Any, rows: int | None, max_abs_value: float) -> list[str]:
    if not isinstance(entry, Mapping):
        return [f"{where} must be a mapping with keys {', '.join(sorted(_NUMERIC_KEYS))}, got {_show(entry)}"]
    problems = _key_problems(where, entry, _NUMERIC_KEYS)
    counts = {key: _as_count(entry.get(key)) for key in ("count", "missing")}
    numbers = {key: _as_finite(entry.get(key)) for key in ("sum", "centred_sum_sq")}
    for key, value in counts.items():
        if key in entry and value is None:
            problems.append(f"{where}.{key} must be an int in [0, {MAX_EHR_ROWS}], got {_show(entry[key])}")
    for key, value in numbers.items():
        if key in entry and value is None:
            problems.append(f"{where}.{key} must be a finite number, got {_show(entry[key])}")
    count, missing = counts["count"], counts["missing"]
    total, centred = numbers["sum"], numbers["centred_sum_sq"]
    if count is not None and missing is not None and rows is not None and count + missing != rows:
        problems.append(f"{where}: count + missing is {count + missing}, rows is {rows}")
    if centred is not None and centred < 0:
        problems.append(f"{where}.centred_sum_sq is negative ({centred:g})")
    if count is None or total is None or centred is None or centred < 0:
        return problems
    if count == 0:
        if total != 0 or centred != 0:
            problems.append(f"{where} has count 0 but sum {total:g} and centred_sum_sq {centred:g} (both must be 0)")
        return problems
    # Every value lies in [-max_abs_value, max_abs_value], so |sum| <= count * max and
    # sum of squares = centred_sum_sq + sum^2 / count <= count * max^2 (one value: no spread).
    if abs(total) > count * max_abs_value * (1 + _ROUNDING):
        problems.append(f"{where}.sum {total:g} is beyond count * {max_abs_value:g} = {count * max_abs_value:g}")
    elif count == 1 and centred != 0:
        problems.append(f"{where}.centred_sum_sq must be 0 with count 1, got {centred:g}")
    elif centred + total * total / count > count * max_abs_value * max_abs_value * (1 + _ROUNDING):
        bound = count * max_abs_value * max_abs_value - total * total / count
        problems.append(f"{where}.centred_sum_sq {centred:g} is beyond what {count} values within +-{max_abs_value:g} "
                        f"with sum {total:g} allow ({bound:g})")
    return problems


def _categorical_problems(where: str, entry: Any, rows: int | None, max_categories: int) -> list[str]:
    if not isinstance(entry, Mapping):
        return [f"{where} must be a mapping with keys {', '.join(sorted(_CATEGORICAL_KEYS))}, got {_show(entry)}"]
    problems = _key_problems(where, entry, _CATEGORICAL_KEYS)
    missing = _as_count(entry.get("missing"))
    if "missing" in entry and missing is None:
        problems.append(f"{where}.missing must be an int in [0, {MAX_EHR_ROWS}], got {_show(entry['missing'])}")
    elif missing is not None and rows is not None and missing > rows:
        problems.append(f"{where}.missing {missing} is more than rows {rows}")
        missing = None
    if "categories" not in entry:
        return problems
    categories = entry["categories"]
    if not isinstance(categories, (list, tuple)):
        problems.append(f"{where}.categories must be a list of labels, got {_show(categories)}")
    elif len(categories) > max_categories:
        problems.append(f"{where} has {len(categories)} categories, more than {max_categories}")
    elif not all(_is_label(label) for label in categories):
        bad = next(label for label in categories if not _is_label(label))
        problems.append(f"{where}.categories must be strings of 1 to {MAX_NAME_LENGTH} characters, got {_show(bad)}")
    elif len(set(categories)) != len(categories):
        problems.append(f"{where}.categories repeat a label")
    elif list(categories) != sorted(categories):
        problems.append(f"{where}.categories are not sorted")
    elif missing is not None and rows is not None:
        # every category was seen in at least one row holding a value, and such a row has one
        present = rows - missing
        if len(categories) > present or (present > 0) != bool(categories):
            problems.append(f"{where} has {len(categories)} categories for {present} rows holding a value")
    return problems


def partial_stats_problems(
    stats: Any,
    expected_spec: Sequence[tuple[str, str]] | None = None,
    *,
    max_categories: int = MAX_EHR_CATEGORIES,
    max_abs_value: float = MAX_ABS_COVARIATE,
) -> list[str]:
    """Every reason why ``stats`` (a site's :func:`partial_stats`, as decoded from JSON) cannot be used.

    Never raises, whatever ``stats`` is. An empty list means the statistics are well formed,
    consistent (counts add up to the rows, no negative spread...) and within bounds (values
    within ``+-max_abs_value``, at most ``max_categories`` categories), so
    :meth:`EhrPreprocessor.from_partial_stats` fits finite means and stds from them. With
    ``expected_spec`` (``[(name, kind), ...]``) the spec must also equal it.
    """
    if not isinstance(stats, Mapping):
        return [f"statistics must be a mapping with keys columns, rows, spec, got {_show(stats)}"]
    problems = _key_problems("statistics", stats, _STATS_KEYS)
    spec = _read_spec(stats["spec"], problems) if "spec" in stats else None
    if spec is not None and expected_spec is not None:
        pairs = expected_spec.items() if isinstance(expected_spec, Mapping) else expected_spec
        expected = [tuple(item) for item in pairs]
        if spec != expected:
            shown = [[list(item) for item in x] for x in (spec, expected)]
            problems.append(f"spec {shown[0]} differs from the expected {shown[1]}")
    rows = _as_count(stats.get("rows"))
    if "rows" in stats and rows is None:
        problems.append(f"rows must be an int in [0, {MAX_EHR_ROWS}], got {_show(stats['rows'])}")
    if "columns" not in stats:
        return problems
    columns = stats["columns"]
    if not isinstance(columns, Mapping):
        problems.append(f"columns must be a mapping of covariate name to statistics, got {_show(columns)}")
        return problems
    if spec is None:
        return problems
    names = [name for name, _ in spec]
    problems += _key_problems("columns", columns, frozenset(names))
    for name, kind in spec:
        if name in columns:
            where = f"columns.{name}"
            if kind == "numeric":
                problems += _numeric_problems(where, columns[name], rows, max_abs_value)
            else:
                problems += _categorical_problems(where, columns[name], rows, max_categories)
    return problems


# --------------------------------------------------------------------------- preprocessor


@dataclass(frozen=True)
class NumericColumn:
    """A standardised numeric covariate: ``(x - mean) / std``; missing -> mean (i.e. 0)."""

    name: str
    mean: float
    std: float  # population std of the training values; 1.0 when they are constant
    missing_indicator: bool  # True when the training rows had missing values

    @property
    def feature_names(self) -> tuple[str, ...]:
        return (self.name,) + ((f"{self.name}__missing",) if self.missing_indicator else ())


@dataclass(frozen=True)
class CategoricalColumn:
    """A one-hot covariate over the training categories (sorted labels)."""

    name: str
    categories: tuple[str, ...]
    missing_indicator: bool

    @property
    def feature_names(self) -> tuple[str, ...]:
        names = tuple(f"{self.name}={c}" for c in self.categories)
        return names + ((f"{self.name}__missing",) if self.missing_indicator else ())


@dataclass(frozen=True)
class EhrPreprocessor:
    """Fitted covariate preprocessing: clinical table -> ``float32`` matrix ``[N, P]``.

    Per covariate, in spec order:

    - numeric: ``(x - mean) / std`` with mean and population std of the training values
      (std 1 for a constant column). A missing value is imputed with the training mean
      (so it becomes 0) and, when the training rows had missing values in that column,
      flagged in an extra ``<name>__missing`` 0/1 column.
    - categorical: one 0/1 column ``<name>=<category>`` per training category, plus
      ``<name>__missing`` when the training rows had missing values. A category unseen in
      training becomes all zeros (the model has no weight for it; a warning names it).

    A missing value in a column that had none in training cannot be flagged (there is no
    indicator column for the model to read): it is imputed and a warning names the
    column, so it never happens silently.

    Instances are immutable and always fitted: build one with :meth:`fit`,
    :meth:`from_partial_stats` or :meth:`from_metadata`.
    """

    columns: tuple[NumericColumn | CategoricalColumn, ...]

    # ---------------------------------------------------------------- construction
    @classmethod
    def fit(cls, df: pd.DataFrame, spec: CovariateSpec) -> EhrPreprocessor:
        """Fit on the training rows ``df`` (same result as merging per-site partial stats)."""
        return cls.from_partial_stats([partial_stats(df, spec)])

    @classmethod
    def from_partial_stats(cls, stats: Sequence[Mapping[str, Any]]) -> EhrPreprocessor:
        """Fit from the :func:`partial_stats` of every site's training rows.

        Means pool the sites' sums; variances pool the within-site centred sums of
        squares plus the between-site term ``sum_k n_k (mean_k - mean)^2``; category sets
        are united. All sites must share the same spec (names, types and order).

        Raises :class:`ClinicalDataError` (and no other exception, whatever ``stats`` holds)
        listing every problem :func:`partial_stats_problems` finds, by site index, or
        when a numeric covariate has no value at all or the united categories of one are
        more than ``MAX_EHR_CATEGORIES``.
        """
        if not isinstance(stats, (list, tuple)) or not stats:
            raise ClinicalDataError(
                f"from_partial_stats needs a list of the statistics of at least one site, got {_show(stats)}"
            )
        first = partial_stats_problems(stats[0])
        # Site 0's spec is the reference once it is known to be well formed.
        expected = None if first else [tuple(item) for item in stats[0]["spec"]]
        problems = [f"site 0: {problem}" for problem in first] + [
            f"site {index}: {problem}"
            for index, site in enumerate(stats[1:], start=1)
            for problem in partial_stats_problems(site, expected)
        ]
        if problems:
            raise ClinicalDataError(f"EHR statistics refused, {len(problems)} problem(s):\n  " + "\n  ".join(problems))

        columns: list[NumericColumn | CategoricalColumn] = []
        for name, kind in expected:
            parts = [site["columns"][name] for site in stats]
            missing = sum(int(p["missing"]) for p in parts)
            if kind == "numeric":
                counts = [int(p["count"]) for p in parts]
                sums = [float(p["sum"]) for p in parts]
                count = sum(counts)
                if count == 0:
                    raise ClinicalDataError(f"numeric covariate {name!r} has no values in the training rows")
                mean = sum(sums) / count
                centred = sum(
                    float(p["centred_sum_sq"]) + (n * (total / n - mean) ** 2 if n else 0.0)
                    for p, n, total in zip(parts, counts, sums)
                )
                std = math.sqrt(centred / count)
                # A constant column carries no information; std 1 keeps it finite (all zeros).
                columns.append(NumericColumn(name, mean, std if std > 0 else 1.0, missing > 0))
            else:
                categories = sorted({c for p in parts for c in p["categories"]})
                if len(categories) > MAX_EHR_CATEGORIES:
                    raise ClinicalDataError(
                        f"categorical covariate {name!r} has {len(categories)} categories over all sites, "
                        f"more than {MAX_EHR_CATEGORIES}"
                    )
                columns.append(CategoricalColumn(name, tuple(categories), missing > 0))
        return cls(tuple(columns))

    # ---------------------------------------------------------------- use
    @property
    def spec(self) -> dict[str, str]:
        return {c.name: ("numeric" if isinstance(c, NumericColumn) else "categorical") for c in self.columns}

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names of the output columns, in order."""
        return tuple(name for column in self.columns for name in column.feature_names)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Covariates of ``df`` (one row per case) -> ``float32`` array ``[len(df), n_features]``."""
        _require_columns(df, self.spec)
        blocks: list[np.ndarray] = []
        for column in self.columns:
            if isinstance(column, NumericColumn):
                values = _numeric_column(df, column.name)
                missing = np.isnan(values)
                blocks.append(((np.where(missing, column.mean, values) - column.mean) / column.std)[:, None])
            else:
                labels = [_category_label(v) for v in df[column.name].tolist()]
                missing = np.array([label is None for label in labels], dtype=bool)
                unknown = sorted({label for label in labels if label is not None} - set(column.categories))
                if unknown:
                    warnings.warn(
                        f"covariate {column.name!r}: categories {unknown} unseen in training are encoded as all zeros",
                        stacklevel=2,
                    )
                one_hot = np.array([[label == c for c in column.categories] for label in labels], dtype=np.float64)
                blocks.append(one_hot.reshape(len(labels), len(column.categories)))
            if column.missing_indicator:
                blocks.append(missing.astype(np.float64)[:, None])
            elif missing.any():
                warnings.warn(
                    f"covariate {column.name!r}: {int(missing.sum())} missing value(s) imputed, but the training rows had "
                    "none, so there is no missing-indicator column to flag them",
                    stacklevel=2,
                )
        if not blocks:
            return np.zeros((len(df), 0), dtype=np.float32)
        return np.concatenate(blocks, axis=1).astype(np.float32)

    # ---------------------------------------------------------------- storage
    def to_metadata(self) -> dict[str, str]:
        """``{METADATA_KEY: json}``: fits a safetensors metadata header (str -> str)."""
        state = {
            "format_version": _FORMAT_VERSION,
            "columns": [
                {"name": c.name, "type": "numeric", "mean": c.mean, "std": c.std, "missing_indicator": c.missing_indicator}
                if isinstance(c, NumericColumn)
                else {"name": c.name, "type": "categorical", "categories": list(c.categories), "missing_indicator": c.missing_indicator}
                for c in self.columns
            ],
        }
        return {METADATA_KEY: json.dumps(state)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> EhrPreprocessor:
        """Rebuild from :meth:`to_metadata` output (other metadata keys are ignored)."""
        if METADATA_KEY not in metadata:
            raise KeyError(f"metadata has no {METADATA_KEY!r} entry (keys: {sorted(metadata)})")
        state = json.loads(metadata[METADATA_KEY])
        if state.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported EHR preprocessor format {state.get('format_version')!r}")
        columns: list[NumericColumn | CategoricalColumn] = []
        for c in state["columns"]:
            if c["type"] == "numeric":
                columns.append(NumericColumn(c["name"], float(c["mean"]), float(c["std"]), bool(c["missing_indicator"])))
            elif c["type"] == "categorical":
                columns.append(CategoricalColumn(c["name"], tuple(c["categories"]), bool(c["missing_indicator"])))
            else:
                raise ValueError(f"unknown column type {c['type']!r} for {c['name']!r} in stored EHR preprocessor")
        return cls(tuple(columns))
