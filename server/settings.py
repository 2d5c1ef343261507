"""The run config of the pemma Flower app, typed.

The keys live in ``pyproject.toml`` under ``[tool.flwr.app.config]`` (``flwr run .``
overrides them with ``--run-config "key=value ..."``); ``pemma simulate`` builds the same
dictionary from its options. Every key, its default and meaning is in :data:`KEYS`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pemma_core.model import ModelSpec
from pemma_core.wire import check_wire_dtype

# run-config key -> (field, default, help)
KEYS: dict[str, tuple[str, Any, str]] = {
    "run-dir": ("run_dir", "runs/flwr-run", "run folder (checkpoints, metrics.json, report.md)"),
    "site-configs": ("site_configs", "", "simulation: comma-separated site YAMLs by partition-id (empty: phantom federation; "
                     "a deployed SuperNode names its own, node config site-config)"),
    "federation-dir": ("federation_dir", "", "simulation without site-configs: where the simulated nodes write the phantom "
                       "federation on first use (empty: RUN/federation)"),
    "phantom-sites": ("phantom_sites", 3, "sites of the phantom federation (site-1 CT, site-2 CT+PET, site-3 CT+PET+EHR...)"),
    "phantom-cases": ("phantom_cases", 6, "cases per phantom site"),
    "backbone": ("backbone", "unetr", "unetr | swin-unetr"),
    "preset": ("preset", "tiny", "tiny | small | paper"),
    "adapter": ("adapter", "lora", "lora | dora"),
    "rank": ("rank", 8, "LoRA/DoRA rank"),
    "alpha": ("alpha", 16, "LoRA/DoRA alpha"),
    "num-server-rounds": ("rounds", 3, "adapt rounds"),
    "local-steps": ("local_steps", 5, "optimiser steps per site per adapt round"),
    "lr": ("lr", 1e-2, "adapt learning rate (adapters start at zero: a higher rate than full training)"),
    "batch-size": ("batch_size", 2, "training batch size"),
    "pretrain-rounds": ("pretrain_rounds", 2, "pretrain-ct rounds (0: no pretraining, random backbone)"),
    "pretrain-steps": ("pretrain_steps", 5, "optimiser steps per site per pretrain-ct round"),
    "pretrain-lr": ("pretrain_lr", 2e-3, "pretrain-ct learning rate"),
    "prognosis-rounds": ("prognosis_rounds", 2, "prognosis rounds after adapt: Cox head (+ EHR encoder) on the frozen adapters (0: none)"),
    "prognosis-steps": ("prognosis_steps", 10, "full-cohort optimiser steps per site per prognosis round"),
    "prognosis-lr": ("prognosis_lr", 1e-2, "prognosis learning rate"),
    "backbone-file": ("backbone_file", "", "a pemma backbone file to adapt (skips pretrain-ct)"),
    "wire-dtype": ("wire_dtype", "float32", "float32 | float16: tensors on the wire"),
    "seed": ("seed", 0, "seed of everything (initial tensors, site sampling of crops and modes)"),
    "min-sites": ("min_sites", 2, "fewest accepted site replies a round needs to aggregate"),
    "max-update-norm": ("max_update_norm", 0.0, "reject a site update with ||update - global|| above this (0: no bound)"),
    "round-timeout": ("round_timeout", 600.0, "seconds to wait for replies in a round"),
    "evaluate": ("evaluate", True, "federated evaluation (Dice per site and mode) after every adapt round"),
    "resume": ("resume", False, "continue the run in run-dir from its last finished round"),
}


@dataclass
class RunSettings:
    run_dir: str = "runs/flwr-run"
    site_configs: str = ""
    federation_dir: str = ""
    phantom_sites: int = 3
    phantom_cases: int = 6
    backbone: str = "unetr"
    preset: str = "tiny"
    adapter: str = "lora"
    rank: int = 8
    alpha: int = 16
    rounds: int = 3
    local_steps: int = 5
    lr: float = 1e-2
    batch_size: int = 2
    pretrain_rounds: int = 2
    pretrain_steps: int = 5
    pretrain_lr: float = 2e-3
    prognosis_rounds: int = 2
    prognosis_steps: int = 10
    prognosis_lr: float = 1e-2
    backbone_file: str = ""
    wire_dtype: str = "float32"
    seed: int = 0
    min_sites: int = 2
    max_update_norm: float = 0.0
    round_timeout: float = 600.0
    evaluate: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        check_wire_dtype(self.wire_dtype)
        for name in ("rounds", "local_steps", "pretrain_steps", "prognosis_steps", "batch_size", "min_sites"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.pretrain_rounds < 0:
            raise ValueError(f"pretrain-rounds must be >= 0, got {self.pretrain_rounds}")
        if self.prognosis_rounds < 0:
            raise ValueError(f"prognosis-rounds must be >= 0, got {self.prognosis_rounds}")
        self.model_spec()  # validates backbone/preset/adapter/rank/alpha

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Typed settings from a Flower run config; unknown keys are an error."""
        unknown = sorted(set(run_config) - set(KEYS))
        if unknown:
            raise ValueError(f"unknown run config key(s) {unknown}; known: {', '.join(KEYS)}")
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for key, value in run_config.items():
            name = KEYS[key][0]
            kind = types[name]
            if kind == "bool" and isinstance(value, str):
                value = value.strip().lower() in ("1", "true", "yes")
            values[name] = {"int": int, "float": float, "bool": bool, "str": str}[kind](value)
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {key: getattr(self, name) for key, (name, _, _) in KEYS.items()}

    def model_spec(self) -> ModelSpec:
        return ModelSpec(backbone=self.backbone, preset=self.preset, adapter=self.adapter, rank=self.rank, alpha=self.alpha)

    def site_config_list(self) -> list[Path]:
        return [Path(p.strip()).expanduser() for p in self.site_configs.split(",") if p.strip()]

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir).expanduser().resolve()

    def resolved_federation_dir(self) -> Path:
        if self.federation_dir:
            return Path(self.federation_dir).expanduser().resolve()
        return self.resolved_run_dir() / "federation"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["model_spec"] = self.model_spec().to_dict()
        return data

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)
