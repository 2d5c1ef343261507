"""The whole ``pemma bench`` run, phase by phase, writing ``bench.json`` after each.

1. the bench sites (:mod:`benchmarks.sites`): site YAMLs, every case checked, the
   alignment audit;
2. per backbone: the CT backbone and the centralized rows (:mod:`benchmarks.rows`), the
   federated row (:mod:`benchmarks.federated`), then speed, profile and inference
   (:mod:`benchmarks.speed`);
3. the CNN reference, data loading, threads, targets, plots and ``BENCHMARKS.md``.

A phase that raises is recorded under ``errors`` and the run goes on: a long benchmark
keeps what it measured. A run that was stopped (the machine went back, a session ended)
continues with ``--resume``: the rows already in its ``bench.json`` are kept, the CT
backbone is reloaded from its file (fingerprint checked), and only what is missing runs.
"""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import monai
import peft
import torch

from benchmarks import speed
from benchmarks.config import BenchConfig, Say
from benchmarks.federated import run_federated
from benchmarks.plots import make_plots
from benchmarks.report import write_markdown
from benchmarks.result_json import FORMAT, read_resumable, rows_by_id, write_json
from benchmarks.rows import PLANS, BackboneBench, over_seeds, run_cnn
from benchmarks.sites import BenchSites, alignment_audit, first_batch, load_test_batches, prepare_sites
from benchmarks.targets import targets
from pemma_core import console
from pemma_core.model.spec import ModelSpec
from pemma_core.training.local import SEGMENTATION_LOSS
from pemma_core.training.threads import fitting_threads

__all__ = ["Progress", "compared_lora_rules", "environment", "run_bench"]


def compared_lora_rules(config: BenchConfig) -> list[str]:
    """The low-rank rules of the extra federated rows: the long budget trains the federated row
    under the naive rule too, beside the default's exact one, so both rules' Dice (and the naive
    rule's error per round, which every run records) come from the same backbone and seeds."""
    return ["naive"] if config.mode == "long" and config.fed_lora_aggregation != "naive" else []


class Progress:
    """``[ elapsed] message`` progress lines on stderr (:func:`pemma_core.console.say`: ``-q`` silences them)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        console.say(f"[{time.perf_counter() - self.start:6.0f} s] {message}")


def environment(config: BenchConfig) -> dict[str, Any]:
    """The machine and library versions of this run, and its load at the start."""
    return {
        "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
        "peft": peft.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "device": config.device,
        "cuda_device": torch.cuda.get_device_name(0) if config.device.startswith("cuda") else None,
        "load_average_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loss": SEGMENTATION_LOSS,  # runs before it wrote none: "DiceCE" with the background channel
    }


def run_bench(config: BenchConfig, command: str, say: Say, resume: bool = False) -> dict[str, Any]:
    """The whole benchmark; returns (and keeps writing) the result dictionary. ``resume``: continue
    the unfinished run in ``config.out`` (same settings); otherwise an existing run there is refused."""
    threads_before = torch.get_num_threads()
    fitting, why = fitting_threads(config.device)
    if config.threads is None and why is not None:  # shared cores: pemma_core.training.threads says why
        config.threads = fitting
        config.threads_reason = f"auto: {why} at the start"
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _Run(config, command, say, resume).run()
    finally:
        torch.set_num_threads(threads_before)


class _Run:
    """One run's state: its results (written to ``bench.json`` after every phase)."""

    def __init__(self, config: BenchConfig, command: str, say: Say, resume: bool = False) -> None:
        self.config = config
        self.say = say
        self.json_path = config.out / "bench.json"
        if resume:
            self.results = read_resumable(self.json_path, config.to_json())
            self.results.setdefault("resumed", []).append({"command": command, "environment": environment(config)})
        elif self.json_path.exists():
            raise FileExistsError(f"{self.json_path} exists: refusing to write over another run (--resume continues "
                                  "an unfinished one; a new run needs another --out)")
        else:
            self.results = {"format": FORMAT, "command": command, "config": config.to_json(),
                            "environment": environment(config), "backbones": {}, "complete": False}
        self.overlays: dict[str, Any] = {}
        self.seconds_before = float(self.results.get("wall_seconds", 0.0))  # the stopped segments' time
        self.started = time.perf_counter()

    def save(self) -> None:
        self.results["wall_seconds"] = self.seconds_before + time.perf_counter() - self.started
        write_json(self.json_path, self.results)

    def guarded(self, phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one phase; a failure is recorded (and reported) instead of ending the run."""
        try:
            return fn(*args)
        except Exception as exc:  # a long benchmark keeps what it measured
            self.say(f"FAILED {phase}: {type(exc).__name__}: {exc}")
            self.results["errors"].append({"phase": phase, "error": f"{type(exc).__name__}: {exc}",
                                           "traceback": traceback.format_exc()[-4000:]})
            return None

    def run(self) -> dict[str, Any]:
        config, results = self.config, self.results
        config.out.mkdir(parents=True, exist_ok=True)
        budget_text = ", ".join(f"{k}: {b.pretrain_steps} backbone + {b.steps} steps per row" for k, b in config.budgets.items())
        self.say(f"pemma bench ({config.mode}): {', '.join(config.backbones)} / {config.preset} on {config.device}, "
                 f"{torch.get_num_threads()} thread(s); {budget_text} -> {config.out}")
        sites, test_batches = self._data()
        results.setdefault("errors", [])
        for name in config.backbones:
            self._backbone(name, sites, test_batches)
        self._closing(sites, test_batches)
        results["environment"]["load_average_end"] = list(os.getloadavg())
        results["complete"] = True
        self.save()
        write_markdown(results, config.out / "BENCHMARKS.md")
        self.say(f"done in {results['wall_seconds'] / 60:.1f} min: {config.out / 'BENCHMARKS.md'}, {self.json_path}")
        return results

    def _data(self) -> tuple[BenchSites, list[dict[str, Any]]]:
        """Sites, checks, alignment audit and the test batches."""
        sites = prepare_sites(self.config, self.say)
        data = {"counts": sites.counts, "warnings": sites.warnings, "skipped": sites.skipped,
                "site_yamls": {p.stem: str(p) for p in (*sites.federation, sites.pooled_ct, sites.pooled_ctpet, sites.test)}}
        self.results["data"] = data
        data["alignment"] = alignment_audit(self.config, sites, self.say)
        test_batches = load_test_batches(sites.test)
        data["test_cases"] = [str(b["case_id"][0]) for b in test_batches]
        self.save()
        return sites, test_batches

    def _backbone(self, name: str, sites: BenchSites, test_batches: list[dict[str, Any]]) -> None:
        """Every row of one backbone, then its speed, profile and inference timings."""
        config = self.config
        bench = BackboneBench(config, sites, name, test_batches, self.say)
        entry = self.results["backbones"].get(name)
        done = rows_by_id(entry) if entry else {}
        if "ct-backbone" in done:  # a resumed run: the same backbone, or a clear error
            bench.reuse_backbone(done["ct-backbone"])
            self.say(f"{name} | resumed: CT backbone reloaded from {bench.backbone_file}; rows kept: {', '.join(done)}")
        else:
            entry = {"budget": config.budgets[name].to_json(), "spec": json.loads(bench.spec.to_json()), "rows": []}
            self.results["backbones"][name] = entry
            entry["rows"].append(bench.train_backbone())  # everything else needs it: no guard
            self.save()
        for plan in (p for p in PLANS if p.row not in done):
            row = self.guarded(f"{name} {plan.row}", over_seeds, config.seeds, partial(bench.run_row, plan))
            if row is not None:
                entry["rows"].append(row)
            self.save()
            if plan.row == "pemma-lora" and not self.overlays and bench.predictions:
                self.overlays = {"backbone": name, "predictions": bench.predictions}
        if "pemma-lora-fed" not in done:
            row = self.guarded(f"{name} pemma-lora-fed", over_seeds, config.seeds, partial(run_federated, bench))
            if row is not None:
                entry["rows"].append(row)
            self.save()
        for rule in compared_lora_rules(config):
            if f"pemma-lora-fed-{rule}" not in done:
                row = self.guarded(f"{name} pemma-lora-fed-{rule}", over_seeds, config.seeds,
                                   partial(run_federated, bench, lora_aggregation=rule))
                if row is not None:
                    entry["rows"].append(row)
                self.save()
        if "speed" in entry:  # the timings below are saved together: a resumed run had them all
            return

        say_name = lambda t, n=name: self.say(f"{n} | {t}")  # noqa: E731
        batch = first_batch(sites.pooled_ctpet, bench.spec.roi_size, config.batch_size, config.seed)
        batch_file = config.out / f"speed-batch-{name}.pt"
        torch.save({"image": batch["image"], "label": batch["label"]}, batch_file)
        entry["speed"] = self.guarded(f"{name} speed", speed.speed_pair, bench.backbone_file, batch_file, config.device,
                                      config.speed_steps, config.threads, say_name)
        entry["profile"] = self.guarded(f"{name} profile", speed.profile_before_after, bench.backbone_file, batch,
                                        config.device, max(1, config.speed_steps - 1), say_name)
        largest = max(test_batches, key=lambda b: b["image"][0, 0].numel())
        entry["inference"] = self.guarded(f"{name} inference", speed.inference_timing, bench.backbone_file, largest,
                                          config.device, say_name)
        if name == "unetr" and (config.mode == "full" or config.device != "cpu"):
            # The memory and time targets at the paper's model size (UNETR only: a paper-size Swin UNETR
            # step takes minutes on CPU).
            entry["speed_paper"] = self.guarded(f"{name} speed (paper preset)", speed.paper_speed_pair, config.out, name,
                                                sites.pooled_ctpet, config.device, 2, config.threads, say_name)
        self.save()

    def _closing(self, sites: BenchSites, test_batches: list[dict[str, Any]]) -> None:
        """The CNN row, data loading and threads timings, targets and plots."""
        config, results = self.config, self.results
        if config.cnn and results.get("cnn") is None:
            predictions: dict[str, Any] = {}

            def cnn_at(seed: int) -> dict[str, Any]:
                row, ctpet = run_cnn(config, sites, test_batches, self.say, config.backbones[0], seed)
                predictions.setdefault("ctpet", ctpet)  # the first seed's, beside the PEMMA row's
                return row

            cnn = self.guarded("cnn", over_seeds, config.seeds, cnn_at)
            if cnn is not None:
                results["cnn"] = cnn
                if self.overlays and predictions:
                    self.overlays["cnn"] = predictions["ctpet"]
            self.save()
        first = config.backbones[0]
        roi = ModelSpec(backbone=first, preset=config.preset).roi_size
        n_cases = 2 if config.mode == "quick" else 4
        if results.get("loading") is None:
            results["loading"] = self.guarded("loading", speed.loading_timing, sites.pooled_ctpet, roi,
                                              config.batch_size, n_cases, 6, self.say)
            self.save()
        if config.device == "cpu" and results.get("threads") is None:
            results["threads"] = self.guarded("threads", speed.threads_timing,
                                              Path(results["backbones"][first]["rows"][0]["file"]),
                                              first_batch(sites.pooled_ctpet, roi, config.batch_size, config.seed), 2,
                                              self.say)
        results["targets"] = targets(results)
        results["plots"] = self.guarded("plots", make_plots, results, config.out / "plots", test_batches,
                                        self.overlays) or {}
