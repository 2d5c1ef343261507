"""The ``pemma`` command line: help without heavy imports, exit statuses, errors, -v / -q."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pemma_core import console
from pemma_core.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
# What `--help` must never load: each costs seconds of start-up.
HEAVY = ("torch", "monai", "flwr", "ray", "transformers")


def pemma(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pemma_core.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_top_help_lists_every_command_and_the_verbosity_options() -> None:
    done = pemma("--help")
    assert done.returncode == 0, done.stderr
    for name, (_, summary) in COMMANDS.items():
        assert f"  {name}" in done.stdout and summary in done.stdout
    assert "--verbose" in done.stdout and "--quiet" in done.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_loads_no_heavy_module(command: str) -> None:
    """The honest form of "help is instant": no torch / MONAI / Flower behind any --help."""
    code = (
        "import json, sys\n"
        "from pemma_core import cli\n"
        f"status = cli.main([{command!r}, '--help'])\n"
        f"print('RESULT', json.dumps([status, [m for m in {HEAVY!r} if m in sys.modules]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    help_text, _, result = done.stdout.rpartition("RESULT ")
    status, heavy = json.loads(result)
    assert status == 0
    assert heavy == [], f"pemma {command} --help imported {heavy}"
    assert f"usage: pemma {command}" in help_text and "--verbose" in help_text and "--quiet" in help_text
    assert COMMANDS[command][1] in " ".join(help_text.split())  # its summary, from the one table


def test_phantoms_help_states_the_real_default_spacing() -> None:
    from pemma_core.phantoms.writer import PHANTOM_SPACING

    done = pemma("phantoms", "--help")
    assert " ".join(f"{v:g}" for v in PHANTOM_SPACING) in " ".join(done.stdout.split())


def test_unknown_command_and_bad_option_are_usage_errors() -> None:
    done = pemma("bogus")
    assert done.returncode == 2
    assert "unknown command 'bogus'" in done.stderr and all(name in done.stderr for name in COMMANDS)
    done = pemma("info", "--no-such-option")
    assert done.returncode == 2 and "unrecognized arguments: --no-such-option" in done.stderr
    done = pemma("check-site", "-v", "-q", "site.yaml")
    assert done.returncode == 2 and "not allowed with" in done.stderr


def test_main_returns_the_status_of_help_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["phantoms", "--help"]) == 0 and "usage: pemma phantoms" in capsys.readouterr().out
    assert main(["phantoms", "out", "--modalities", "ct+mri"]) == 2
    assert "bad modalities 'ct+mri'" in capsys.readouterr().err


def test_missing_site_yaml_is_one_error_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    done = pemma("check-site", str(missing))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [f"pemma check-site: error: site config not found: {missing}"]
    verbose = pemma("check-site", "-v", str(missing))
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "SiteConfigError" in verbose.stderr
    as_json = pemma("check-site", "--json", str(missing))
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["reason"] == "config error"


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "fed"
    done = pemma("phantoms", str(out), "--sites", "1", "--cases-per-site", "2", "--test-cases", "0")
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.split()[0])


def test_check_site_progress_by_default_and_none_with_quiet(tiny_site: Path) -> None:
    loud = pemma("check-site", str(tiny_site))
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.splitlines() == ["checking site-1: case 1/2 site-1-000", "checking site-1: case 2/2 site-1-001"]
    for quiet in (pemma("check-site", "-q", str(tiny_site)), pemma("-q", "check-site", str(tiny_site))):
        assert quiet.returncode == 0 and quiet.stderr == ""
        assert quiet.stdout == loud.stdout  # -q silences progress, never results


def test_existing_output_folder_is_a_failure_not_a_usage_error(tiny_site: Path) -> None:
    done = pemma("phantoms", str(tiny_site.parents[1]))
    assert done.returncode == 1 and "refusing to write over it" in done.stderr and "Traceback" not in done.stderr


def _command_raising(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    from pemma_core.model import info

    def run(args):
        raise exc

    monkeypatch.setattr(info, "run", run)


def test_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _command_raising(monkeypatch, KeyboardInterrupt())
    assert main(["info"]) == 130
    assert "pemma info: interrupted" in capsys.readouterr().err


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _command_raising(monkeypatch, FileNotFoundError(2, "No such file or directory", "/data/ct.nii.gz"))
    assert main(["info"]) == 1
    assert capsys.readouterr().err == "pemma info: error: /data/ct.nii.gz: No such file or directory\n"
    _command_raising(monkeypatch, console.UsageError("give --ct"))
    assert main(["info"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "pemma info: error: give --ct"
    _command_raising(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info"])
    console.set_verbosity(console.NORMAL)


def test_verbosity_leaves_the_root_logger_as_it_found_it(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    root = logging.getLogger()
    before = root.level
    console.set_verbosity(console.QUIET)
    assert root.level == logging.ERROR
    assert list(console.progress([1, 2], "step")) == [1, 2]
    console.say("hidden")
    console.set_verbosity(console.VERBOSE)
    assert root.level == logging.INFO
    console.set_verbosity(console.NORMAL)
    assert root.level == before
    assert list(console.progress(["a"], "step", label=str)) == ["a"]
    assert capsys.readouterr().err == "step 1/1 a\n"
