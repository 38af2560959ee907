"""Stochastic depth (drop path) per sample."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Zero the whole residual branch of a random subset of samples during training.

    Surviving samples are scaled by ``1 / (1 - p)`` so the expectation is unchanged.
    A no-op in eval mode or when ``p == 0``.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep).div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"
