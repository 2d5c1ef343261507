"""``pemma bench``: PEMMA against its baselines on the real IBSI PET/CT sites.

::

    pemma bench --quick                       # reduced run, < 10 min on 2 CPU cores
    pemma bench                               # the full benchmark, < 60 min on 2 CPU cores
    pemma bench --device cuda --preset paper  # the same suite on a GPU (bf16 autocast)

Writes into ``--out`` (default ``bench-out``): ``BENCHMARKS.md`` (every number in it comes
from this run), ``bench.json`` (everything measured, written after every phase) and
``plots/*.png``. What runs, in order (details: :mod:`simulation.bench_core`,
:mod:`simulation.bench_speed`):

1. bench site YAMLs in ``OUT/sites`` (the IBSI sites of ``sites/ibsi``, plus pooled
   training sets), every case checked: the data layer's warnings and skipped cases, and
   an alignment audit of PET vs CT masks on the pipeline's grid (STS_019's header);
2. per backbone: the CT backbone (pooled CT), then CT-only, PET-only, early fusion,
   PEMMA-LoRA, PEMMA-DoRA (centralized) and PEMMA-LoRA federated (``pemma simulate``'s
   Flower simulation), each with the same steps and seed, evaluated on the test cases;
   then PEMMA-LoRA vs full fine-tuning speed and memory (fresh processes), the profile
   before/after pemma's module swaps, and sliding-window inference of one case;
3. the CNN reference (SegResNet) and data-loading times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HELP = "benchmark PEMMA vs its baselines on the IBSI PET/CT sites (Dice, size, upload, speed, memory) -> BENCHMARKS.md"

# Budgets (optimiser steps, batch 2), measured on the project's 2-core CPU machine (small
# preset, 1 thread, other jobs running): a UNETR step takes 1.8-2.1 s, a Swin UNETR step
# 5.8 s (PEMMA) to 9 s (full fine-tuning); evaluating one model in one mode on the 8 test
# cases (50 windows of 64^3) 20 s (UNETR) / 60 s (Swin UNETR). The full run took 54 min,
# --quick (UNETR only) 3-6 min. Evaluations, speed and memory runs are about half of it.
FULL_BUDGETS = {"unetr": (80, 3, 4), "swin-unetr": (24, 2, 2)}  # pretrain steps, fed rounds, fed local steps
QUICK_BUDGETS = {"unetr": (8, 1, 2), "swin-unetr": (4, 1, 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from simulation.bench_core import ADAPT_LR

    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default bench-out)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced run (< 10 min on 2 CPU cores): UNETR only, a few steps, 2 test cases, "
                             "alignment audit of the named quirk cases only")
    parser.add_argument("--data-root", type=Path,
                        help="IBSI data folder holding STS_XXX/ (default: $PEMMA_IBSI_ROOT or ../shared/data/ibsi-sts)")
    parser.add_argument("--sites-dir", type=Path, default=Path(__file__).resolve().parents[1] / "sites" / "ibsi",
                        help="folder of site-a/b/c.yaml and test.yaml (default sites/ibsi)")
    parser.add_argument("--cache-dir", type=Path, help="preprocessing cache (default: beside the sites' caches, ibsi-bench)")
    parser.add_argument("--backbones", nargs="+", choices=("unetr", "swin-unetr"),
                        help="backbones (default: both; --quick: unetr)")
    parser.add_argument("--preset", choices=("tiny", "small", "paper"), default="small")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] (bf16 autocast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: 1 when other jobs load the machine, i.e. 1-min load "
                             "average >= 1 at the start, else torch's default of one per core)")
    parser.add_argument("--pretrain-steps", type=int, help="CT backbone steps (all backbones)")
    parser.add_argument("--fed-rounds", type=int, help="federated rounds (all backbones)")
    parser.add_argument("--fed-local-steps", type=int,
                        help="steps per site per round; every row trains rounds x 3 x local steps (all backbones)")
    parser.add_argument("--cnn-steps", type=int, help="CNN steps (default: pretrain + row steps of the first backbone)")
    parser.add_argument("--no-cnn", action="store_true", help="skip the CNN reference row")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--test-cases", type=int, help="evaluate on the first N test cases (default all 8; quick 2)")
    parser.add_argument("--train-cases", type=int, help="use the first N training cases of each site (default all)")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap of evaluations (default 0.25)")
    parser.add_argument("--speed-steps", type=int, help="timed steps per speed variant (default 3; quick 1)")
    parser.add_argument("--fed-engine", choices=("simulation", "inprocess"), default="simulation",
                        help="federated row on Flower's simulation engine (default) or in this process (tests)")
    parser.add_argument("--lr-backbone", type=float, default=1e-3, help="CT backbone and CNN learning rate (default 1e-3)")
    parser.add_argument("--lr-full", type=float, default=5e-4,
                        help="full fine-tuning learning rate: CT-only, PET-only, early fusion (default 5e-4)")
    parser.add_argument("--lr-adapter", type=float, default=ADAPT_LR,
                        help=f"PEMMA adapter learning rate, centralized and federated (default {ADAPT_LR:g}, "
                             "the adapt rate of 'pemma simulate')")
    parser.add_argument("--report-only", type=Path, metavar="RUN",
                        help="rewrite the markdown of a finished run from its bench.json (RUN: the output folder or "
                             "the JSON file; plots in plots/ beside it); runs nothing")
    parser.add_argument("--report-to", type=Path, metavar="MD",
                        help="with --report-only: write the markdown here (plot links made relative to it)")


def config_from_args(args: argparse.Namespace) -> Any:
    from simulation.bench_core import BenchConfig, Budget

    budgets_table = QUICK_BUDGETS if args.quick else FULL_BUDGETS
    if not args.backbones:
        args.backbones = ["unetr"] if args.quick else ["unetr", "swin-unetr"]
    budgets = {}
    for name in args.backbones:
        pretrain, rounds, local = budgets_table[name]
        budgets[name] = Budget(
            pretrain_steps=args.pretrain_steps if args.pretrain_steps is not None else pretrain,
            fed_rounds=args.fed_rounds if args.fed_rounds is not None else rounds,
            fed_local_steps=args.fed_local_steps if args.fed_local_steps is not None else local,
        )
    for name, b in budgets.items():
        if min(b.pretrain_steps, b.fed_rounds, b.fed_local_steps) < 1:
            raise ValueError(f"{name}: pretrain steps, fed rounds and fed local steps must be >= 1 ({b})")
    first = budgets[args.backbones[0]]
    custom = any(v is not None for v in (args.pretrain_steps, args.fed_rounds, args.fed_local_steps, args.cnn_steps,
                                         args.test_cases, args.train_cases, args.speed_steps))
    if not 0.0 <= args.overlap < 1.0:
        raise ValueError(f"--overlap must be in [0, 1), got {args.overlap}")
    return BenchConfig(
        out=args.out.expanduser().resolve(),
        mode="custom" if custom or args.preset != "small" or args.fed_engine != "simulation" else ("quick" if args.quick else "full"),
        backbones=tuple(args.backbones),
        preset=args.preset,
        device=args.device,
        seed=args.seed,
        budgets=budgets,
        cnn_steps=args.cnn_steps if args.cnn_steps is not None else first.pretrain_steps + first.steps,
        batch_size=args.batch_size,
        lr_backbone=args.lr_backbone,
        lr_full=args.lr_full,
        lr_adapter=args.lr_adapter,
        chunk=2 if args.quick else 10,
        overlap=args.overlap,
        speed_steps=args.speed_steps if args.speed_steps is not None else (1 if args.quick else 3),
        test_cases=args.test_cases if args.test_cases is not None else (2 if args.quick else None),
        train_cases=args.train_cases,
        audit="named" if args.quick else "all",
        fed_engine=args.fed_engine,
        threads=args.threads,
        sites_dir=args.sites_dir.expanduser().resolve(),
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        cnn=not args.no_cnn,
    )


class Progress:
    """``[ elapsed] message`` lines on stdout, flushed."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.0f} s] {message}", flush=True)


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


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def environment(config: Any) -> dict[str, Any]:
    import monai
    import peft
    import torch

    return {
        "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
        "peft": peft.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "device": config.device,
        "cuda_device": torch.cuda.get_device_name(0) if config.device.startswith("cuda") else None,
        "load_average_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def run_bench(config: Any, command: str, say: Progress) -> dict[str, Any]:
    """The whole benchmark; returns (and keeps writing) the result dictionary."""
    import torch

    from pemma_core.model import ModelSpec
    from simulation import bench_core as core
    from simulation import bench_report as report
    from simulation import bench_speed as speed

    threads_before = torch.get_num_threads()
    if config.threads is None and config.device == "cpu" and os.getloadavg()[0] >= 1.0:
        # Shared cores: OpenMP threads of one process wait on each other while other jobs run;
        # one thread per process measured several times faster here (BENCHMARKS.md, threads).
        config.threads = 1
        config.threads_reason = f"auto: load average {os.getloadavg()[0]:.1f} at the start"
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run_bench(config, command, say)
    finally:
        torch.set_num_threads(threads_before)


def _run_bench(config: Any, command: str, say: Progress) -> dict[str, Any]:
    import torch

    from pemma_core.model import ModelSpec
    from simulation import bench_core as core
    from simulation import bench_report as report
    from simulation import bench_speed as speed

    config.out.mkdir(parents=True, exist_ok=True)
    json_path = config.out / "bench.json"
    started = time.perf_counter()
    results: dict[str, Any] = {"format": "pemma-bench/1", "command": command, "config": config.to_json(),
                               "environment": environment(config), "backbones": {}, "complete": False}
    budget_text = ", ".join(f"{k}: {b.pretrain_steps} backbone + {b.steps} steps per row" for k, b in config.budgets.items())
    say(f"pemma bench ({config.mode}): {', '.join(config.backbones)} / {config.preset} on {config.device}, "
        f"{torch.get_num_threads()} thread(s); {budget_text} -> {config.out}")

    sites = core.prepare_sites(config, say)
    results["data"] = {"counts": sites.counts, "warnings": sites.warnings, "skipped": sites.skipped,
                       "site_yamls": {p.stem: str(p) for p in (*sites.federation, sites.pooled_ct, sites.pooled_ctpet, sites.test)}}
    results["data"]["alignment"] = core.alignment_audit(config, sites, say)
    test_batches = core.load_test_batches(sites.test)
    results["data"]["test_cases"] = [str(b["case_id"][0]) for b in test_batches]
    write_json(json_path, results)

    overlays: dict[str, Any] = {}
    results["errors"] = []

    def guarded(phase: str, fn: Any, *fargs: Any) -> Any:
        """Run one phase; a failure is recorded (and reported) instead of ending the run."""
        try:
            return fn(*fargs)
        except Exception as exc:  # a long benchmark keeps what it measured
            import traceback

            say(f"FAILED {phase}: {type(exc).__name__}: {exc}")
            results["errors"].append({"phase": phase, "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()[-4000:]})
            return None

    for name in config.backbones:
        bench = core.BackboneBench(config, sites, name, test_batches, say)
        entry: dict[str, Any] = {"budget": {**config.budgets[name].__dict__, "steps": config.budgets[name].steps},
                                 "spec": bench.spec.to_dict(), "rows": []}
        results["backbones"][name] = entry
        entry["rows"].append(bench.train_backbone())  # everything else needs it: no guard
        write_json(json_path, results)
        for plan in core.PLANS:
            row = guarded(f"{name} {plan.row}", bench.run_row, plan)
            if row is not None:
                entry["rows"].append(row)
            write_json(json_path, results)
            if plan.row == "pemma-lora" and not overlays and bench.predictions:
                overlays = {"backbone": name, "predictions": bench.predictions}
        row = guarded(f"{name} pemma-lora-fed", bench.run_federated)
        if row is not None:
            entry["rows"].append(row)
        write_json(json_path, results)

        say_name = lambda t, n=name: say(f"{n} | {t}")  # noqa: E731
        batch = core.first_batch(sites.pooled_ctpet, bench.spec.roi_size, config.batch_size, config.seed)
        batch_file = config.out / f"speed-batch-{name}.pt"
        torch.save({"image": batch["image"], "label": batch["label"]}, batch_file)
        entry["speed"] = guarded(f"{name} speed", speed.speed_pair, bench.backbone_file, batch_file, config.device,
                                 config.speed_steps, config.threads, say_name)
        entry["profile"] = guarded(f"{name} profile", speed.profile_before_after, bench.backbone_file, batch,
                                   config.device, max(1, config.speed_steps - 1), say_name)
        largest = max(test_batches, key=lambda b: b["image"][0, 0].numel())
        entry["inference"] = guarded(f"{name} inference", speed.inference_timing, bench.backbone_file, largest,
                                     config.device, say_name)
        if name == "unetr" and (config.mode == "full" or config.device != "cpu"):
            # The memory and time targets at the paper's model size (UNETR only: a paper-size Swin UNETR
            # step takes minutes on CPU).
            entry["speed_paper"] = guarded(f"{name} speed (paper preset)", speed.paper_speed_pair, config.out, name,
                                           sites.pooled_ctpet, config.device, 2, config.threads, say_name)
        write_json(json_path, results)

    if config.cnn:
        cnn = guarded("cnn", core.run_cnn, config, sites, test_batches, say, config.backbones[0])
        if cnn is not None:
            results["cnn"] = cnn[0]
            if overlays:
                overlays["cnn"] = cnn[1]
    first = config.backbones[0]
    roi = ModelSpec(backbone=first, preset=config.preset).roi_size
    n_cases = 2 if config.mode == "quick" else 4
    results["loading"] = guarded("loading", speed.loading_timing, sites.pooled_ctpet, roi, config.batch_size,
                                 n_cases, 6, say)
    if config.device == "cpu":
        results["threads"] = guarded("threads", speed.threads_timing,
                                     Path(results["backbones"][first]["rows"][0]["file"]),
                                     core.first_batch(sites.pooled_ctpet, roi, config.batch_size, config.seed), 2, say)
    results["targets"] = report.targets(results)
    results["plots"] = guarded("plots", report.make_plots, results, config.out / "plots", test_batches, overlays) or {}
    results["environment"]["load_average_end"] = list(os.getloadavg())
    results["wall_seconds"] = time.perf_counter() - started
    results["complete"] = True
    write_json(json_path, results)
    report.write_markdown(results, config.out / "BENCHMARKS.md")
    say(f"done in {results['wall_seconds'] / 60:.1f} min: {config.out / 'BENCHMARKS.md'}, {json_path}")
    return results


def rewrite_report(run_path: Path, report_to: Path | None = None) -> int:
    """``--report-only``: the markdown again from a finished run's bench.json (same numbers)."""
    from simulation.bench_report import targets, write_markdown

    source = run_path / "bench.json" if run_path.is_dir() else run_path
    if not source.is_file():
        print(f"pemma bench: {source} does not exist", file=sys.stderr)
        return 2
    results = json.loads(source.read_text(encoding="utf-8"))
    if not results.get("complete"):
        print(f"pemma bench: {source} is from a run that did not finish", file=sys.stderr)
        return 2
    results["targets"] = targets(results)
    results["report_rewritten"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(source, results)
    target = (report_to or source.parent / "BENCHMARKS.md").expanduser().resolve()
    plots = Path(os.path.relpath(source.parent / "plots", target.parent))
    json_link = Path(os.path.relpath(source, target.parent)).as_posix()
    print(write_markdown(results, target, plots_link=plots.as_posix(), json_link=json_link))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.report_only is not None:
        return rewrite_report(args.report_only.expanduser().resolve(), args.report_to)
    problem = check_device(args.device)
    if problem:
        print(f"pemma bench: {problem}", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"pemma bench: {exc}", file=sys.stderr)
        return 2
    command = "pemma bench " + " ".join(sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "bench" else [])
    try:
        results = run_bench(config, command.strip(), Progress())
    except FileNotFoundError as exc:
        print(f"pemma bench: {exc}", file=sys.stderr)
        return 2
    from simulation.bench_report import summary_lines

    print("\n".join(summary_lines(results)))
    return 0
