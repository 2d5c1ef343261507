"""``pemma simulate``: a whole federation on this machine, on Flower's simulation engine.

With no argument it writes the default phantom federation (3 sites: CT, CT+PET,
CT+PET+EHR) into the run folder, runs ``pretrain-ct``, ``adapt`` then ``prognosis`` (the
Cox head, with the EHR branch of site-3, on the frozen adapters) through the same
ServerApp and ClientApp that ``flwr run .`` and a deployment use, prints one line per
round on stdout (``-q`` silences them, ``-v`` adds Flower's own log lines), and leaves the
run folder described in :mod:`server.run_dir` (adapters per round, backbone,
``metrics.json``, ``report.md`` with a Dice plot and a prediction overlay).
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

from pemma_core import console

# Options that set one run setting each: help, type and choices come from the settings
# model (pemma_core.config.run), and so do the defaults (an option not given is None).
SETTING_OPTIONS = (
    "backbone", "adapter", "preset", "rounds", "local_steps", "pretrain_rounds", "pretrain_steps", "prognosis_rounds",
    "prognosis_steps", "wire_dtype", "seed", "min_sites", "max_update_norm", "phantom_cases",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pemma_core.config.run import RunSettings

    parser.add_argument("--sites", nargs="+", type=Path, metavar="YAML",
                        help="site YAML files, one simulated site each (default: a phantom federation of 3 sites)")
    for name in SETTING_OPTIONS:
        parser.add_argument("--" + name.replace("_", "-"), **RunSettings.option(name))
    parser.add_argument("--backbone-file", type=Path, help=RunSettings.help("backbone-file"))
    parser.add_argument("--out", type=Path, help="run folder (default runs/sim-<date>-<time>)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last finished round (its settings, plus options given here)")
    parser.add_argument("--no-evaluate", action="store_true", help="skip: " + RunSettings.help("evaluate"))


def settings_from_args(args: argparse.Namespace) -> Any:
    """RunSettings from the options: the model's defaults < (resumed run's settings) < options given."""
    from pemma_core.config.run import RunSettings
    from server.run_dir import RunDir

    values: dict[str, Any] = {}
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
    values.update({name: getattr(args, name) for name in SETTING_OPTIONS if getattr(args, name) is not None})
    if args.sites:
        values["site_configs"] = ",".join(str(p.expanduser().resolve()) for p in args.sites)
    if args.backbone_file is not None:
        values["backbone_file"] = str(args.backbone_file.expanduser().resolve())
    if args.no_evaluate:
        values["evaluate"] = False
    if not values.get("site_configs") and "federation_dir" not in values:  # the phantom federation, in the run folder
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
    """Progress on stdout (the run's log; silent with ``-q``): one line per round (phase, round,
    wall time), one per site."""
    head = f"[{record.phase} round {record.round}] {record.wall_seconds:.1f} s"
    if "c-index" in record.train_metrics:
        head += f"  mean C-index {record.train_metrics['c-index']:.3f}"
    if record.eval_metrics:
        head += "  mean Dice " + ", ".join(f"{k.removeprefix('dice-')} {v:.3f}" for k, v in record.eval_metrics.items())
    if record.note:
        head += f"  ({record.note})"
    console.say(head, file=sys.stdout)
    for site in sorted(record.sites.values(), key=lambda s: s.name):
        console.say(f"    {site.summary()}", file=sys.stdout)


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
    from pemma_core.phantoms.coordination import ensure_phantom_federation
    from server.report import write_report
    from server.run_dir import RunDir
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
    console.say(f"pemma simulate: {len(sites)} sites, {settings.backbone}/{settings.preset} + {settings.adapter}, "
                f"{settings.pretrain_rounds} pretrain-ct + {settings.rounds} adapt + {settings.prognosis_rounds} "
                f"prognosis rounds -> {settings.run_dir}", file=sys.stdout)
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
        console.say(f"(no prediction overlay: {exc})")
    write_report(run, overlay)
    run.update_run_info(simulate_wall_seconds=time.perf_counter() - started)
    return run.path


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)  # a missing site YAML or run folder: FileNotFoundError, status 1
    except ValueError as exc:  # settings out of range or inconsistent
        raise console.UsageError(str(exc)) from exc
    started = time.perf_counter()
    path = simulate(settings, verbose=console.verbosity() >= console.VERBOSE)
    from server.report import overhead_share
    from server.run_dir import RunDir, phase_rounds

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
