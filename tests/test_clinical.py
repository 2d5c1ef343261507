"""Clinical CSV reading and the EHR covariate preprocessor."""

from __future__ import annotations

import copy
import json
import math
import random
import warnings

import numpy as np
import pandas as pd
import pytest

from pemma_core.data.clinical import (
    MAX_ABS_COVARIATE,
    MAX_EHR_CATEGORIES,
    METADATA_KEY,
    CategoricalColumn,
    ClinicalDataError,
    EhrPreprocessor,
    NumericColumn,
    partial_stats,
    partial_stats_problems,
    present_counts,
    read_clinical,
)

SPEC = {"age": "numeric", "stage": "categorical"}
HEADER = "case,os_days,dead,age,stage,unused\n"


def write_csv(tmp_path, body: str, header: str = HEADER):
    path = tmp_path / "clinical.csv"
    path.write_text(header + body, encoding="utf-8")
    return path


def read(path, on_bad_case="skip", spec=SPEC):
    return read_clinical(path, id_column="case", time="os_days", event="dead", covariates=spec, on_bad_case=on_bad_case)


# --------------------------------------------------------------------------- read_clinical


def test_reads_a_clean_table_with_types_and_missing_covariates(tmp_path):
    path = write_csv(tmp_path, "007,100,1,61.5,II,x\n008,250.5,0,,III,y\n009,0,1,70,NA,z\n")
    table, problems = read(path)
    assert problems == []
    assert list(table.index) == ["007", "008", "009"]  # ids stay text: leading zeros kept
    assert table.index.name == "case"
    assert list(table.columns) == ["time", "event", "age", "stage"]
    assert table["time"].tolist() == [100.0, 250.5, 0.0]
    assert table["event"].dtype == np.int64 and table["event"].tolist() == [1, 0, 1]
    assert np.isnan(table.loc["008", "age"]) and table.loc["007", "age"] == 61.5
    assert table.loc["008", "stage"] == "III" and pd.isna(table.loc["009", "stage"])


@pytest.mark.parametrize(
    ("row", "column", "reason"),
    [
        ("c2,-5,1,60,II,x", "os_days", "negative time"),
        ("c2,,1,60,II,x", "os_days", "missing time"),
        ("c2,abc,1,60,II,x", "os_days", "not a finite number"),
        ("c2,10,2,60,II,x", "dead", "event must be 0 or 1"),
        ("c2,10,,60,II,x", "dead", "event must be 0 or 1"),
        ("c2,10,1,sixty,II,x", "age", "numeric covariate 'sixty'"),
        (",10,1,60,II,x", "case", "missing case id"),
        ("c2,10,1,60,II", "*", "row has 5 fields"),
    ],
)
def test_bad_row_is_skipped_and_named_by_line_case_and_column(tmp_path, row, column, reason):
    path = write_csv(tmp_path, f"c1,10,1,60,II,x\n{row}\nc3,30,0,65,I,x\n")
    table, problems = read(path)
    assert list(table.index) == ["c1", "c3"]
    assert len(problems) == 1
    problem = problems[0]
    assert (problem.line, problem.column) == (3, column)
    assert reason in problem.reason
    assert "line 3" in str(problem) and repr(column) in str(problem)
    assert problem.case_id == (None if column == "case" else "c2")


def test_fail_mode_raises_listing_every_bad_row(tmp_path):
    path = write_csv(tmp_path, "c1,-1,1,60,II,x\nc2,10,1,60,II,x\nc3,10,5,60,II,x\n")
    with pytest.raises(ClinicalDataError) as error:
        read(path, on_bad_case="fail")
    message = str(error.value)
    assert str(path) in message and "2 bad row(s)" in message
    assert "line 2, case 'c1', column 'os_days'" in message
    assert "line 4, case 'c3', column 'dead'" in message


def test_duplicate_ids_reject_every_occurrence(tmp_path):
    path = write_csv(tmp_path, "c1,10,1,60,II,x\nc2,20,1,60,II,x\nc1,30,0,60,II,x\n")
    table, problems = read(path)
    assert list(table.index) == ["c2"]
    assert [(p.line, p.case_id, p.column) for p in problems] == [(2, "c1", "case"), (4, "c1", "case")]
    assert "also on line 4" in problems[0].reason
    with pytest.raises(ClinicalDataError, match="duplicate case id"):
        read(path, on_bad_case="fail")


def test_unknown_covariate_type_names_the_column(tmp_path):
    path = write_csv(tmp_path, "c1,10,1,60,II,x\n")
    with pytest.raises(ClinicalDataError, match=r"unknown covariate type 'ordinal' for column 'stage'"):
        read(path, spec={"age": "numeric", "stage": "ordinal"})


def test_declared_column_absent_from_csv_is_named(tmp_path):
    path = write_csv(tmp_path, "c1,10,1,60,II,x\n")
    with pytest.raises(ClinicalDataError, match=r"missing column\(s\) \['weight'\]"):
        read(path, spec={"age": "numeric", "weight": "numeric"})
    with pytest.raises(ClinicalDataError, match=r"missing column\(s\) \['survival'\]"):
        read_clinical(path, id_column="case", time="survival", event="dead", covariates={})


def test_without_survival_columns_time_and_event_are_not_read(tmp_path):
    path = write_csv(tmp_path, "c1,,x,60,II,x\nc2,10,1,sixty,II,x\n")  # bad time/event are not looked at
    table, problems = read_clinical(path, "case", covariates=SPEC)
    assert list(table.index) == ["c1"] and list(table.columns) == ["age", "stage"]
    assert [(p.line, p.column) for p in problems] == [(3, "age")]
    with pytest.raises(ValueError, match="together"):
        read_clinical(path, "case", time="os_days")


def test_a_table_without_ids_is_indexed_by_line(tmp_path):
    path = write_csv(tmp_path, "61.5,II\n", header="age,stage\n")
    table, problems = read_clinical(path, None, covariates=SPEC)
    assert problems == [] and table.index.name == "line" and list(table.index) == [2]
    assert table.loc[2, "age"] == 61.5 and table.loc[2, "stage"] == "II"


def test_undecodable_file_is_a_clinical_error(tmp_path):
    path = tmp_path / "clinical.csv"
    path.write_bytes(HEADER.encode() + b"c1,10,1,60,\xe9\xff,x\n")
    with pytest.raises(ClinicalDataError, match="cannot be read as CSV"):
        read(path)


def test_missing_file_error_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "clinical.csv"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read(missing)


def test_bom_and_blank_lines_are_tolerated_and_line_numbers_stay_true(tmp_path):
    path = tmp_path / "clinical.csv"
    path.write_text("\ufeff" + HEADER + "c1,10,1,60,II,x\n\nc2,-1,1,60,II,x\n", encoding="utf-8")
    table, problems = read(path)
    assert list(table.index) == ["c1"]
    assert problems[0].line == 4  # the blank line 3 still counts


# --------------------------------------------------------------------------- preprocessor


def training_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [50.0, 60.0, np.nan, 70.0, 80.0, 65.0],
            "stage": ["I", "II", "II", None, "III", "I"],
        }
    )


def test_numeric_columns_are_standardised_with_training_statistics():
    train = training_table()
    preprocessor = EhrPreprocessor.fit(train, SPEC)
    present = train["age"].dropna()
    column = preprocessor.columns[0]
    assert column.mean == pytest.approx(present.mean())
    assert column.std == pytest.approx(present.std(ddof=0))
    other_site = pd.DataFrame({"age": [100.0], "stage": ["I"]})
    expected = (100.0 - present.mean()) / present.std(ddof=0)
    assert preprocessor.transform(other_site)[0, 0] == pytest.approx(expected, rel=1e-6)  # not refitted


def test_layout_one_hot_and_missing_indicators():
    preprocessor = EhrPreprocessor.fit(training_table(), SPEC)
    assert preprocessor.feature_names == ("age", "age__missing", "stage=I", "stage=II", "stage=III", "stage__missing")
    matrix = preprocessor.transform(training_table())
    assert matrix.dtype == np.float32 and matrix.shape == (6, 6)
    # row 2: age missing -> imputed with the mean (0 after standardising) and flagged
    np.testing.assert_array_equal(matrix[2], [0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    # row 3: stage missing -> no category, flagged
    np.testing.assert_array_equal(matrix[3, 2:], [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(matrix[[0, 1, 4, 5], 1], 0.0)


def test_unknown_category_becomes_all_zeros_with_a_warning():
    preprocessor = EhrPreprocessor.fit(training_table(), SPEC)
    with pytest.warns(UserWarning, match=r"'stage'.*\['IV'\]"):
        row = preprocessor.transform(pd.DataFrame({"age": [60.0], "stage": ["IV"]}))
    np.testing.assert_array_equal(row[0, 2:], [0.0, 0.0, 0.0, 0.0])


def test_missing_value_in_a_column_without_indicator_is_imputed_with_a_warning():
    train = pd.DataFrame({"age": [50.0, 70.0], "stage": ["I", "II"]})  # nothing missing
    preprocessor = EhrPreprocessor.fit(train, SPEC)
    assert preprocessor.feature_names == ("age", "stage=I", "stage=II")
    with pytest.warns(UserWarning, match=r"'age': 1 missing value\(s\) imputed"):
        row = preprocessor.transform(pd.DataFrame({"age": [np.nan], "stage": ["I"]}))
    assert row[0, 0] == 0.0


def test_numeric_categories_from_differently_typed_tables_agree():
    as_numbers = pd.DataFrame({"age": [1.0, 2.0], "stage": [1.0, np.nan]})  # float column (NaN present)
    as_text = pd.DataFrame({"age": [1.0, 2.0], "stage": ["1", "2"]})
    merged = EhrPreprocessor.from_partial_stats([partial_stats(as_numbers, SPEC), partial_stats(as_text, SPEC)])
    assert merged.columns[1] == CategoricalColumn("stage", ("1", "2"), missing_indicator=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "1.0" must not count as an unseen category
        np.testing.assert_array_equal(merged.transform(as_numbers)[:, 1:], [[1, 0, 0], [0, 0, 1]])


def test_constant_column_gets_unit_std_instead_of_dividing_by_zero():
    preprocessor = EhrPreprocessor.fit(pd.DataFrame({"age": [5.0, 5.0], "stage": ["I", "I"]}), SPEC)
    assert preprocessor.columns[0].std == 1.0
    assert np.isfinite(preprocessor.transform(pd.DataFrame({"age": [7.0], "stage": ["I"]}))).all()


def test_fit_errors_are_clear():
    with pytest.raises(ClinicalDataError, match=r"\['stage'\] absent"):
        EhrPreprocessor.fit(pd.DataFrame({"age": [1.0]}), SPEC)
    with pytest.raises(ClinicalDataError, match="'age' has no values"):
        EhrPreprocessor.fit(pd.DataFrame({"age": [np.nan], "stage": ["I"]}), SPEC)
    with pytest.raises(ClinicalDataError, match="non-numeric"):
        EhrPreprocessor.fit(pd.DataFrame({"age": ["old"], "stage": ["I"]}), SPEC)


def test_pooled_fit_equals_merge_of_site_partial_stats():
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "age": np.where(rng.random(300) < 0.1, np.nan, rng.normal(1e4, 3.0, 300)),  # large mean, small spread
            "stage": rng.choice(["I", "II", "III", None], 300).tolist(),
        }
    )
    sites = [table.iloc[:40], table.iloc[40:41], table.iloc[41:200], table.iloc[200:]]
    stats = [partial_stats(site, SPEC) for site in sites]
    json.dumps(stats)  # must be able to cross the wire as JSON
    merged = EhrPreprocessor.from_partial_stats(stats)
    pooled = EhrPreprocessor.fit(table, SPEC)

    assert merged.feature_names == pooled.feature_names
    assert merged.columns[0].mean == pytest.approx(pooled.columns[0].mean, rel=1e-14)
    assert merged.columns[0].std == pytest.approx(pooled.columns[0].std, rel=1e-9)
    assert merged.columns[0].std == pytest.approx(np.nanstd(table["age"].to_numpy()), rel=1e-9)
    assert merged.columns[1] == pooled.columns[1]
    np.testing.assert_allclose(merged.transform(table), pooled.transform(table), rtol=1e-6, atol=1e-6)


def test_a_category_seen_at_one_site_only_is_in_the_merged_encoding():
    site_a = pd.DataFrame({"age": [1.0, 2.0], "stage": ["I", "I"]})
    site_b = pd.DataFrame({"age": [3.0, 4.0], "stage": ["IV", "I"]})
    merged = EhrPreprocessor.from_partial_stats([partial_stats(site_a, SPEC), partial_stats(site_b, SPEC)])
    assert merged.feature_names == ("age", "stage=I", "stage=IV")


def test_sites_with_different_specs_are_refused():
    site_a = partial_stats(training_table(), SPEC)
    site_b = partial_stats(training_table(), {"stage": "categorical", "age": "numeric"})
    with pytest.raises(ClinicalDataError, match=r"site 1: spec \[\['stage', 'categorical'\].* differs"):
        EhrPreprocessor.from_partial_stats([site_a, site_b])
    with pytest.raises(ValueError, match="at least one site"):
        EhrPreprocessor.from_partial_stats([])


def test_metadata_round_trip_is_string_only_and_exact():
    preprocessor = EhrPreprocessor.fit(training_table(), SPEC)
    metadata = preprocessor.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    restored = EhrPreprocessor.from_metadata({**metadata, "format": "pt", "fingerprint": "abc"})
    assert restored == preprocessor
    assert isinstance(restored.columns[0], NumericColumn)
    np.testing.assert_array_equal(restored.transform(training_table()), preprocessor.transform(training_table()))
    with pytest.raises(KeyError, match=METADATA_KEY):
        EhrPreprocessor.from_metadata({"format": "pt"})


# --------------------------------------------------------------------------- checking site statistics

DELETE = object()


def mutated(stats: dict, path: tuple, value) -> dict:
    """A deep copy of ``stats`` with the entry at ``path`` replaced by ``value`` (or deleted)."""
    out = copy.deepcopy(stats)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def valid_stats() -> dict:
    return partial_stats(training_table(), SPEC)  # rows 6; age: 5 values, 1 missing; stage: I/II/III, 1 missing


def assert_refused(stats, fragment: str) -> None:
    problems = partial_stats_problems(stats)
    assert any(fragment in p for p in problems), problems
    with pytest.raises(ClinicalDataError, match="site 0: ") as error:
        EhrPreprocessor.from_partial_stats([stats])
    assert type(error.value) is ClinicalDataError and fragment in str(error.value)


def test_statistics_from_partial_stats_have_no_problem():
    stats = valid_stats()
    assert partial_stats_problems(stats) == []
    assert partial_stats_problems(json.loads(json.dumps(stats)), list(SPEC.items())) == []
    assert partial_stats_problems(stats, expected_spec=SPEC) == []  # a mapping spec is accepted too
    assert present_counts(stats) == {"age": 5, "stage": 5}


def test_attacker_negative_centred_sum_of_squares_is_refused_not_a_math_error():
    assert_refused(mutated(valid_stats(), ("columns", "age", "centred_sum_sq"), -5.0),
                   "columns.age.centred_sum_sq is negative (-5)")


def test_attacker_huge_sum_cannot_move_the_mean():
    stats = mutated(valid_stats(), ("columns", "age", "sum"), 1e15)
    assert_refused(stats, "columns.age.sum 1e+15 is beyond count * 1e+06")


def test_attacker_thousand_categories_cannot_widen_the_ehr():
    labels = sorted(f"c{i:04d}" for i in range(1000))
    stats = mutated(mutated(valid_stats(), ("columns", "stage", "categories"), labels), ("rows",), 6)
    assert_refused(stats, f"columns.stage has 1000 categories, more than {MAX_EHR_CATEGORIES}")


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ((), None, "statistics must be a mapping"),
        ((), [1, 2], "statistics must be a mapping"),
        (("rows",), DELETE, "statistics lacks rows"),
        (("ids",), ["c1"], "statistics has unexpected key(s) ['ids']"),
        (("spec",), [], "spec must be a non-empty list"),
        (("spec",), "age", "spec must be a non-empty list"),
        (("spec", 0), ["age"], "spec[0] must be a [name, kind] pair"),
        (("spec", 0), ["age", "text"], "spec[0] kind of 'age' must be one of numeric, categorical"),
        (("spec", 1), ["age", "categorical"], "spec[1] repeats covariate 'age'"),
        (("spec", 0), ["a" * 65, "numeric"], "spec[0] name must be a string of 1 to 64 characters"),
        (("spec", 0), [7, "numeric"], "spec[0] name must be a string"),
        (("rows",), True, "rows must be an int"),
        (("rows",), -1, "rows must be an int"),
        (("rows",), "6", "rows must be an int"),
        (("rows",), 10**400, "rows must be an int"),
        (("rows",), 7, "columns.age: count + missing is 6, rows is 7"),
        (("columns",), [], "columns must be a mapping"),
        (("columns", "age"), DELETE, "columns lacks age"),
        (("columns", "weight"), {"count": 1}, "columns has unexpected key(s) ['weight']"),
        (("columns", "age"), 3.0, "columns.age must be a mapping"),
        (("columns", "age", "sum"), DELETE, "columns.age lacks sum"),
        (("columns", "age", "values"), [50.0], "columns.age has unexpected key(s) ['values']"),
        (("columns", "age", "count"), 5.0, "columns.age.count must be an int"),
        (("columns", "age", "count"), False, "columns.age.count must be an int"),
        (("columns", "age", "missing"), -1, "columns.age.missing must be an int"),
        (("columns", "age", "sum"), float("nan"), "columns.age.sum must be a finite number, got nan"),
        (("columns", "age", "sum"), float("inf"), "columns.age.sum must be a finite number"),
        (("columns", "age", "sum"), "325", "columns.age.sum must be a finite number"),
        (("columns", "age", "sum"), 10**400, "columns.age.sum must be a finite number"),
        (("columns", "age", "centred_sum_sq"), -float("inf"), "columns.age.centred_sum_sq must be a finite number"),
        (("columns", "age", "centred_sum_sq"), [1.0], "columns.age.centred_sum_sq must be a finite number"),
        (("columns", "age", "centred_sum_sq"), 5 * MAX_ABS_COVARIATE**2, "columns.age.centred_sum_sq 5e+12 is beyond"),
        (("columns", "stage", "categories"), "I", "columns.stage.categories must be a list"),
        (("columns", "stage", "categories"), ["I", "I"], "columns.stage.categories repeat a label"),
        (("columns", "stage", "categories"), ["II", "I"], "columns.stage.categories are not sorted"),
        (("columns", "stage", "categories"), ["I", None], "columns.stage.categories must be strings"),
        (("columns", "stage", "categories"), ["I", "x" * 65], "columns.stage.categories must be strings"),
        (("columns", "stage", "categories"), [], "columns.stage has 0 categories for 5 rows holding a value"),
        (("columns", "stage", "categories"), list("ABCDEF"), "columns.stage has 6 categories for 5 rows"),
        (("columns", "stage", "missing"), 7, "columns.stage.missing 7 is more than rows 6"),
        (("columns", "stage", "missing"), None, "columns.stage.missing must be an int"),
    ],
)
def test_each_malformed_field_is_named(path, value, fragment):
    stats = value if path == () else mutated(valid_stats(), path, value)
    assert_refused(stats, fragment)


def test_counts_must_fit_their_spread():
    one_value = {"count": 1, "sum": 60.0, "centred_sum_sq": 3.0, "missing": 5}
    assert_refused(mutated(valid_stats(), ("columns", "age"), one_value), "must be 0 with count 1, got 3")
    no_value = {"count": 0, "sum": 60.0, "centred_sum_sq": 0.0, "missing": 6}
    assert_refused(mutated(valid_stats(), ("columns", "age"), no_value), "has count 0 but sum 60")
    # a spread that values within +-1e6 could have (two values at -1e6 and +1e6) is accepted...
    extreme = {"count": 2, "sum": 0.0, "centred_sum_sq": 2 * MAX_ABS_COVARIATE**2, "missing": 4}
    assert partial_stats_problems(mutated(valid_stats(), ("columns", "age"), extreme)) == []
    # ...but not with a sum that puts both values at one end
    extreme["sum"] = 2 * MAX_ABS_COVARIATE
    assert_refused(mutated(valid_stats(), ("columns", "age"), extreme), "columns.age.centred_sum_sq 2e+12 is beyond")


def test_expected_spec_and_site_order_are_checked():
    stats = valid_stats()
    problems = partial_stats_problems(stats, [("age", "numeric"), ("stage", "numeric")])
    assert problems == ["spec [['age', 'numeric'], ['stage', 'categorical']] differs from the expected "
                        "[['age', 'numeric'], ['stage', 'numeric']]"]
    bad = mutated(stats, ("columns", "age", "centred_sum_sq"), -1.0)
    with pytest.raises(ClinicalDataError) as error:
        EhrPreprocessor.from_partial_stats([stats, bad, bad])
    assert "site 0" not in str(error.value) and str(error.value).count("is negative") == 2
    assert "site 1: columns.age" in str(error.value) and "site 2: columns.age" in str(error.value)
    for garbage in (None, "stats", {"site": stats}, 3):
        with pytest.raises(ClinicalDataError, match="needs a list of the statistics"):
            EhrPreprocessor.from_partial_stats(garbage)


def test_united_categories_are_bounded_too():
    sites = [pd.DataFrame({"age": [1.0] * 30, "stage": [f"s{k}-{i}" for i in range(30)]}) for k in range(2)]
    with pytest.raises(ClinicalDataError, match="'stage' has 60 categories over all sites, more than 50"):
        EhrPreprocessor.from_partial_stats([partial_stats(site, SPEC) for site in sites])


def test_partial_stats_refuses_a_table_the_server_would_refuse():
    with pytest.raises(ClinicalDataError, match=r"'age' has a value 2e\+06 beyond \+-1e\+06"):
        partial_stats(pd.DataFrame({"age": [50.0, 2e6], "stage": ["I", "II"]}), SPEC)
    many = pd.DataFrame({"age": np.arange(51.0), "stage": [f"id{i}" for i in range(51)]})
    with pytest.raises(ClinicalDataError, match="would be refused: columns.stage has 51 categories"):
        partial_stats(many, SPEC)


# A pool of what a hostile or broken site could put anywhere in its JSON.
GARBAGE = [
    None, True, False, 0, -1, -5.0, 1, 2, 10**400, -(10**400), 2**63, 1e300, -1e300, 1e15, 1e-300, float("nan"),
    float("inf"), -float("inf"), "", "5", "age", "x" * 100, [], [1, 2], [["age", "numeric"]], [[[[]]]], {}, {"a": {}},
    {"count": 1}, ["I", "I"], ["b", "a"], [None], list(range(100)), [f"c{i:03d}" for i in range(60)],
]


def _random_mutation(stats: dict, rng: random.Random) -> dict:
    """Replace, delete or add one entry anywhere in ``stats`` (or swap the whole object)."""
    entries: list[tuple] = []  # (container, key) for every entry; the column statistics count twice

    def walk(node, weight):
        for key in list(node) if isinstance(node, dict) else range(len(node)):
            entries.extend([(node, key)] * weight)
            if isinstance(node[key], (dict, list)):
                walk(node[key], 2 if key == "columns" else weight)

    walk(stats, 1)
    if rng.random() < 0.03 or not entries:
        return copy.deepcopy(rng.choice(GARBAGE))
    node, key = rng.choice(entries)
    action = rng.random()
    value = node[key]
    if action < 0.3 and isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e18:
        lie = rng.choice([-1, 1, 2, 1e3, 1e9, -1e-9]) * value + rng.choice([0, 1, -1])  # a plausible lie
        node[key] = int(lie) if isinstance(value, int) else lie
    elif action < 0.8:
        node[key] = copy.deepcopy(rng.choice(GARBAGE))
    elif action < 0.9:
        del node[key]
    elif isinstance(node, dict):
        node[rng.choice(["extra", "age", "stage", "count", "sum", "spec", "rows"]) + rng.choice(["", "2"])] = (
            copy.deepcopy(rng.choice(GARBAGE))
        )
    else:
        node.append(copy.deepcopy(rng.choice(GARBAGE)))
    return stats


def test_fuzzed_statistics_never_crash_the_server():
    rng = random.Random(0)
    base = valid_stats()
    refused = 0
    for trial in range(600):
        stats = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            stats = _random_mutation(stats, rng) if isinstance(stats, dict) else stats
        problems = partial_stats_problems(stats)  # must never raise
        assert isinstance(problems, list) and all(isinstance(p, str) and len(p) < 400 for p in problems)
        for sites in ([stats], [base, stats]):
            try:
                fitted = EhrPreprocessor.from_partial_stats(sites)
            except ClinicalDataError:
                refused += 1
                continue
            except Exception as error:  # pragma: no cover - the failure this test exists to catch
                pytest.fail(f"trial {trial}: {type(error).__name__}: {error} for {stats!r}")
            assert not problems, (trial, problems)  # anything it accepts, the check accepts
            for column in fitted.columns:
                if isinstance(column, NumericColumn):
                    assert math.isfinite(column.mean) and math.isfinite(column.std) and column.std > 0
                    assert abs(column.mean) <= MAX_ABS_COVARIATE
                else:
                    assert len(column.categories) <= MAX_EHR_CATEGORIES
            assert fitted.n_features <= 2 * (MAX_EHR_CATEGORIES + 1)
    assert refused > 900  # nearly every mutant is refused: the fuzz is not vacuous


def test_random_numeric_statistics_fit_finite_or_are_refused():
    """Numbers of every magnitude and sign in a well-formed numeric entry: the bounds decide."""
    rng = random.Random(1)
    accepted = 0
    for _ in range(500):
        count, missing = rng.choice([0, 1, 2, 5, 10**6]), rng.choice([0, 3])
        entry = {
            "count": count,
            "missing": missing,
            "sum": rng.choice([-1, 1]) * 10 ** rng.uniform(-3, 16) * rng.choice([0, 1]),
            "centred_sum_sq": rng.choice([-1, 1, 1, 1]) * 10 ** rng.uniform(-3, 30) * rng.choice([0, 1]),
        }
        stats = {"spec": [["age", "numeric"]], "rows": count + missing, "columns": {"age": entry}}
        problems = partial_stats_problems(stats)
        try:
            column = EhrPreprocessor.from_partial_stats([stats]).columns[0]
        except ClinicalDataError:
            continue
        accepted += 1
        assert problems == []
        assert abs(column.mean) <= MAX_ABS_COVARIATE * (1 + 1e-9) and 0 < column.std <= MAX_ABS_COVARIATE * (1 + 1e-9)
    assert 50 < accepted < 450  # both sides of the bounds are exercised


def test_real_tables_give_statistics_without_problems(phantom_federation):
    from lifelines.datasets import load_lung

    from pemma_core.config.site import load_site_config

    ehr_sites = [load_site_config(p) for p in (*phantom_federation.site_yamls, phantom_federation.test_yaml)]
    ehr_sites = [cfg for cfg in ehr_sites if cfg.clinical is not None and cfg.clinical.covariates]
    assert ehr_sites
    stats = []
    for cfg in ehr_sites:
        table, _ = read_clinical(cfg.clinical.path, cfg.clinical.id_column, cfg.clinical.time, cfg.clinical.event,
                                 cfg.clinical.covariates)
        stats.append(json.loads(json.dumps(partial_stats(table, cfg.clinical.covariates))))
        assert partial_stats_problems(stats[-1], list(cfg.clinical.covariates.items())) == []
    EhrPreprocessor.from_partial_stats(stats)

    lung = load_lung()
    spec = {"age": "numeric", "sex": "categorical", "ph.ecog": "categorical", "ph.karno": "numeric",
            "pat.karno": "numeric", "meal.cal": "numeric", "wt.loss": "numeric"}
    by_site = [part for _, part in lung.groupby(lung["inst"].fillna(-1))]
    site_stats = [json.loads(json.dumps(partial_stats(part, spec))) for part in by_site]
    assert all(partial_stats_problems(s, list(spec.items())) == [] for s in site_stats)
    merged = EhrPreprocessor.from_partial_stats(site_stats)
    pooled = EhrPreprocessor.fit(lung, spec)
    assert merged.feature_names == pooled.feature_names
    assert merged.columns[0].mean == pytest.approx(lung["age"].mean())
