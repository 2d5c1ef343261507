"""Run settings: one definition (pemma_core.config.run), read the same way by every reader."""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pemma_core.config.run import RunConfigError, RunSettings

REPO = Path(__file__).resolve().parents[1]

# Today's `pemma simulate` values: the default run trains exactly as before the settings were merged.
SIMULATE_VALUES = {
    "num-server-rounds": 5, "local-steps": 10, "pretrain-rounds": 3, "pretrain-steps": 12, "phantom-cases": 18,
    "prognosis-rounds": 2, "prognosis-steps": 10, "lr": 1e-2, "pretrain-lr": 2e-3, "prognosis-lr": 1e-2,
    "batch-size": 2, "rank": 8, "alpha": 16, "seed": 0, "min-sites": 2, "wire-dtype": "float32",
    "backbone": "unetr", "preset": "tiny", "adapter": "lora", "evaluate": True, "resume": False,
}


def test_defaults_are_todays_pemma_simulate_values() -> None:
    defaults = RunSettings().to_run_config()
    assert {key: defaults[key] for key in SIMULATE_VALUES} == SIMULATE_VALUES


def test_pyproject_run_config_is_the_models_defaults_key_by_key() -> None:
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunSettings().to_run_config()
    assert list(table) == list(defaults)
    for key, value in defaults.items():
        assert table[key] == value, key


def test_every_bad_key_is_reported_at_once_naming_the_key_and_what_it_expects() -> None:
    with pytest.raises(RunConfigError) as error:
        RunSettings.from_run_config({"rank": "eight", "evaluate": "nope", "lr": -1.0, "num-server-rounds": 0,
                                     "wire-dtype": "bfloat16", "local-step": 3})
    message = str(error.value)
    for line in (
        "rank: expected a whole number >= 1, got 'eight'",
        "evaluate: expected true or false, got 'nope'",
        "lr: expected a number > 0, got -1.0",
        "num-server-rounds: expected a whole number >= 1, got 0",
        "wire-dtype: expected one of 'float32', 'float16', 'int8', got 'bfloat16'",
        "local-step: unknown run config key (did you mean 'local-steps'?)",
    ):
        assert line in message
    assert len(error.value.problems) == 6


def test_values_are_checked_not_coerced() -> None:
    for bad in ({"rank": True}, {"rank": 8.5}, {"batch-size": "2"}, {"run-dir": 3}, {"pretrain-rounds": -1},
                {"max-update-norm": -0.5}, {"round-timeout": 0}):
        with pytest.raises(RunConfigError, match=next(iter(bad))):
            RunSettings.from_run_config(bad)
    assert RunSettings.from_run_config({"evaluate": "false", "resume": "true"}).model_dump(include={"evaluate", "resume"}) == {
        "evaluate": False, "resume": True}
    assert RunSettings.from_run_config({"round-timeout": 30, "rank": 4}).round_timeout == 30.0
    with pytest.raises(RunConfigError, match="local-steps: expected a whole number >= 1, got 0"):
        RunSettings(local_steps=0)  # the Python names are checked the same way


def test_run_config_round_trip_and_run_id() -> None:
    settings = RunSettings(rounds=2, local_steps=3, adapter="dora")
    assert RunSettings.from_run_config(settings.to_run_config()) == settings
    assert RunSettings.from_run_config({"run-dir": "runs/flwr-{run_id}"}, run_id=42).run_dir == "runs/flwr-42"
    assert settings.model_spec().adapter == "dora"


def test_help_comes_from_the_model() -> None:
    assert RunSettings.help("local-steps").startswith(RunSettings.model_fields["local_steps"].description)
    assert "(default 10)" in RunSettings.help("local-steps")
    assert RunSettings.default("num-server-rounds") == 5


# --------------------------------------------------------------------------- one definition, every reader


@pytest.fixture
def patch_default() -> Iterator[Callable[[str, Any], None]]:
    """Change the model's default of one setting (and only there) for the test."""
    patched: list[tuple[str, Any]] = []

    def patch(name: str, value: Any) -> None:
        field = RunSettings.model_fields[name]
        patched.append((name, field.default))
        field.default = value
        RunSettings.model_rebuild(force=True)

    yield patch
    for name, value in reversed(patched):
        RunSettings.model_fields[name].default = value
    RunSettings.model_rebuild(force=True)


def server_settings(monkeypatch: pytest.MonkeyPatch) -> RunSettings:
    """What the ServerApp parses from an empty run config (run_federation not run)."""
    from flwr.app import Context, RecordDict

    from server import server_app

    seen: list[RunSettings] = []
    monkeypatch.setattr(server_app, "run_federation", lambda grid, settings, progress=None: seen.append(settings))
    app = server_app.make_server_app()
    app(None, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={}))  # type: ignore[arg-type]
    return seen[0]


def simulate_settings(tmp_path: Path) -> RunSettings:
    from simulation import simulate

    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    return simulate.settings_from_args(parser.parse_args(["--out", str(tmp_path / "run")]))


def bench_config(tmp_path: Path) -> Any:
    from benchmarks.cli import add_arguments
    from benchmarks.config import config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(["--out", str(tmp_path / "bench"), "--quick"]))


@pytest.mark.parametrize(("name", "value"), [("local_steps", 3), ("phantom_cases", 2), ("lr", 0.05), ("batch_size", 1), ("seed", 3)])
def test_one_default_changed_in_the_model_changes_every_reader(
    name: str, value: Any, patch_default: Callable[[str, Any], None], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from client import site_work

    patch_default(name, value)
    assert getattr(RunSettings(), name) == value
    assert getattr(server_settings(monkeypatch), name) == value
    assert getattr(site_work.run_settings({}), name) == value
    assert getattr(simulate_settings(tmp_path), name) == value
    # The benchmark takes the adapt rate, batch size and seed of the product; its step
    # budgets (rounds x local steps) are its own, by design (BENCHMARKS.md).
    bench_reads = {"lr": "lr_adapter", "batch_size": "batch_size", "seed": "seed"}
    if name in bench_reads:
        assert getattr(bench_config(tmp_path), bench_reads[name]) == value


def test_the_client_builds_the_phantom_federation_from_the_model(
    patch_default: Callable[[str, Any], None], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from client import site_work

    patch_default("phantom_cases", 2)
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(site_work, "ensure_phantom_federation",
                             lambda folder, sites, cases, seed: calls.append((sites, cases, seed)) or [tmp_path / "a.yaml"])
    assert site_work.site_config_path({"partition-id": 0}, {"federation-dir": str(tmp_path)}) == tmp_path / "a.yaml"
    assert calls == [(3, 2, 0)]
    with pytest.raises(RunConfigError, match="phantom-cases: expected a whole number >= 1, got 'six'"):
        site_work.site_config_path({"partition-id": 0}, {"phantom-cases": "six"})


def test_simulate_has_no_defaults_of_its_own(tmp_path: Path) -> None:
    from simulation import simulate

    assert not hasattr(simulate, "SIMULATE_DEFAULTS")
    settings = simulate_settings(tmp_path)
    expected = RunSettings().model_dump(exclude={"run_dir", "federation_dir"})
    assert settings.model_dump(exclude={"run_dir", "federation_dir"}) == expected
    assert settings.federation_dir == str((tmp_path / "run" / "federation").resolve())
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["local_steps"] == RunSettings.help("local-steps")
    assert helps["rounds"] == RunSettings.help("num-server-rounds")


def test_simulate_reports_every_bad_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pemma_core.cli import main

    assert main(["simulate", "--out", str(tmp_path / "run"), "--rounds", "0", "--local-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "num-server-rounds: expected a whole number >= 1, got 0" in err
    assert "local-steps: expected a whole number >= 1, got 0" in err


def test_old_settings_module_is_gone() -> None:
    assert not (REPO / "server" / "settings.py").exists()
