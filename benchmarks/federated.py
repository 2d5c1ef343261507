"""The federated row: PEMMA-LoRA trained by the project's own ServerApp and ClientApp on the
bench's three IBSI sites, from the bench's CT backbone, then evaluated round by round.

Engines: ``simulation`` is ``pemma simulate``'s Flower simulation (Ray); ``inprocess``
runs the same apps on :class:`simulation.inprocess.InProcessGrid` (no Ray), for tests.
The run folders are written under ``OUT/runs``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.config import BenchConfig, Say
from benchmarks.measure import model_sizes, step_peak_memory
from benchmarks.robust import robust_counts
from benchmarks.rows import ROW_LABELS, BackboneBench, seg_metrics_of
from client.client_app import make_client_app
from pemma_core.config.run import RunSettings
from pemma_core.config.site import load_site_config
from pemma_core.model.pemma import SegmentationModel
from pemma_core.modes import MODES
from pemma_core.training.local import EvalResult
from server.report import bytes_per_site, overhead_share
from server.run_dir import RunDir
from server.server_app import run_federation
from simulation.inprocess import InProcessGrid
from simulation.predict import load_run_model
from simulation.simulate import simulate

__all__ = ["run_federated"]


def _settings(bench: BackboneBench, run_dir: Path, seed: int, lora_aggregation: str | None = None) -> RunSettings:
    """The run's settings: adapt the bench's backbone with its budget, ``seed`` and adapter rate
    (``lora_aggregation``: the low-rank rule, default the bench's)."""
    config = bench.config
    return RunSettings(
        run_dir=str(run_dir), site_configs=",".join(str(p) for p in bench.sites.federation),
        backbone=bench.name, preset=config.preset, adapter="lora", rank=bench.spec.rank, alpha=bench.spec.alpha,
        rounds=bench.budget.fed_rounds, local_steps=bench.budget.fed_local_steps, lr=config.lr_adapter,
        batch_size=config.batch_size, pretrain_rounds=0, backbone_file=str(bench.backbone_file),
        seed=seed, min_sites=2, evaluate=False, aggregation=config.fed_aggregation, wire_dtype=config.fed_wire_dtype,
        secure_aggregation=config.fed_secure, dp_target_epsilon=config.fed_dp_epsilon,
        lora_aggregation=lora_aggregation or config.fed_lora_aggregation,
        prognosis_rounds=0,  # segmentation only: no survival phase in this benchmark
    )


def _check_site_limits(settings: RunSettings) -> None:
    """Raise ValueError with every site's refusal before starting Flower: a site refuses a
    request outside its YAML's ``limits:`` (e.g. batch x local steps under
    ``min_examples_per_round``), and a round refused by every site says less than this."""
    spec = settings.model_spec()
    refusals = []
    for path in settings.site_config_list():
        site = load_site_config(path)
        refusals += site.limits.refusals(rank=spec.rank, pet_embed=spec.pet_embed, phase="adapt",
                                         local_steps=settings.local_steps, batch_size=settings.batch_size,
                                         source=site.path)
    if refusals:
        raise ValueError("the federated row's budget breaks the sites' limits (raise --fed-local-steps or --batch-size, "
                         "or lower the limit in the site YAMLs under --sites-dir): " + "; ".join(refusals))


def _simulate(settings: RunSettings, config: BenchConfig, say: Say) -> Path:
    """The federated row through ``pemma simulate``'s engine (Flower simulation, Ray)."""
    if config.threads:
        os.environ["OMP_NUM_THREADS"] = str(config.threads)  # Ray actors inherit the driver's environment
    if config.device.startswith("cuda"):
        # Ray hides GPUs from actors that reserve none (simulate() reserves num_gpus=0).
        os.environ.setdefault("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        path = simulate(settings, engine="ray")
    for line in buffer.getvalue().splitlines():
        if line.strip():
            say("  flower: " + line.strip())
    return Path(path)


def _simulate_inprocess(settings: RunSettings, say: Say) -> Path:
    """The same ServerApp/ClientApp on :class:`simulation.inprocess.InProcessGrid` (no Ray): for tests."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    n = len(settings.site_config_list())
    grid = InProcessGrid(make_client_app(), [{"partition-id": i, "num-partitions": n} for i in range(n)],
                         settings.to_run_config())

    def progress(record: Any) -> None:
        say(f"  flower: [{record.phase} round {record.round}] {record.wall_seconds:.1f} s, "
            + ", ".join(f"{s.name} {s.status}" for s in record.sites.values()))

    return Path(run_federation(grid, settings, progress=progress).path)


def _evaluate_rounds(bench: BackboneBench, run: RunDir,
                     rounds: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], EvalResult, SegmentationModel]:
    """Each round's global model on the test cases (ctpet; every mode in the last round).
    Returns the per-round records, the last round's evaluation and its model."""
    last = max(r["round"] for r in rounds)
    records = []
    final = final_model = None
    for r in rounds:
        n = int(r["round"])
        model = load_run_model(run.path, n)
        result = bench.evaluate(model, list(MODES) if n == last else ["ctpet"], f"federated round {n}")
        if n == last:
            final, final_model = result, model
        records.append({
            "round": n, "dice": result.dice, "wall_seconds": r.get("wall_seconds"),
            "reference_rms": r.get("reference_rms"), "lora_naive_error": r.get("lora_naive_error"),
            "sites": [{k: s.get(k) for k in ("name", "status", "reason", "bytes_up", "train_seconds", "setup_seconds",
                                              "loss", "examples", "rms", "clip_factor")} for s in r.get("sites", [])],
        })
    return records, final, final_model


def run_federated(bench: BackboneBench, seed: int | None = None, lora_aggregation: str | None = None) -> dict[str, Any]:
    """The ``pemma-lora-fed`` row of ``bench``'s backbone (its CT backbone trained first),
    trained with ``seed`` (default the bench's); with ``lora_aggregation`` the row
    ``pemma-lora-fed-<rule>`` of that low-rank rule instead of the bench's."""
    assert bench.backbone is not None, "train the backbone first"
    config = bench.config
    seed = config.seed if seed is None else seed
    row_id = "pemma-lora-fed" + (f"-{lora_aggregation}" if lora_aggregation else "")
    run_dir = config.out / "runs" / (row_id.replace("pemma-lora-", "") + f"-{bench.name}"
                                     + (f"-seed{seed}" if len(config.seeds) > 1 else ""))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    settings = _settings(bench, run_dir, seed, lora_aggregation)
    _check_site_limits(settings)
    bench.say(f"PEMMA-LoRA federated: {settings.rounds} rounds x 3 sites x {settings.local_steps} steps "
              f"through Flower ({config.fed_engine}), aggregation {settings.aggregation}, "
              f"outlier factor {settings.outlier_factor:g}")
    started = time.perf_counter()
    if config.fed_engine == "simulation":
        run_path = _simulate(settings, config, bench.say)
    else:
        run_path = _simulate_inprocess(settings, bench.say)
    wall = time.perf_counter() - started
    run = RunDir(run_path)
    metrics = dict(run.metrics())
    # Only the adapt phase (run folders also list prognosis rounds under "rounds").
    metrics["rounds"] = [r for r in metrics["rounds"] if str(r.get("phase") or "adapt") == "adapt"]
    rounds_out, final, final_model = _evaluate_rounds(bench, run, metrics["rounds"])
    accepted = ("ok", "clipped")  # a clipped update is aggregated (scaled back), a rejected one is not
    ok_sites = [s for r in metrics["rounds"] for s in r.get("sites", []) if s.get("status") in accepted]
    steps_done = bench.budget.fed_local_steps * len(ok_sites)
    train_seconds = sum(float(s.get("train_seconds") or 0.0) for s in ok_sites)
    per_round_up = [sum(int(s.get("bytes_up") or 0) for s in r.get("sites", []) if s.get("status") in accepted)
                    for r in metrics["rounds"]]
    sizes = model_sizes(final_model)
    memory = step_peak_memory(final_model, bench.memory_batch("pooled_ctpet"), "ctpet", config.device)
    memory["peak_memory_method"] += " (the federated model, measured outside Flower on a CT+PET batch)"
    return {
        "row": row_id, "label": ROW_LABELS[row_id], "backbone": bench.name, "kind": "pemma",
        "adapter": "lora", "engine": config.fed_engine, "aggregation": settings.aggregation,
        "lora_aggregation": settings.lora_aggregation_rule,
        "secure_aggregation": settings.secure_aggregation,
        "dp": {"target_epsilon": settings.dp_target_epsilon, "delta": settings.dp_delta, "clip": settings.dp_clip,
               "epsilon_spent": {s["name"]: s.get("dp_epsilon") for s in metrics["rounds"][-1].get("sites", [])}}
        if settings.dp_target_epsilon > 0 else None,
        "round_wall_seconds": [r.get("wall_seconds") for r in metrics["rounds"]],
        "round_train_wall_seconds": [r.get("train_wall_seconds") for r in metrics["rounds"]],
        "robust": robust_counts(metrics["rounds"], settings.aggregation, settings.outlier_factor),
        "examples_per_round": settings.local_steps * settings.batch_size,
        "site_min_examples_per_round": {site.name: site.limits.min_examples_per_round
                                        for site in map(load_site_config, settings.site_config_list())},
        "train_data": "site-a CT only; site-b, site-c CT+PET (Flower "
                      + ("simulation engine)" if config.fed_engine == "simulation" else "ServerApp/ClientApp in process)"),
        "train_modes": ["ct (site-a)", "ct, pet, ctpet (b, c)"], "lr": config.lr_adapter,
        "steps": steps_done, "rounds": bench.budget.fed_rounds, "local_steps": bench.budget.fed_local_steps,
        "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(1, steps_done),
        "cpu_seconds_per_step": None, "wall_seconds": wall, **sizes,
        "bytes_up_per_round": int(np.mean(per_round_up)) if per_round_up else 0,
        "bytes_up_note": "measured: sum over sites, mean over rounds",
        "bytes_up_per_site": bytes_per_site(metrics), "overhead": overhead_share(metrics),
        "dice": final.dice, "per_case": final.per_case, "eval_seconds": final.seconds, **seg_metrics_of(final),
        "per_round": rounds_out, "run_dir": str(run.path), **memory,
        "sites_failed": sorted({f"{s.get('name')}: {s.get('reason')}" for r in metrics["rounds"]
                                for s in r.get("sites", []) if s.get("status") != "ok"}),
    }
