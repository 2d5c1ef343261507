"""The settings of one ``pemma bench`` run: step budgets and :class:`BenchConfig`.

The batch size, seed and PEMMA adapter rate default to the product's run settings
(:class:`pemma_core.config.run.RunSettings`): the bench measures what ``pemma simulate``
trains. Wall times of the budgets below are in ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pemma_core.config.run import RunSettings
from pemma_core.model.spec import DEFAULT_OVERLAP

__all__ = [
    "DEFAULT_SITES_DIR",
    "FULL_BUDGETS",
    "LONG_BUDGETS",
    "QUICK_BUDGETS",
    "SITE_NAMES",
    "BenchConfig",
    "Budget",
    "Say",
    "config_from_args",
    "default",
]

Say = Callable[[str], None]  # one progress line

DEFAULT_SITES_DIR = Path(__file__).resolve().parents[1] / "sites" / "ibsi"
SITE_NAMES = ("site-a", "site-b", "site-c")  # the federation, in partition order

# Backbone -> (CT backbone steps, federated rounds, local steps per site per round): every
# row after the backbone gets rounds x 3 sites x local steps optimiser steps (batch 2).
FULL_BUDGETS = {"unetr": (80, 3, 4), "swin-unetr": (24, 2, 2)}
# --budget long: 4x the UNETR rows' steps (144), 2x Swin UNETR's (24); the CNN gets the
# UNETR rows' total as always. Trained at LONG_SEEDS seeds unless --seeds says otherwise.
LONG_BUDGETS = {"unetr": (80, 6, 8), "swin-unetr": (24, 4, 2)}
LONG_SEEDS = 3
QUICK_BUDGETS = {"unetr": (8, 1, 2), "swin-unetr": (4, 1, 1)}


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

    def to_json(self) -> dict[str, int]:
        return {**self.__dict__, "steps": self.steps}


@dataclass
class BenchConfig:
    """All settings of one bench run (written to the JSON as they were used)."""

    out: Path
    mode: str  # "full" | "long" | "quick" | "custom"
    backbones: tuple[str, ...]
    preset: str
    device: str
    seed: int
    budgets: dict[str, Budget]
    cnn_steps: int
    seeds: tuple[int, ...] = (0,)  # every row but the CT backbone is trained once per seed
    batch_size: int = field(default_factory=lambda: RunSettings.default("batch-size"))
    lr_backbone: float = 1e-3  # CT backbone and the CNN, from scratch
    lr_full: float = 5e-4  # full fine-tuning from the CT weights (ct-only, pet-only, early-fusion)
    lr_adapter: float = field(default_factory=lambda: RunSettings.default("lr"))  # PEMMA adapters, centralized and federated alike
    chunk: int = 10  # steps between progress lines
    overlap: float = DEFAULT_OVERLAP  # sliding-window overlap of every evaluation
    speed_steps: int = 3
    test_cases: int | None = None  # None: all 8
    train_cases: int | None = None  # per site; None: all
    audit: str = "all"  # "all" CT+PET cases, or "named" (README quirk cases only)
    fed_engine: str = "simulation"  # "simulation" (Flower + Ray) | "inprocess" (tests)
    fed_aggregation: str = field(default_factory=lambda: RunSettings.default("aggregation"))  # federated row's rule
    fed_wire_dtype: str = field(default_factory=lambda: RunSettings.default("wire_dtype"))  # federated row's tensors on the wire
    fed_lora_aggregation: str = field(default_factory=lambda: RunSettings.default("lora_aggregation"))  # auto | naive | exact
    fed_secure: bool = False  # federated row with secure aggregation
    fed_dp_epsilon: float = 0.0  # federated row with DP-SGD at this epsilon per site (0: none)
    threads: int | None = None
    threads_reason: str = "given"
    sites_dir: Path = DEFAULT_SITES_DIR
    data_root: Path | None = None
    cache_dir: Path | None = None
    cnn: bool = True

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, Path):
                value = str(value)
            elif key == "budgets":
                value = {k: b.to_json() for k, b in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out


def default(name: str) -> Any:
    """The default of one :class:`BenchConfig` field (the command's option defaults)."""
    f = BenchConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _budgets(args: argparse.Namespace) -> dict[str, Budget]:
    table = QUICK_BUDGETS if args.quick else LONG_BUDGETS if args.budget == "long" else FULL_BUDGETS
    budgets = {}
    for name in args.backbones:
        pretrain, rounds, local = table[name]
        budgets[name] = Budget(
            pretrain_steps=args.pretrain_steps if args.pretrain_steps is not None else pretrain,
            fed_rounds=args.fed_rounds if args.fed_rounds is not None else rounds,
            fed_local_steps=args.fed_local_steps if args.fed_local_steps is not None else local,
        )
    for name, b in budgets.items():
        if min(b.pretrain_steps, b.fed_rounds, b.fed_local_steps) < 1:
            raise ValueError(f"{name}: pretrain steps, fed rounds and fed local steps must be >= 1 ({b})")
    return budgets


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The run's settings from ``pemma bench``'s options; ValueError names a bad one."""
    if not args.backbones:
        args.backbones = ["unetr"] if args.quick else ["unetr", "swin-unetr"]
    budgets = _budgets(args)
    first = budgets[args.backbones[0]]
    custom = any(v is not None for v in (args.pretrain_steps, args.fed_rounds, args.fed_local_steps, args.cnn_steps,
                                         args.test_cases, args.train_cases, args.speed_steps))
    if not 0.0 <= args.overlap < 1.0:
        raise ValueError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.quick and args.budget == "long":
        raise ValueError("--quick and --budget long contradict each other: choose one")
    n_seeds = args.seeds if args.seeds is not None else (LONG_SEEDS if args.budget == "long" else 1)
    if n_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {n_seeds}")
    named = "quick" if args.quick else ("long" if args.budget == "long" else "full")
    return BenchConfig(
        out=args.out.expanduser().resolve(),
        mode="custom" if custom or args.preset != "small" or args.fed_engine != "simulation" else named,
        backbones=tuple(args.backbones),
        preset=args.preset,
        device=args.device,
        seed=args.seed,
        budgets=budgets,
        cnn_steps=args.cnn_steps if args.cnn_steps is not None else first.pretrain_steps + first.steps,
        seeds=tuple(args.seed + i for i in range(n_seeds)),
        batch_size=args.batch_size,
        lr_backbone=args.lr_backbone,
        lr_full=args.lr_full,
        lr_adapter=args.lr_adapter,
        chunk=2 if args.quick else 10,
        overlap=args.overlap,
        speed_steps=args.speed_steps if args.speed_steps is not None else (1 if args.quick else 3),
        test_cases=args.test_cases if args.test_cases is not None else (2 if args.quick else None),
        train_cases=args.train_cases,
        audit="named" if args.quick else "all",
        fed_engine=args.fed_engine,
        fed_aggregation=args.fed_aggregation,
        fed_wire_dtype=args.fed_wire_dtype,
        fed_lora_aggregation=getattr(args, "fed_lora_aggregation", None) or default("fed_lora_aggregation"),
        fed_secure=bool(getattr(args, "fed_secure_aggregation", False)),
        fed_dp_epsilon=float(getattr(args, "fed_dp_epsilon", 0.0) or 0.0),
        threads=args.threads,
        sites_dir=args.sites_dir.expanduser().resolve(),
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        cnn=not args.no_cnn,
    )
