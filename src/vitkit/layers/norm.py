"""Normalisation layers: token norms by name, and a channels-first LayerNorm for feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same keys) that also takes inputs in a lower precision than its weights: a model
    cast for bf16 inference (:func:`vitkit.layers.precision.cast_for_inference`) keeps norm weights in
    fp32, and the statistics are then computed in fp32 and the result returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight is not None else self.bias
        if (w is None or x.dtype == w.dtype or torch.is_autocast_enabled(x.device.type)
                or (x.device.type == "cpu" and x.dtype == torch.bfloat16)):  # CPU kernel: fp32 statistics
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(x.to(w.dtype), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` with the mixed-precision behaviour of :class:`LayerNorm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w is None or x.dtype == w.dtype or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return super().forward(x.to(w.dtype)).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, device=None, dtype=None) -> nn.Module:
    """Build a token norm: ``"layernorm"`` or ``"rmsnorm"``."""
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps, device=device, dtype=dtype)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    raise ValueError(f"unknown norm kind {kind!r}; expected 'layernorm' or 'rmsnorm'")


class LayerNorm2d(LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor (as used after ConvNets / upscalers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # via NHWC
