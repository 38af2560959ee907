"""Absolute position embeddings: resampling to another grid and the fixed 2-D sin-cos table."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       offset: float = 0.0, antialias: bool = False) -> torch.Tensor:
    """Bicubically resample patch position embeddings [1, oh*ow, D] to [1, nh*nw, D].

    Two behaviours exist in the reference code and both are kept, because the weights were trained
    with one of them:
    * ``offset > 0`` (Meta DINOv2 without registers, offset 0.1): ``scale_factor=(n + offset) / o``.
      PyTorch then maps coordinates with that scale, which is *not* the same as ``size=n``.
    * ``offset == 0``: ``size=(nh, nw)`` (Meta with registers, timm, HF). With ``antialias=True``
      PyTorch switches to the PIL cubic kernel (a=-0.5) on every resized axis.
    Interpolation runs in float32 and the result is cast back to the input dtype.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    D = pos.shape[-1]
    x = pos.float().reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # NLC -> NCHW
    if offset:
        scale = ((new_grid[0] + offset) / old_grid[0], (new_grid[1] + offset) / old_grid[1])
        x = F.interpolate(x, scale_factor=scale, mode="bicubic", antialias=antialias)
        if tuple(x.shape[-2:]) != tuple(new_grid):
            raise RuntimeError(f"offset interpolation produced grid {tuple(x.shape[-2:])}, expected {new_grid}")
    else:
        x = F.interpolate(x, size=tuple(new_grid), mode="bicubic", antialias=antialias)
    return x.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos.dtype)  # NCHW -> NLC


def sincos_2d_pos_embed(embed_dim: int, grid: tuple[int, int], temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos table [1, gh*gw, D] as in MAE / I-JEPA.

    The first D/2 channels encode the column (x) index, the last D/2 the row (y) index; each half is
    ``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = 1 / temperature ** (i / (D/4))``.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    gh, gw = grid
    omega = 1.0 / temperature ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")

    def axis(p: torch.Tensor) -> torch.Tensor:
        out = p.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([axis(xs), axis(ys)], dim=1).float()[None]
