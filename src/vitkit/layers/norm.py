"""Normalisation layers: token norms by name, and a channels-first LayerNorm for feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_norm(kind: str, dim: int, eps: float, device=None, dtype=None) -> nn.Module:
    """Build a token norm: ``"layernorm"`` or ``"rmsnorm"``."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    raise ValueError(f"unknown norm kind {kind!r}; expected 'layernorm' or 'rmsnorm'")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor (as used after ConvNets / upscalers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # NCHW -> NHWC
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # NHWC -> NCHW
