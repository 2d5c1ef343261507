"""``pemma info``: sizes of a PEMMA model, computed from the real model."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from pemma_core import protocol
from pemma_core.console import UsageError
from pemma_core.model.spec import ADAPTERS, BACKBONES, ModelSpec


def model_info(spec: ModelSpec, wire_dtype: str = "float32") -> dict[str, Any]:
    """Parameter counts, fractions and bytes of one adapter upload (``adapter_bytes_wire``: every
    trainable tensor in ``wire_dtype``'s wire form, int8 scales included) vs the full model."""
    from pemma_core.model.factory import build_model, count_parameters  # torch and MONAI: not for --help
    from pemma_core.model.files import trainable_state

    protocol.check_wire_dtype(wire_dtype)

    model = build_model(spec)
    total, trainable = count_parameters(model)
    params = dict(model.named_parameters())
    groups: Counter[str] = Counter()
    for name, group in model.param_groups.items():
        groups[group] += params[name].numel()
    wire_bytes = protocol.payload_bytes(protocol.to_wire(trainable_state(model), wire_dtype))
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
        "wire_dtype": wire_dtype,
        "adapter_bytes_wire": wire_bytes,
        "full_model_bytes_fp32": total * 4,
        "frozen_bytes": frozen_bytes,
        "upload_ratio_fp16": (total * 4) / (trainable * 2),
        "upload_ratio_wire": (total * 4) / wire_bytes,
        "groups": dict(sorted(groups.items())),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", choices=BACKBONES, default="unetr")
    parser.add_argument("--adapter", choices=ADAPTERS, default="lora")
    parser.add_argument("--preset", default="tiny", help="paper, small or tiny (default tiny)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--pet-embed", choices=("lowrank", "full"), default="lowrank",
                        help="PET patch embedding: low-rank delta of the CT one (default) or a full copy")
    parser.add_argument("--wire-dtype", choices=tuple(protocol.WIRE_DTYPES), default="float32",
                        help="tensor dtype on the wire for adapter_bytes_wire (int8: with its per-block scales; "
                             "default float32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        spec = ModelSpec(backbone=args.backbone, adapter=args.adapter, preset=args.preset, rank=args.rank,
                         pet_embed=args.pet_embed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    info = model_info(spec, args.wire_dtype)
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
    print(f"  adapter upload {args.wire_dtype:<7}{info['adapter_bytes_wire'] / mb:>12.3f} MiB  "
          f"(full model fp32 is {info['upload_ratio_wire']:.0f}x that)")
    for group, count in info["groups"].items():
        print(f"  group {group:<10}      {count:>12,}")
    return 0
