"""``pemma simulate``: a whole federation on this machine (in process, or on Flower's simulation engine).

With no argument it writes the default phantom federation (3 sites: CT, CT+PET,
CT+PET+EHR) into the run folder, runs ``pretrain-ct``, ``adapt`` then ``prognosis`` (the
Cox head, with the EHR branch of site-3, on the frozen adapters) through the same
ServerApp and ClientApp that ``flwr run .`` and a deployment use, prints one line per
round on stdout (``-q`` silences them, ``-v`` adds Flower's own log lines), and leaves the
run folder described in :mod:`server.run_dir` (adapters per round, backbone,
``metrics.json``, ``report.md`` with a Dice plot and a prediction overlay).

``--adversary SITE=KIND`` makes a simulated site misbehave (:mod:`simulation.adversary`),
to see what the server's checks make of it. Ctrl-C or SIGTERM ends the run at once;
``--resume RUN_DIR`` continues it from its last finished round.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pemma_core import console

# Options that set one run setting each: help, type and choices come from the settings
# model (pemma_core.config.run), and so do the defaults (an option not given is None).
SETTING_OPTIONS = (
    "backbone", "adapter", "preset", "rounds", "local_steps", "pretrain_rounds", "pretrain_steps", "prognosis_rounds",
    "prognosis_steps", "wire_dtype", "seed", "min_sites", "max_update_norm", "outlier_factor", "aggregation",
    "phantom_cases", "phantom_sites", "secure_max_dropouts", "secure_min_cohort", "dp_target_epsilon", "dp_delta",
    "dp_clip", "lora_aggregation", "server_optimizer", "server_lr", "lr", "pretrain_lr",
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
    parser.add_argument("--engine", choices=ENGINES, default="inprocess",
                        help="inprocess (default): every site in this process, --site-workers of them side by side; "
                             "ray: Flower's simulation engine (a Ray worker process per site, one site at a time)")
    parser.add_argument("--site-workers", type=_positive_int, metavar="N",
                        help="inprocess engine: sites that train and evaluate side by side, in threads (default: one "
                             "per site, at most two per CPU core; one when PyTorch sees a GPU: its kernels fill it)")
    parser.add_argument("--activation-checkpointing", action="store_true", default=None,
                        help=RunSettings.help("activation-checkpointing"))
    parser.add_argument("--secure-aggregation", action="store_true", default=None,
                        help=RunSettings.help("secure-aggregation"))
    from simulation.adversary import ADVERSARY_KINDS

    kinds = "; ".join(f"{kind}: {what}" for kind, what in ADVERSARY_KINDS.items())
    parser.add_argument("--adversary", action="append", metavar="SITE=KIND",
                        help=f"make simulated site SITE misbehave (repeatable, one kind per site). KIND is one of: {kinds}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def default_site_workers(n_sites: int, cores: int | None = None, gpu: bool | None = None) -> int:
    """Sites the in-process engine runs side by side: one per site, at most two per core (one
    site per core leaves a core idle while the last of an odd number trains alone; more than two
    only adds memory), and one when a GPU is visible (sites take turns on it)."""
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    if gpu:
        return 1
    if cores is None:
        from pemma_core.training.threads import available_cores

        cores = available_cores()
    return max(1, min(n_sites, 2 * cores))


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
        # run.json also holds what the run was set up with (model spec, the sites that joined): settings only
        values.update({key: value for key, value in saved.items() if key in RunSettings.model_fields})
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
    for flag in ("secure_aggregation", "activation_checkpointing"):
        if getattr(args, flag, None):
            values[flag] = True
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
    from server.run_dir import round_dice

    head = f"[{record.phase} round {record.round}] {record.wall_seconds:.1f} s"
    if "c-index" in record.train_metrics:
        head += f"  mean C-index {record.train_metrics['c-index']:.3f}"
    if record.eval_metrics:
        head += "  mean Dice " + ", ".join(f"{m} {v:.3f}" for m, v in round_dice(record.eval_metrics).items())
    if record.note:
        head += f"  ({record.note})"
    console.say(head, file=sys.stdout)
    for site in sorted(record.sites.values(), key=lambda s: s.name):
        console.say(f"    {site.summary()}", file=sys.stdout)


def _stop_on_interrupt(run_dir: str | Path) -> Callable[[int, Any], None]:
    """A SIGINT / SIGTERM handler that ends the process now (status 128 + signal). Flower
    runs the ServerApp in a non-daemon thread and, on Ctrl-C, waits for it to finish the
    whole run; every file of the run folder is replaced atomically after each round, so
    stopping mid-round loses only that round, and ``--resume`` continues from the last
    finished one."""

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


INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and `kill` / a job scheduler's stop


@contextlib.contextmanager
def _interrupts_stop(run_dir: str | Path) -> Iterator[None]:
    """Within: SIGINT and SIGTERM end the process with the ``--resume`` hint; after: the
    previous handlers (signal handlers can be set from the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _stop_on_interrupt(run_dir)) for signum in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _start_ray(cpus: int, verbose: bool) -> None:
    """Start Ray as Flower's Ray backend would (it starts Ray only when it is not running).

    Started here so that :func:`_interrupts_stop` comes after it: ``ray.init`` replaces the
    SIGTERM handler, in Python (``sys.exit``, which leaves Flower's ServerApp thread running
    the whole run) and in C++ (an abort, status 134, no hint).
    """
    import ray

    if ray.is_initialized():
        return
    # Flower's backend does the same: the workers import the apps from this process's path.
    pythonpath = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(num_cpus=cpus, logging_level="ERROR", log_to_driver=verbose, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})


def backend_config(cpus: int) -> dict[str, Any]:
    """Flower's Ray backend config: what each simulated site (SuperNode) reserves.

    One site at a time, each with every core: no oversubscription, reproducible timing (Ray
    itself, with ``cpus`` cores, is started by :func:`_start_ray`). Where PyTorch sees a GPU
    each site also reserves one whole GPU: Ray (2.55, by default) hides every GPU from a worker that reserved
    none, so without it ``device: auto`` would silently train on the CPU. Sites still run one
    at a time (each asks for every core), so a fractional share would buy no concurrency.
    """
    import torch

    gpus = 1.0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 0.0
    return {"client_resources": {"num_cpus": cpus, "num_gpus": gpus}}


def site_names(sites: list[Path]) -> list[str]:
    """The ``name`` of each site YAML."""
    from pemma_core.config.site import load_site_config

    return [load_site_config(path).name for path in sites]


def _recording(run_dir: str | Path, adversaries: Mapping[str, str], progress: Callable[[Any], None]) -> Callable[[Any], None]:
    """``progress`` that first records the adversaries in the run info, once the server has
    written its first round (a fresh run folder must hold no metrics before the server starts),
    so an interrupted run keeps them too."""
    from server.run_dir import RunDir

    recorded = not adversaries

    def record_then_progress(record: Any) -> None:
        nonlocal recorded
        if not recorded:
            RunDir(run_dir).update_run_info(adversaries=dict(adversaries))
            recorded = True
        progress(record)

    return record_then_progress


ENGINES = ("inprocess", "ray")


def simulate(settings: Any, verbose: bool = False, adversaries: Mapping[str, str] | None = None,
             engine: str = "inprocess", site_workers: int | None = None) -> Path:
    """Run ``settings`` on one machine; returns the run folder.

    ``engine``: ``inprocess`` (default) runs the ServerApp's federation and every site's ClientApp
    in this process (:class:`simulation.inprocess.InProcessGrid`), ``site_workers`` sites side by
    side (None: :func:`default_site_workers`); ``ray`` runs them on Flower's simulation engine
    (Ray workers, one process per worker, one site at a time: Flower's backend is given every
    core per site, :func:`backend_config`). Both run the same apps and messages and give the
    same results (docs/ARCHITECTURE.md, simulation). The run info records ``site_workers``.
    ``adversaries`` (site name -> kind of :data:`simulation.adversary.ADVERSARY_KINDS`)
    make those sites misbehave; they are recorded in the run info (``adversaries``).
    """
    from pemma_core.phantoms.coordination import ensure_phantom_federation

    # The sites are known before Flower starts: one simulated SuperNode per site YAML (the
    # phantom federation is written here, by the simulation, never by the server). The
    # phantoms are written while the model stack is imported: both take seconds, and each
    # leaves a core idle part of the time (BENCHMARKS.md, the default demo's wall time).
    listed = settings.site_config_list()
    with ThreadPoolExecutor(1, thread_name_prefix="pemma-phantoms") as pool:
        written = None if listed else pool.submit(
            ensure_phantom_federation, settings.resolved_federation_dir(), settings.phantom_sites,
            settings.phantom_cases, settings.seed)
        from client.client_app import make_client_app
        from server.report import write_report
        from server.run_dir import RunDir
        from server.server_app import make_server_app
        from simulation.adversary import ADVERSARY_KINDS, adversary_mod, check_adversary_sites
        from simulation.predict import write_overlay

        sites = listed if written is None else written.result()
    _quiet_flower(verbose)
    settings.site_configs = ",".join(str(p) for p in sites)
    adversaries = dict(adversaries or {})
    mods = []
    if adversaries:
        check_adversary_sites(adversaries, site_names(sites))
        mods.append(adversary_mod(adversaries))
    overrides = settings.to_run_config()
    cpus = max(1, os.cpu_count() or 1)
    workers = 1 if engine == "ray" else site_workers or default_site_workers(len(sites))
    started = time.perf_counter()
    console.say(f"pemma simulate: {len(sites)} sites ({min(workers, len(sites))} side by side), {settings.backbone}/{settings.preset} + {settings.adapter}, "
                f"{settings.pretrain_rounds} pretrain-ct + {settings.rounds} adapt + {settings.prognosis_rounds} "
                f"prognosis rounds -> {settings.run_dir}", file=sys.stdout)
    for site, kind in adversaries.items():
        console.say(f"pemma simulate: adversary {site} misbehaves: {kind} ({ADVERSARY_KINDS[kind]})", file=sys.stdout)
    progress = _recording(settings.run_dir, adversaries, print_round)
    if engine == "ray":
        from flwr.simulation import run_simulation

        _start_ray(cpus, verbose)
        with _interrupts_stop(settings.run_dir):
            run_simulation(
                server_app=make_server_app(overrides, progress=progress),
                client_app=make_client_app(overrides, mods=mods),
                num_supernodes=len(sites),
                backend_config=backend_config(cpus),
                verbose_logging=verbose,
            )
    elif engine == "inprocess":
        from server.server_app import run_federation
        from simulation.inprocess import InProcessGrid

        grid = InProcessGrid(make_client_app(overrides, mods=mods),
                             [{"partition-id": i, "num-partitions": len(sites)} for i in range(len(sites))],
                             overrides, keep_transcript=False, workers=workers)
        with _interrupts_stop(settings.run_dir):
            run_federation(grid, settings, progress)
    else:
        raise ValueError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    run = RunDir(settings.run_dir)
    if not run.metrics()["rounds"]:
        raise RuntimeError(f"the simulation ended without finishing a round; see the log above (run folder {run.path})")
    run.update_run_info(site_workers=workers)
    if adversaries:
        run.update_run_info(adversaries=adversaries)
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
    from simulation.adversary import AdversarySiteError, parse_adversaries

    try:
        adversaries = parse_adversaries(args.adversary)
    except ValueError as exc:
        raise console.UsageError(str(exc)) from exc
    import torch

    from pemma_core.training.threads import threads_for_this_machine

    started = time.perf_counter()
    try:
        with threads_for_this_machine("cuda" if torch.cuda.is_available() else "cpu") as cut:
            if cut:
                console.say(f"pemma simulate: {cut} (other jobs share the cores)", file=sys.stdout)
            path = simulate(settings, verbose=console.verbosity() >= console.VERBOSE, adversaries=adversaries,
                            engine=args.engine, site_workers=args.site_workers)
    except AdversarySiteError as exc:
        raise console.UsageError(str(exc)) from exc
    from server.report import overhead_share, pooled_c_index_text
    from server.run_dir import RunDir, phase_rounds, round_dice

    metrics = RunDir(path).metrics()
    last = phase_rounds(metrics, "adapt")[-1]
    share = overhead_share(metrics)
    print(f"\ndone in {time.perf_counter() - started:.0f} s: {path}")
    if last.get("eval_metrics"):
        print("final mean Dice: " + ", ".join(f"{m} {v:.3f}" for m, v in round_dice(last["eval_metrics"]).items()))
    prognosis = phase_rounds(metrics, "prognosis")
    if prognosis:
        final = prognosis[-1]
        per_site = ", ".join(f"{s['name']} {s['c_index']:.3f}" for s in final["sites"] if s.get("c_index") is not None)
        mean = final.get("train_metrics", {}).get("c-index")
        print("final prognosis C-index (held-out splits): " + (per_site or "none computable")
              + (f"; mean {mean:.3f}" if mean is not None else ""))
        train = final.get("train_metrics", {})
        if "c-index-pooled" in train:
            print(f"pooled C-index {pooled_c_index_text(train)} over {train['c-index-pairs']:.0f} within-site pairs"
                  + (" (fewer than 30: read it as noise)" if train["c-index-pairs"] < 30 else ""))
    if share.get("rounds"):
        print(f"time outside local training: {share['overhead_share']:.0%} of the adapt rounds' train wall time")
    print(f"report: {path / 'report.md'}")
    return 0
