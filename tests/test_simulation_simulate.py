"""`pemma simulate` end to end on Flower's simulation engine (Ray) and in process (the default),
then evaluate and predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from pemma_core.cli import main
from pemma_core.model.files import read_adapter_file

pytestmark = pytest.mark.slow  # Ray simulation engine

RUN_OPTIONS = ("--rounds", "2", "--pretrain-rounds", "1", "--local-steps", "1", "--pretrain-steps", "1", "--phantom-cases",
               "3", "--wire-dtype", "float16", "--prognosis-rounds", "1", "--prognosis-steps", "2")


# Both engines at one intra-op thread, whatever the machine's load: their numbers are compared.
PINNED_THREADS = {**os.environ, "OMP_NUM_THREADS": "1"}


def pemma(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pemma_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=PINNED_THREADS)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("simulate") / "run"
    done = pemma("simulate", *RUN_OPTIONS, "--engine", "ray", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[adapt round 2]" in done.stdout and "site-3" in done.stdout  # progress was shown
    assert "[prognosis round 3]" in done.stdout and "final prognosis C-index" in done.stdout
    return out


def test_run_folder_contract(run_dir: Path) -> None:
    for name in ("run.json", "metrics.json", "report.md", "backbone.safetensors", "plots/dice.png", "plots/overlay.png",
                 "adapters/round-0.safetensors", "adapters/round-1.safetensors", "adapters/round-2.safetensors",
                 "adapters/round-3.safetensors",
                 "federation/federation.yaml"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [(r["phase"], r["round"]) for r in metrics["rounds"]] == [("adapt", 1), ("adapt", 2), ("prognosis", 3)]
    assert [r["round"] for r in metrics["pretrain_rounds"]] == [1]
    prognosis = metrics["rounds"][-1]
    assert prognosis["aggregated"] and {s["name"]: s["examples"].keys() >= {"ehr"} for s in prognosis["sites"]} == {
        "site-1": False, "site-2": False, "site-3": True}
    for record in metrics["rounds"][:2]:
        assert record["wall_seconds"] > 0 and record["aggregated"]
        names = [s["name"] for s in record["sites"]]
        assert names == ["site-1", "site-2", "site-3"]
        for site in record["sites"]:
            assert site["bytes_up"] > 0 and site["train_seconds"] > 0
            assert set(site["dice"]) == ({"ct"} if site["name"] == "site-1" else {"ct", "pet", "ctpet"})
    _, metadata = read_adapter_file(run_dir / "adapters" / "round-2.safetensors")
    provenance = json.loads(metadata["provenance"])
    assert provenance["round"] == 2 and provenance["sites"] == ["site-1", "site-2", "site-3"]
    assert metadata["fingerprint"] == metrics["run"]["fingerprint"]
    report = (run_dir / "report.md").read_text()
    assert "plots/dice.png" in report and "plots/overlay.png" in report and "## prognosis" in report


def test_evaluate_and_predict(run_dir: Path, tmp_path: Path) -> None:
    sites = sorted(str(p) for p in (run_dir / "federation").glob("site-*/site.yaml"))
    out_json = tmp_path / "eval.json"
    assert main(["evaluate", "--run", str(run_dir), "--sites", *sites, "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert set(result["sites"]) == {"site-1", "site-2", "site-3"} and set(result["sites"]["site-2"]) == {"ct", "pet", "ctpet"}
    case = next((run_dir / "federation" / "site-2" / "cases").iterdir())
    mask = tmp_path / "mask.nii.gz"
    assert main(["predict", "--run", str(run_dir), "--ct", str(case / "ct.nii.gz"), "--pet", str(case / "pet.nii.gz"),
                 "--out", str(mask)]) == 0
    ct, written = nib.load(str(case / "ct.nii.gz")), nib.load(str(mask))
    assert written.shape == ct.shape and (written.affine == ct.affine).all()
    assert "risk" in json.loads((tmp_path / "mask.risk.json").read_text())  # the run has a survival head


def test_resume_takes_the_run_settings_and_the_options_given(tmp_path: Path) -> None:
    import argparse

    from pemma_core.config.run import RunSettings
    from simulation import simulate

    run = tmp_path / "run"
    run.mkdir()
    saved = RunSettings(run_dir=str(run), rounds=2, seed=7, wire_dtype="float16", local_steps=3)
    (run / "run.json").write_text(json.dumps(saved.to_json()))
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    settings = simulate.settings_from_args(parser.parse_args(["--resume", str(run), "--rounds", "4"]))
    assert settings.resume and settings.rounds == 4 and settings.run_dir == str(run.resolve())
    assert (settings.seed, settings.wire_dtype, settings.local_steps) == (7, "float16", 3)
    fresh = simulate.settings_from_args(parser.parse_args(["--out", str(tmp_path / "new"), "--adapter", "dora"]))
    assert not fresh.resume and fresh.adapter == "dora" and fresh.rounds == RunSettings.default("num-server-rounds")


def test_ctrl_c_ends_the_simulation_at_once_and_points_at_resume(tmp_path: Path) -> None:
    """Flower would finish the whole run after Ctrl-C (its ServerApp thread is not a daemon);
    pemma's handler exits at once with 130 and says how to continue."""
    code = (
        "import os, signal, time\n"
        "from simulation.simulate import _stop_on_interrupt\n"
        f"signal.signal(signal.SIGINT, _stop_on_interrupt({str(tmp_path)!r}))\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
        "print('still running')\n"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130
    assert "still running" not in proc.stdout
    assert f"pemma simulate --resume {tmp_path}" in proc.stderr


def test_the_in_process_engine_ends_where_flowers_simulation_engine_ends(run_dir: Path, tmp_path: Path) -> None:
    import numpy as np

    out = tmp_path / "run"
    # The default engine (in process), one site at a time as on Ray: with the same intra-op threads the
    # numbers agree; another thread count sums in another order, which Adam's first steps amplify.
    # (More workers change nothing else: test_simulation_federation's bit-for-bit test.)
    done = pemma("simulate", *RUN_OPTIONS, "--site-workers", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ray_rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    here_rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [(r["phase"], r["round"], r["aggregated"]) for r in here_rounds] == [
        (r["phase"], r["round"], r["aggregated"]) for r in ray_rounds]
    ray_adapters, _ = read_adapter_file(run_dir / "adapters" / "round-2.safetensors")
    here_adapters, _ = read_adapter_file(out / "adapters" / "round-2.safetensors")
    assert ray_adapters.keys() == here_adapters.keys()
    for name, tensor in ray_adapters.items():  # the same apps and messages: the same numbers
        np.testing.assert_allclose(here_adapters[name].numpy(), tensor.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
