"""The experiment behind ``pemma bench``: sites, rows, evaluation, the federated row.

Everything here is called by :mod:`simulation.bench` (the command) and writes nothing
but what it is asked to: bench site YAMLs and manifests under ``OUT/sites``, backbone
files under ``OUT/backbones``, the federated run folders under ``OUT/runs``.

Rows of one backbone (DESIGN.md section 3), all from the *same* CT backbone:

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
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pemma_core.model import FullModel, ModelSpec, SegmentationModel, build_backbone, build_model, count_parameters
from pemma_core.modes import MODES
from pemma_core.site import SiteConfig, load_site_config
from pemma_core.train import predict_volume, train_local
from server.settings import RunSettings

REPO = Path(__file__).resolve().parents[1]
SITE_NAMES = ("site-a", "site-b", "site-c")  # the federation, in partition order
QUIRK_CASES = ("STS_019", "STS_031", "STS_035", "STS_041")  # named in the IBSI README

Progress = Callable[[str], None]
ADAPT_LR = RunSettings.lr  # the product's adapt rate: the bench measures what 'pemma simulate' trains


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Budget:
    """Optimiser steps of one backbone's rows. Every adapted row gets ``steps`` after the
    shared CT backbone's ``pretrain_steps``; the federated row spends the same ``steps`` as
    ``fed_rounds`` x 3 sites x ``fed_local_steps``."""

    pretrain_steps: int
    fed_rounds: int
    fed_local_steps: int

    @property
    def steps(self) -> int:
        return self.fed_rounds * len(SITE_NAMES) * self.fed_local_steps


@dataclass
class BenchConfig:
    """All settings of one bench run (written to the JSON as they were used)."""

    out: Path
    mode: str  # "full" | "quick" | "custom"
    backbones: tuple[str, ...]
    preset: str
    device: str
    seed: int
    budgets: dict[str, Budget]
    cnn_steps: int
    batch_size: int = 2
    lr_backbone: float = 1e-3  # CT backbone and the CNN, from scratch
    lr_full: float = 5e-4  # full fine-tuning from the CT weights (ct-only, pet-only, early-fusion)
    lr_adapter: float = ADAPT_LR  # PEMMA adapters, centralized and federated alike
    chunk: int = 10  # steps between progress lines
    overlap: float = 0.25  # sliding-window overlap of every evaluation (pemma_core.train default)
    speed_steps: int = 3
    test_cases: int | None = None  # None: all 8
    train_cases: int | None = None  # per site; None: all
    audit: str = "all"  # "all" CT+PET cases, or "named" (README quirk cases only)
    fed_engine: str = "simulation"  # "simulation" (Flower + Ray) | "inprocess" (tests)
    threads: int | None = None
    threads_reason: str = "given"
    sites_dir: Path = REPO / "sites" / "ibsi"
    data_root: Path | None = None
    cache_dir: Path | None = None
    cnn: bool = True

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, Path):
                value = str(value)
            elif key == "budgets":
                value = {k: {**b.__dict__, "steps": b.steps} for k, b in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out


# ----------------------------------------------------------------------------- sites


@dataclass
class BenchSites:
    """The bench's site YAMLs (all under ``OUT/sites``) and what the data layer reported."""

    federation: list[Path]  # site-a, site-b, site-c (copies: absolute paths, bench device and cache)
    pooled_ct: Path  # every training case of the three sites, CT only
    pooled_ctpet: Path  # training cases of the CT+PET sites (b, c)
    test: Path  # the held-out test cases
    warnings: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return [{k.strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(handle)]


def _write_manifest(path: Path, rows: Iterable[Mapping[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case_id", "ct", "pet", "label", "split"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in ("case_id", "ct", "pet", "label", "split")})
    return path


def _write_site_yaml(path: Path, cfg: SiteConfig, name: str, modalities: Sequence[str], manifest: Path,
                     cache_dir: Path, device: str) -> Path:
    import yaml

    data = {
        "name": name,
        "data_root": str(cfg.data_root),
        "modalities": list(modalities),
        "manifest": str(manifest),
        "spacing": list(cfg.spacing),
        "patch_size": None,
        "cache_dir": str(cache_dir),
        "device": "cuda" if device.startswith("cuda") else device,
        "on_bad_case": cfg.on_bad_case,
        "ct_window": list(cfg.ct_window),
        "pet_suv_max": cfg.pet_suv_max,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by pemma bench\n" + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def prepare_sites(config: BenchConfig, progress: Progress) -> BenchSites:
    """Write the bench's site YAMLs and manifests; check every case (collecting the data
    layer's warnings and skipped cases); fill the preprocessing cache."""
    from pemma_core import data

    if config.data_root is not None:
        os.environ["PEMMA_IBSI_ROOT"] = str(Path(config.data_root).expanduser().resolve())
    folder = config.out / "sites"
    originals = {n: load_site_config(config.sites_dir / f"{n}.yaml") for n in (*SITE_NAMES, "test")}
    if not originals["site-a"].data_root.is_dir():
        raise FileNotFoundError(
            f"IBSI data not found at {originals['site-a'].data_root} (give --data-root or set PEMMA_IBSI_ROOT)"
        )
    cache = Path(config.cache_dir) if config.cache_dir else originals["site-a"].cache_dir.parent / "ibsi-bench"
    rows = {n: _read_rows(cfg.manifest) for n, cfg in originals.items()}
    if config.train_cases is not None:
        for n in SITE_NAMES:
            rows[n] = [r for r in rows[n] if r["split"] == "train"][: config.train_cases]
    if config.test_cases is not None:
        rows["test"] = rows["test"][: config.test_cases]

    federation = []
    for n in SITE_NAMES:
        cfg = originals[n]
        manifest = _write_manifest(folder / f"{n}-manifest.csv", rows[n])
        federation.append(_write_site_yaml(folder / f"{n}.yaml", cfg, cfg.name, cfg.modalities, manifest, cache, config.device))
    ct_rows = [{**r, "pet": ""} for n in SITE_NAMES for r in rows[n] if r["split"] == "train"]
    ctpet_rows = [r for n in SITE_NAMES if originals[n].has_pet for r in rows[n] if r["split"] == "train"]
    reference = originals["site-b"]
    pooled_ct = _write_site_yaml(folder / "pooled-ct.yaml", reference, "ibsi-pooled-ct", ["ct"],
                                 _write_manifest(folder / "pooled-ct-manifest.csv", ct_rows), cache, config.device)
    pooled_ctpet = _write_site_yaml(folder / "pooled-ctpet.yaml", reference, "ibsi-pooled-ctpet", ["ct", "pet"],
                                    _write_manifest(folder / "pooled-ctpet-manifest.csv", ctpet_rows), cache, config.device)
    test = _write_site_yaml(folder / "test.yaml", originals["test"], originals["test"].name, originals["test"].modalities,
                            _write_manifest(folder / "test-manifest.csv", rows["test"]), cache, config.device)
    sites = BenchSites(federation=federation, pooled_ct=pooled_ct, pooled_ctpet=pooled_ctpet, test=test)

    handler = _Collect()
    logger = logging.getLogger("pemma.data")
    logger.addHandler(handler)
    try:
        seen: set[str] = set()
        for path in (*federation, test):
            cfg = load_site_config(path)
            usable, problems = data.site_cases(cfg)
            sites.counts[cfg.name] = len(usable)
            for p in problems:
                sites.skipped.append({"site": cfg.name, **p.to_dict()})
        for message in handler.messages:
            if message not in seen:
                seen.add(message)
                site, _, text = message.partition(": ")
                sites.warnings.append({"site": site.removeprefix("site "), "message": text})
        for path in (pooled_ct, pooled_ctpet):
            cfg = load_site_config(path)
            sites.counts[cfg.name] = len(data.site_cases(cfg, "train")[0])
    finally:
        logger.removeHandler(handler)

    # Fill the preprocessing cache once, so no row pays for it.
    started = time.perf_counter()
    for path, split in ((pooled_ct, "train"), (pooled_ctpet, "train"), (test, "test"), *((p, "train") for p in federation)):
        cfg = load_site_config(path)
        for _ in data.eval_loader(cfg, split=split):
            pass
    progress(f"data: {sum(sites.counts.get(load_site_config(p).name, 0) for p in federation)} training cases at 3 sites, "
             f"{sites.counts.get('ibsi-test', 0)} test cases, cache ready in {time.perf_counter() - started:.0f} s")
    return sites


def alignment_audit(config: BenchConfig, sites: BenchSites, progress: Progress) -> list[dict[str, Any]]:
    """For CT+PET cases: PET_mask carried onto the CT-derived grid by the pipeline's own
    transform (through both affines) against CT_mask on that grid, plus header facts.

    A Dice well below the others means the headers disagree with the masks (STS_019)."""
    import nibabel as nib

    from pemma_core.data import Preprocessing, deterministic_transform

    cases: list[tuple[str, str, Path]] = []
    held: dict[str, bool] = {}
    for path in (*sites.federation, sites.test):
        cfg = load_site_config(path)
        held[cfg.name] = cfg.has_pet
        for row in _read_rows(cfg.manifest):
            cases.append((cfg.name, row["case_id"], cfg.data_root / row["case_id"]))
    if config.audit == "named":
        cases = [c for c in cases if c[1] in QUIRK_CASES]
    prep = Preprocessing.from_site(load_site_config(sites.test))
    transform = deterministic_transform(prep, has_ct=True, has_pet=False, has_label=True)
    out = []
    started = time.perf_counter()
    for site, case_id, folder in cases:
        ct_file, pet_file = folder / "CT_image.nii.gz", folder / "PET_image.nii.gz"
        if not pet_file.is_file() or not (folder / "PET_mask.nii.gz").is_file():
            continue
        ct_h, pet_h = nib.load(str(ct_file)), nib.load(str(pet_file))
        on_ct = transform({"ct": str(ct_file), "label": str(folder / "CT_mask.nii.gz")})["label"][0].numpy() > 0.5
        on_pet = transform({"ct": str(ct_file), "label": str(folder / "PET_mask.nii.gz")})["label"][0].numpy() > 0.5
        dice = 2 * float((on_ct & on_pet).sum()) / max(1.0, float(on_ct.sum() + on_pet.sum()))
        out.append({
            "site": site, "case_id": case_id,
            "pet_used": held[site],
            "ct_slices": int(ct_h.shape[2]), "pet_slices": int(pet_h.shape[2]),
            "z_origin_offset_mm": round(float(pet_h.affine[2, 3] - ct_h.affine[2, 3]), 2),
            "pet_mask_vs_ct_mask_dice": round(dice, 3),
        })
    progress(f"alignment audit: {len(out)} CT+PET cases in {time.perf_counter() - started:.0f} s")
    return out


# ----------------------------------------------------------------------------- training


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def train_chunked(
    model: SegmentationModel, loader: Iterable, modes: Sequence[str], steps: int, lr: float, seed: int,
    device: str, chunk: int, label: str, progress: Progress,
) -> dict[str, Any]:
    """:func:`pemma_core.train.train_local` in chunks of ``chunk`` steps (one optimiser
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
        progress(f"{label}: step {done}/{steps}  loss {result.loss:.3f}  {result.seconds / n:.2f} s/step")
    return {
        "steps": steps, "train_seconds": seconds, "seconds_per_step": seconds / steps, "cpu_seconds_per_step": cpu / steps,
        "loss_first_chunk": losses[0], "loss_last_chunk": losses[-1], "mode_steps": mode_steps,
    }


def load_test_batches(test_yaml: Path) -> list[dict[str, Any]]:
    """Every test case as an :func:`pemma_core.data.eval_loader` batch (kept in memory)."""
    from pemma_core import data

    return list(data.eval_loader(load_site_config(test_yaml), split="test"))


def evaluate_cases(
    model: SegmentationModel, batches: Sequence[Mapping[str, Any]], modes: Sequence[str], device: str,
    overlap: float, keep_predictions: bool = False,
) -> dict[str, Any]:
    """Foreground Dice per case and mode, as :func:`pemma_core.train.evaluate` computes it
    (MONAI ``DiceMetric``, no background, empty prediction of a non-empty label = 0), with
    the sliding-window overlap as a setting. Returns ``{"dice", "per_case", "seconds",
    "predictions"}`` (predictions: mode -> case -> uint8 mask, when asked)."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    classes = model.spec.out_channels
    per_case: dict[str, dict[str, float]] = {m: {} for m in modes}
    predictions: dict[str, dict[str, np.ndarray]] = {m: {} for m in modes}
    seconds: dict[str, float] = {m: 0.0 for m in modes}
    for batch in batches:
        case_id = str(batch["case_id"][0])
        label = batch["label"].long()
        for mode in modes:
            model.check_mode(mode)
            start = time.perf_counter()
            pred = predict_volume(model, batch["image"], mode, device, overlap=overlap).cpu()
            seconds[mode] += time.perf_counter() - start
            metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
            per_case[mode][case_id] = float(metric(one_hot(pred, classes), one_hot(label, classes)).mean())
            if keep_predictions:
                predictions[mode][case_id] = pred[0, 0].numpy().astype(np.uint8)
    dice = {m: float(np.mean(list(v.values()))) for m, v in per_case.items()}
    return {"dice": dice, "per_case": per_case, "seconds": seconds, "predictions": predictions}


def step_peak_memory(model: SegmentationModel, batch: Mapping[str, Any], mode: str, device: str) -> dict[str, Any]:
    """Peak tensor memory of one training step in ``mode`` (optimiser state already allocated).

    CPU: parameters + buffers + optimiser state, plus the highest total of the bytes
    allocated during the profiled step (``torch.profiler`` allocation events, so other
    rows' leftovers and allocator caching do not count). CUDA: ``max_memory_allocated``."""
    from simulation.bench_speed import make_step

    dev = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    step = make_step(model, batch, mode, dev, optimizer)

    # Optimiser state without a warm-up step: one AdamW step on zero gradients allocates it
    # and leaves the weights unchanged (zero moments give a zero update; no weight decay).
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        peak = int(torch.cuda.max_memory_allocated(dev))
        method = "torch.cuda.max_memory_allocated over one training step"
    else:
        persistent = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        persistent += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t))
        peak = persistent + profiled_step_peak(step)
        method = "torch.profiler: params + buffers + optimiser state + peak bytes allocated in one step"
    optimizer.zero_grad(set_to_none=True)
    return {"peak_memory_bytes": peak, "peak_memory_method": method, "peak_memory_mode": mode}


def profiled_step_peak(step: Callable[[], None]) -> int:
    """Highest running total of CPU bytes allocated while ``step()`` runs (torch.profiler)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    best = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            best = max(best, int(event.extra_fields.total_allocated))
        stack.extend(event.children)
    return best


def model_sizes(model: SegmentationModel) -> dict[str, Any]:
    total, trainable = count_parameters(model)
    return {"total_params": total, "trainable_params": trainable, "trainable_fraction": trainable / total}


# ----------------------------------------------------------------------------- rows


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


@dataclass
class RowPlan:
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


def _upload_bytes(model: SegmentationModel, sizes: Mapping[str, Any]) -> int:
    """fp32 bytes one site would send per round if this model were trained federated:
    the trainable tensors (PEMMA: its adapters; a fully trained model: all of it)."""
    return int(sizes["trainable_params"]) * 4


def first_batch(yaml_path: Path, roi: tuple[int, int, int], batch_size: int, seed: int) -> dict[str, Any]:
    from pemma_core import data

    loader = data.train_loader(load_site_config(yaml_path), roi, batch_size=batch_size, seed=seed)
    return next(iter(loader))


class BackboneBench:
    """All rows of one backbone, sharing one CT backbone and the test batches."""

    def __init__(self, config: BenchConfig, sites: BenchSites, backbone_name: str, test_batches: list[dict[str, Any]],
                 progress: Progress) -> None:
        self.config = config
        self.sites = sites
        self.name = backbone_name
        self.budget = config.budgets[backbone_name]
        self.spec = ModelSpec(backbone=backbone_name, preset=config.preset)
        self.test_batches = test_batches
        self.say = lambda text: progress(f"{backbone_name} | {text}")
        self.backbone: torch.nn.Module | None = None
        self.backbone_file = config.out / "backbones" / f"{backbone_name}-{config.preset}.safetensors"
        self.predictions: dict[str, dict[str, np.ndarray]] = {}
        self._batches: dict[str, dict[str, Any]] = {}

    def loader(self, which: str, seed: int):
        from pemma_core import data

        path = getattr(self.sites, which)
        return data.train_loader(load_site_config(path), self.spec.roi_size, batch_size=self.config.batch_size, seed=seed)

    def memory_batch(self, which: str) -> dict[str, Any]:
        if which not in self._batches:
            self._batches[which] = first_batch(getattr(self.sites, which), self.spec.roi_size, self.config.batch_size,
                                               self.config.seed)
        return self._batches[which]

    def evaluate(self, model: SegmentationModel, modes: Sequence[str], label: str, keep: bool = False) -> dict[str, Any]:
        result = evaluate_cases(model, self.test_batches, modes, self.config.device, self.config.overlap, keep)
        self.say(f"{label}: test Dice " + ", ".join(f"{m} {d:.3f}" for m, d in result["dice"].items())
                 + f" ({sum(result['seconds'].values()):.0f} s, {len(self.test_batches)} cases)")
        return result

    # ------------------------------------------------------------------ backbone
    def train_backbone(self) -> dict[str, Any]:
        from pemma_core.adapters import backbone_fingerprint, save_backbone

        _seed_all(self.config.seed)
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
        sizes = model_sizes(wrapper)
        return {
            "row": "ct-backbone", "label": ROW_LABELS["ct-backbone"], "backbone": self.name, "kind": "ct backbone",
            "train_data": "pooled CT, all sites", "train_modes": ["ct"], "lr": self.config.lr_backbone,
            "fingerprint": fingerprint, "file": str(self.backbone_file), **train, **sizes,
            "bytes_up_per_round": _upload_bytes(wrapper, sizes), "bytes_up_note": "if federated (full model, fp32)",
            "dice": result["dice"], "per_case": result["per_case"], "eval_seconds": result["seconds"], **memory,
        }

    # ------------------------------------------------------------------ centralized rows
    def run_row(self, plan: RowPlan) -> dict[str, Any]:
        assert self.backbone is not None, "train the backbone first"
        _seed_all(self.config.seed)
        spec = self.spec.with_(kind=plan.kind, adapter=plan.adapter)
        model = build_model(spec, self.backbone)
        lr = float(getattr(self.config, plan.lr_key))
        label = ROW_LABELS[plan.row]
        train = train_chunked(model, self.loader(plan.train_yaml, self.config.seed), plan.train_modes, self.budget.steps,
                              lr, self.config.seed, self.config.device, self.config.chunk, label, self.say)
        keep = plan.row == "pemma-lora"
        result = self.evaluate(model, plan.eval_modes, label, keep=keep)
        if keep:
            self.predictions = result["predictions"]
        sizes = model_sizes(model)
        memory = step_peak_memory(model, self.memory_batch(plan.train_yaml), plan.memory_mode, self.config.device)
        data_name = {"pooled_ct": "pooled CT, all sites", "pooled_ctpet": "pooled CT+PET sites (b, c)"}[plan.train_yaml]
        return {
            "row": plan.row, "label": label, "backbone": self.name, "kind": plan.kind,
            "adapter": plan.adapter if plan.kind == "pemma" else None, "train_data": data_name,
            "train_modes": list(plan.train_modes), "lr": lr, **train, **sizes,
            "bytes_up_per_round": _upload_bytes(model, sizes),
            "bytes_up_note": "if federated (adapters, fp32)" if plan.kind == "pemma" else "if federated (full model, fp32)",
            "dice": result["dice"], "per_case": result["per_case"], "eval_seconds": result["seconds"], **memory,
        }

    # ------------------------------------------------------------------ federated row
    def run_federated(self) -> dict[str, Any]:
        from server.run_dir import RunDir, bytes_per_site, overhead_share
        from simulation.predict import load_run_model

        assert self.backbone is not None
        run_dir = self.config.out / "runs" / f"fed-{self.name}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        values: dict[str, Any] = dict(
            run_dir=str(run_dir), site_configs=",".join(str(p) for p in self.sites.federation),
            backbone=self.name, preset=self.config.preset, adapter="lora", rank=self.spec.rank, alpha=self.spec.alpha,
            rounds=self.budget.fed_rounds, local_steps=self.budget.fed_local_steps, lr=self.config.lr_adapter,
            batch_size=self.config.batch_size, pretrain_rounds=0, backbone_file=str(self.backbone_file),
            seed=self.config.seed, min_sites=2, evaluate=False,
        )
        values["prognosis_rounds"] = 0  # segmentation only: no survival phase in this benchmark
        settings = RunSettings(**values)
        self.say(f"PEMMA-LoRA federated: {settings.rounds} rounds x 3 sites x {settings.local_steps} steps "
                 f"through Flower ({self.config.fed_engine})")
        started = time.perf_counter()
        if self.config.fed_engine == "simulation":
            run_path = _simulate(settings, self.config, self.say)
        else:
            run_path = _simulate_inprocess(settings, self.say)
        wall = time.perf_counter() - started
        run = RunDir(run_path)
        metrics = dict(run.metrics())
        # Only the adapt phase (newer run folders also list prognosis rounds under "rounds").
        metrics["rounds"] = [r for r in metrics["rounds"] if str(r.get("phase") or "adapt") == "adapt"]
        rounds_out = []
        per_round_dice: dict[int, dict[str, float]] = {}
        last = max(r["round"] for r in metrics["rounds"])
        final: dict[str, Any] = {}
        for r in metrics["rounds"]:
            n = int(r["round"])
            modes = list(MODES) if n == last else ["ctpet"]
            model = load_run_model(run.path, n)
            result = self.evaluate(model, modes, f"federated round {n}")
            per_round_dice[n] = result["dice"]
            if n == last:
                final = result
                final_model = model
            rounds_out.append({
                "round": n, "dice": result["dice"], "wall_seconds": r.get("wall_seconds"),
                "sites": [{k: s.get(k) for k in ("name", "status", "reason", "bytes_up", "train_seconds", "setup_seconds",
                                                  "loss", "examples")} for s in r.get("sites", [])],
            })
        ok_sites = [s for r in metrics["rounds"] for s in r.get("sites", []) if s.get("status") == "ok"]
        steps_done = sum(self.budget.fed_local_steps for _ in ok_sites)
        train_seconds = sum(float(s.get("train_seconds") or 0.0) for s in ok_sites)
        per_round_up = [sum(int(s.get("bytes_up") or 0) for s in r.get("sites", []) if s.get("status") == "ok")
                        for r in metrics["rounds"]]
        sizes = model_sizes(final_model)
        memory = step_peak_memory(final_model, self.memory_batch("pooled_ctpet"), "ctpet", self.config.device)
        memory["peak_memory_method"] += " (the federated model, measured outside Flower on a CT+PET batch)"
        return {
            "row": "pemma-lora-fed", "label": ROW_LABELS["pemma-lora-fed"], "backbone": self.name, "kind": "pemma",
            "adapter": "lora", "engine": self.config.fed_engine,
            "train_data": "site-a CT only; site-b, site-c CT+PET (Flower "
                          + ("simulation engine)" if self.config.fed_engine == "simulation" else "ServerApp/ClientApp in process)"),
            "train_modes": ["ct (site-a)", "ct, pet, ctpet (b, c)"], "lr": self.config.lr_adapter,
            "steps": steps_done, "rounds": self.budget.fed_rounds, "local_steps": self.budget.fed_local_steps,
            "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(1, steps_done),
            "cpu_seconds_per_step": None, "wall_seconds": wall, **sizes,
            "bytes_up_per_round": int(np.mean(per_round_up)) if per_round_up else 0,
            "bytes_up_note": "measured: sum over sites, mean over rounds",
            "bytes_up_per_site": bytes_per_site(metrics), "overhead": overhead_share(metrics),
            "dice": final["dice"], "per_case": final["per_case"], "eval_seconds": final["seconds"],
            "per_round": rounds_out, "run_dir": str(run.path), **memory,
            "sites_failed": sorted({f"{s.get('name')}: {s.get('reason')}" for r in metrics["rounds"]
                                    for s in r.get("sites", []) if s.get("status") != "ok"}),
        }


def _simulate(settings: Any, config: BenchConfig, say: Progress) -> Path:
    """The federated row through ``pemma simulate``'s engine (Flower simulation, Ray)."""
    import contextlib
    import io

    from simulation.simulate import simulate

    if config.threads:
        os.environ["OMP_NUM_THREADS"] = str(config.threads)  # Ray actors inherit the driver's environment
    if config.device.startswith("cuda"):
        # Ray hides GPUs from actors that reserve none (simulate() reserves num_gpus=0).
        os.environ.setdefault("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        path = simulate(settings)
    for line in buffer.getvalue().splitlines():
        if line.strip():
            say("  flower: " + line.strip())
    return Path(path)


def _simulate_inprocess(settings: Any, say: Progress) -> Path:
    """The same ServerApp/ClientApp on :class:`simulation.inprocess.InProcessGrid` (no Ray): for tests."""
    from client.client_app import make_client_app
    from server.server_app import run_federation
    from simulation.inprocess import InProcessGrid

    logging.getLogger("flwr").setLevel(logging.WARNING)
    n = len(settings.site_config_list())
    grid = InProcessGrid(make_client_app(), [{"partition-id": i, "num-partitions": n} for i in range(n)],
                         settings.to_run_config())

    def progress(record: Any) -> None:
        say(f"  flower: [{record.phase} round {record.round}] {record.wall_seconds:.1f} s, "
            + ", ".join(f"{s.name} {s.status}" for s in record.sites.values()))

    return Path(run_federation(grid, settings, progress=progress).path)


def run_cnn(config: BenchConfig, sites: BenchSites, test_batches: list[dict[str, Any]], progress: Progress,
            roi_backbone: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The CNN reference: SegResNet, 2 channels, from scratch, ``config.cnn_steps`` steps."""
    from pemma_core import data

    say = lambda text: progress(f"cnn | {text}")  # noqa: E731
    _seed_all(config.seed)
    spec = ModelSpec(backbone=roi_backbone, preset=config.preset, kind="cnn-early-fusion")
    model = build_model(spec)
    loader = data.train_loader(load_site_config(sites.pooled_ctpet), spec.roi_size, batch_size=config.batch_size,
                               seed=config.seed)
    label = ROW_LABELS["cnn-early-fusion"]
    train = train_chunked(model, loader, ["ctpet"], config.cnn_steps, config.lr_backbone, config.seed, config.device,
                          config.chunk, label, say)
    result = evaluate_cases(model, test_batches, ["ctpet"], config.device, config.overlap, keep_predictions=True)
    say(f"{label}: test Dice ctpet {result['dice']['ctpet']:.3f} ({sum(result['seconds'].values()):.0f} s)")
    sizes = model_sizes(model)
    memory = step_peak_memory(model, first_batch(sites.pooled_ctpet, spec.roi_size, config.batch_size, config.seed),
                              "ctpet", config.device)
    row = {
        "row": "cnn-early-fusion", "label": label, "backbone": "segresnet", "kind": "cnn-early-fusion",
        "train_data": "pooled CT+PET sites (b, c)", "train_modes": ["ctpet"], "lr": config.lr_backbone,
        "roi_size": list(spec.roi_size), **train, **sizes, "bytes_up_per_round": _upload_bytes(model, sizes),
        "bytes_up_note": "if federated (full model, fp32)", "dice": result["dice"], "per_case": result["per_case"],
        "eval_seconds": result["seconds"], **memory,
    }
    return row, result["predictions"]["ctpet"]


__all__ = [
    "BackboneBench",
    "BenchConfig",
    "BenchSites",
    "Budget",
    "PLANS",
    "QUIRK_CASES",
    "ROW_LABELS",
    "alignment_audit",
    "evaluate_cases",
    "first_batch",
    "load_test_batches",
    "model_sizes",
    "prepare_sites",
    "profiled_step_peak",
    "run_cnn",
    "step_peak_memory",
    "train_chunked",
]
