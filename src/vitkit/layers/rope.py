"""2-D rotary position embedding on patch tokens (DINOv3).

Frequencies follow Meta's ``RopePositionEmbedding``: ``head_dim / 4`` periods per axis, patch-centre
coordinates normalised to [-1, 1], and angles ``2 pi * coord / period`` laid out as
``[y-freqs | x-freqs | y-freqs | x-freqs]``. ``periods`` is a persistent buffer so that a Meta
checkpoint's stored (bf16-rounded) periods reproduce Meta's outputs bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the last ``HW`` tokens of ``x`` [B, heads, N, head_dim]; leading tokens (CLS,
    registers, EoMT queries) are left untouched."""
    sin, cos = rope
    num_patches = sin.shape[-2]
    prefix = x.shape[-2] - num_patches
    dtype = x.dtype
    xp = x[..., prefix:, :].to(sin.dtype)
    xp = (xp * cos + rotate_half(xp) * sin).to(dtype)
    if prefix == 0:
        return xp
    return torch.cat([x[..., :prefix, :], xp], dim=-2)


class RopeEmbedding(nn.Module):
    """Sin/cos tables for an ``H x W`` patch grid.

    Args:
        head_dim: per-head channel count; must be divisible by 4.
        base: period base (DINOv3: 100). Mutually exclusive with ``min_period``/``max_period``.
        normalize_coords: ``"separate"`` (each axis by its own length), ``"max"`` or ``"min"``.
        shift_coords, jitter_coords, rescale_coords: train-time coordinate augmentation
            (uniform shift, log-uniform per-axis jitter, log-uniform joint rescale); ignored in eval.
    """

    def __init__(self, head_dim: int, base: float | None = 100.0, min_period: float | None = None,
                 max_period: float | None = None, normalize_coords: str = "separate",
                 shift_coords: float | None = None, jitter_coords: float | None = None,
                 rescale_coords: float | None = None, device=None, dtype=None):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs head_dim divisible by 4, got {head_dim}")
        if (base is None) == (min_period is None or max_period is None):
            raise ValueError("RoPE needs either base or both min_period and max_period")
        if normalize_coords not in ("separate", "max", "min"):
            raise ValueError(f"normalize_coords must be 'separate', 'max' or 'min', got {normalize_coords!r}")
        self.head_dim = head_dim
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        self.register_buffer("periods", torch.empty(head_dim // 4, device=device, dtype=dtype or torch.float32))
        self.reset_parameters()

    @property
    def augments(self) -> bool:
        return self.training and any(
            v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords))

    def reset_parameters(self) -> None:
        n = self.head_dim // 4
        dev, dt = self.periods.device, self.periods.dtype
        if self.base is not None:
            periods = self.base ** (2 * torch.arange(n, device=dev, dtype=dt) / (self.head_dim // 2))
        else:
            ratio = self.max_period / self.min_period
            periods = ratio ** torch.linspace(0, 1, n, device=dev, dtype=dt) / ratio * self.max_period
        with torch.no_grad():
            self.periods.copy_(periods)

    def _coords(self, H: int, W: int) -> torch.Tensor:
        dev, dt = self.periods.device, self.periods.dtype
        if self.normalize_coords == "separate":
            dh, dw = H, W
        elif self.normalize_coords == "max":
            dh = dw = max(H, W)
        else:
            dh = dw = min(H, W)
        ch = torch.arange(0.5, H, device=dev, dtype=dt) / dh
        cw = torch.arange(0.5, W, device=dev, dtype=dt) / dw
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1)  # [HW, 2] (y, x)
        coords = 2.0 * coords - 1.0
        if self.training:
            if self.shift_coords is not None:
                coords = coords + torch.empty(2, device=dev, dtype=dt).uniform_(-self.shift_coords, self.shift_coords)
            if self.jitter_coords is not None:
                r = math.log(self.jitter_coords)
                coords = coords * torch.empty(2, device=dev, dtype=dt).uniform_(-r, r).exp()
            if self.rescale_coords is not None:
                r = math.log(self.rescale_coords)
                coords = coords * torch.empty(1, device=dev, dtype=dt).uniform_(-r, r).exp()
        return coords

    def forward(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(sin, cos)``, each ``[H*W, head_dim]`` in the buffer's dtype."""
        coords = self._coords(H, W)
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [HW, 2, hd/4]
        angles = angles.flatten(1, 2).tile(2)  # [HW, hd]
        return torch.sin(angles), torch.cos(angles)
