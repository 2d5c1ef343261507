"""The PEMMA model: a frozen CT backbone plus the small trainable parts that add PET.

Every new branch starts at zero, so modes ``ct`` and ``ctpet`` reproduce the CT backbone
exactly at initialisation; the path of each mode and the group of each part are drawn in
docs/ARCHITECTURE.md, "The model (PEMMA)" and "Parameter groups". Which groups a training
step in each mode may update is :data:`MODE_GROUPS`.

Every model here is called as ``model(image, mode)`` with ``image`` of shape
``[B, 2, X, Y, Z]`` (channel 0 CT, channel 1 PET; see :mod:`pemma_core.modes`) and
returns logits ``[B, out_channels, X, Y, Z]``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from pemma_core.model.layers import (
    ModalityPatchEmbed,
    ModalitySkip,
    ModeState,
    free_frozen_conv_inputs,
    lean_res_block,
    parameter_groups,
    recompute_in_backward,
)
from pemma_core.model.spec import PRESETS, TARGETS, ModelSpec
from pemma_core.modes import MODES, check_mode

# Why two LoRA adapters: when one shared LoRA learnt from every mode, the PET-reading
# steps moved the transformer that the CT mode runs through, and its CT Dice fell as
# training grew (BENCHMARKS.md, "Forgetting"). Now the shared LoRA learns from CT steps only
# and serves every mode; a second LoRA of the same shape (group pet) is stacked on it in the
# modes that read PET and learns from them. The CT mode's path then holds only tensors that
# CT steps train, and only CT+PET batches train the fusion projection (the single modes
# bypass it), so a CT-only site never changes what PET sites learn, nor they its CT mode.
MODE_GROUPS: dict[str, frozenset[str]] = {
    "ct": frozenset({"shared", "ct"}),
    "pet": frozenset({"pet"}),
    "ctpet": frozenset({"pet", "fusion"}),
}
# Groups that learn slower than the adapt rate: the two the CT mode runs through. Centralized
# PEMMA-LoRA at the long budget (144 steps, three seeds) took the CT mode from the backbone's 0.374
# to 0.334 at the full rate (0.277 at seed 0), and held it at 0.370 with these scales; PET and CT+PET
# moved by -0.9 and -1.0 points (BENCHMARKS.md, "CT forgetting at the long budget: slower CT groups").
GROUP_LR_SCALES: dict[str, float] = {"shared": 0.5, "ct": 0.2}
# The peft adapters active in each mode (names as in layers.PEFT_GROUPS).
MODE_LORAS: dict[str, list[str]] = {"ct": ["default"], "pet": ["default", "pet"], "ctpet": ["default", "pet"]}

# What ``spec.checkpointing`` changes (benchmarks/memory.py measures it). Profiling a small
# preset step: the full-resolution decoder block holds most saved activations, but it is
# the first block backward needs, so recomputing it would rebuild them while every other
# block's are still held and the peak would not move. So every block backward reaches after
# it (RECOMPUTED_BLOCKS, and the PET skip branch, which is trainable but full-resolution and
# reached last) keeps only its inputs and is recomputed; the full-resolution block itself
# recomputes only its cheap parameter-free parts, and its frozen convs (and the output conv)
# keep no input (FULL_RESOLUTION_BLOCK).
RECOMPUTED_BLOCKS: dict[str, tuple[str, ...]] = {
    "unetr": (
        *(f"vit.blocks.{i}" for i in range(12)),
        "encoder2", "encoder3", "encoder4", "decoder5", "decoder4", "decoder3",
    ),
    "swin-unetr": (
        "swinViT.layers1.0", "swinViT.layers2.0", "swinViT.layers3.0", "swinViT.layers4.0",
        "encoder2", "encoder3", "encoder4", "encoder10",
        "decoder5", "decoder4", "decoder3", "decoder2",
    ),
}
FULL_RESOLUTION_BLOCK = {"unetr": "decoder2", "swin-unetr": "decoder1"}


def _recompute_in_backward(net: nn.Module, backbone_name: str) -> None:
    """Apply ``spec.checkpointing`` to the PEMMA network ``net``, in place (see above)."""
    for path in RECOMPUTED_BLOCKS[backbone_name]:
        recompute_in_backward(net.get_submodule(path))
    full_resolution = net.get_submodule(FULL_RESOLUTION_BLOCK[backbone_name])
    lean_res_block(full_resolution.conv_block)
    free_frozen_conv_inputs(full_resolution)
    free_frozen_conv_inputs(net.out)
    net.encoder1.recompute_pet = True


class SegmentationModel(nn.Module):
    """Base of every model here: ``forward(image [B,2,X,Y,Z], mode) -> logits``.

    Attributes: ``spec``, ``fingerprint`` (of the CT backbone it started from),
    ``modes`` (modes it can run), ``param_groups`` (trainable tensor name -> group),
    ``lr_scales`` (group -> its learning rate relative to the run's; 1 where absent).
    """

    spec: ModelSpec
    fingerprint: str
    modes: tuple[str, ...]
    fixed_grid: ClassVar[bool] = True  # a UNETR input must have the preset's crop size
    lr_scales: ClassVar[Mapping[str, float]] = {}

    @property
    def roi_size(self) -> tuple[int, int, int]:
        return self.spec.roi_size

    # A site reaches named_parameters a dozen times a round (loading the global tensors, its
    # optimiser, every training step, its reply), and nn.Module walks every module each time
    # (hundreds, with peft's layers): Python work that holds the interpreter lock while the
    # other sites' threads train (BENCHMARKS.md, the default demo's wall time). Once a model's
    # modules are all in place (:meth:`seal`), the list is walked once and kept; moving the
    # model (``Module._apply``, which may swap parameters for new ones) drops it.
    def seal(self) -> None:
        """Say that this model's modules are final: from now on its parameter list is kept."""
        self.__dict__["_sealed"] = True
        self.__dict__.pop("_named_parameters", None)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        if prefix or not recurse or not remove_duplicate or not self.__dict__.get("_sealed"):
            return super().named_parameters(prefix, recurse, remove_duplicate)
        kept = self.__dict__.get("_named_parameters")
        if kept is None:
            kept = self.__dict__["_named_parameters"] = tuple(super().named_parameters())
        return iter(kept)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_named_parameters", None)
        return super()._apply(fn, recurse)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, (nn.Module, nn.Parameter)):
            self.__dict__.pop("_named_parameters", None)
        super().__setattr__(name, value)

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

    def check_input(self, image: torch.Tensor, mode: str) -> None:
        """Raise ``ValueError`` unless this model runs ``mode`` on ``image`` ``[B, 2, X, Y, Z]``."""
        self.check_mode(mode)
        if image.ndim != 5 or image.shape[1] != 2:
            raise ValueError(
                f"expected image [B, 2, X, Y, Z] (channel 0 CT, channel 1 PET), got shape {tuple(image.shape)}"
            )
        if self.fixed_grid and self.spec.backbone == "unetr" and tuple(image.shape[2:]) != self.roi_size:
            raise ValueError(
                f"UNETR expects spatial size {self.roi_size} (its positional grid), got {tuple(image.shape[2:])}"
            )


def _patch_conv_path(backbone_name: str) -> str:
    return "vit.patch_embedding.patch_embeddings" if backbone_name == "unetr" else "swinViT.patch_embed.proj"


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


class PemmaModel(SegmentationModel):
    """A frozen CT backbone with PEMMA's trainable parts; runs modes ct, pet and ctpet."""

    modes = MODES
    trainable_parts: ClassVar[Mapping[str, str]] = {"survival_head": "prognosis", "ehr_encoder": "ehr"}
    lr_scales: ClassVar[Mapping[str, float]] = GROUP_LR_SCALES

    def __init__(self, backbone: nn.Module, spec: ModelSpec, fingerprint: str) -> None:
        super().__init__()
        self.spec = spec
        self.fingerprint = fingerprint
        self._state = ModeState()
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
        net = inject_adapter_in_model(lora, net)
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: it is meant
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.net = inject_adapter_in_model(lora, net, adapter_name="pet")
        # a plain list, not a ModuleList: these are already submodules of self.net
        self._lora_layers = [m for m in self.net.modules() if isinstance(m, BaseTunerLayer)]
        if spec.checkpointing:
            _recompute_in_backward(self.net, spec.backbone)
        if spec.survival:
            # imported here: lifelines (behind the survival module) is slow to load and
            # only survival models need it
            from pemma_core.training.survival import EhrEncoder, SurvivalHead

            ehr_width = spec.ehr_embedding if spec.ehr_features else 0
            self.survival_head = SurvivalHead(self.feature_width, ehr_features=ehr_width)
            if spec.ehr_features:
                self.ehr_encoder = EhrEncoder(spec.ehr_features, spec.ehr_embedding)
        self._groups = parameter_groups(self)
        for name, p in self.named_parameters():
            p.requires_grad_(name in self._groups)
        if not any(g == "shared" for g in self._groups.values()):
            raise ValueError(f"targets {spec.targets} matched no attention module in {spec.backbone}")
        self.seal()

    @property
    def param_groups(self) -> dict[str, str]:
        return dict(self._groups)

    def groups_for_mode(self, mode: str) -> frozenset[str]:
        return MODE_GROUPS[mode]

    def _enter_mode(self, image: torch.Tensor, mode: str) -> None:
        self.check_input(image, mode)
        self._state.mode = mode
        # peft's set_adapter would also change requires_grad; which tensors a mode trains is
        # train_step's business (MODE_GROUPS), so only the active list is switched here
        for layer in self._lora_layers:
            layer._active_adapter = MODE_LORAS[mode]

    def forward(self, image: torch.Tensor, mode: str) -> torch.Tensor:
        self._enter_mode(image, mode)
        return self.net(image)

    @property
    def feature_width(self) -> int:
        if self.spec.backbone == "unetr":
            return int(self.net.hidden_size)
        return 16 * int(PRESETS["swin-unetr"][self.spec.preset]["feature_size"])

    def encode(self, image: torch.Tensor, mode: str) -> torch.Tensor:
        """Pooled transformer tokens of ``mode``: ``[B, 2, S, S, S] -> [B, feature_width]``."""
        self._enter_mode(image, mode)
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
