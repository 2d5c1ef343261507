"""PEMMA's trainable layers, each declaring the parameter group of what it trains.

A layer names its trainable parts in ``trainable_parts`` (attribute -> group), as PEFT
layers name theirs in ``adapter_layer_names``; a part's own ``frozen_parts`` are left out.
:func:`parameter_groups` derives every tensor's group from these declarations, and puts
the LoRA/DoRA tensors that peft injects in the group of their adapter (:data:`PEFT_GROUPS`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UnetResBlock
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.checkpoint import checkpoint

from pemma_core.model.monai_speed import speed_up_monai_modules
from pemma_core.model.spec import ModelSpec
from pemma_core.modes import REQUIRED_MODALITIES

# The LoRA/DoRA adapters peft injects into the transformer, by adapter name -> group: the
# shared one ("default", peft's name) learns from CT steps and serves every mode; the PET one
# is added on top of it in the modes that read PET (pemma_core.model.pemma, "why two").
PEFT_GROUPS = {"default": "shared", "pet": "pet"}


class ModeState:
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

    frozen_parts: ClassVar[tuple[str, ...]] = ("frozen",)

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
    """Replaces the backbone's patch conv: ``[B, 2, ...]`` in, ``[B, C, ...]`` tokens out.

    The single modes bypass the fusion projection: only ``ctpet`` trains it, so a CT-mode
    path through it would follow wherever CT+PET training moved it (BENCHMARKS.md,
    forgetting). The mode a CT-only site serves depends only on groups CT steps train.
    """

    trainable_parts: ClassVar[Mapping[str, str]] = {
        "pet_conv": "pet", "ct_adapter": "ct", "pet_adapter": "pet", "fusion": "fusion",
    }

    def __init__(self, ct_conv: nn.Conv3d, spec: ModelSpec, state: ModeState) -> None:
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
    where a second 3x3x3 conv made a PEMMA step much slower and kept large activations
    for backward (BENCHMARKS.md, speed and memory)."""

    trainable_parts: ClassVar[Mapping[str, str]] = {"pet_block": "pet", "pet_gate": "pet"}

    def __init__(self, encoder1: nn.Module, channels: int, state: ModeState) -> None:
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
        # Set by spec.checkpointing: the PET path is the last one backward reaches, so its
        # full-resolution activations are recomputed there instead of held through all of it.
        self.recompute_pet = False

    def _pet_skip(self, pet: torch.Tensor) -> torch.Tensor:
        return self.pet_gate(self.pet_block(pet))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.state.mode
        primary = x[:, 0:1] if "ct" in REQUIRED_MODALITIES[mode] else x[:, 1:2]
        out = self.encoder1(primary)
        if "pet" in REQUIRED_MODALITIES[mode]:
            pet = x[:, 1:2]
            if self.recompute_pet and self.training and torch.is_grad_enabled():
                out = out + checkpoint(self._pet_skip, pet, use_reentrant=False)
            else:
                out = out + self._pet_skip(pet)
        return out


class _InputFreeConv3dFunction(torch.autograd.Function):
    """``conv3d`` whose backward returns only the input's gradient, so it keeps the weight, not the input."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        # The input's gradient is the transposed conv of the output's. Not
        # torch.nn.grad.conv3d_input: on CPU it materialises a stand-in input of the full
        # input size, the very tensor this function exists not to hold.
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        extra = tuple(
            size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, out, s, p, d, k in zip(shape[2:], grad.shape[2:], stride, padding, dilation, weight.shape[2:])
        )
        grad_x = F.conv_transpose3d(grad, weight, None, stride, padding, extra, groups, dilation)
        return grad_x, None, None, None, None, None, None


class InputFreeConv3d(nn.Conv3d):
    """An ``nn.Conv3d`` that, while its weight and bias are frozen, does not keep its input
    for backward: the input's gradient needs only the weight.

    Autograd's own conv keeps the input whatever requires grad; at full resolution that is
    the largest tensor of the block (the decoder's concatenated skip). Same parameters,
    ``state_dict`` and kernels. Swapped in by :func:`free_frozen_conv_inputs`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        plain = self.padding_mode != "zeros" or isinstance(self.padding, str)
        if plain or not (frozen and x.requires_grad and torch.is_grad_enabled()):
            return super().forward(x)
        return _InputFreeConv3dFunction.apply(x, self.weight, self.bias, self.stride, self.padding,
                                              self.dilation, self.groups)


def free_frozen_conv_inputs(block: nn.Module) -> nn.Module:
    """Every plain ``nn.Conv3d`` in ``block`` becomes an :class:`InputFreeConv3d`, in place; returns ``block``."""
    for module in block.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = InputFreeConv3d
    return block


class LeanUnetResBlock(UnetResBlock):
    """MONAI's ``UnetResBlock`` that keeps only its convs' outputs for backward.

    In a training forward with gradients its parameter-free parts (the norms, the
    activations, the residual sum) run under ``torch.utils.checkpoint`` and are recomputed
    in backward: they are cheap, but each keeps a tensor of the block's full size, and a
    norm followed by an in-place activation keeps two. Same parameters, ``state_dict`` and
    values as MONAI's forward; with :func:`free_frozen_conv_inputs` on its frozen convs too,
    the block keeps three of its eight tensors. Swapped in by :func:`lean_res_block`.
    """

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(inp)
        # one name for the main path, rebound at once: each tensor it held is freed as soon
        # as nothing needs it, or the forward would hold more than MONAI's
        h = checkpoint(self._norm_act, self.conv1(inp), use_reentrant=False)
        h = self.conv2(h)
        residual = self.conv3(inp) if hasattr(self, "conv3") else inp
        return checkpoint(self._merge, h, residual, use_reentrant=False)

    def _norm_act(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrelu(self.norm1(x))

    def _merge(self, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = self.norm2(out)
        if hasattr(self, "norm3"):
            residual = self.norm3(residual)
        out += residual
        return self.lrelu(out)


def lean_res_block(block: nn.Module) -> nn.Module:
    """``block`` (a MONAI ``UnetResBlock``) made a :class:`LeanUnetResBlock`, in place; returns it."""
    if type(block) is not UnetResBlock:
        raise ValueError(f"expected a MONAI UnetResBlock, got {type(block).__name__}")
    block.__class__ = LeanUnetResBlock
    return block


class Recomputed:
    """Mixin that makes a block keep only its inputs for backward and recompute the rest.

    In a training forward with gradients the block runs under ``torch.utils.checkpoint``
    (non-reentrant, so gradients reach trainable tensors inside the block too, and the
    RNG state is replayed); in eval or under ``no_grad`` it runs as it is. Swapped in by
    :func:`recompute_in_backward`, which keeps the block's parameters, buffers and
    ``state_dict`` keys, so files and fingerprints do not see it.
    """

    def forward(self, *args: object, **kwargs: object) -> object:
        forward = super().forward  # type: ignore[misc]
        if self.training and torch.is_grad_enabled():  # type: ignore[attr-defined]
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)


# One recomputing subclass per block class, published in this module under its own name
# so that a model holding one still pickles and deep-copies.
_RECOMPUTED: dict[type, type] = {}


def recompute_in_backward(module: nn.Module) -> nn.Module:
    """Make ``module`` (in place) a :class:`Recomputed` block of its own class; returns it."""
    cls = type(module)
    if issubclass(cls, Recomputed):
        return module
    if cls not in _RECOMPUTED:
        name = f"Recomputed{cls.__name__}"
        if name in globals():
            raise ValueError(f"two block classes named {cls.__name__!r} cannot both be recomputed")
        sub = type(name, (Recomputed, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = sub
        _RECOMPUTED[cls] = sub
    module.__class__ = _RECOMPUTED[cls]
    return module


def parameter_groups(root: nn.Module) -> dict[str, str]:
    """Trainable tensor name -> group, in ``root.named_parameters()`` order, from the
    ``trainable_parts`` every module of ``root`` declares and peft's ``adapter_layer_names``.

    A tensor no declaration reaches is frozen and left out. Raises ``ValueError`` if two
    declarations give one tensor different groups.
    """
    groups: dict[int, str] = {}

    def claim(params: Iterable[nn.Parameter], group: str, frozen: set[int]) -> None:
        for p in params:
            if id(p) not in frozen and groups.setdefault(id(p), group) != group:
                raise ValueError(f"a tensor is declared in both group {groups[id(p)]!r} and {group!r}")

    for module in root.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                for adapter, part in getattr(module, attr).items():
                    params = [part] if isinstance(part, nn.Parameter) else part.parameters()
                    claim(params, PEFT_GROUPS[adapter], set())
        for attr, group in getattr(module, "trainable_parts", {}).items():
            part = getattr(module, attr, None)
            if part is None:
                continue
            frozen = {
                id(p) for sub in part.modules() for name in getattr(sub, "frozen_parts", ())
                for p in getattr(sub, name).parameters()
            }
            claim(part.parameters(), group, frozen)
    return {name: groups[id(p)] for name, p in root.named_parameters() if id(p) in groups}
