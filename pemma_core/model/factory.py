"""The one factory of every model the project compares, chosen by ``spec.kind``."""

from __future__ import annotations

from torch import nn

from pemma_core.model.baselines import CnnModel, FullModel
from pemma_core.model.files import backbone_fingerprint
from pemma_core.model.pemma import PemmaModel, SegmentationModel
from pemma_core.model.spec import ModelSpec, build_backbone


def build_model(spec: ModelSpec, backbone: nn.Module | None = None) -> SegmentationModel:
    """Build the model ``spec.kind`` around ``backbone`` (a fresh one from ``spec`` if None).

    ``pemma``: the backbone frozen plus PEMMA's parts; ``ct-only`` / ``pet-only`` /
    ``early-fusion``: a fully trained copy; ``cnn-early-fusion``: a SegResNet (``backbone``
    is ignored). The CT backbone is copied, never modified; its fingerprint is kept on the model.
    """
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
