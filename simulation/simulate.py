"""``pemma simulate``: a whole federation on this machine, on Flower's simulation engine.

With no argument it writes the default phantom federation (3 sites: CT, CT+PET,
CT+PET+EHR) into the run folder, runs ``pretrain-ct``, ``adapt`` then ``prognosis`` (the
Cox head, with the EHR branch of site-3, on the frozen adapters) through the same
ServerApp and ClientApp that ``flwr run .`` and a deployment use, prints one line per
round, and leaves the run folder described in :mod:`server.run_dir` (adapters per
round, backbone, ``metrics.json``, ``report.md`` with a Dice plot and a prediction
overlay).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

HELP = "run a federation on this machine (Flower simulation engine): pretrain-ct, adapt, prognosis, with a report"

# Demo-sized defaults for `pemma simulate` (the run config in pyproject.toml keeps its own).
SIMULATE_DEFAULTS: dict[str, Any] = {
    "rounds": 5,
    "local_steps": 10,
    "pretrain_rounds": 3,
    "pretrain_steps": 10,
    "phantom_cases": 6,
    "prognosis_rounds": 2,
    "prognosis_steps": 10,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sites", nargs="+", type=Path, metavar="YAML",
                        help="site YAML files, one simulated site each (default: a phantom federation of 3 sites)")
    parser.add_argument("--backbone", choices=("unetr", "swin-unetr"), help="CT backbone (default unetr)")
    parser.add_argument("--adapter", choices=("lora", "dora"), help="adapter (default lora)")
    parser.add_argument("--preset", choices=("tiny", "small", "paper"), help="model size (default tiny)")
    parser.add_argument("--rounds", type=int, help=f"adapt rounds (default {SIMULATE_DEFAULTS['rounds']})")
    parser.add_argument("--local-steps", type=int, help=f"steps per site per adapt round (default {SIMULATE_DEFAULTS['local_steps']})")
    parser.add_argument("--pretrain-rounds", type=int,
                        help=f"pretrain-ct rounds (default {SIMULATE_DEFAULTS['pretrain_rounds']}; ignored with --backbone-file)")
    parser.add_argument("--pretrain-steps", type=int, help=f"steps per site per pretrain-ct round (default {SIMULATE_DEFAULTS['pretrain_steps']})")
    parser.add_argument("--prognosis-rounds", type=int,
                        help=f"prognosis rounds after adapt (default {SIMULATE_DEFAULTS['prognosis_rounds']}; 0: none)")
    parser.add_argument("--prognosis-steps", type=int,
                        help=f"steps per site per prognosis round (default {SIMULATE_DEFAULTS['prognosis_steps']})")
    parser.add_argument("--wire-dtype", choices=("float32", "float16"), help="tensor dtype on the wire (default float32)")
    parser.add_argument("--seed", type=int, help="seed (default 0)")
    parser.add_argument("--min-sites", type=int, help="fewest accepted replies for a round to aggregate (default 2)")
    parser.add_argument("--max-update-norm", type=float, help="reject updates farther than this from the global tensors (default: no bound)")
    parser.add_argument("--phantom-cases", type=int, help=f"cases per phantom site (default {SIMULATE_DEFAULTS['phantom_cases']})")
    parser.add_argument("--backbone-file", type=Path, help="adapt this pemma backbone file instead of pretraining one")
    parser.add_argument("--out", type=Path, help="run folder (default runs/sim-<date>-<time>)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last finished round (its settings, plus options given here)")
    parser.add_argument("--no-evaluate", action="store_true", help="skip the federated evaluation after each round")
    parser.add_argument("--verbose", action="store_true", help="show Flower's own log lines")


def settings_from_args(args: argparse.Namespace) -> Any:
    """RunSettings from the options: defaults < (resumed run's settings) < options given."""
    from server.run_dir import RunDir
    from server.settings import RunSettings

    values: dict[str, Any] = dict(SIMULATE_DEFAULTS)
    if args.resume is not None:
        run = RunDir(args.resume)
        saved = run.read_json(run.run_json, None)
        if saved is None:
            raise FileNotFoundError(f"cannot resume: {run.run_json} does not exist")
        saved.pop("model_spec", None)
        values.update(saved)
        values["run_dir"] = str(run.path)
        values["resume"] = True
    else:
        out = args.out or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
        values["run_dir"] = str(Path(out).expanduser().resolve())
    given = {
        "backbone": args.backbone, "adapter": args.adapter, "preset": args.preset, "rounds": args.rounds,
        "local_steps": args.local_steps, "pretrain_rounds": args.pretrain_rounds, "pretrain_steps": args.pretrain_steps,
        "wire_dtype": args.wire_dtype, "seed": args.seed, "min_sites": args.min_sites,
        "max_update_norm": args.max_update_norm, "phantom_cases": args.phantom_cases,
        "prognosis_rounds": args.prognosis_rounds, "prognosis_steps": args.prognosis_steps,
    }
    values.update({k: v for k, v in given.items() if v is not None})
    if args.sites:
        values["site_configs"] = ",".join(str(p.expanduser().resolve()) for p in args.sites)
    if args.backbone_file is not None:
        values["backbone_file"] = str(args.backbone_file.expanduser().resolve())
    if args.no_evaluate:
        values["evaluate"] = False
    if not values.get("site_configs") and not values.get("federation_dir"):  # the phantom federation's folder
        values["federation_dir"] = str(Path(values["run_dir"]) / "federation")
    settings = RunSettings(**values)
    missing = [p for p in settings.site_config_list() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"site config(s) not found: {', '.join(map(str, missing))}")
    return settings


def _quiet_flower(verbose: bool) -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning
    if not verbose:  # progress comes from print_round; warnings (rejected sites...) still show
        flwr_logger = logging.getLogger("flwr")
        flwr_logger.setLevel(logging.WARNING)
        # We know: this is the Python entry point of Flower's simulation engine; `flwr run .` is the CLI one.
        flwr_logger.addFilter(lambda record: "`run_simulation` function is deprecated" not in record.getMessage())


def print_round(record: Any) -> None:
    """Progress: one line per round (phase, round, wall time), one per site."""
    head = f"[{record.phase} round {record.round}] {record.wall_seconds:.1f} s"
    if "c-index" in record.train_metrics:
        head += f"  mean C-index {record.train_metrics['c-index']:.3f}"
    if record.eval_metrics:
        head += "  mean Dice " + ", ".join(f"{k.removeprefix('dice-')} {v:.3f}" for k, v in record.eval_metrics.items())
    if record.note:
        head += f"  ({record.note})"
    print(head, flush=True)
    for site in sorted(record.sites.values(), key=lambda s: s.name):
        line = f"    {site.name:<10} {site.status:<8}"
        if site.loss is not None:
            line += f" loss {site.loss:.3f}  train {site.train_seconds:.1f} s  up {site.bytes_up / 1024:.0f} KiB"
        if site.dice:
            line += "  Dice " + " ".join(f"{m} {v:.3f}" for m, v in site.dice.items())
        if site.c_index is not None:
            line += f"  C-index {site.c_index:.3f}"
        if site.reason:
            line += f"  {site.reason[:120]}"
        print(line, flush=True)


def _stop_on_interrupt(run_dir: str | Path) -> Callable[[int, Any], None]:
    """A SIGINT handler that ends the process now. Flower runs the ServerApp in a non-daemon
    thread and, on Ctrl-C, waits for it to finish the whole run; every file of the run
    folder is replaced atomically after each round, so stopping mid-round loses only that
    round, and ``--resume`` continues from the last finished one."""

    def handler(signum: int, frame: Any) -> None:
        print(f"\npemma simulate: interrupted; finished rounds are in {run_dir} "
              f"(continue with: pemma simulate --resume {run_dir})", file=sys.stderr, flush=True)
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
        os._exit(128 + signum)

    return handler


def simulate(settings: Any, verbose: bool = False) -> Path:
    """Run ``settings`` on Flower's simulation engine; returns the run folder."""
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from pemma_core.phantoms import ensure_phantom_federation
    from server.run_dir import RunDir, write_report
    from server.server_app import make_server_app
    from simulation.predict import write_overlay

    _quiet_flower(verbose)
    # The sites are known before Flower starts: one simulated SuperNode per site YAML (the
    # phantom federation is written here, by the simulation, never by the server).
    sites = settings.site_config_list() or ensure_phantom_federation(
        settings.resolved_federation_dir(), settings.phantom_sites, settings.phantom_cases, settings.seed
    )
    settings.site_configs = ",".join(str(p) for p in sites)
    overrides = settings.to_run_config()
    cpus = max(1, os.cpu_count() or 1)
    started = time.perf_counter()
    print(f"pemma simulate: {len(sites)} sites, {settings.backbone}/{settings.preset} + {settings.adapter}, "
          f"{settings.pretrain_rounds} pretrain-ct + {settings.rounds} adapt + {settings.prognosis_rounds} prognosis rounds "
          f"-> {settings.run_dir}", flush=True)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGINT, _stop_on_interrupt(settings.run_dir)) if in_main_thread else None
    try:
        run_simulation(
            server_app=make_server_app(overrides, progress=print_round),
            client_app=make_client_app(overrides),
            num_supernodes=len(sites),
            # One site at a time, each with every core: no oversubscription, reproducible timing.
            backend_config={
                "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": verbose},
            },
            verbose_logging=verbose,
        )
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    run = RunDir(settings.run_dir)
    if not run.metrics()["rounds"]:
        raise RuntimeError(f"the simulation ended without finishing a round; see the log above (run folder {run.path})")
    overlay = None
    try:
        overlay = write_overlay(run, sites)
    except Exception as exc:  # the report stays useful without the picture
        print(f"(no prediction overlay: {exc})", file=sys.stderr)
    write_report(run, overlay)
    run.update_run_info(simulate_wall_seconds=time.perf_counter() - started)
    return run.path


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pemma simulate: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    path = simulate(settings, verbose=args.verbose)
    from server.run_dir import RunDir, overhead_share, phase_rounds

    metrics = RunDir(path).metrics()
    last = phase_rounds(metrics, "adapt")[-1]
    share = overhead_share(metrics)
    print(f"\ndone in {time.perf_counter() - started:.0f} s: {path}")
    if last.get("eval_metrics"):
        print("final mean Dice: " + ", ".join(f"{k.removeprefix('dice-')} {v:.3f}" for k, v in last["eval_metrics"].items()))
    prognosis = phase_rounds(metrics, "prognosis")
    if prognosis:
        final = prognosis[-1]
        per_site = ", ".join(f"{s['name']} {s['c_index']:.3f}" for s in final["sites"] if s.get("c_index") is not None)
        mean = final.get("train_metrics", {}).get("c-index")
        print("final prognosis C-index (held-out splits): " + (per_site or "none computable")
              + (f"; mean {mean:.3f}" if mean is not None else ""))
    if share.get("rounds"):
        print(f"time outside local training: {share['overhead_share']:.0%} of the adapt rounds' train wall time")
    print(f"report: {path / 'report.md'}")
    return 0
