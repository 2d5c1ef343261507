"""PEMMA: parameter-efficient multi-modal adaptation of a frozen CT segmentation transformer.

One factory builds every model the project compares:

* ``build_backbone(spec)``: the CT model, a MONAI ``UNETR`` or ``SwinUNETR`` with one
  input channel, at a size preset (``paper``, ``small``, ``tiny``).
* ``build_model(spec, backbone)``: ``spec.kind`` picks

  - ``pemma``: the backbone frozen, plus the trainable parts of DESIGN.md section 3,
  - ``ct-only`` / ``pet-only``: the whole backbone fine-tuned on one modality,
  - ``early-fusion``: a two-channel copy of the backbone initialised from the CT weights
    (the PET input weights start at zero, so it starts as the CT model), fully trained.
  - ``cnn-early-fusion``: a reference CNN, MONAI ``SegResNet`` with 2 input channels
    (CT, PET), trained from scratch; no transformer and no CT backbone
    (``spec.backbone``/``spec.preset`` only fix its crop size).

Every model is called as ``model(image, mode)`` with ``image`` of shape
``[B, 2, X, Y, Z]`` (channel 0 CT, channel 1 PET; see :mod:`pemma_core.modes`) and
returns logits ``[B, out_channels, X, Y, Z]``.

The PEMMA path, for both backbones (``e = patch embedding``, ``f = fusion``)::

    e_ct  = frozen CT patch conv(CT)
    e_pet = (frozen CT patch conv + low-rank delta)(PET)          group pet
    ctpet : tokens = f(e_ct, e_pet)                                group fusion
    ct    : tokens = a_ct(e_ct)            a_ct: CT adapter        group ct
    pet   : tokens = a_pet(e_pet)          a_pet: PET adapter      group pet
    f(u, v) = u + up(down([u, v]))   a 1x1x1 projection of the concatenation that starts
                                     as "take the CT half" (up is zero at init)
    a(x)    = x + up(gelu(down(x)))  a residual 1x1x1 bottleneck, zero at init
    first skip = frozen encoder1(CT, or PET in mode pet) + zero-init PET skip block(PET)
    LoRA/DoRA (peft) on the attention qkv and output projections     group shared

Because every new branch starts at zero, modes ``ct`` and ``ctpet`` reproduce the CT
backbone exactly at initialisation. Which groups a mode trains is ``MODE_GROUPS``.

The single modes do not pass through the fusion projection (DESIGN.md puts their adapters
"before the same projection"): only ``ctpet`` trains it, so the CT mode would follow
wherever CT+PET training moved it. On IBSI it did (UNETR, 36 adapt steps): the CT-mode
Dice fell from the backbone's 0.399 to 0.322 (LoRA) and 0.178 (DoRA), and in a DoRA run
resetting the projection alone took it from 0.374 back to 0.399. Routed this way, the
benchmark's CT mode stays within 0.5 points of the backbone (BENCHMARKS.md, forgetting).
The mode a CT-only site serves now depends only on groups that CT steps train.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import UNETR, SegResNet, SwinUNETR
from monai.networks.nets.swin_unetr import WindowAttention
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from pemma_core.modes import IMAGE_CHANNEL, MODES, REQUIRED_MODALITIES, check_mode

BACKBONES = ("unetr", "swin-unetr")
ADAPTERS = ("lora", "dora")
KINDS = ("pemma", "ct-only", "pet-only", "early-fusion", "cnn-early-fusion")
CNN_INIT_FILTERS = 16  # SegResNet width of the cnn-early-fusion reference (about 4.7 M parameters)

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

# User-facing LoRA target names -> module-name patterns per backbone.
TARGETS: dict[str, dict[str, str]] = {
    "unetr": {"qkv": r"attn\.qkv", "proj": r"attn\.out_proj", "mlp": r"mlp\.linear[12]"},
    "swin-unetr": {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "mlp": r"mlp\.linear[12]"},
}

# Parameter groups (DESIGN.md section 4) and the groups a training step in each mode
# may update. Fusion is *used* by the single modes (it is the shared path into the
# transformer) but only CT+PET batches train it, so a CT-only site never changes it.
GROUPS = ("shared", "ct", "pet", "fusion", "prognosis", "ehr")
MODE_GROUPS: dict[str, frozenset[str]] = {
    "ct": frozenset({"shared", "ct"}),
    "pet": frozenset({"shared", "pet"}),
    "ctpet": frozenset({"shared", "pet", "fusion"}),
}
FULL_GROUP = "backbone"  # every tensor of a fully fine-tuned baseline


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored (as JSON) in every weight file."""

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

    def __post_init__(self) -> None:
        _choice("backbone", self.backbone, BACKBONES)
        _choice("kind", self.kind, KINDS)
        _choice("adapter", self.adapter, ADAPTERS)
        _choice("pet_embed", self.pet_embed, ("lowrank", "full"))
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"model spec has unknown field(s) {sorted(unknown)}")
        data = dict(data)
        if "targets" in data:
            data["targets"] = tuple(data["targets"])
        return cls(**data)

    def with_(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(allowed)}")


def build_backbone(spec: ModelSpec, in_channels: int = 1) -> nn.Module:
    """The MONAI CT network of ``spec.backbone`` at ``spec.preset``.

    Input ``[B, in_channels, S, S, S]`` with ``S`` the preset's crop size (UNETR needs
    exactly ``S``, its positional grid is fixed; Swin UNETR takes any multiple of 32).
    Output ``[B, spec.out_channels, S, S, S]``.
    """
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


class ChannelInstanceNorm(nn.Module):
    """``nn.InstanceNorm3d(affine=False)`` computed as ``group_norm`` with one group per channel.

    The same normalisation (per sample and channel, biased variance, same ``eps``) with no
    parameters or buffers, but its output is not a view: MONAI's blocks apply an in-place
    LeakyReLU and ``out += residual`` to the norm output, and on ``instance_norm``'s view
    output autograd then copies the whole activation twice in backward (``CopySlices``),
    about 15% of a UNETR training step on CPU (profile in BENCHMARKS.md).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_features, None, None, self.eps)


class SdpaWindowAttention(WindowAttention):
    """MONAI's Swin ``WindowAttention`` with ``scaled_dot_product_attention`` in training too.

    MONAI uses the fused kernel only without gradients; here it is used always (same maths:
    the relative-position bias, plus the shift mask, is the additive attention mask). With a
    frozen bias table (PEMMA) the fused kernel also runs backward; a trainable one makes
    PyTorch fall back to the explicit computation. Swap in with :func:`speed_up_monai_modules`.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        index = self.relative_position_index[:n, :n].reshape(-1)  # type: ignore[index]
        bias = self.relative_position_bias_table[index].reshape(n, n, heads).permute(2, 0, 1)
        if mask is not None:
            nw = mask.shape[0]
            bias = bias.reshape(1, 1, heads, n, n) + mask.reshape(1, nw, 1, n, n)
            bias = bias.expand(b // nw, nw, heads, n, n).reshape(b, heads, n, n)
        else:
            bias = bias.unsqueeze(0)
        dropout = float(self.attn_drop.p) if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


def speed_up_monai_modules(net: nn.Module) -> nn.Module:
    """Swap in numerically equivalent, faster modules, in place: every parameter-free
    ``InstanceNorm3d`` -> :class:`ChannelInstanceNorm`, every Swin ``WindowAttention`` ->
    :class:`SdpaWindowAttention`. Parameters, buffers and ``state_dict`` keys are unchanged
    (so is the backbone fingerprint); outputs agree to float rounding."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.InstanceNorm3d) and not child.affine and not child.track_running_stats:
                setattr(parent, name, ChannelInstanceNorm(child.num_features, child.eps))
            elif type(child) is WindowAttention:
                child.__class__ = SdpaWindowAttention
    return net


class _ModeState:
    """The mode of the forward pass in flight, shared by the swapped-in input modules.

    MONAI's own ``forward`` runs unchanged; only its first layers (patch conv, first skip)
    are replaced by modules that read both channels and this mode.
    """

    def __init__(self) -> None:
        self.mode = "ct"


class LowRankConv3d(nn.Module):
    """``conv(x; W_frozen + (B @ A).view(W.shape), bias)``: a rank-``r`` update of a frozen conv.

    Used for the PET patch embedding: UNETR's 16^3 patch conv alone would be 3% of the
    model if copied in full; the delta keeps the PET embedding a few thousand numbers.
    """

    def __init__(self, frozen: nn.Conv3d, rank: int) -> None:
        super().__init__()
        self.frozen = frozen
        out_ch = frozen.weight.shape[0]
        fan_in = frozen.weight[0].numel()
        self.lora_down = nn.Parameter(torch.randn(rank, fan_in) / fan_in**0.5)
        self.lora_up = nn.Parameter(torch.zeros(out_ch, rank))
        self.bias = nn.Parameter(frozen.bias.detach().clone()) if frozen.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.frozen.weight + (self.lora_up @ self.lora_down).view_as(self.frozen.weight)
        return F.conv3d(x, weight, self.bias, self.frozen.stride, self.frozen.padding)


class ResidualAdapter(nn.Module):
    """``x + up(gelu(down(x)))`` with 1x1x1 convs; ``up`` starts at zero (identity at init)."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.down = nn.Conv3d(channels, width, 1)
        self.up = nn.Conv3d(width, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


class FusionProjection(nn.Module):
    """``[u, v] -> u + up(down(cat(u, v)))``: a 2C -> C 1x1x1 projection starting as "take u"."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.down = nn.Conv3d(2 * channels, width, 1)
        self.up = nn.Conv3d(width, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return u + self.up(self.down(torch.cat([u, v], dim=1)))


class ModalityPatchEmbed(nn.Module):
    """Replaces the backbone's patch conv: ``[B, 2, ...]`` in, ``[B, C, ...]`` tokens out."""

    def __init__(self, ct_conv: nn.Conv3d, spec: ModelSpec, state: _ModeState) -> None:
        super().__init__()
        self.state = state
        channels = ct_conv.weight.shape[0]
        self.ct_conv = ct_conv
        if spec.pet_embed == "lowrank":
            self.pet_conv: nn.Module = LowRankConv3d(ct_conv, spec.rank)
        else:
            self.pet_conv = copy.deepcopy(ct_conv)
        self.ct_adapter = ResidualAdapter(channels, spec.bottleneck)
        self.pet_adapter = ResidualAdapter(channels, spec.bottleneck)
        self.fusion = FusionProjection(channels, spec.bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.state.mode
        if mode == "ct":
            return self.ct_adapter(self.ct_conv(x[:, 0:1]))
        e_pet = self.pet_conv(x[:, 1:2])
        if mode == "pet":
            return self.pet_adapter(e_pet)
        return self.fusion(self.ct_conv(x[:, 0:1]), e_pet)


class ModalitySkip(nn.Module):
    """Replaces the first skip encoder: frozen ``encoder1`` on the primary image (CT, or PET
    in mode ``pet``) plus a shallow PET block on the raw PET (one 3x3x3 conv, instance norm,
    LeakyReLU) behind a 1x1x1 gate that starts at 0.

    One conv, not a residual block like ``encoder1``: this path runs at full resolution,
    where the residual block's second 3x3x3 conv cost about a fifth of a UNETR PEMMA step
    and 96 MiB of saved activations at the small preset; with one conv the benchmark's
    PEMMA / full fine-tuning step-time ratio went from 0.918 to 0.743."""

    def __init__(self, encoder1: nn.Module, channels: int, state: _ModeState) -> None:
        super().__init__()
        self.state = state
        self.encoder1 = encoder1
        self.pet_block = speed_up_monai_modules(
            Convolution(3, 1, channels, kernel_size=3, norm="instance",
                        act=("leakyrelu", {"negative_slope": 0.01, "inplace": True}))
        )
        self.pet_gate = nn.Conv3d(channels, channels, 1)
        nn.init.zeros_(self.pet_gate.weight)
        nn.init.zeros_(self.pet_gate.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.state.mode
        primary = x[:, 0:1] if "ct" in REQUIRED_MODALITIES[mode] else x[:, 1:2]
        out = self.encoder1(primary)
        if "pet" in REQUIRED_MODALITIES[mode]:
            out = out + self.pet_gate(self.pet_block(x[:, 1:2]))
        return out


def _patch_conv_path(backbone_name: str) -> str:
    return "vit.patch_embedding.patch_embeddings" if backbone_name == "unetr" else "swinViT.patch_embed.proj"


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def _check_image(image: torch.Tensor, roi: tuple[int, int, int], backbone: str) -> None:
    if image.ndim != 5 or image.shape[1] != 2:
        raise ValueError(
            f"expected image [B, 2, X, Y, Z] (channel 0 CT, channel 1 PET), got shape {tuple(image.shape)}"
        )
    if backbone == "unetr" and tuple(image.shape[2:]) != roi:
        raise ValueError(f"UNETR expects spatial size {roi} (its positional grid), got {tuple(image.shape[2:])}")


class SegmentationModel(nn.Module):
    """Base of every model here: ``forward(image [B,2,X,Y,Z], mode) -> logits``.

    Attributes: ``spec``, ``fingerprint`` (of the CT backbone it started from),
    ``modes`` (modes it can run), ``param_groups`` (trainable tensor name -> group).
    """

    spec: ModelSpec
    fingerprint: str
    modes: tuple[str, ...]

    @property
    def roi_size(self) -> tuple[int, int, int]:
        return self.spec.roi_size

    @property
    def param_groups(self) -> dict[str, str]:
        raise NotImplementedError

    def groups_for_mode(self, mode: str) -> frozenset[str]:
        """Groups a training step in ``mode`` may update."""
        raise NotImplementedError

    def check_mode(self, mode: str) -> None:
        check_mode(mode)
        if mode not in self.modes:
            raise ValueError(f"this {self.spec.kind} model runs modes {self.modes}, not {mode!r}")


class PemmaModel(SegmentationModel):
    """A frozen CT backbone with PEMMA's trainable parts; runs modes ct, pet and ctpet."""

    modes = MODES

    def __init__(self, backbone: nn.Module, spec: ModelSpec, fingerprint: str) -> None:
        super().__init__()
        self.spec = spec
        self.fingerprint = fingerprint
        self._state = _ModeState()
        net = copy.deepcopy(backbone)
        for p in net.parameters():
            p.requires_grad_(False)
        conv_path = _patch_conv_path(spec.backbone)
        ct_conv = net.get_submodule(conv_path)
        if ct_conv.weight.shape[1] != 1:
            raise ValueError(f"PEMMA adapts a 1-channel CT backbone; this one takes {ct_conv.weight.shape[1]} channels")
        _set_submodule(net, conv_path, ModalityPatchEmbed(ct_conv, spec, self._state))
        skip_channels = net.encoder1.layer.conv1.conv.out_channels
        net.encoder1 = ModalitySkip(net.encoder1, skip_channels, self._state)
        pattern = "|".join(TARGETS[spec.backbone][t] for t in spec.targets)
        lora = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=rf".*\.(?:{pattern})$",
            use_dora=spec.adapter == "dora",
        )
        self.net = inject_adapter_in_model(lora, net)
        for name, p in self.net.named_parameters():
            p.requires_grad_(_pemma_group(name) is not None)
        if spec.survival:
            from pemma_core.survival import EhrEncoder, SurvivalHead

            ehr_width = spec.ehr_embedding if spec.ehr_features else 0
            self.survival_head = SurvivalHead(self.feature_width, ehr_features=ehr_width)
            if spec.ehr_features:
                self.ehr_encoder = EhrEncoder(spec.ehr_features, spec.ehr_embedding)
        self._groups = {n: g for n, p in self.named_parameters() if (g := _pemma_group(n.removeprefix("net.")))}
        if not any(g == "shared" for g in self._groups.values()):
            raise ValueError(f"targets {spec.targets} matched no attention module in {spec.backbone}")

    @property
    def param_groups(self) -> dict[str, str]:
        return dict(self._groups)

    def groups_for_mode(self, mode: str) -> frozenset[str]:
        return MODE_GROUPS[mode]

    def forward(self, image: torch.Tensor, mode: str) -> torch.Tensor:
        self.check_mode(mode)
        _check_image(image, self.roi_size, self.spec.backbone)
        self._state.mode = mode
        return self.net(image)

    @property
    def feature_width(self) -> int:
        if self.spec.backbone == "unetr":
            return int(self.net.hidden_size)
        return 16 * int(PRESETS["swin-unetr"][self.spec.preset]["feature_size"])

    def encode(self, image: torch.Tensor, mode: str) -> torch.Tensor:
        """Pooled transformer tokens of ``mode``: ``[B, 2, S, S, S] -> [B, feature_width]``."""
        self.check_mode(mode)
        _check_image(image, self.roi_size, self.spec.backbone)
        self._state.mode = mode
        if self.spec.backbone == "unetr":
            tokens, _ = self.net.vit(image)  # [B, N, hidden]
            return tokens.mean(dim=1)
        deepest = self.net.swinViT(image, self.net.normalize)[-1]  # [B, 16 * feature, s, s, s]
        return deepest.flatten(2).mean(dim=2)

    def risk(self, image: torch.Tensor, mode: str, ehr: torch.Tensor | None = None) -> torch.Tensor:
        """Cox log relative hazard ``[B]`` from the image in ``mode`` (and EHR covariates)."""
        if not self.spec.survival:
            raise ValueError("this model has no survival head (build it with survival=True)")
        if self.spec.ehr_features and ehr is None:
            raise ValueError(f"this model's survival head needs EHR covariates [B, {self.spec.ehr_features}]")
        embedding = self.ehr_encoder(ehr) if self.spec.ehr_features else None
        return self.survival_head(self.encode(image, mode), embedding)


def _pemma_group(name: str) -> str | None:
    """Group of a PEMMA tensor by its name, or None for a frozen backbone tensor."""
    if name.startswith("survival_head."):
        return "prognosis"
    if name.startswith("ehr_encoder."):
        return "ehr"
    if "lora_" in name and ".pet_conv." not in name:
        return "shared"
    rules = (
        (".ct_adapter.", "ct"),
        (".pet_adapter.", "pet"),
        (".pet_conv.lora_", "pet"),
        (".pet_conv.bias", "pet"),
        (".pet_block.", "pet"),
        (".pet_gate.", "pet"),
        (".fusion.", "fusion"),
    )
    for marker, group in rules:
        if marker in name and ".frozen." not in name:
            return group
    if ".pet_conv." in name and ".frozen." not in name:  # full-copy PET embedding
        return "pet"
    return None


class FullyTrainedModel(SegmentationModel):
    """Base of the models trained end to end: every trainable tensor is in group
    :data:`FULL_GROUP`, and every mode trains that group."""

    @property
    def param_groups(self) -> dict[str, str]:
        return {n: FULL_GROUP for n, p in self.named_parameters() if p.requires_grad}

    def groups_for_mode(self, mode: str) -> frozenset[str]:
        return frozenset({FULL_GROUP})


class FullModel(FullyTrainedModel):
    """A baseline trained end to end: ``ct-only``, ``pet-only`` or ``early-fusion``."""

    def __init__(self, backbone: nn.Module, spec: ModelSpec, fingerprint: str, share_weights: bool = False) -> None:
        """``share_weights`` trains ``backbone`` itself (CT pretraining) instead of a copy."""
        super().__init__()
        self.spec = spec
        self.fingerprint = fingerprint
        self.net = backbone if share_weights else copy.deepcopy(backbone)
        if spec.kind == "early-fusion":
            self.net = _two_channel_copy(self.net, spec)
            self.modes = ("ctpet",)
        else:
            self.modes = ("ct",) if spec.kind == "ct-only" else ("pet",)
        for p in self.net.parameters():
            p.requires_grad_(True)

    def forward(self, image: torch.Tensor, mode: str) -> torch.Tensor:
        self.check_mode(mode)
        _check_image(image, self.roi_size, self.spec.backbone)
        if self.spec.kind == "early-fusion":
            return self.net(image)
        channel = IMAGE_CHANNEL[mode]
        return self.net(image[:, channel : channel + 1])


def _two_channel_copy(ct_net: nn.Module, spec: ModelSpec) -> nn.Module:
    """The backbone rebuilt with 2 input channels; CT weights copied, PET input weights zero."""
    net = build_backbone(spec, in_channels=2)
    source = ct_net.state_dict()
    target = net.state_dict()
    for name, tensor in target.items():
        src = source[name]
        if src.shape == tensor.shape:
            target[name] = src.clone()
        else:  # a first-layer conv: [out, 1, k...] -> [out, 2, k...] with the PET slice zero
            widened = torch.zeros_like(tensor)
            widened[:, :1] = src
            target[name] = widened
    net.load_state_dict(target)
    return net


class CnnModel(FullyTrainedModel):
    """``cnn-early-fusion``: MONAI ``SegResNet`` on ``[B, 2, X, Y, Z]`` (CT, PET) -> ``[B, out, X, Y, Z]``.

    A fully trained CNN reference for the transformer models, mode ``ctpet`` only. It has
    no CT backbone, so its ``fingerprint`` is empty. ``X, Y, Z`` must be multiples of 8.
    """

    modes = ("ctpet",)

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.fingerprint = ""
        self.net = SegResNet(spatial_dims=3, init_filters=CNN_INIT_FILTERS, in_channels=2, out_channels=spec.out_channels)

    def forward(self, image: torch.Tensor, mode: str) -> torch.Tensor:
        self.check_mode(mode)
        if image.ndim != 5 or image.shape[1] != 2:
            raise ValueError(f"expected image [B, 2, X, Y, Z] (channel 0 CT, channel 1 PET), got shape {tuple(image.shape)}")
        return self.net(image)


def build_model(spec: ModelSpec, backbone: nn.Module | None = None) -> SegmentationModel:
    """Build the model ``spec.kind`` around ``backbone`` (a fresh one from ``spec`` if None).

    The CT backbone is copied, never modified; its fingerprint is kept on the model.
    ``cnn-early-fusion`` uses no backbone (``backbone`` is ignored).
    """
    from pemma_core.adapters import backbone_fingerprint

    if spec.kind == "cnn-early-fusion":
        return CnnModel(spec)
    if backbone is None:
        backbone = build_backbone(spec)
    fingerprint = backbone_fingerprint(backbone)
    if spec.kind == "pemma":
        return PemmaModel(backbone, spec, fingerprint)
    return FullModel(backbone, spec, fingerprint)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


__all__ = [
    "ADAPTERS",
    "BACKBONES",
    "CNN_INIT_FILTERS",
    "FULL_GROUP",
    "GROUPS",
    "KINDS",
    "MODE_GROUPS",
    "PRESETS",
    "ChannelInstanceNorm",
    "CnnModel",
    "FullModel",
    "FullyTrainedModel",
    "ModelSpec",
    "PemmaModel",
    "SdpaWindowAttention",
    "SegmentationModel",
    "build_backbone",
    "build_model",
    "count_parameters",
    "speed_up_monai_modules",
]
