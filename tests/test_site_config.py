"""Site YAML loading: schema, defaults, paths, env vars, and every kind of bad key."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pemma_core.config.site import (
    DEFAULT_CT_WINDOW,
    DEFAULT_PET_SUV_MAX,
    DEFAULT_SPACING,
    ClinicalSpec,
    SiteConfigError,
    SiteLimits,
    expand_env,
    load_site_config,
    site_json_schema,
)

REPO = Path(__file__).resolve().parents[1]
IBSI_SITES = REPO / "sites" / "ibsi"

MINIMAL = "name: s\ndata_root: data\nmodalities: [ct, pet]\nmanifest: m.csv\n"


def write_yaml(folder: Path, text: str) -> Path:
    path = folder / "site.yaml"
    path.write_text(text)
    return path


def test_minimal_yaml_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load_site_config(write_yaml(tmp_path, MINIMAL))
    assert cfg.name == "s"
    assert cfg.path == (tmp_path / "site.yaml").resolve()
    assert cfg.data_root == (tmp_path / "data").resolve()  # relative to the YAML's folder
    assert cfg.manifest == (tmp_path / "m.csv").resolve()
    assert cfg.modalities == ("ct", "pet")
    assert cfg.modes == ("ct", "pet", "ctpet")  # servable_modes
    assert cfg.clinical is None
    assert cfg.spacing == DEFAULT_SPACING
    assert cfg.patch_size is None
    assert cfg.cache_dir == (tmp_path / "cache" / "s").resolve()
    assert cfg.device == "auto"  # CUDA on a GPU node, else CPU (client.task.resolve_device)
    assert cfg.loader_workers == 0
    assert cfg.on_bad_case == "skip"
    assert cfg.ct_window == DEFAULT_CT_WINDOW
    assert cfg.pet_suv_max == DEFAULT_PET_SUV_MAX
    assert cfg.limits == SiteLimits()


def test_default_limits() -> None:
    limits = SiteLimits()
    assert (limits.max_rank, limits.pet_embed, limits.max_upload_mb) == (16, ("lowrank",), 64.0)
    assert (limits.min_examples_per_round, limits.min_eval_cases, limits.min_ehr_rows) == (8, 3, 10)


def test_limits_are_read_and_missing_keys_keep_their_defaults(tmp_path: Path) -> None:
    text = MINIMAL + ("limits:\n  max_rank: 32\n  pet_embed: [full, lowrank]\n  max_upload_mb: 12.5\n"
                      "  min_eval_cases: 5\n")
    cfg = load_site_config(write_yaml(tmp_path, text))
    assert cfg.limits == SiteLimits(max_rank=32, pet_embed=("lowrank", "full"), max_upload_mb=12.5, min_eval_cases=5)
    assert load_site_config(write_yaml(tmp_path, MINIMAL + "limits:\n")).limits == SiteLimits()  # null: defaults
    assert load_site_config(write_yaml(tmp_path, MINIMAL + "limits: {pet_embed: full}\n")).limits.pet_embed == ("full",)


def test_full_yaml(tmp_path: Path) -> None:
    text = (
        "name: full\ndata_root: /abs/data\nmodalities: [ehr, ct]\nmodes: [ct]\nmanifest: sub/m.csv\n"
        "clinical:\n  path: c.csv\n  id_column: pid\n  time: os_months\n  event: died\n"
        "  covariates: {age: numeric, grade: categorical}\n"
        "spacing: 3\npatch_size: [32, 32, 16]\ncache_dir: /tmp/x\ndevice: cuda:1\non_bad_case: fail\n"
        "ct_window: [-100, 200]\npet_suv_max: 15\n"
    )
    cfg = load_site_config(write_yaml(tmp_path, text))
    assert cfg.data_root == Path("/abs/data")
    assert cfg.modalities == ("ct", "ehr")  # canonical order
    assert cfg.modes == ("ct",)
    assert cfg.manifest == (tmp_path / "sub" / "m.csv").resolve()
    assert cfg.clinical == ClinicalSpec(
        path=(tmp_path / "c.csv").resolve(),
        id_column="pid",
        time="os_months",
        event="died",
        covariates={"age": "numeric", "grade": "categorical"},
    )
    assert list(cfg.clinical.covariates) == ["age", "grade"]
    assert cfg.spacing == (3.0, 3.0, 3.0)
    assert cfg.patch_size == (32, 32, 16)
    assert cfg.device == "cuda:1" and cfg.on_bad_case == "fail"
    assert cfg.ct_window == (-100.0, 200.0) and cfg.pet_suv_max == 15.0
    assert cfg.has_ct and cfg.has_ehr and not cfg.has_pet


def test_clinical_without_survival(tmp_path: Path) -> None:
    cfg = load_site_config(write_yaml(tmp_path, MINIMAL + "clinical: {path: c.csv, time: null, event: null}\n"))
    assert cfg.clinical.time is None and cfg.clinical.event is None
    shorthand = load_site_config(write_yaml(tmp_path, MINIMAL + "clinical: c.csv\n"))
    assert shorthand.clinical == ClinicalSpec(path=(tmp_path / "c.csv").resolve())


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ("spacng: [1, 1, 1]\n", "spacng", "did you mean 'spacing'"),
        ("spacing: 2mm\n", "spacing", "3 positive numbers"),
        ("spacing: [1, 1]\n", "spacing", "3 positive numbers"),
        ("spacing: [1, -1, 1]\n", "spacing", "3 positive numbers"),
        ("patch_size: [32, 32.5, 32]\n", "patch_size", "positive integers"),
        ("on_bad_case: ignore\n", "on_bad_case", "skip"),
        ("device: gpu\n", "device", "cuda"),
        ("loader_workers: -1\n", "loader_workers", "whole number >= 0"),
        ("loader_workers: 2.5\n", "loader_workers", "whole number >= 0"),
        ("ct_window: [300, -200]\n", "ct_window", "low < high"),
        ("ct_window: -200\n", "ct_window", "low < high"),
        ("pet_suv_max: 0\n", "pet_suv_max", "positive number"),
        ("pet_suv_max: high\n", "pet_suv_max", "positive number"),
        ("modes: [ctpet, mri]\n", "modes", "ct"),
        ("clinical: {path: c.csv, covariates: {age: number}}\n", "clinical.covariates.age", "numeric"),
        ("clinical: {path: c.csv, tme: t}\n", "clinical.tme", "did you mean 'time'"),
        ("clinical: {id_column: pid}\n", "clinical.path", "required"),
        ("clinical: {path: c.csv, time: null}\n", "clinical.time", "both"),
        ("clinical: {path: c.csv, covariates: {time: numeric}}\n", "clinical.covariates", "clash"),
        ("clinical: [c.csv]\n", "clinical", "mapping"),
        ("limits: {max_rank: 0}\n", "limits.max_rank", "whole number >= 1"),
        ("limits: {max_rank: 8.5}\n", "limits.max_rank", "whole number >= 1"),
        ("limits: {max_rnak: 8}\n", "limits.max_rnak", "did you mean 'max_rank'"),
        ("limits: {pet_embed: huge}\n", "limits.pet_embed", "'lowrank', 'full'"),
        ("limits: {pet_embed: []}\n", "limits.pet_embed", "non-empty list"),
        ("limits: {pet_embed: [full, full]}\n", "limits.pet_embed", "without repeats"),
        ("limits: {max_upload_mb: 0}\n", "limits.max_upload_mb", "positive number"),
        ("limits: {min_examples_per_round: 0}\n", "limits.min_examples_per_round", "whole number >= 1"),
        ("limits: {min_eval_cases: -1}\n", "limits.min_eval_cases", "whole number >= 1"),
        ("limits: {min_ehr_rows: ten}\n", "limits.min_ehr_rows", "whole number >= 1"),
        ("limits: 16\n", "limits", "mapping with max_rank"),
    ],
)
def test_bad_keys_name_key_and_expectation(tmp_path: Path, extra: str, key: str, expected: str) -> None:
    with pytest.raises(SiteConfigError) as error:
        load_site_config(write_yaml(tmp_path, MINIMAL + extra))
    message = str(error.value)
    assert key in message and expected in message
    assert str(tmp_path / "site.yaml") in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: s\ndata_root: d\nmodalities: [ct]\n", "missing required key(s) ['manifest']"),
        ("name: s\ndata_root: d\nmodalities: [mri]\nmanifest: m.csv\n", "'modalities'"),
        ("name: s\ndata_root: d\nmodalities: [ehr]\nmanifest: m.csv\n", "at least one image modality"),
        ("name: s\ndata_root: d\nmodalities: [ct, ct]\nmanifest: m.csv\n", "without repeats"),
        ("name: s\ndata_root: d\nmodalities: [ct]\nmodes: [ctpet]\nmanifest: m.csv\n", "need modalities"),
        ("name: s\ndata_root: d\nmodalities: [ct, ehr]\nmanifest: m.csv\n", "'ehr' needs a clinical table"),
        ("name: ''\ndata_root: d\nmodalities: [ct]\nmanifest: m.csv\n", "'name'"),
        ("name: s\ndata_root: 3\nmodalities: [ct]\nmanifest: m.csv\n", "'data_root'"),
        ("- just\n- a list\n", "mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_files(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(SiteConfigError, match=None) as error:
        load_site_config(write_yaml(tmp_path, text))
    assert expected in str(error.value)


def test_every_problem_is_reported_at_once_naming_file_and_key(tmp_path: Path) -> None:
    text = MINIMAL + "spacing: 2mm\ndevice: gpu\nclinical: {path: c.csv, tme: t}\npet_suv_max: 0\n"
    path = write_yaml(tmp_path, text)
    with pytest.raises(SiteConfigError) as error:
        load_site_config(path)
    problems = error.value.problems
    assert len(problems) == 4
    for key, expected in (("spacing", "3 positive numbers"), ("device", "cuda"), ("clinical.tme", "did you mean 'time'"),
                          ("pet_suv_max", "positive number")):
        line = next(p for p in problems if repr(key) in p)
        assert line.startswith(f"{path}: ") and expected in line
        assert line in str(error.value)


def test_missing_and_mistyped_keys_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError) as error:
        load_site_config(write_yaml(tmp_path, "name: s\ndata_root: 3\nmodalities: [ct]\non_bad_case: ignore\n"))
    message = str(error.value)
    assert "missing required key(s) ['manifest']" in message
    assert "'data_root'" in message and "'on_bad_case'" in message


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        (MINIMAL + "spacing: [1, 1, 1]\nspacing: [3, 3, 3]\n", "spacing", 6),
        (MINIMAL + "clinical:\n  path: c.csv\n  covariates: {age: numeric, age: categorical}\n", "age", 7),
    ],
)
def test_a_duplicated_key_is_refused(tmp_path: Path, text: str, key: str, line: int) -> None:
    with pytest.raises(SiteConfigError) as error:
        load_site_config(write_yaml(tmp_path, text))
    assert f"duplicate key {key!r} (line {line}" in str(error.value)


# --------------------------------------------------------------------------- limits: what a site refuses

DEFAULT_RUN = {"rank": 8, "pet_embed": "lowrank", "phase": "adapt", "local_steps": 10, "batch_size": 2}


def test_the_default_run_is_accepted_by_the_default_limits() -> None:
    assert SiteLimits().refusals(**DEFAULT_RUN) == []
    assert SiteLimits().refusals(**{**DEFAULT_RUN, "phase": "pretrain-ct"}) == []


@pytest.mark.parametrize(
    ("change", "key", "expected"),
    [
        ({"rank": 64}, "limits.max_rank", "the server asks for rank 64, this site accepts at most 16"),
        ({"pet_embed": "full"}, "limits.pet_embed", "pet_embed 'full', this site accepts only ['lowrank']"),
        ({"local_steps": 1, "batch_size": 1}, "limits.min_examples_per_round", "1 example(s) per round"),
        ({"local_steps": 3, "batch_size": 2}, "limits.min_examples_per_round", "needs at least 8"),
        ({"batch_size": None}, "limits.min_examples_per_round", "no batch size"),
    ],
)
def test_each_broken_limit_is_one_refusal_naming_key_and_file(tmp_path: Path, change: dict, key: str,
                                                              expected: str) -> None:
    source = tmp_path / "site.yaml"
    refusals = SiteLimits().refusals(**{**DEFAULT_RUN, **change}, source=source)
    assert len(refusals) == 1
    assert expected in refusals[0] and f"({key} in {source})" in refusals[0]


def test_refusals_follow_the_sites_own_limits(tmp_path: Path) -> None:
    cfg = load_site_config(write_yaml(tmp_path, MINIMAL + "limits: {max_rank: 64, pet_embed: [lowrank, full]}\n"))
    wide = {**DEFAULT_RUN, "rank": 64, "pet_embed": "full"}
    assert cfg.limits.refusals(**wide, source=cfg.path) == []
    everything = {**wide, "rank": 65, "local_steps": 1, "batch_size": 1}
    refusals = SiteLimits().refusals(**everything)
    assert [r.split("(")[-1].split(" in ")[0] for r in refusals] == [
        "limits.max_rank", "limits.pet_embed", "limits.min_examples_per_round"]
    assert all(r.endswith("in the site YAML)") for r in refusals)  # no source given


def test_prognosis_is_exempt_from_the_examples_minimum() -> None:
    prognosis = {**DEFAULT_RUN, "phase": "prognosis", "local_steps": 1, "batch_size": None}
    assert SiteLimits().refusals(**prognosis) == []
    assert len(SiteLimits().refusals(**{**prognosis, "rank": 64})) == 1  # the other limits still hold


def test_upload_refusal(tmp_path: Path) -> None:
    limits = SiteLimits(max_upload_mb=2.0)
    assert limits.upload_refusal(2 * 2**20) is None  # exactly the limit fits
    message = limits.upload_refusal(2 * 2**20 + 1, source=tmp_path / "site.yaml")
    assert message is not None and "at most 2 MiB" in message
    assert f"limits.max_upload_mb in {tmp_path / 'site.yaml'}" in message
    assert SiteLimits().upload_refusal(64 * 2**20) is None and SiteLimits().upload_refusal(65 * 2**20) is not None


def test_committed_json_schema_is_the_models() -> None:
    committed = json.loads((REPO / "sites" / "site.schema.json").read_text())
    assert committed == site_json_schema(), "regenerate: python -m pemma_core.config.site"
    assert committed["additionalProperties"] is False and set(committed["required"]) == {
        "name", "data_root", "modalities", "manifest"}
    readme = (REPO / "sites" / "README.md").read_text()
    assert "site.schema.json" in readme
    limits = committed["$defs"]["LimitsFile"]
    assert limits["additionalProperties"] is False
    for key, value in vars(SiteLimits()).items():  # every limit documented, with the dataclass's default
        assert f"`{key}`" in readme, key
        assert limits["properties"][key]["default"] == (list(value) if isinstance(value, tuple) else value)


def test_shipped_yamls_name_the_schema() -> None:
    for path in IBSI_SITES.glob("*.yaml"):
        assert path.read_text().startswith("# yaml-language-server: $schema=../site.schema.json"), path


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match="not found"):
        load_site_config(tmp_path / "absent.yaml")


def test_expand_env() -> None:
    env = {"A": "/x", "EMPTY": ""}
    assert expand_env("$A/y", env) == "/x/y"
    assert expand_env("${A}/y", env) == "/x/y"
    assert expand_env("${B:-../d}/y", env) == "../d/y"
    assert expand_env("${EMPTY:-fallback}", env) == "fallback"
    assert expand_env("no vars", env) == "no vars"
    with pytest.raises(KeyError):
        expand_env("$B/y", env)


def test_env_var_in_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "name: s\ndata_root: ${MY_ROOT:-rel}\nmodalities: [ct]\nmanifest: $MY_DIR/m.csv\n"
    path = write_yaml(tmp_path, text)
    monkeypatch.delenv("MY_ROOT", raising=False)
    monkeypatch.delenv("MY_DIR", raising=False)
    with pytest.raises(SiteConfigError, match=r"'manifest'.*\$MY_DIR is not set"):
        load_site_config(path)
    monkeypatch.setenv("MY_DIR", str(tmp_path / "lists"))
    cfg = load_site_config(path)
    assert cfg.data_root == (tmp_path / "rel").resolve()
    assert cfg.manifest == tmp_path / "lists" / "m.csv"
    monkeypatch.setenv("MY_ROOT", "/elsewhere/data")
    assert load_site_config(path).data_root == Path("/elsewhere/data")


# --------------------------------------------------------------------------- shipped IBSI sites


def test_ibsi_yamls_load_and_point_at_the_shared_data(ibsi_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEMMA_IBSI_ROOT", raising=False)
    monkeypatch.delenv("PEMMA_CACHE_DIR", raising=False)
    expected = {
        "site-a": ("ct",),
        "site-b": ("ct", "pet"),
        "site-c": ("ct", "pet"),
        "test": ("ct", "pet"),
    }
    for stem, modalities in expected.items():
        cfg = load_site_config(IBSI_SITES / f"{stem}.yaml")
        assert cfg.modalities == modalities
        assert cfg.data_root == (REPO.parent / "shared" / "data" / "ibsi-sts").resolve()
        assert cfg.manifest.is_file()
        assert cfg.cache_dir == (REPO / "cache" / f"ibsi-{stem}").resolve()  # the repo's ignored cache/
        assert cfg.clinical is None
    monkeypatch.setenv("PEMMA_IBSI_ROOT", str(ibsi_root))
    monkeypatch.setenv("PEMMA_CACHE_DIR", "/tmp/pemma-cache")
    cfg = load_site_config(IBSI_SITES / "site-a.yaml")
    assert cfg.data_root == ibsi_root
    assert cfg.cache_dir == Path("/tmp/pemma-cache/ibsi-site-a")


def test_ibsi_manifests_follow_the_shared_split(ibsi_root: Path) -> None:
    with (ibsi_root / "manifest.csv").open() as stream:
        shared = list(csv.DictReader(stream))
    for stem in ("site-a", "site-b", "site-c", "test"):
        with (IBSI_SITES / f"{stem}-manifest.csv").open() as stream:
            rows = list(csv.DictReader(stream))
        wanted = [r for r in shared if (r["site"] == stem if stem != "test" else r["split"] == "test")]
        assert [r["case_id"] for r in rows] == [r["case_id"] for r in wanted]
        for row, source in zip(rows, wanted):
            case = row["case_id"]
            assert row["split"] == source["split"]
            assert row["ct"] == f"{case}/CT_image.nii.gz"  # original IBSI names, read in place
            assert row["label"] == f"{case}/CT_mask.nii.gz"
            assert row["pet"] == ("" if stem == "site-a" else f"{case}/PET_image.nii.gz")
            assert (ibsi_root / row["ct"]).is_file()
    assert len(shared) == 36


def test_phantom_site_yamls_load(phantom_federation) -> None:
    for path in (*phantom_federation.site_yamls, phantom_federation.test_yaml):
        cfg = load_site_config(path)
        assert cfg.modalities == phantom_federation.modalities[cfg.name]
        assert cfg.clinical is not None and cfg.clinical.path.is_file()
        assert bool(cfg.clinical.covariates) == ("ehr" in cfg.modalities)
        # 4 cases a site (1 test, 3 train) and 2 test cases: the floors are lowered to what each site holds.
        assert cfg.limits.min_eval_cases == (2 if cfg.name == "test" else 1)
        if "ehr" not in cfg.modalities:
            assert cfg.limits.min_ehr_rows == SiteLimits().min_ehr_rows
        elif cfg.name == "test":  # no training rows at all
            assert cfg.limits.min_ehr_rows == 1
        else:  # lowered to the sparsest covariate's training values, so the site still sends its statistics
            from pemma_core.data.clinical import present_counts
            from pemma_core.data.cases import site_ehr_stats

            stats, _ = site_ehr_stats(cfg, min_rows=cfg.limits.min_ehr_rows)
            assert stats is not None and min(present_counts(stats).values()) == cfg.limits.min_ehr_rows


def test_loader_workers_is_read_and_used_by_the_loaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pemma_core.data import pipeline

    cfg = load_site_config(write_yaml(tmp_path, MINIMAL + "loader_workers: 2\n"))
    assert cfg.loader_workers == 2
    # The loaders take the site's setting unless the caller names a count (cases and cache stubbed out:
    # only the worker count is under test).
    monkeypatch.setattr(pipeline, "_usable_or_raise", lambda *args, **kwargs: [])
    monkeypatch.setattr(pipeline, "cached_dataset", lambda *args, **kwargs: [{}])
    assert pipeline.eval_loader(cfg).num_workers == 2
    assert pipeline.eval_loader(cfg, num_workers=0).num_workers == 0
    assert pipeline.train_loader(cfg, (8, 8, 8)).num_workers == 2
