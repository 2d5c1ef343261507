"""Naive vs exact low-rank aggregation on the IBSI federated row: ``python -m benchmarks.lora_rules``.

Runs the bench's federated row (PEMMA-LoRA, three IBSI sites, standard budget, in-process
engine) once per ``RULE:SEED`` variant from one CT backbone, and evaluates every round's
global model on the test cases in mode ``ct`` as well as ``ctpet`` (the bench itself
evaluates ``ct`` only after the last round): the CT mode is where averaging the factors
separately shows, since only CT steps train the ``shared`` LoRA. Writes
``OUT/lora-rules.json``, adding to the variants already there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import cli as bench_cli
from benchmarks.config import config_from_args
from benchmarks.federated import run_federated
from benchmarks.rows import BackboneBench
from benchmarks.sites import load_test_batches, prepare_sites
from pemma_core.lora_aggregation import LORA_AGGREGATIONS
from pemma_core.model.files import load_backbone
from simulation.predict import load_run_model


def _variant(text: str) -> tuple[str, int]:
    rule, _, seed = text.partition(":")
    if rule not in LORA_AGGREGATIONS or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"expected RULE:SEED with RULE one of {', '.join(LORA_AGGREGATIONS)}, "
                                         f"got {text!r}")
    return rule, int(seed)


def run_variant(bench: BackboneBench, rule: str, seed: int) -> dict[str, Any]:
    """The federated row with ``rule`` at ``seed``; CT and CT+PET Dice after every round."""
    bench.config = dataclasses.replace(bench.config, fed_lora_aggregation=rule)
    row = run_federated(bench, seed=seed)
    per_round = []
    for record in row["per_round"]:
        model = load_run_model(Path(row["run_dir"]), record["round"])
        ct = bench.evaluate(model, ["ct"], f"{rule} seed {seed} round {record['round']}").dice["ct"]
        per_round.append({"round": record["round"], "ct": ct, "ctpet": record["dice"].get("ctpet"),
                          "lora_naive_error": record.get("lora_naive_error")})
    return {"rule": rule, "seed": seed, "dice": row["dice"], "per_round": per_round,
            "train_seconds": row["train_seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora_rules", description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", type=_variant, default=[_variant(v) for v in
                                                                          ("naive:1", "exact:1", "exact:0")],
                        metavar="RULE:SEED", help="default naive:1 exact:1 exact:0")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    bench_parser = argparse.ArgumentParser()
    bench_cli.add_arguments(bench_parser)
    config = config_from_args(bench_parser.parse_args([
        "--out", str(args.out), "--data-root", str(args.data_root), "--backbones", "unetr",
        "--threads", str(args.threads), "--fed-engine", "inprocess"]))
    torch.set_num_threads(args.threads)
    say = lambda text: print(time.strftime("%H:%M:%S"), text, flush=True)  # noqa: E731
    sites = prepare_sites(config, say)
    bench = BackboneBench(config, sites, "unetr", load_test_batches(sites.test), say)
    out_file = args.out / "lora-rules.json"
    results: dict[str, Any] = json.loads(out_file.read_text()) if out_file.exists() else {"variants": {}}
    if bench.backbone_file.exists():  # the variants of one study share one backbone
        bench.backbone, _ = load_backbone(bench.backbone_file)
    else:
        results["backbone"] = {"dice": bench.train_backbone()["dice"], "file": str(bench.backbone_file)}
    for rule, seed in args.variants:
        results["variants"][f"{rule}:{seed}"] = run_variant(bench, rule, seed)
        out_file.write_text(json.dumps(results, indent=1))
        say(f"wrote {out_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
