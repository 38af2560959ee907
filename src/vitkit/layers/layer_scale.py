"""Per-channel residual scaling (CaiT / DINOv2 LayerScale)."""

from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    """``x * gamma`` with a learned ``gamma`` of shape ``[dim]`` (state-dict key ``gamma``)."""

    def __init__(self, dim: int, init_values: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values), device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
