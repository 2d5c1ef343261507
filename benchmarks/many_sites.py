"""Many simulated hospitals on one machine (BENCHMARKS.md, "Many sites on one machine").

For each N, one ``pemma simulate --phantom-sites N`` in a fresh process (16 phantom cases per
site, written by the simulation into its run folder): one pretrain-ct round, one adapt round with federated
evaluation, no prognosis, a few local steps. Measured per N from the run's ``metrics.json``
and by sampling the whole process tree (the simulate process, Ray and its workers):

* wall seconds of the adapt round (training, evaluation) and of the whole simulation;
* server seconds of the adapt round (validation + aggregation of the replies);
* the peak resident memory of the process tree (sum of RSS, sampled every 0.2 s).

Flower's simulation backend is sized to the machine (each site reserves every core, one
site trains at a time: :func:`simulation.simulate.backend_config`), not to N, so memory
should stay flat as N grows while wall time grows linearly.

    python -m benchmarks.many_sites --out benchmarks/results/many-sites            # N = 3, 8, 16, 32, 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from server.run_dir import dice_metrics

import psutil

DEFAULT_SITES = (3, 8, 16, 32, 64)
SAMPLE_SECONDS = 0.2


def tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and all its descendants (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_sampled(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak tree RSS bytes) of ``cmd``, its output in ``log``."""
    peak = 0
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss(proc.pid))
                done.wait(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            code = proc.wait()
        finally:
            done.set()
            sampler.join()
        return code, time.perf_counter() - start, peak


def one_n(n: int, out: Path, local_steps: int, seed: int) -> dict[str, Any]:
    """``pemma simulate --phantom-sites N`` (it writes the phantom federation into its run folder first); the row of the table."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run_dir = out / f"n{n}" / "run"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pemma_core.cli", "simulate", "--phantom-sites", str(n), "--out", str(run_dir),
           "--rounds", "1", "--pretrain-rounds", "1", "--prognosis-rounds", "0", "--local-steps", str(local_steps),
           "--pretrain-steps", str(local_steps), "--seed", str(seed)]
    code, wall, peak = run_sampled(cmd, out / f"n{n}" / "simulate.log", env)
    row: dict[str, Any] = {"sites": n, "exit": code, "simulate_wall_seconds": round(wall, 2), "peak_tree_rss_bytes": peak}
    metrics_file = run_dir / "metrics.json"
    if code == 0 and metrics_file.is_file():
        rounds = json.loads(metrics_file.read_text())["rounds"]
        adapt = [r for r in rounds if r["phase"] == "adapt"][-1]
        row.update({
            "adapt_round_wall_seconds": adapt["wall_seconds"],
            "adapt_train_wall_seconds": adapt["train_wall_seconds"],
            "server_seconds": adapt["aggregation_seconds"],
            "site_train_seconds_total": round(sum(s["train_seconds"] for s in adapt["sites"]), 3),
            "accepted": sum(1 for s in adapt["sites"] if s["status"] in ("ok", "clipped")),
            "dice": dice_metrics(adapt.get("eval_metrics", {})),
        })
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| sites | adapt round wall s | of which local training s | server s (validation + aggregation) | "
             "whole simulation s | peak memory MiB (process tree) | accepted |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "adapt_round_wall_seconds" not in r:
            lines.append(f"| {r['sites']} | failed (exit {r['exit']}) | | | {r['simulate_wall_seconds']:.0f} | "
                         f"{r['peak_tree_rss_bytes'] / 2**20:.0f} | |")
            continue
        lines.append(f"| {r['sites']} | {r['adapt_round_wall_seconds']:.1f} | {r['site_train_seconds_total']:.1f} | "
                     f"{r['server_seconds']:.3f} | {r['simulate_wall_seconds']:.0f} | "
                     f"{r['peak_tree_rss_bytes'] / 2**20:.0f} | {r['accepted']} of {r['sites']} |")
    return "\n".join(lines)


def machine() -> str:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores{', ' + model if model else ''}, " \
           f"{psutil.virtual_memory().total / 2**30:.0f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.many_sites", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/many-sites"))
    parser.add_argument("--sites", type=int, nargs="+", default=list(DEFAULT_SITES))
    parser.add_argument("--local-steps", type=int, default=4,
                        help="local steps per round (4: x batch 2 meets the sites' default floor of 8 examples)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sites:
        print(f"N = {n} ...", flush=True)
        rows.append(one_n(n, args.out, args.local_steps, args.seed))
        print(f"  {rows[-1]}", flush=True)
        (args.out / "sites.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    print(f"\nmachine: {machine()}\n\n{table(rows)}")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
