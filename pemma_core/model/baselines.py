"""The baselines PEMMA is compared with, all trained end to end (one group, ``backbone``).

``ct-only`` / ``pet-only``: the whole CT backbone fine-tuned on one modality;
``early-fusion``: a two-channel copy of the backbone whose PET input weights start at zero
(so it starts as the CT model); ``cnn-early-fusion``: a MONAI ``SegResNet`` on CT and PET
trained from scratch, with no transformer and no CT backbone.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from monai.networks.nets import SegResNet
from torch import nn

from pemma_core.model.pemma import SegmentationModel
from pemma_core.model.spec import FULL_GROUP, ModelSpec, build_backbone
from pemma_core.modes import IMAGE_CHANNEL

CNN_INIT_FILTERS = 16  # SegResNet width of the cnn-early-fusion reference (about 4.7 M parameters)


class FullyTrainedModel(SegmentationModel):
    """Base of the models trained end to end: every trainable tensor is in group
    :data:`~pemma_core.model.spec.FULL_GROUP`, and every mode trains that group."""

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
        self.seal()

    def forward(self, image: torch.Tensor, mode: str) -> torch.Tensor:
        self.check_input(image, mode)
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
    no CT backbone, so its ``fingerprint`` is empty; ``spec.backbone``/``spec.preset`` only
    fix its crop size. ``X, Y, Z`` must be multiples of 8.
    """

    modes = ("ctpet",)
    fixed_grid: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.fingerprint = ""
        self.net = SegResNet(spatial_dims=3, init_filters=CNN_INIT_FILTERS, in_channels=2, out_channels=spec.out_channels)
        self.seal()

    def forward(self, image: torch.Tensor, mode: str) -> torch.Tensor:
        self.check_input(image, mode)
        return self.net(image)
