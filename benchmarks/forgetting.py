"""Why PEMMA's CT mode forgets, measured: ``python -m benchmarks.forgetting``.

Trains the bench's centralized PEMMA row (pooled CT+PET sites, the product's mode mix) from
one CT backbone, once per variant, and records per variant:

* the test Dice of every mode, and of the CT mode with the ``shared`` LoRA switched off
  (its B factors zeroed), which separates the shared adapters' drift from the CT adapter's;
* how far the ``shared`` tensors moved, summed per step by the mode of the step
  (``drift_by_mode``: sum over steps of the L2 norm of that step's change);
* DoRA's magnitude vectors: their relative change from the backbone's column norms;
* normalisation statistics: the running-statistics buffers the network holds (a layer with
  running statistics would change the CT mode through PET batches without any gradient).

Variants: ``lora`` and ``dora`` (the tree's PEMMA as built, each group at the tree's rate,
``GROUP_LR_SCALES``), ``lora-shared-lr-0.2`` (the shared group at 0.2x its rate), and DoRA with
the shared magnitude vectors at 0.1x their rate (``dora-magnitude-lr-0.1``) or frozen at the
backbone's column norms (``dora-magnitude-frozen``). Results in ``benchmarks/results/forgetting/``
were taken before the tree had group rates, when every group trained at the adapter rate. Run it against two source
trees to compare designs: it measures whatever ``pemma_core`` it imports.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import cli as bench_cli
from benchmarks.config import config_from_args
from benchmarks.rows import BackboneBench, seed_all
from benchmarks.sites import load_test_batches, prepare_sites
from pemma_core.model.factory import build_model
from pemma_core.model.files import load_backbone

from pemma_core.training.local import _cycle, mode_sampler, segmentation_loss, train_step

# variant -> (adapter, the shared group's rate scale, the DoRA magnitude vectors' rate scale)
VARIANTS = {"lora": ("lora", 1.0, 1.0), "dora": ("dora", 1.0, 1.0), "lora-shared-lr-0.2": ("lora", 0.2, 1.0),
            "dora-magnitude-lr-0.1": ("dora", 1.0, 0.1), "dora-magnitude-frozen": ("dora", 1.0, 0.0)}
MODE_WEIGHTS = None  # the product's default mix (pemma_core.training.local.mode_sampler)


def _shared(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    groups = model.param_groups
    return {n: p for n, p in model.named_parameters() if groups.get(n) == "shared"}


def _zero_shared_lora(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in _shared(model).items():
            if ".lora_B." in name:
                p.zero_()


def run_variant(bench: BackboneBench, variant: str, steps: int, say: Any) -> dict[str, Any]:
    adapter, shared_scale, magnitude_scale = VARIANTS[variant]
    config = bench.config
    seed_all(config.seed)
    model = build_model(bench.spec.with_(kind="pemma", adapter=adapter), bench.backbone)
    lr = config.lr_adapter
    shared = _shared(model)
    magnitudes = {n: p for n, p in shared.items() if "magnitude" in n}  # DoRA only
    groups = model.param_groups
    by_rate: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        # the tree's own group rates (make_optimizer's), times the variant's scales
        rate = lr * model.lr_scales.get(groups.get(name, ""), 1.0)
        rate *= (shared_scale if name in shared else 1.0) * (magnitude_scale if name in magnitudes else 1.0)
        p.requires_grad_(p.requires_grad and rate > 0)
        if p.requires_grad:
            by_rate.setdefault(rate, []).append(p)
    optimizer = torch.optim.AdamW([{"params": ps, "lr": r} for r, ps in by_rate.items()], lr=lr, weight_decay=0.0)
    magnitudes0 = {n: p.detach().clone() for n, p in magnitudes.items()}
    start_state = {n: p.detach().clone() for n, p in shared.items()}
    drift: dict[str, float] = {}
    loader = bench.loader("pooled_ctpet", config.seed)
    modes = ["ct", "pet", "ctpet"]
    model.to(config.device).train()
    torch.manual_seed(config.seed)
    draws = mode_sampler(modes, None, config.seed)
    loss_fn = segmentation_loss()
    started = time.perf_counter()
    batches = _cycle(loader)
    for step in range(steps):
        before = {n: p.detach().clone() for n, p in shared.items()}
        batch, mode = next(batches), next(draws)
        loss = train_step(model, batch["image"].to(config.device), batch["label"].to(config.device), mode, optimizer,
                          loss_fn, config.device)
        moved = sum(float((p.detach() - before[n]).norm() ** 2) for n, p in shared.items()) ** 0.5
        drift[mode] = drift.get(mode, 0.0) + moved
        if (step + 1) % 10 == 0:
            say(f"{variant}: step {step + 1}/{steps} loss {loss:.3f}")
    train_seconds = time.perf_counter() - started
    result = bench.evaluate(model, modes, variant)
    total = sum(float((p.detach() - start_state[n]).norm() ** 2) for n, p in shared.items()) ** 0.5
    out: dict[str, Any] = {
        "variant": variant, "adapter": adapter, "shared_lr_scale": shared_scale,
        "magnitude_lr_scale": magnitude_scale, "steps": steps,
        "train_seconds": train_seconds, "dice": result.dice, "per_case": result.per_case,
        "drift_by_mode": drift, "shared_moved_total": total,
    }
    if magnitudes0:
        out["dora_magnitude_relative_change"] = (
            sum(float((shared[n].detach() - m0).norm() ** 2) for n, m0 in magnitudes0.items()) ** 0.5
            / sum(float(m0.norm() ** 2) for m0 in magnitudes0.values()) ** 0.5)
    _zero_shared_lora(model)
    out["dice_ct_without_shared_lora"] = bench.evaluate(model, ["ct"], f"{variant} (shared LoRA off)").dice["ct"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.forgetting", description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=72, help="adapt steps per variant (default 72: 2x the standard bench)")
    parser.add_argument("--pretrain-steps", type=int, default=80)
    parser.add_argument("--backbone-file", type=Path, help="reuse this CT backbone (else trained and saved under --out)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0, help="the variants' training seed (the backbone's is 0)")
    parser.add_argument("--label", default="", help="a name for the source tree measured, written to the JSON")
    args = parser.parse_args(argv)
    bench_parser = argparse.ArgumentParser()
    bench_cli.add_arguments(bench_parser)
    bench_args = bench_parser.parse_args(["--out", str(args.out), "--data-root", str(args.data_root), "--backbones",
                                          "unetr", "--threads", "1", "--pretrain-steps", str(args.pretrain_steps)])
    bench_args.seed = args.seed
    config = config_from_args(bench_args)
    torch.set_num_threads(1)
    say = lambda text: print(time.strftime("%H:%M:%S"), text, flush=True)  # noqa: E731
    sites = prepare_sites(config, say)
    bench = BackboneBench(config, sites, "unetr", load_test_batches(sites.test), say)
    results: dict[str, Any] = {"label": args.label, "steps": args.steps, "seed": args.seed, "variants": []}
    if args.backbone_file and args.backbone_file.exists():
        bench.backbone, _ = load_backbone(args.backbone_file)
        results["backbone_file"] = str(args.backbone_file)
    else:
        row = bench.train_backbone()
        results["backbone"] = {"dice": row["dice"], "per_case": row["per_case"], "file": row["file"]}
    net = bench.backbone
    results["running_stat_buffers"] = sorted(n for n, _ in net.named_buffers() if "running" in n)
    out_file = args.out / f"forgetting{('-' + args.label) if args.label else ''}-seed{args.seed}.json"
    for variant in args.variants:
        results["variants"].append(run_variant(bench, variant, args.steps, say))
        out_file.write_text(json.dumps(results, indent=1))
        say(f"wrote {out_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
