"""``pemma info``: sizes of a PEMMA model, computed from the real model."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from pemma_core.console import UsageError
from pemma_core.model.spec import ADAPTERS, BACKBONES, ModelSpec


def model_info(spec: ModelSpec) -> dict[str, Any]:
    """Parameter counts, fractions and bytes of one adapter upload vs the full model."""
    from pemma_core.model.factory import build_model, count_parameters  # torch and MONAI: not for --help

    model = build_model(spec)
    total, trainable = count_parameters(model)
    params = dict(model.named_parameters())
    groups: Counter[str] = Counter()
    for name, group in model.param_groups.items():
        groups[group] += params[name].numel()
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {
        "backbone": spec.backbone,
        "preset": spec.preset,
        "adapter": spec.adapter,
        "rank": spec.rank,
        "pet_embed": spec.pet_embed,
        "roi_size": list(spec.roi_size),
        "total_params": total,
        "trainable_params": trainable,
        "trainable_fraction": trainable / total,
        "adapter_bytes_fp32": trainable * 4,
        "adapter_bytes_fp16": trainable * 2,
        "full_model_bytes_fp32": total * 4,
        "frozen_bytes": frozen_bytes,
        "upload_ratio_fp16": (total * 4) / (trainable * 2),
        "groups": dict(sorted(groups.items())),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", choices=BACKBONES, default="unetr")
    parser.add_argument("--adapter", choices=ADAPTERS, default="lora")
    parser.add_argument("--preset", default="tiny", help="paper, small or tiny (default tiny)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--pet-embed", choices=("lowrank", "full"), default="lowrank",
                        help="PET patch embedding: low-rank delta of the CT one (default) or a full copy")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        spec = ModelSpec(backbone=args.backbone, adapter=args.adapter, preset=args.preset, rank=args.rank,
                         pet_embed=args.pet_embed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    info = model_info(spec)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    mb = 1024 * 1024
    print(f"{spec.backbone} / {spec.adapter} rank {spec.rank} / preset {spec.preset} (crop {info['roi_size']})")
    print(f"  total parameters      {info['total_params']:>12,}")
    print(f"  trainable parameters  {info['trainable_params']:>12,}  ({100 * info['trainable_fraction']:.3f}%)")
    print(f"  adapter upload fp32   {info['adapter_bytes_fp32'] / mb:>12.3f} MiB")
    print(f"  adapter upload fp16   {info['adapter_bytes_fp16'] / mb:>12.3f} MiB")
    print(f"  full model fp32       {info['full_model_bytes_fp32'] / mb:>12.3f} MiB  "
          f"({info['upload_ratio_fp16']:.0f}x one fp16 upload)")
    for group, count in info["groups"].items():
        print(f"  group {group:<10}      {count:>12,}")
    return 0
