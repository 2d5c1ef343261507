"""``pemma bench``: PEMMA against its baselines on the real IBSI PET/CT sites.

::

    pemma bench --quick                       # reduced run: UNETR only, a few steps, 2 test cases
    pemma bench                               # the full benchmark (both backbones, the CNN)
    pemma bench --device cuda --preset paper  # the same suite on a GPU (bf16 autocast)
    pemma bench --quick --fed-aggregation median  # the federated row under the server's median rule
    pemma bench --report-only benchmarks/results/bench-full.json --report-to BENCHMARKS.md

Writes into ``--out`` (default ``bench-out``): ``BENCHMARKS.md`` (every number in it comes
from this run), ``bench.json`` (everything measured, written after every phase) and
``plots/*.png``. What runs, in order: :mod:`benchmarks.runner`. The results behind the
project's ``BENCHMARKS.md`` are in ``benchmarks/results/``.

The heavy modules (torch, MONAI, Flower) are imported when the command runs, so that
``pemma bench --help`` does not load them. Progress lines go to stderr (``-q`` silences
them); the summary goes to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pemma_core.console import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pemma bench``."""
    from benchmarks.config import DEFAULT_SITES_DIR, default
    from pemma_core.aggregation import RULES
    from pemma_core.config.run import RunSettings
    from pemma_core.protocol import WIRE_DTYPES

    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default bench-out)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced run: UNETR only, a few steps, 2 test cases, "
                             "alignment audit of the named quirk cases only")
    parser.add_argument("--budget", choices=("standard", "long"), default="standard",
                        help="standard (default): UNETR rows 36 steps, Swin UNETR 12, one seed; long: 144 and 24 "
                             "steps, 3 seeds, the federated row also under the naive low-rank rule (hours on CPU: "
                             "start it in the background; --resume continues it if stopped)")
    parser.add_argument("--seeds", type=int,
                        help="train every row (not the CT backbone) at this many seeds, --seed, --seed + 1, ... "
                             "(default 1; --budget long: 3); Dice is the seed mean, targets' intervals cover seeds "
                             "and test cases")
    parser.add_argument("--data-root", type=Path,
                        help="IBSI data folder holding STS_XXX/ (default: $PEMMA_IBSI_ROOT or ../shared/data/ibsi-sts)")
    parser.add_argument("--sites-dir", type=Path, default=DEFAULT_SITES_DIR,
                        help="folder of site-a/b/c.yaml and test.yaml (default sites/ibsi)")
    parser.add_argument("--cache-dir", type=Path, help="preprocessing cache (default: beside the sites' caches, ibsi-bench)")
    parser.add_argument("--backbones", nargs="+", choices=("unetr", "swin-unetr"),
                        help="backbones (default: both; --quick: unetr)")
    parser.add_argument("--preset", choices=("tiny", "small", "paper"), default="small")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] (bf16 autocast)")
    parser.add_argument("--seed", type=int, default=RunSettings.default("seed"))
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: 1 when other jobs load the machine, i.e. 1-min load "
                             "average >= 1 at the start, else torch's default of one per core)")
    parser.add_argument("--pretrain-steps", type=int, help="CT backbone steps (all backbones)")
    parser.add_argument("--fed-rounds", type=int, help="federated rounds (all backbones)")
    parser.add_argument("--fed-local-steps", type=int,
                        help="steps per site per round; every row trains rounds x 3 x local steps (all backbones)")
    parser.add_argument("--cnn-steps", type=int, help="CNN steps (default: pretrain + row steps of the first backbone)")
    parser.add_argument("--no-cnn", action="store_true", help="skip the CNN reference row")
    parser.add_argument("--batch-size", type=int, default=default("batch_size"))
    parser.add_argument("--test-cases", type=int, help="evaluate on the first N test cases (default all 8; quick 2)")
    parser.add_argument("--train-cases", type=int, help="use the first N training cases of each site (default all)")
    parser.add_argument("--overlap", type=float, default=default("overlap"),
                        help=f"sliding-window overlap of evaluations (default {default('overlap')})")
    parser.add_argument("--speed-steps", type=int, help="timed steps per speed variant (default 3; quick 1)")
    parser.add_argument("--fed-engine", choices=("simulation", "inprocess"), default="simulation",
                        help="federated row on Flower's simulation engine (default) or in this process (tests)")
    parser.add_argument("--fed-aggregation", choices=RULES, default=default("fed_aggregation"),
                        help="how the server combines the federated row's site updates (default "
                             f"{default('fed_aggregation')}, the product default; recorded in the row)")
    parser.add_argument("--fed-wire-dtype", choices=tuple(WIRE_DTYPES), default=default("fed_wire_dtype"),
                        help="tensor dtype on the wire of the federated row (int8: blockwise absmax quantisation; "
                             f"default {default('fed_wire_dtype')}, the product default)")
    parser.add_argument("--fed-lora-aggregation", choices=("auto", "naive", "exact"),
                        default=default("fed_lora_aggregation"),
                        help="the federated row's low-rank pairs: exact (mean of the sites' products, re-factorised by "
                             "SVD), naive (each factor averaged), or auto (the product default: exact unless secure or "
                             "robust aggregation needs naive); the naive rule's error per round is recorded either way")
    parser.add_argument("--fed-secure-aggregation", action="store_true",
                        help="federated row with secure aggregation (the server sees only each group's sum)")
    parser.add_argument("--fed-dp-epsilon", type=float, default=0.0,
                        help="federated row with patient-level DP-SGD: each site's epsilon (delta 1e-5; default 0: none)")
    parser.add_argument("--lr-backbone", type=float, default=default("lr_backbone"),
                        help=f"CT backbone and CNN learning rate (default {default('lr_backbone'):g})")
    parser.add_argument("--lr-full", type=float, default=default("lr_full"),
                        help=f"full fine-tuning learning rate: CT-only, PET-only, early fusion (default {default('lr_full'):g})")
    parser.add_argument("--lr-adapter", type=float, default=default("lr_adapter"),
                        help=f"PEMMA adapter learning rate, centralized and federated (default {default('lr_adapter'):g}, "
                             "the adapt rate of 'pemma simulate')")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stopped run in --out, given the same options: its finished rows are kept, "
                             "its CT backbone reloaded, only what is missing runs (without it an existing run is refused)")
    parser.add_argument("--report-only", type=Path, metavar="RUN",
                        help="rewrite the markdown of a run from its bench.json (RUN: the output folder or the JSON file; "
                             "plots in plots/ beside it); runs nothing. A stopped run's report shows what it "
                             "reached and says what it lacks")
    parser.add_argument("--report-to", type=Path, metavar="MD",
                        help="with --report-only: write the markdown here (plot links made relative to it)")


def check_device(device: str) -> str | None:
    """None if ``device`` is usable, else the reason."""
    import torch

    if device == "cpu":
        return None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return (f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                    "CPU-only build or no GPU); run without --device, or on a GPU node with a CUDA build of torch")
        return None
    return f"--device {device}: expected cpu or cuda[:N]"


def rewrite_report(run_path: Path, report_to: Path | None = None) -> int:
    """``--report-only``: the markdown again from a run's bench.json (same numbers). A finished run's
    JSON gets the targets and the date of the rewrite; an unfinished one is only read (``--resume``
    continues it as it was), and its markdown says what it lacks."""
    from benchmarks.report import write_markdown
    from benchmarks.result_json import read_result, write_json
    from benchmarks.targets import targets

    source = run_path / "bench.json" if run_path.is_dir() else run_path
    results = read_result(source)  # missing or foreign: ValueError, exit status 1
    results["targets"] = targets(results)
    if results.get("complete"):
        results["report_rewritten"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write_json(source, results)
    target = (report_to or source.parent / "BENCHMARKS.md").expanduser().resolve()
    plots = Path(os.path.relpath(source.parent / "plots", target.parent))
    json_link = Path(os.path.relpath(source, target.parent)).as_posix()
    print(write_markdown(results, target, plots_link=plots.as_posix(), json_link=json_link))
    return 0


def run(args: argparse.Namespace) -> int:
    """``pemma bench``: the run (or ``--report-only``); UsageError (exit status 2) on a bad option."""
    if args.report_only is not None:
        return rewrite_report(args.report_only.expanduser().resolve(), args.report_to)
    problem = check_device(args.device)
    if problem:
        raise UsageError(problem)
    from benchmarks.config import config_from_args
    from benchmarks.report import summary_lines
    from benchmarks.runner import Progress, run_bench

    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    command = "pemma bench " + " ".join(sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "bench" else [])
    # missing IBSI data: FileNotFoundError, status 1
    results = run_bench(config, command.strip(), Progress(), resume=args.resume)
    print("\n".join(summary_lines(results)))
    return 0
