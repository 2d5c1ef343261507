"""Clinical CSV reading and the EHR covariate preprocessor."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from pemma_core.data.clinical import (
    METADATA_KEY,
    CategoricalColumn,
    ClinicalDataError,
    EhrPreprocessor,
    NumericColumn,
    partial_stats,
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
    with pytest.raises(ClinicalDataError, match="site 1 has covariate spec"):
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
