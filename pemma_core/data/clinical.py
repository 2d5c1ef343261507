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
   preprocessor.

A covariate spec is an ordered mapping ``{column name: "numeric" | "categorical"}``;
its order is the order of the output columns.
"""

from __future__ import annotations

import csv
import json
import math
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

__all__ = [
    "COVARIATE_TYPES",
    "MISSING_TOKENS",
    "METADATA_KEY",
    "ClinicalProblem",
    "ClinicalDataError",
    "check_spec",
    "read_clinical",
    "partial_stats",
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

    Returns a JSON-serialisable dict::

        {"spec": [[name, type], ...], "rows": n,
         "columns": {name: {"count", "sum", "centred_sum_sq", "missing"}      # numeric
                     name: {"categories": [sorted labels], "missing"}}}       # categorical
    """
    spec = check_spec(spec)
    _require_columns(df, spec)
    columns: dict[str, dict[str, Any]] = {}
    for name, kind in spec.items():
        if kind == "numeric":
            values = _numeric_column(df, name)
            present = values[~np.isnan(values)]
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
    return {"spec": [[name, kind] for name, kind in spec.items()], "rows": int(len(df)), "columns": columns}


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
        """
        if not stats:
            raise ValueError("from_partial_stats needs the statistics of at least one site")
        spec = [tuple(item) for item in stats[0]["spec"]]
        for index, site in enumerate(stats[1:], start=1):
            if [tuple(item) for item in site["spec"]] != spec:
                raise ClinicalDataError(f"site {index} has covariate spec {site['spec']}, site 0 has {stats[0]['spec']}")
        check_spec(dict(spec))

        columns: list[NumericColumn | CategoricalColumn] = []
        for name, kind in spec:
            parts = [site["columns"][name] for site in stats]
            missing = sum(int(p["missing"]) for p in parts)
            if kind == "numeric":
                count = sum(int(p["count"]) for p in parts)
                if count == 0:
                    raise ClinicalDataError(f"numeric covariate {name!r} has no values in the training rows")
                mean = sum(float(p["sum"]) for p in parts) / count
                centred = sum(
                    float(p["centred_sum_sq"]) + (p["count"] * (p["sum"] / p["count"] - mean) ** 2 if p["count"] else 0.0)
                    for p in parts
                )
                std = math.sqrt(centred / count)
                # A constant column carries no information; std 1 keeps it finite (all zeros).
                columns.append(NumericColumn(name, mean, std if std > 0 else 1.0, missing > 0))
            else:
                categories = sorted({c for p in parts for c in p["categories"]})
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
