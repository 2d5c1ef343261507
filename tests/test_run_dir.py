"""The run folder's segments (interrupted and resumed runs), the report's robustness and
privacy sections, and SIGTERM ending `pemma simulate` like Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import server.run_dir as run_dir_module
from server.report import one_line, round_ranges, segments_summary, small_aggregates, status_counts, write_report
from server.run_dir import RunDir, run_segments, total_wall_seconds

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """The run folder's clock, moved by hand: ``clock[0] += timedelta(...)``."""
    now = [datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)]
    monkeypatch.setattr(run_dir_module, "_now", lambda: now[0])
    return now


def finish_round(run: RunDir, phase: str, number: int) -> None:
    """A finished round: its checkpoint file, then its metrics entry."""
    path = run.checkpoint(phase, number)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    run.record_round({"phase": phase, "round": number, "sites": []})


def test_segments_of_an_interrupted_then_resumed_run(tmp_path: Path, clock: list[datetime]) -> None:
    run = RunDir(tmp_path)
    run.start_segment(None)
    finish_round(run, "pretrain-ct", 1)
    clock[0] += timedelta(seconds=10)
    finish_round(run, "adapt", 1)
    clock[0] += timedelta(seconds=5)
    finish_round(run, "adapt", 2)
    clock[0] += timedelta(seconds=30)  # killed mid-round 3: these seconds are lost with the round
    first = run_segments(run.metrics())
    assert [(s["wall_seconds"], s["ended"], s["resumed_after"]) for s in first] == [(15.0, "interrupted", None)]

    clock[0] += timedelta(hours=1)  # the time between the segments is nobody's
    assert run.finished_rounds() == {"pretrain-ct": 1, "adapt": 2}
    run.start_segment(run.finished_rounds())
    clock[0] += timedelta(seconds=4)
    finish_round(run, "adapt", 3)
    clock[0] += timedelta(seconds=3)
    run.finish_segment()
    segments = run_segments(run.metrics())
    assert [(s["wall_seconds"], s["ended"]) for s in segments] == [(15.0, "interrupted"), (7.0, "finished")]
    assert segments[1]["resumed_after"] == {"pretrain-ct": 1, "adapt": 2}
    assert datetime.fromisoformat(segments[1]["started"]) > datetime.fromisoformat(segments[0]["started"])
    assert total_wall_seconds(run.metrics()) == 22.0
    assert segments_summary(run.metrics()) == "wall time 22 s over 2 segments; interrupted after adapt round 2, resumed"
    clock[0] += timedelta(seconds=50)
    run.record_round({"phase": "adapt", "round": 3, "sites": []})  # a finished segment's time stays
    assert run_segments(run.metrics())[1]["wall_seconds"] == 7.0


def test_segment_edge_cases(tmp_path: Path, clock: list[datetime]) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(RuntimeError, match="no run segment to finish"):
        run.finish_segment()
    # A hand-written (or older) segment without "ended" reads as interrupted; no segments: the run's wall_seconds.
    run.update_run_info(wall_seconds=12.5)
    assert total_wall_seconds(run.metrics()) == 12.5 and segments_summary(run.metrics()) == "wall time 12 s"
    run.update_run_info(segments=[{"started": clock[0].isoformat(), "wall_seconds": 3.0},
                                  {"started": clock[0].isoformat(), "wall_seconds": 2.0, "resumed_after": {}}])
    assert [s["ended"] for s in run_segments(run.metrics())] == ["interrupted", "interrupted"]
    assert segments_summary(run.metrics()) == ("wall time 5 s over 2 segments; interrupted before any finished round, "
                                               "resumed; the last segment was interrupted")
    assert segments_summary({"run": {}}) is None


# ----------------------------------------------------------------------------- report

RED = "\x1b[31m"


def site(name: str, status: str = "ok", reason: str = "", **extra) -> dict:
    out = {"name": name, "node_id": int(name[-1]), "status": status, "loss": 0.4, "examples": {}, "dice": {}}
    if reason:
        out["reason"] = reason
    return out | extra


def adapt_round(number: int, sites: list[dict], contributors: dict[str, list[str]] | None) -> dict:
    out = {"phase": "adapt", "round": number, "wall_seconds": 2.0, "aggregated": True, "note": "", "sites": sites}
    return out | ({"contributors": contributors} if contributors is not None else {})


@pytest.fixture()
def robust_run(tmp_path: Path) -> RunDir:
    """A run whose strategy clipped, rejected and lost replies, with groups formed by 1 and 2 sites."""
    run = RunDir(tmp_path / "run")
    both = {"shared": ["site-1", "site-2", "site-3"], "ct": ["site-1", "site-2", "site-3"], "pet": ["site-2", "site-3"]}
    metrics = {
        "run": {
            "sites": [{"name": "site-1", "node_id": 1, "declared": {"ct": 3, "pet": 0, "ehr": 0, "survival": 3}},
                      {"name": "site-2", "node_id": 2, "declared": {"ct": 4, "pet": 4, "ehr": 0, "survival": 4}},
                      {"name": "site-2", "node_id": 4, "declared": {"ct": 9, "pet": 9, "ehr": 9, "survival": 9}},
                      {"name": "site-3", "node_id": 3, "declared": {"ct": 5, "pet": 5, "ehr": 5, "survival": 5}}],
            "duplicate_names": {"site-2": [2, 4]},
            "ehr_stats": [{"site": "site-1", "status": "none", "reason": ""},
                          {"site": "site-3", "status": "rejected", "reason": f"{RED}centred_sum_sq is negative\x1b[0m"}],
            "adversaries": {"site-1": "scale"},
            "segments": [{"started": "2025-03-01T12:00:00+00:00", "wall_seconds": 100.0, "resumed_after": None,
                          "ended": "interrupted"},
                         {"started": "2025-03-01T13:00:00+00:00", "wall_seconds": 112.0,
                          "resumed_after": {"pretrain-ct": 1, "adapt": 3}, "ended": "finished"}],
        },
        "pretrain_rounds": [],
        "rounds": [
            adapt_round(1, [site("site-1", "clipped", "update norm 9.1 > 1.0", clip_factor=0.11),
                            site("site-2"), site("site-3")], both),
            adapt_round(2, [site("site-1", "rejected", f"{RED}non-finite\x1b[0m values in\n 'lora'"),
                            site("site-2"), site("site-3", "failed", "RuntimeError: disk | full\nTraceback ...")],
                        {"shared": ["site-2"], "pet": ["site-2", "site-3"]}),
            adapt_round(3, [site("site-1"), site("site-2"), site("site-3")], both),
            {"phase": "prognosis", "round": 4, "aggregated": True, "sites": [site("site-3")],
             "contributors": {"prognosis": ["site-1", "site-2", "site-3"], "ehr": ["site-3"]}},
        ],
    }
    run.write_json(run.metrics_json, metrics)
    run.write_json(run.run_json, {"seed": 0, "model_spec": {"backbone": "unetr", "preset": "tiny"}})
    return run


def section(report: str, title: str) -> str:
    start = report.index(f"## {title}\n")
    end = report.find("\n## ", start + 1)
    return report[start:] if end < 0 else report[start:end]


def test_report_robustness_privacy_sites_and_failures(robust_run: RunDir) -> None:
    report = write_report(robust_run).read_text()
    assert "\x1b" not in report
    assert "Wall time 212 s over 2 segments; interrupted after adapt round 3, resumed." in report

    sites = section(report, "Sites")
    assert "| site-3 | 3 | 5 | 5 | 5 | 5 |" in sites and "| site-1 | 1 | 3 | 0 | 0 | 3 |" in sites
    assert sites.count("site-2 **(duplicate name)**") == 2 and "**duplicate name** site-2: claimed by nodes 2, 4" in sites

    robustness = section(report, "Robustness")
    assert "Simulated adversaries: site-1 (scale)" in robustness
    assert "| phase | ok | clipped | rejected | failed |" in robustness
    assert "| adapt | 6 | 1 | 1 | 1 |" in robustness and "| prognosis | 1 | 0 | 0 | 0 |" in robustness
    assert "| adapt | 1 | site-1 | clipped (x0.11) | update norm 9.1 > 1.0 |" in robustness
    assert "| adapt | 2 | site-1 | rejected | non-finite values in 'lora' |" in robustness  # one line, no colour
    assert "| adapt | 2 | site-3 | failed | RuntimeError: disk \\| full Traceback ... |" in robustness
    assert robustness.count("| adapt |") == 1 + 3  # the counts row and the three non-ok replies

    privacy = section(report, "Privacy")
    assert ("group pet aggregated from 2 sites (site-2, site-3) in adapt rounds 1-3: each of them can subtract its own "
            "update and recover the other's") in privacy
    assert "group shared aggregated from 1 site (site-2) in adapt round 2: the aggregate is that site's own update" in privacy
    assert "group ehr aggregated from 1 site (site-3) in prognosis round 4" in privacy
    assert "group ct" not in privacy and "group prognosis" not in privacy  # 3 sites each
    assert "| site-3 | rejected | centred_sum_sq is negative |" in privacy and "| site-1 | none | - |" in privacy

    failures = section(report, "Failures")
    assert "| site | phase | round | cause |" in failures
    assert "| site-3 | adapt | 2 | RuntimeError: disk \\| full Traceback ... |" in failures and failures.count("| site-") == 1
    assert "clipped (x0.11): update norm 9.1 > 1.0" in section(report, "adapt")  # the per-round table too


def test_report_of_an_older_run_without_the_new_fields(tmp_path: Path) -> None:
    """No statuses beyond ok/rejected, no contributors, sites as YAML paths: the report still says what it can."""
    run = RunDir(tmp_path)
    ct, pet = {"shared": 3, "ct": 3}, {"shared": 4, "ct": 4, "pet": 4}
    metrics = {"run": {"sites": ["/fed/site-1/site.yaml", "/fed/site-2/site.yaml"], "wall_seconds": 30.0},
               "rounds": [adapt_round(1, [site("site-1", examples=ct), site("site-2", examples=pet),
                                          site("site-3", "rejected", "bad", examples=pet)], None)]}
    run.write_json(run.metrics_json, metrics)
    report = write_report(run).read_text()
    assert "Wall time 30 s." in report and "`/fed/site-1/site.yaml`" in section(report, "Sites")
    privacy = section(report, "Privacy")
    assert "did not record contributors" in privacy
    assert "group pet aggregated from 1 site (site-2) in adapt round 1" in privacy  # the rejected site-3 is not counted
    assert "group shared aggregated from 2 sites (site-1, site-2) in adapt round 1" in privacy
    assert "## Failures" not in report and "EHR statistics" not in report
    assert status_counts(run.metrics()) == {"adapt": {"ok": 2, "clipped": 0, "rejected": 1, "failed": 0}}


def test_report_helpers() -> None:
    assert round_ranges([5, 1, 2, 3, 7, 8]) == "1-3, 5, 7-8" and round_ranges([4]) == "4" and round_ranges([]) == ""
    assert one_line(f"{RED}a\n  b | c\x1b[0m") == "a b \\| c"
    assert one_line("x" * 300, limit=10) == "xxxxxxx..."
    raised = ("ClientApp raised: Traceback (most recent call last):\n  File \"task.py\", line 3, in train\n"
              "    run()\nValueError: inner\n\nDuring handling...\nTraceback (most recent call last):\n"
              f"  File \"x.py\"\n{RED}RuntimeError\x1b[0m: disk full\n")
    assert one_line(raised) == "ClientApp raised: RuntimeError: disk full"
    metrics = {"rounds": [adapt_round(1, [], {"pet": ["a", "b"], "shared": ["a", "b", "c"]}),
                          adapt_round(2, [], {"pet": ["a", "c"]}), adapt_round(3, [], {"pet": ["a", "b"]})]}
    assert small_aggregates(metrics) == [{"phase": "adapt", "group": "pet", "sites": ["a", "b"], "rounds": [1, 3]},
                                         {"phase": "adapt", "group": "pet", "sites": ["a", "c"], "rounds": [2]}]
    assert small_aggregates(metrics, minimum=2) == []


# ----------------------------------------------------------------------------- SIGTERM


def test_simulate_stops_on_sigterm_and_sigint_and_restores_the_handlers(tmp_path: Path) -> None:
    from simulation import simulate

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with simulate._interrupts_stop(tmp_path):
        assert all(signal.getsignal(s) is not before[s] for s in before)
    assert {s: signal.getsignal(s) for s in before} == before
    code = (
        "import os, signal, time\n"
        "from simulation.simulate import _interrupts_stop\n"
        f"with _interrupts_stop({str(tmp_path)!r}):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "print('still running')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "still running" not in proc.stdout
    assert f"pemma simulate --resume {tmp_path}" in proc.stderr


def _wait_for_line(stream, marker: str, seen: list[str], found: threading.Event) -> None:
    """Collect ``stream``'s lines; set ``found`` at the first holding ``marker``, or at its end."""
    for line in stream:
        seen.append(line)
        if marker in line:
            found.set()
    found.set()


@pytest.mark.slow
def test_sigterm_then_resume_records_two_segments(tmp_path: Path) -> None:
    """`pemma simulate` killed with SIGTERM after its first adapt round says how to resume;
    the resumed run finishes and its run info has both segments, the first interrupted."""
    out = tmp_path / "run"
    # 4 steps x batch 2: the phantom sites' min_examples_per_round (8) refuses fewer
    options = ["--phantom-cases", "3", "--rounds", "3", "--local-steps", "4", "--pretrain-rounds", "1",
               "--pretrain-steps", "4", "--prognosis-rounds", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stderr_file = tmp_path / "stderr.txt"
    with stderr_file.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "pemma_core.cli", "simulate", *options, "--out", str(out)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                start_new_session=True)  # its own process group: Ray's helpers go with it
        try:
            seen: list[str] = []
            found = threading.Event()
            reader = threading.Thread(target=_wait_for_line, args=(proc.stdout, "[adapt round 1]", seen, found), daemon=True)
            reader.start()
            found.wait(timeout=600)
            assert any("[adapt round 1]" in line for line in seen), (
                "no adapt round line:\n" + "".join(seen[-40:]) + stderr_file.read_text()[-3000:])
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group it leads (Ray workers), by its own id
            except (ProcessLookupError, PermissionError):
                pass
    assert status == 128 + signal.SIGTERM, stderr_file.read_text()[-3000:]
    assert f"pemma simulate --resume {out.resolve()}" in stderr_file.read_text()

    done = subprocess.run([sys.executable, "-m", "pemma_core.cli", "simulate", "--resume", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, start_new_session=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    segments = run_segments(metrics)
    assert [s["ended"] for s in segments] == ["interrupted", "finished"]
    assert segments[0]["resumed_after"] is None and segments[1]["resumed_after"]["adapt"] >= 1
    assert all(s["wall_seconds"] > 0 for s in segments)
    assert [r["round"] for r in metrics["rounds"] if r["phase"] == "adapt"] == [1, 2, 3]
    assert "over 2 segments; interrupted after adapt round" in (out / "report.md").read_text()
