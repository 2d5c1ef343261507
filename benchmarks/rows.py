"""The experiment rows of one backbone, all from the *same* CT backbone, and the CNN row.

==================  =========================  ============================  ===============
row                 model (``kind``)           trained on                    evaluated in
==================  =========================  ============================  ===============
ct-backbone         the CT backbone itself     pooled CT of every site       ct
ct-only             ``ct-only`` (continued)    pooled CT of every site       ct
pet-only            ``pet-only``               pooled CT+PET sites, PET      pet
early-fusion        ``early-fusion``           pooled CT+PET sites           ctpet
pemma-lora          ``pemma`` + LoRA           every site, the fed's mix     ct, pet, ctpet
pemma-dora          ``pemma`` + DoRA           every site, the fed's mix     ct, pet, ctpet
pemma-lora-fed      ``pemma`` + LoRA, Flower   site-a CT, b and c CT+PET     ct, pet, ctpet
cnn-early-fusion    ``cnn-early-fusion``       pooled CT+PET sites           ctpet
==================  =========================  ============================  ===============

The federated row is :mod:`benchmarks.federated`. Backbone files are written under
``OUT/backbones``.

The centralized PEMMA rows are the federated row's fair reference: they see the same data
in the same mode mix (:func:`federation_mode_weights`), CT steps drawn from every site's CT
(site-a's CT-only cases included) and PET-reading steps from the CT+PET sites' cases.

Every row but the CT backbone is trained once per seed of ``config.seeds``
(:func:`over_seeds`): one backbone, then each row's own training noise.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.config import BenchConfig, Say
from benchmarks.measure import model_sizes, step_peak_memory, upload_bytes
from benchmarks.sites import BenchSites, first_batch
from pemma_core.config.site import load_site_config
from pemma_core.data.pipeline import train_loader
from pemma_core.model.baselines import FullModel
from pemma_core.model.factory import build_model
from pemma_core.model.files import backbone_fingerprint, load_backbone, save_backbone
from pemma_core.model.pemma import SegmentationModel
from pemma_core.model.spec import ModelSpec, build_backbone

from pemma_core.modes import DEFAULT_MODE_WEIGHTS, MODES, servable_modes
from pemma_core.training.local import (EvalResult, evaluate_cases, mode_sampler, segmentation_loss, train_local,
                                       train_step)
from pemma_core.training.optimizer import make_optimizer

__all__ = ["PLANS", "ROW_LABELS", "BackboneBench", "RowPlan", "federation_mode_weights", "over_seeds", "run_cnn",
           "seed_all", "train_chunked"]

ROW_LABELS = {
    "ct-backbone": "CT backbone (before adaptation)",
    "ct-only": "CT-only",
    "pet-only": "PET-only",
    "early-fusion": "Early fusion (full FT)",
    "pemma-lora": "PEMMA-LoRA centralized",
    "pemma-dora": "PEMMA-DoRA centralized",
    "pemma-lora-fed": "PEMMA-LoRA federated",
    "pemma-lora-fed-naive": "PEMMA-LoRA federated, naive low-rank aggregation",
    "cnn-early-fusion": "CNN early fusion (SegResNet)",
}
TRAIN_DATA = {
    "pooled_ct": "pooled CT, all sites", "pooled_ctpet": "pooled CT+PET sites (b, c)",
    "pooled_mixed": "pooled, all sites: ct steps on every site's CT (site-a's too), pet/ctpet on b, c",
}


@dataclass
class RowPlan:
    """One centralized row trained from the CT backbone."""

    row: str
    kind: str
    adapter: str
    train_yaml: str  # "pooled_ct" | "pooled_ctpet"
    train_modes: tuple[str, ...]
    eval_modes: tuple[str, ...]
    lr_key: str  # attribute of BenchConfig
    memory_mode: str


PLANS = (
    RowPlan("ct-only", "ct-only", "lora", "pooled_ct", ("ct",), ("ct",), "lr_full", "ct"),
    RowPlan("pet-only", "pet-only", "lora", "pooled_ctpet", ("pet",), ("pet",), "lr_full", "pet"),
    RowPlan("early-fusion", "early-fusion", "lora", "pooled_ctpet", ("ctpet",), ("ctpet",), "lr_full", "ctpet"),
    RowPlan("pemma-lora", "pemma", "lora", "pooled_mixed", MODES, MODES, "lr_adapter", "ctpet"),
    RowPlan("pemma-dora", "pemma", "dora", "pooled_mixed", MODES, MODES, "lr_adapter", "ctpet"),
)


def seed_all(seed: int) -> None:
    """Seed torch and numpy before a row builds its model."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def federation_mode_weights(site_yamls: Sequence[Any]) -> dict[str, float]:
    """The share of each mode among a federated round's steps when every site takes the same
    local steps and draws the modes it serves in the product's proportions."""
    shares: dict[str, float] = {}
    for path in site_yamls:
        site = load_site_config(path)
        modes = [m for m in site.modes if m in servable_modes(site.modalities)]
        total = sum(DEFAULT_MODE_WEIGHTS[m] for m in modes)
        for m in modes:
            shares[m] = shares.get(m, 0.0) + DEFAULT_MODE_WEIGHTS[m] / total / len(site_yamls)
    return shares


def _endless(loader: Iterable) -> Iterator:
    while True:
        yield from loader


def _train_mixed(model: SegmentationModel, loaders: Mapping[str, Iterable], weights: Mapping[str, float], steps: int,
                 lr: float, seed: int, device: str, chunk: int, label: str, say: Say) -> dict[str, Any]:
    """Like :func:`train_chunked`, but each step's batch comes from the loader of its mode."""
    model.to(device).train()
    torch.manual_seed(seed)
    optimizer = make_optimizer(model, lr)
    loss_fn = segmentation_loss()
    draws = mode_sampler(list(loaders), weights, seed)
    streams: dict[int, Iterator] = {}
    batches = {m: streams.setdefault(id(loader), _endless(loader)) for m, loader in loaders.items()}
    mode_steps: dict[str, int] = {}
    losses: list[float] = []
    chunk_losses: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        mode = next(draws)
        batch = next(batches[mode])
        chunk_losses.append(train_step(model, batch["image"].to(device), batch["label"].to(device), mode, optimizer,
                                       loss_fn, device))
        mode_steps[mode] = mode_steps.get(mode, 0) + 1
        if step % chunk == 0 or step == steps:
            losses.append(float(np.mean(chunk_losses)))
            chunk_losses = []
            say(f"{label}: step {step}/{steps}  loss {losses[-1]:.3f}  "
                f"{(time.perf_counter() - started) / step:.2f} s/step")
    seconds = time.perf_counter() - started
    return {
        "steps": steps, "train_seconds": seconds, "seconds_per_step": seconds / steps,
        "cpu_seconds_per_step": (time.process_time() - cpu_started) / steps, "loss_first_chunk": losses[0],
        "loss_last_chunk": losses[-1], "mode_steps": mode_steps, "mode_weights": dict(weights),
    }


def over_seeds(seeds: Sequence[int], train_row: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """One row trained at every seed of ``seeds``: the first seed's record, with ``dice`` and
    ``per_case`` replaced by their means over the seeds, ``dice_seed_sd`` (the spread across
    seeds, ddof 1) and each seed's own numbers under ``per_seed``."""
    runs = [(seed, train_row(seed)) for seed in seeds]
    row = dict(runs[0][1])
    row["seeds"] = list(seeds)
    row["per_seed"] = [{"seed": seed, "dice": r["dice"], "per_case": r["per_case"],
                        "train_seconds": r.get("train_seconds"), **{k: r.get(k) for k in SEG_METRICS}}
                       for seed, r in runs]
    for key in SEG_METRICS:  # seed means where every seed defines the value
        values = [r.get(key) or {} for _, r in runs]
        row[key] = {m: (float(np.mean([v[m] for v in values])) if all(v.get(m) is not None for v in values) else None)
                    for m in values[0]}
    modes = list(row["dice"])
    row["dice"] = {m: float(np.mean([r["dice"][m] for _, r in runs])) for m in modes}
    row["dice_seed_sd"] = {m: float(np.std([r["dice"][m] for _, r in runs], ddof=1)) if len(runs) > 1 else 0.0
                           for m in modes}
    row["per_case"] = {m: {case: float(np.mean([r["per_case"][m][case] for _, r in runs]))
                           for case in runs[0][1]["per_case"][m]} for m in modes}
    return row


def train_chunked(
    model: SegmentationModel, loader: Iterable, modes: Sequence[str], steps: int, lr: float, seed: int,
    device: str, chunk: int, label: str, say: Say,
) -> dict[str, Any]:
    """:func:`pemma_core.training.local.train_local` in chunks of ``chunk`` steps (one optimiser
    throughout; chunk ``c`` draws its modes with seed ``seed + c``), a progress line per chunk."""
    optimizer = make_optimizer(model, lr)
    done, c, seconds, cpu = 0, 0, 0.0, 0.0
    losses: list[float] = []
    mode_steps: dict[str, int] = {}
    while done < steps:
        n = min(chunk, steps - done)
        cpu_start = time.process_time()
        result = train_local(model, loader, modes, n, lr=lr, seed=seed + c, device=device, optimizer=optimizer)
        cpu += time.process_time() - cpu_start
        seconds += result.seconds
        losses.append(result.loss)
        for m, k in result.mode_steps.items():
            mode_steps[m] = mode_steps.get(m, 0) + k
        done += n
        c += 1
        say(f"{label}: step {done}/{steps}  loss {result.loss:.3f}  {result.seconds / n:.2f} s/step")
    return {
        "steps": steps, "train_seconds": seconds, "seconds_per_step": seconds / steps, "cpu_seconds_per_step": cpu / steps,
        "loss_first_chunk": losses[0], "loss_last_chunk": losses[-1], "mode_steps": mode_steps,
    }


def _row_record(row: str, label: str, backbone: str, kind: str, train: Mapping[str, Any], sizes: Mapping[str, Any],
                result: EvalResult, memory: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """One row of bench.json: what it is, its training, size, upload, Dice and memory."""
    return {
        "row": row, "label": label, "backbone": backbone, "kind": kind, **extra, **train, **sizes,
        "bytes_up_per_round": upload_bytes(sizes),
        "bytes_up_note": "if federated (adapters, fp32)" if kind == "pemma" else "if federated (full model, fp32)",
        "dice": result.dice, "per_case": result.per_case, "eval_seconds": result.seconds, **memory,
        **seg_metrics_of(result),
    }


SEG_METRICS = ("agg_dice", "hd95", "nsd")  # beside Dice: HECKTOR aggregated Dice, HD95 (mm), surface Dice


def seg_metrics_of(result: EvalResult) -> dict[str, Any]:
    """The segmentation metrics users compare with, per mode, from an evaluation."""
    return {"agg_dice": dict(result.agg_dice), "hd95": dict(result.hd95), "nsd": dict(result.nsd),
            "hd95_cases": dict(result.hd95_cases), "distance_unit": result.distance_unit,
            "nsd_tolerance": result.nsd_tolerance}


class BackboneBench:
    """All rows of one backbone, sharing one CT backbone and the test batches."""

    def __init__(self, config: BenchConfig, sites: BenchSites, backbone_name: str, test_batches: list[dict[str, Any]],
                 say: Say) -> None:
        self.config = config
        self.sites = sites
        self.name = backbone_name
        self.budget = config.budgets[backbone_name]
        self.spec = ModelSpec(backbone=backbone_name, preset=config.preset)
        self.test_batches = test_batches
        self.say = lambda text: say(f"{backbone_name} | {text}")
        self.backbone: torch.nn.Module | None = None
        self.backbone_file = config.out / "backbones" / f"{backbone_name}-{config.preset}.safetensors"
        self.predictions: dict[str, dict[str, np.ndarray]] = {}
        self._batches: dict[str, dict[str, Any]] = {}

    def loader(self, which: str, seed: int) -> Iterable:
        """The training loader of ``which`` pooled set (``"pooled_ct"`` / ``"pooled_ctpet"``)."""
        if which == "pooled_mixed":
            raise ValueError("pooled_mixed has one loader per mode: BackboneBench.mixed_loaders")
        return train_loader(load_site_config(getattr(self.sites, which)), self.spec.roi_size,
                            batch_size=self.config.batch_size, seed=seed)

    def mixed_loaders(self, seed: int) -> dict[str, Iterable]:
        """The fair pooled set: ct steps from every site's CT, the PET-reading modes from the CT+PET sites."""
        pet_sites = self.loader("pooled_ctpet", seed)
        return {"ct": self.loader("pooled_ct", seed), "pet": pet_sites, "ctpet": pet_sites}

    def memory_batch(self, which: str) -> dict[str, Any]:
        """The first training batch of ``which``, the one every memory measurement uses."""
        if which not in self._batches:
            self._batches[which] = first_batch(getattr(self.sites, which), self.spec.roi_size, self.config.batch_size,
                                               self.config.seed)
        return self._batches[which]

    def evaluate(self, model: SegmentationModel, modes: Sequence[str], label: str, keep: bool = False) -> EvalResult:
        """Dice on the test cases (:func:`pemma_core.training.local.evaluate_cases`), with a progress line."""
        result = evaluate_cases(model, self.test_batches, modes, self.config.device, overlap=self.config.overlap,
                                keep_predictions=keep)
        self.say(f"{label}: test Dice " + ", ".join(f"{m} {d:.3f}" for m, d in result.dice.items())
                 + f" ({sum(result.seconds.values()):.0f} s, {len(self.test_batches)} cases)")
        return result

    def train_backbone(self) -> dict[str, Any]:
        """The CT backbone row: train it on pooled CT, save it, evaluate it in mode ct."""
        seed_all(self.config.seed)
        backbone = build_backbone(self.spec)
        wrapper = FullModel(backbone, self.spec.with_(kind="ct-only"), fingerprint="", share_weights=True)
        train = train_chunked(wrapper, self.loader("pooled_ct", self.config.seed), ["ct"], self.budget.pretrain_steps,
                              self.config.lr_backbone, self.config.seed, self.config.device, self.config.chunk,
                              "CT backbone", self.say)
        backbone.cpu()
        fingerprint = save_backbone(self.backbone_file, backbone, self.spec,
                                    provenance={"phase": "pemma bench pretrain (pooled CT)", "steps": self.budget.pretrain_steps})
        assert fingerprint == backbone_fingerprint(backbone)
        self.backbone = backbone
        result = self.evaluate(wrapper, ["ct"], "CT backbone")
        memory = step_peak_memory(copy.deepcopy(wrapper), self.memory_batch("pooled_ct"), "ct", self.config.device)
        return _row_record("ct-backbone", ROW_LABELS["ct-backbone"], self.name, "ct backbone", train,
                           model_sizes(wrapper), result, memory, train_data=TRAIN_DATA["pooled_ct"], train_modes=["ct"],
                           lr=self.config.lr_backbone, fingerprint=fingerprint, file=str(self.backbone_file))

    def reuse_backbone(self, row: Mapping[str, Any]) -> None:
        """A resumed run: the CT backbone of its ``ct-backbone`` row, from its file; ValueError if the
        file is not that backbone (another fingerprint or model)."""
        backbone, spec = load_backbone(self.backbone_file)  # checks the file against its own fingerprint
        if backbone_fingerprint(backbone) != row.get("fingerprint") or spec != self.spec:
            raise ValueError(f"--resume: {self.backbone_file} is not the CT backbone the run trained "
                             f"(fingerprint {backbone_fingerprint(backbone)[:12]}, the run's {str(row.get('fingerprint'))[:12]})")
        self.backbone = backbone

    def run_row(self, plan: RowPlan, seed: int | None = None) -> dict[str, Any]:
        """One centralized row of :data:`PLANS`, from the CT backbone, trained with ``seed``
        (default: the bench's seed)."""
        assert self.backbone is not None, "train the backbone first"
        seed = self.config.seed if seed is None else seed
        seed_all(seed)
        model = build_model(self.spec.with_(kind=plan.kind, adapter=plan.adapter), self.backbone)
        lr = float(getattr(self.config, plan.lr_key))
        label = ROW_LABELS[plan.row] + (f" (seed {seed})" if len(self.config.seeds) > 1 else "")
        if plan.train_yaml == "pooled_mixed":
            train = _train_mixed(model, self.mixed_loaders(seed), federation_mode_weights(self.sites.federation),
                                 self.budget.steps, lr, seed, self.config.device, self.config.chunk, label, self.say)
        else:
            train = train_chunked(model, self.loader(plan.train_yaml, seed), plan.train_modes, self.budget.steps,
                                  lr, seed, self.config.device, self.config.chunk, label, self.say)
        keep = plan.row == "pemma-lora" and seed == self.config.seeds[0]
        result = self.evaluate(model, plan.eval_modes, label, keep=keep)
        if keep:
            self.predictions = result.predictions
        sizes = model_sizes(model)
        memory_set = "pooled_ctpet" if plan.train_yaml == "pooled_mixed" else plan.train_yaml
        memory = step_peak_memory(model, self.memory_batch(memory_set), plan.memory_mode, self.config.device)
        return _row_record(plan.row, ROW_LABELS[plan.row], self.name, plan.kind, train, sizes, result, memory,
                           adapter=plan.adapter if plan.kind == "pemma" else None,
                           train_data=TRAIN_DATA[plan.train_yaml], train_modes=list(plan.train_modes), lr=lr)


def run_cnn(config: BenchConfig, sites: BenchSites, test_batches: list[dict[str, Any]], say: Say,
            roi_backbone: str, seed: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The CNN reference: SegResNet, 2 channels, from scratch, ``config.cnn_steps`` steps, at the
    crop size of ``roi_backbone``, trained with ``seed`` (default the bench's); returns its row
    and its ctpet predictions."""
    seed = config.seed if seed is None else seed
    cnn_say = lambda text: say(f"cnn | {text}" + (f" (seed {seed})" if len(config.seeds) > 1 else ""))  # noqa: E731
    seed_all(seed)
    spec = ModelSpec(backbone=roi_backbone, preset=config.preset, kind="cnn-early-fusion")
    model = build_model(spec)
    loader = train_loader(load_site_config(sites.pooled_ctpet), spec.roi_size, batch_size=config.batch_size,
                          seed=seed)
    label = ROW_LABELS["cnn-early-fusion"]
    train = train_chunked(model, loader, ["ctpet"], config.cnn_steps, config.lr_backbone, seed, config.device,
                          config.chunk, label, cnn_say)
    result = evaluate_cases(model, test_batches, ["ctpet"], config.device, overlap=config.overlap, keep_predictions=True)
    cnn_say(f"{label}: test Dice ctpet {result.dice['ctpet']:.3f} ({sum(result.seconds.values()):.0f} s)")
    memory = step_peak_memory(model, first_batch(sites.pooled_ctpet, spec.roi_size, config.batch_size, config.seed),
                              "ctpet", config.device)
    row = _row_record("cnn-early-fusion", label, "segresnet", "cnn-early-fusion", train, model_sizes(model), result,
                      memory, train_data=TRAIN_DATA["pooled_ctpet"], train_modes=["ctpet"], lr=config.lr_backbone,
                      roi_size=list(spec.roi_size))
    return row, result.predictions["ctpet"]
