"""How far secure aggregation moves a run from the plain one, against a control (BENCHMARKS.md,
"Secure aggregation: the result").

Three runs of the default phantom federation (``pemma simulate``'s settings, no prognosis),
in this process on :class:`simulation.inprocess.InProcessGrid` (deterministic, no Ray):

* ``plain``: the product defaults;
* ``secure``: ``secure-aggregation = true``;
* ``nudged`` (the control): plain, but every aggregated global tensor moved by one float32
  ulp (``np.nextafter`` towards +inf) after each round of every phase (secure aggregation
  runs in every phase too): the smallest change any different arithmetic could make.

Per adapt round: ``||run - plain|| / ||plain - initial||`` over all adapter tensors. The
pretrain-ct rounds before them already start from different backbones; every round adds what
local training makes of a tiny difference in the tensors it starts from.

    python -m benchmarks.secure_gap --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from benchmarks.many_sites import machine
from client.client_app import make_client_app
from pemma_core.config.run import RunSettings
from pemma_core.model.files import read_adapter_file
from pemma_core.phantoms.coordination import ensure_phantom_federation
from server.run_dir import RunDir, dice_metrics
from server.server_app import run_federation
from server.strategy import PemmaStrategy
from simulation.inprocess import InProcessGrid


def _run(out: Path, federation_dir: Path, **changes: Any) -> RunDir:
    settings = RunSettings(run_dir=str(out), federation_dir=str(federation_dir), prognosis_rounds=0, **changes)
    sites = ensure_phantom_federation(federation_dir, settings.phantom_sites, settings.phantom_cases, settings.seed)
    settings.site_configs = ",".join(map(str, sites))
    grid = InProcessGrid(make_client_app(), [{"partition-id": i, "num-partitions": len(sites)} for i in range(len(sites))],
                         settings.to_run_config())
    return run_federation(grid, settings, progress=None)


def _nudged_aggregate(original):
    def aggregate_train(self, server_round, replies):
        out = original(self, server_round, replies)
        if out[0] is not None:  # every phase, as secure aggregation
            self.global_state = {k: np.nextafter(v, np.float32(np.inf)).astype(v.dtype) for k, v in self.global_state.items()}
        return out

    return aggregate_train


def adapters(run: RunDir, round_: int) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in read_adapter_file(run.checkpoint("adapt", round_))[0].items()}


def gap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> float:
    num = np.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in b))
    den = np.sqrt(sum(float(np.sum((b[k] - start[k]) ** 2)) for k in b))
    return num / den


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.secure_gap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/secure-gap"))
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    federation = out / "federation"
    seconds = {}
    runs = {}
    for name, changes in (("plain", {}), ("secure", {"secure_aggregation": True}), ("nudged", {})):
        start = time.perf_counter()
        if name == "nudged":
            with mock.patch.object(PemmaStrategy, "aggregate_train", _nudged_aggregate(PemmaStrategy.aggregate_train)):
                runs[name] = _run(out / name, federation, **changes)
        else:
            runs[name] = _run(out / name, federation, **changes)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    rounds = RunSettings().rounds
    initial = adapters(runs["plain"], 0)
    rows = []
    for r in range(1, rounds + 1):
        plain = adapters(runs["plain"], r)
        rows.append({"round": r, "secure": gap(adapters(runs["secure"], r), plain, initial),
                     "nudged": gap(adapters(runs["nudged"], r), plain, initial)})
    dice = {name: dice_metrics(run.metrics()["rounds"][-1].get("eval_metrics", {})) for name, run in runs.items()}
    result = {"machine": machine(), "seconds": seconds, "rounds": rows, "final_dice": dice}
    (out / "secure-gap.json").write_text(json.dumps(result, indent=2))
    print("| adapt round | secure vs plain | control (1 ulp) vs plain |\n|---|---|---|")
    for row in rows:
        print(f"| {row['round']} | {row['secure']:.2e} | {row['nudged']:.2e} |")
    print("final Dice:", json.dumps(dice))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
