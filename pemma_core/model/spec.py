"""What a model is: :class:`ModelSpec`, its one JSON encoding, and the CT backbone it names.

A spec travels as :meth:`ModelSpec.to_json` text (in every message and every weight file)
and is read back with :meth:`ModelSpec.from_json`, which names the field that is wrong.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

BACKBONES = ("unetr", "swin-unetr")
ADAPTERS = ("lora", "dora")
KINDS = ("pemma", "ct-only", "pet-only", "early-fusion", "cnn-early-fusion")

# Size presets. UNETR's patch is fixed at 16 by MONAI and it always has 12 layers;
# Swin UNETR needs inputs divisible by 32.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "unetr": {
        "paper": dict(img_size=96, hidden_size=768, mlp_dim=3072, num_heads=12, feature_size=16),
        "small": dict(img_size=64, hidden_size=192, mlp_dim=768, num_heads=6, feature_size=16),
        "tiny": dict(img_size=32, hidden_size=48, mlp_dim=96, num_heads=2, feature_size=4),
    },
    "swin-unetr": {
        "paper": dict(img_size=96, feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)),
        "small": dict(img_size=64, feature_size=24, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)),
        # Swin needs >= 64: its 1/32 bottleneck is instance-normalised and must exceed 1 voxel.
        "tiny": dict(img_size=64, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24), window_size=4),
    },
}
PATCH_DIVISOR = {"unetr": 16, "swin-unetr": 32}
# Overlap of the roi_size windows that every evaluation and prediction slides over a volume.
DEFAULT_OVERLAP = 0.25

# User-facing LoRA target names -> module-name patterns per backbone.
TARGETS: dict[str, dict[str, str]] = {
    "unetr": {"qkv": r"attn\.qkv", "proj": r"attn\.out_proj", "mlp": r"mlp\.linear[12]"},
    "swin-unetr": {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "mlp": r"mlp\.linear[12]"},
}

# Parameter groups (docs/ARCHITECTURE.md, "Parameter groups"); which of them a mode
# trains is ``pemma_core.model.pemma.MODE_GROUPS``.
GROUPS = ("shared", "ct", "pet", "fusion", "prognosis", "ehr")
FULL_GROUP = "backbone"  # every tensor of a fully fine-tuned baseline


PET_EMBED_KINDS: tuple[str, ...] = ("lowrank", "full")  # a rank-`rank` delta on the CT conv, or a full copy


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored (as :meth:`to_json`) in every weight file."""

    backbone: str = "unetr"
    preset: str = "tiny"
    kind: str = "pemma"
    adapter: str = "lora"
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "proj")
    out_channels: int = 2
    bottleneck: int = 16  # width of the single-mode adapters and of the fusion projection
    pet_embed: str = "lowrank"  # "lowrank" (delta of rank `rank` on the CT conv) or "full" copy
    survival: bool = False  # add a Cox risk head on the pooled encoder tokens (group prognosis)
    ehr_features: int = 0  # width of the preprocessed EHR vector; > 0 adds the EHR encoder (group ehr)
    ehr_embedding: int = 8
    # PEMMA only, training only: recompute activations in backward instead of keeping them
    # (less peak memory, a slower step; outputs and gradients unchanged; pemma.RECOMPUTED_BLOCKS)
    checkpointing: bool = False

    def __post_init__(self) -> None:
        _choice("backbone", self.backbone, BACKBONES)
        _choice("kind", self.kind, KINDS)
        _choice("adapter", self.adapter, ADAPTERS)
        _choice("pet_embed", self.pet_embed, PET_EMBED_KINDS)
        if self.preset not in PRESETS[self.backbone]:
            raise ValueError(
                f"unknown preset {self.preset!r} for {self.backbone}: expected one of "
                f"{', '.join(PRESETS[self.backbone])}"
            )
        for name in ("rank", "alpha", "out_channels", "bottleneck"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.ehr_features < 0:
            raise ValueError(f"ehr_features must be >= 0, got {self.ehr_features}")
        if self.ehr_features and not self.survival:
            raise ValueError("ehr_features needs survival=True: the EHR branch feeds the survival head")
        if not isinstance(self.checkpointing, bool):
            raise ValueError(f"checkpointing must be true or false, got {self.checkpointing!r}")
        if self.checkpointing and self.kind != "pemma":
            raise ValueError(f"checkpointing applies to kind 'pemma' only, not {self.kind!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("targets must name at least one module kind")
        unknown = [t for t in self.targets if t not in TARGETS[self.backbone]]
        if unknown:
            raise ValueError(
                f"unknown target module(s) {unknown} for {self.backbone}: expected some of "
                f"{', '.join(TARGETS[self.backbone])}"
            )
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def roi_size(self) -> tuple[int, int, int]:
        size = PRESETS[self.backbone][self.preset]["img_size"]
        return (size, size, size)

    def to_json(self) -> str:
        """The spec as one JSON object, every field by name."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """The spec :meth:`to_json` wrote; a field left out takes its default.

        Raises ``ValueError`` naming the bad field: unknown, of the wrong JSON type, or
        refused by the spec's own checks (unknown preset, rank < 1, ...).
        """
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"model spec is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"model spec must be a JSON object, got {type(data).__name__}")
        defaults = {f.name: f.default for f in fields(cls)}
        unknown = sorted(set(data) - set(defaults))
        if unknown:
            raise ValueError(f"model spec has unknown field(s) {unknown}")
        values = {name: _json_field(name, value, defaults[name]) for name, value in data.items()}
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"model spec: {exc}") from exc

    def with_(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)


def _json_field(name: str, value: Any, default: Any) -> Any:
    """``value`` read from JSON for the field whose default is ``default``, type-checked."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = "a list of strings" if isinstance(default, tuple) else type(default).__name__
        raise ValueError(f"model spec field {name!r} must be {expected}, got {value!r}")
    return value


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(allowed)}")


def build_backbone(spec: ModelSpec, in_channels: int = 1) -> nn.Module:
    """The MONAI CT network of ``spec.backbone`` at ``spec.preset``.

    Input ``[B, in_channels, S, S, S]`` with ``S`` the preset's crop size (UNETR needs
    exactly ``S``, its positional grid is fixed; Swin UNETR takes any multiple of 32).
    Output ``[B, spec.out_channels, S, S, S]``.
    """
    # Imported here, not at the top: the command-line help and the run settings read this
    # module's names and must not load MONAI and torch (seconds of start-up).
    from monai.networks.nets import UNETR, SwinUNETR

    from pemma_core.model.monai_speed import speed_up_monai_modules

    preset = dict(PRESETS[spec.backbone][spec.preset])
    size = preset.pop("img_size")
    divisor = PATCH_DIVISOR[spec.backbone]
    if size % divisor:
        raise ValueError(f"{spec.backbone} input size {size} is not divisible by {divisor}")
    if spec.backbone == "unetr":
        net: nn.Module = UNETR(in_channels=in_channels, out_channels=spec.out_channels, img_size=size, **preset)
    else:
        net = SwinUNETR(in_channels=in_channels, out_channels=spec.out_channels, **preset)
    speed_up_monai_modules(net)
    net.pemma_spec = spec  # lets pretraining and files know what this network is
    return net
