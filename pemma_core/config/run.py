"""The settings of a pemma run, defined once.

Every setting is one field of :class:`RunSettings`: its default, its allowed range and
its help text (the field's description). The Flower run config spells the keys with
hyphens (the field aliases: ``local-steps``, ``num-server-rounds``...); they live in
``pyproject.toml`` under ``[tool.flwr.app.config]`` (a test keeps that table equal to the
defaults here) and ``flwr run .`` overrides them with ``--run-config "key=value ..."``.

Readers, all through :meth:`RunSettings.from_run_config` or the constructor: the
ServerApp, the ClientApp (which site a simulated node serves), ``pemma simulate`` (its
options take their help and defaults from here) and ``pemma bench`` (the adapt rate,
batch size and seed of its federated row).

Values are checked, not coerced: a whole number must be one (``rank = "eight"`` is an
error, not 0 or a crash), booleans may also be the strings ``"true"``/``"false"``, and
every bad key is reported at once, each naming the run-config key and what it expects.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from pemma_core.aggregation import RULES
from pemma_core.lora_aggregation import LORA_AGGREGATIONS, exact_conflicts
from pemma_core.model.spec import ADAPTERS, BACKBONES, PRESETS, ModelSpec
from pemma_core.protocol import WIRE_DTYPES
from pemma_core.server_optimizer import SERVER_LR, SERVER_OPTIMIZERS

__all__ = ["RunConfigError", "RunSettings"]

_PRESET_NAMES = tuple(dict.fromkeys(name for presets in PRESETS.values() for name in presets))
RUN_ID = "{run_id}"  # in run-dir: replaced by the Flower run id


class RunConfigError(ValueError):
    """Run settings that cannot be used; ``problems`` holds one line per bad key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("bad run config:\n  - " + "\n  - ".join(self.problems))


def _hyphenated(name: str) -> str:
    return name.replace("_", "-")


class RunSettings(BaseModel):
    """All settings of one run (see the module docstring). Python code uses the field
    names (``local_steps``), run configs the hyphenated keys (``local-steps``)."""

    model_config = ConfigDict(
        alias_generator=_hyphenated, populate_by_name=True, extra="forbid", strict=True, validate_assignment=True
    )

    # ------------------------------------------------------------- where
    run_dir: str = Field(
        f"runs/flwr-{RUN_ID}", min_length=1,
        description=f"run folder (checkpoints, metrics.json, report.md); {RUN_ID} becomes the Flower run id",
    )
    site_configs: str = Field(
        "", description="simulation: comma-separated site YAMLs by partition-id (empty: phantom federation; "
                        "a deployed SuperNode names its own, node config site-config)",
    )
    federation_dir: str = Field(
        "runs/phantom-federation",
        description="simulation without site-configs: where the first simulated node writes the phantom federation, "
                    "then reused (empty: RUN/federation)",
    )
    phantom_sites: int = Field(3, ge=1, description="sites of the phantom federation (site-1 CT, site-2 CT+PET, "
                                                   "site-3 CT+PET+EHR...)")
    phantom_cases: int = Field(18, ge=1, description="cases per phantom site (18: 12 training and 6 test cases, "
                                                     "enough for the sites' default privacy floors)")
    # ------------------------------------------------------------- model
    backbone: Literal[BACKBONES] = Field("unetr", description="CT backbone")  # type: ignore[valid-type]
    preset: Literal[_PRESET_NAMES] = Field("tiny", description="model size")  # type: ignore[valid-type]
    adapter: Literal[ADAPTERS] = Field("lora", description="adapter")  # type: ignore[valid-type]
    rank: int = Field(8, ge=1, description="LoRA/DoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA/DoRA alpha")
    activation_checkpointing: bool = Field(False, strict=False, description="recompute the frozen blocks' activations "
                                                                           "in backward instead of keeping them: less "
                                                                           "training memory, slower steps (same maths)")
    # ------------------------------------------------------------- training
    rounds: int = Field(5, ge=1, alias="num-server-rounds", description="adapt rounds")
    local_steps: int = Field(10, ge=1, description="optimiser steps per site per adapt round")
    lr: float = Field(1e-2, gt=0, description="adapt learning rate (adapters start at zero: a higher rate than "
                                             "full training)")
    batch_size: int = Field(2, ge=1, description="training batch size")
    pretrain_rounds: int = Field(3, ge=0, description="pretrain-ct rounds (0: no pretraining, random backbone; "
                                                     "ignored with backbone-file)")
    pretrain_steps: int = Field(12, ge=1, description="optimiser steps per site per pretrain-ct round")
    pretrain_lr: float = Field(2e-3, gt=0, description="pretrain-ct learning rate")
    prognosis_rounds: int = Field(2, ge=0, description="prognosis rounds after adapt: Cox head (+ EHR encoder) on "
                                                      "the frozen adapters (0: none)")
    prognosis_steps: int = Field(10, ge=1, description="full-cohort optimiser steps per site per prognosis round")
    prognosis_lr: float = Field(1e-2, gt=0, description="prognosis learning rate")
    backbone_file: str = Field("", description="a pemma backbone file to adapt instead of pretraining one")
    # ------------------------------------------------------------- federation
    wire_dtype: Literal[tuple(WIRE_DTYPES)] = Field("float32", description="tensor dtype on the wire")  # type: ignore[valid-type]
    seed: int = Field(0, ge=0, description="seed of everything (initial tensors, site sampling of crops and modes)")
    min_sites: int = Field(2, ge=1, description="fewest accepted site replies a round needs to aggregate")
    max_update_norm: float = Field(0.0, ge=0, description="adapt: clip every site update to ||update - global|| <= "
                                                          "this (0: none); choose it from the honest norms in "
                                                          "metrics.json, see docs/ARCHITECTURE.md")
    outlier_factor: float = Field(5.0, ge=0, description="reject a site update that moved a parameter group, per "
                                                         "element, more than this many times the round's median "
                                                         "(every phase; 0: off)")
    aggregation: Literal[RULES] = Field("mean", description="how each parameter group is combined: mean (weighted by "  # type: ignore[valid-type]
                                                            "examples), or the Byzantine-robust median or trimmed-mean")
    lora_aggregation: Literal[("auto", *LORA_AGGREGATIONS)] = Field(  # type: ignore[valid-type]
        "auto", description="adapt: low-rank adapter pairs: exact (the weighted mean of the sites' products B A, "
                            "re-factorised to the rank by truncated SVD; needs aggregation = mean, no secure "
                            "aggregation, no server optimiser), naive (each factor averaged), or auto: exact where "
                            "those allow it, else naive")
    server_optimizer: Literal[SERVER_OPTIMIZERS] = Field(  # type: ignore[valid-type]
        "none", description="adapt: server step on the aggregated update: none (take it), fedadam or fedyogi "
                            "(Reddi et al. 2021); not with lora-aggregation = exact")
    server_lr: float = Field(SERVER_LR, gt=0, description="adapt: the server optimiser's learning rate (eta)")
    secure_aggregation: bool = Field(False, strict=False, description="the server learns, per parameter group, only "
                                                                     "the weighted sum over the sites that trained it "
                                                                     "(pairwise masks, Shamir dropout recovery); sites "
                                                                     "clip and check their own updates")
    secure_max_dropouts: int = Field(1, ge=0, description="secure aggregation: sites of a round that may vanish after "
                                                          "masking and the round still completes")
    secure_min_cohort: int = Field(2, ge=1, description="secure aggregation: a parameter group is aggregated only over "
                                                        "at least this many sites")
    dp_target_epsilon: float = Field(0.0, ge=0, description="patient-level DP-SGD on the adapters: each site's "
                                                            "epsilon budget for the adapt phase (0: no DP)")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="DP: delta of the (epsilon, delta) guarantee")
    dp_clip: float = Field(1.0, gt=0, description="DP: bound on one patient's gradient norm per step")
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for replies in a round")
    evaluate: bool = Field(True, strict=False, description="federated evaluation (Dice per site and mode) after "
                                                          "every adapt round")
    resume: bool = Field(False, strict=False, description="continue the run in run-dir from its last finished round")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise RunConfigError(_problems(exc)) from None

    @model_validator(mode="after")
    def _valid_model_spec(self) -> RunSettings:
        self.model_spec()  # the preset exists for this backbone, and the spec's own checks
        return self

    @model_validator(mode="after")
    def _valid_lora_aggregation(self) -> RunSettings:
        conflicts = exact_conflicts(self.aggregation, self.secure_aggregation, self.server_optimizer)
        if self.lora_aggregation == "exact" and conflicts:
            raise ValueError("; ".join(conflicts))
        return self

    @property
    def lora_aggregation_rule(self) -> str:
        """``naive`` or ``exact``: the rule the adapt rounds use (``auto`` resolved). Exact where the
        server sees each site's factors and combines them by their mean with no server step: the
        naive rule's mean(B) mean(A) let the federated CT mode collapse on IBSI (BENCHMARKS.md)."""
        if self.lora_aggregation != "auto":
            return self.lora_aggregation
        return "naive" if exact_conflicts(self.aggregation, self.secure_aggregation, self.server_optimizer) else "exact"

    # ------------------------------------------------------------- reading
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], run_id: int | None = None) -> RunSettings:
        """Settings from a Flower run config (hyphenated keys; missing keys take the defaults).

        ``run_id`` replaces ``{run_id}`` in ``run-dir``. Raises :class:`RunConfigError`
        listing every unknown or bad key at once.
        """
        keys = {field.alias: name for name, field in cls.model_fields.items()}
        problems = [_unknown(key, list(keys)) for key in run_config if key not in keys]
        try:
            settings = cls(**{key: value for key, value in run_config.items() if key in keys})
        except RunConfigError as exc:
            problems = exc.problems + problems
        if problems:
            raise RunConfigError(problems)
        if run_id is not None:
            settings.run_dir = settings.run_dir.replace(RUN_ID, str(run_id))
        return settings

    def to_run_config(self) -> dict[str, Any]:
        """The settings as a Flower run config (hyphenated keys, every key)."""
        return self.model_dump(by_alias=True)

    @classmethod
    def field_name(cls, key: str) -> str:
        """The field name of a run-config key or field name (``local-steps`` -> ``local_steps``)."""
        for name, field in cls.model_fields.items():
            if key in (name, field.alias):
                return name
        raise KeyError(_unknown(key, [f.alias for f in cls.model_fields.values()]))

    @classmethod
    def default(cls, key: str) -> Any:
        """The default of one setting (run-config key or field name)."""
        return cls.model_fields[cls.field_name(key)].default

    @classmethod
    def help(cls, key: str) -> str:
        """One setting's help text with its default, for command-line options."""
        field = cls.model_fields[cls.field_name(key)]
        return f"{field.description} (default {_show(field.default)})"

    @classmethod
    def option(cls, key: str) -> dict[str, Any]:
        """``argparse.add_argument`` keywords for one setting: type, choices, help; no
        default (None means "not given", so a resumed run keeps its own values)."""
        field = cls.model_fields[cls.field_name(key)]
        kind = field.annotation
        if get_origin(kind) is Literal:
            return {"choices": get_args(kind), "help": cls.help(key)}
        return {"type": kind, "help": cls.help(key)}

    # ------------------------------------------------------------- derived
    def model_spec(self) -> ModelSpec:
        """The model this run trains (backbone, preset, adapter, rank, alpha)."""
        return ModelSpec(backbone=self.backbone, preset=self.preset, adapter=self.adapter, rank=self.rank, alpha=self.alpha,
                         checkpointing=self.activation_checkpointing)

    def site_config_list(self) -> list[Path]:
        """The site YAMLs of ``site-configs``, in partition order (empty: none named)."""
        return [Path(p.strip()).expanduser() for p in self.site_configs.split(",") if p.strip()]

    def resolved_run_dir(self) -> Path:
        """``run-dir`` as an absolute path."""
        return Path(self.run_dir).expanduser().resolve()

    def resolved_federation_dir(self) -> Path:
        """Where the phantom federation is (``federation-dir``, or RUN/federation when empty)."""
        if self.federation_dir:
            return Path(self.federation_dir).expanduser().resolve()
        return self.resolved_run_dir() / "federation"

    def to_json(self) -> dict[str, Any]:
        """What ``run.json`` holds: every setting by field name, plus the model spec."""
        return {**self.model_dump(), "model_spec": json.loads(self.model_spec().to_json())}


# ----------------------------------------------------------------------------- messages


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "none"


def _expected(field: FieldInfo) -> str:
    """What a field accepts, in words: its type and its bounds."""
    kind = field.annotation
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(kind))
    if kind is bool:
        return "true or false"
    text = {int: "a whole number", float: "a number", str: "a string"}[kind]
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            text += f" >= {bound.ge:g}"
        elif isinstance(bound, annotated_types.Gt):
            text += f" > {bound.gt:g}"
        elif isinstance(bound, annotated_types.MinLen) and bound.min_length == 1:
            text = "a non-empty string"
    return text


def _unknown(key: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(str(key), known, n=1)
    return f"{key}: unknown run config key" + (f" (did you mean {hint[0]!r}?)" if hint else f"; known: {', '.join(known)}")


def _problems(exc: ValidationError) -> list[str]:
    """One line per bad key, naming the run-config key and what it expects."""
    fields = RunSettings.model_fields
    names = {key: name for name, field in fields.items() for key in (name, field.alias)}
    problems: dict[str, str] = {}
    for error in exc.errors():
        if not error["loc"]:  # a check across fields (the model spec)
            problems.setdefault(error["msg"], error["msg"].removeprefix("Value error, "))
            continue
        key = str(error["loc"][0])
        if key not in names:
            problems.setdefault(key, _unknown(key, list(names)))
            continue
        field = fields[names[key]]
        problems.setdefault(field.alias, f"{field.alias}: expected {_expected(field)}, got {error['input']!r}")
    return list(problems.values())
