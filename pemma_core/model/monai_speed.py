"""Faster, numerically equivalent stand-ins for two MONAI modules, swapped in place.

Parameters, buffers and ``state_dict`` keys stay the same, so a backbone's fingerprint does
not change; outputs agree to float rounding. Why each one is faster: BENCHMARKS.md,
"Profiling: the costs found and removed".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn


class ChannelInstanceNorm(nn.Module):
    """``nn.InstanceNorm3d(affine=False)`` computed as ``group_norm`` with one group per channel.

    The same normalisation (per sample and channel, biased variance, same ``eps``) with no
    parameters or buffers, but its output is not a view: MONAI's blocks apply an in-place
    LeakyReLU and ``out += residual`` to the norm output, and on ``instance_norm``'s view
    output autograd then copies the whole activation twice in backward (``CopySlices``).
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
    :class:`SdpaWindowAttention`. Returns ``net``."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.InstanceNorm3d) and not child.affine and not child.track_running_stats:
                setattr(parent, name, ChannelInstanceNorm(child.num_features, child.eps))
            elif type(child) is WindowAttention:
                child.__class__ = SdpaWindowAttention
    return net
