"""The experiment rows of one backbone, all from the *same* CT backbone, and the CNN row.

==================  =========================  ============================  ===============
row                 model (``kind``)           trained on                    evaluated in
==================  =========================  ============================  ===============
ct-backbone         the CT backbone itself     pooled CT of every site       ct
ct-only             ``ct-only`` (continued)    pooled CT of every site       ct
pet-only            ``pet-only``               pooled CT+PET sites, PET      pet
early-fusion        ``early-fusion``           pooled CT+PET sites           ctpet
pemma-lora          ``pemma`` + LoRA           pooled CT+PET sites, 3 modes  ct, pet, ctpet
pemma-dora          ``pemma`` + DoRA           pooled CT+PET sites, 3 modes  ct, pet, ctpet
pemma-lora-fed      ``pemma`` + LoRA, Flower   site-a CT, b and c CT+PET     ct, pet, ctpet
cnn-early-fusion    ``cnn-early-fusion``       pooled CT+PET sites           ctpet
==================  =========================  ============================  ===============

The federated row is :mod:`benchmarks.federated`. Backbone files are written under
``OUT/backbones``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
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
from pemma_core.model.files import backbone_fingerprint, save_backbone
from pemma_core.model.pemma import SegmentationModel
from pemma_core.model.spec import ModelSpec, build_backbone
from pemma_core.modes import MODES
from pemma_core.training.local import EvalResult, evaluate_cases, train_local

__all__ = ["PLANS", "ROW_LABELS", "BackboneBench", "RowPlan", "run_cnn", "seed_all", "train_chunked"]

ROW_LABELS = {
    "ct-backbone": "CT backbone (before adaptation)",
    "ct-only": "CT-only",
    "pet-only": "PET-only",
    "early-fusion": "Early fusion (full FT)",
    "pemma-lora": "PEMMA-LoRA centralized",
    "pemma-dora": "PEMMA-DoRA centralized",
    "pemma-lora-fed": "PEMMA-LoRA federated",
    "cnn-early-fusion": "CNN early fusion (SegResNet)",
}
TRAIN_DATA = {"pooled_ct": "pooled CT, all sites", "pooled_ctpet": "pooled CT+PET sites (b, c)"}


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
    RowPlan("pemma-lora", "pemma", "lora", "pooled_ctpet", MODES, MODES, "lr_adapter", "ctpet"),
    RowPlan("pemma-dora", "pemma", "dora", "pooled_ctpet", MODES, MODES, "lr_adapter", "ctpet"),
)


def seed_all(seed: int) -> None:
    """Seed torch and numpy before a row builds its model."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def train_chunked(
    model: SegmentationModel, loader: Iterable, modes: Sequence[str], steps: int, lr: float, seed: int,
    device: str, chunk: int, label: str, say: Say,
) -> dict[str, Any]:
    """:func:`pemma_core.training.local.train_local` in chunks of ``chunk`` steps (one optimiser
    throughout; chunk ``c`` draws its modes with seed ``seed + c``), a progress line per chunk."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
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
    }


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
        return train_loader(load_site_config(getattr(self.sites, which)), self.spec.roi_size,
                            batch_size=self.config.batch_size, seed=seed)

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

    def run_row(self, plan: RowPlan) -> dict[str, Any]:
        """One centralized row of :data:`PLANS`, from the CT backbone."""
        assert self.backbone is not None, "train the backbone first"
        seed_all(self.config.seed)
        model = build_model(self.spec.with_(kind=plan.kind, adapter=plan.adapter), self.backbone)
        lr = float(getattr(self.config, plan.lr_key))
        label = ROW_LABELS[plan.row]
        train = train_chunked(model, self.loader(plan.train_yaml, self.config.seed), plan.train_modes, self.budget.steps,
                              lr, self.config.seed, self.config.device, self.config.chunk, label, self.say)
        keep = plan.row == "pemma-lora"
        result = self.evaluate(model, plan.eval_modes, label, keep=keep)
        if keep:
            self.predictions = result.predictions
        sizes = model_sizes(model)
        memory = step_peak_memory(model, self.memory_batch(plan.train_yaml), plan.memory_mode, self.config.device)
        return _row_record(plan.row, label, self.name, plan.kind, train, sizes, result, memory,
                           adapter=plan.adapter if plan.kind == "pemma" else None,
                           train_data=TRAIN_DATA[plan.train_yaml], train_modes=list(plan.train_modes), lr=lr)


def run_cnn(config: BenchConfig, sites: BenchSites, test_batches: list[dict[str, Any]], say: Say,
            roi_backbone: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The CNN reference: SegResNet, 2 channels, from scratch, ``config.cnn_steps`` steps, at the
    crop size of ``roi_backbone``; returns its row and its ctpet predictions."""
    cnn_say = lambda text: say(f"cnn | {text}")  # noqa: E731
    seed_all(config.seed)
    spec = ModelSpec(backbone=roi_backbone, preset=config.preset, kind="cnn-early-fusion")
    model = build_model(spec)
    loader = train_loader(load_site_config(sites.pooled_ctpet), spec.roi_size, batch_size=config.batch_size,
                          seed=config.seed)
    label = ROW_LABELS["cnn-early-fusion"]
    train = train_chunked(model, loader, ["ctpet"], config.cnn_steps, config.lr_backbone, config.seed, config.device,
                          config.chunk, label, cnn_say)
    result = evaluate_cases(model, test_batches, ["ctpet"], config.device, overlap=config.overlap, keep_predictions=True)
    cnn_say(f"{label}: test Dice ctpet {result.dice['ctpet']:.3f} ({sum(result.seconds.values()):.0f} s)")
    memory = step_peak_memory(model, first_batch(sites.pooled_ctpet, spec.roi_size, config.batch_size, config.seed),
                              "ctpet", config.device)
    row = _row_record("cnn-early-fusion", label, "segresnet", "cnn-early-fusion", train, model_sizes(model), result,
                      memory, train_data=TRAIN_DATA["pooled_ctpet"], train_modes=["ctpet"], lr=config.lr_backbone,
                      roi_size=list(spec.roi_size))
    return row, result.predictions["ctpet"]
