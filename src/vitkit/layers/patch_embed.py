"""Patch embedding and the weight surgery it needs: channel folding and patch-size resampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches projected by a strided conv (key ``proj``).

    Returns tokens [B, H/p * W/p, D] in row-major (y, x) order.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias,
                              device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # NCHW -> NLC


def fold_in_chans(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a patch-embed kernel [D, C, p, p] to ``in_chans`` input channels.

    RGB -> 1 channel sums the colour kernels, so a grey image replicated to RGB and the same image
    fed as one channel give the same embedding. Other conversions are refused.
    """
    c = weight.shape[1]
    if c == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    raise ValueError(
        f"cannot adapt a patch embedding with {c} input channels to in_chans={in_chans}: the only "
        f"adaptation is folding channels into 1 by summing. Build the model with in_chans={c}"
        + (" or 1." if c > 1 else "."))


def _resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Matrix R [new_h*new_w, old_h*old_w] with ``resize(x).flatten() == R @ x.flatten()``
    (bicubic, antialiased, as FlexiViT/timm)."""
    n_old = old[0] * old[1]
    basis = torch.eye(n_old, dtype=torch.float64).reshape(n_old, 1, *old)
    resized = F.interpolate(basis, size=new, mode="bicubic", antialias=True, align_corners=False)
    return resized.reshape(n_old, -1).T


def resample_patch_embed(weight: torch.Tensor, new_size: int | tuple[int, int]) -> torch.Tensor:
    """Resample a patch-embed kernel [D, C, p, p] to another patch size (FlexiViT).

    The new kernel ``w'`` solves ``<resize(x), w'> ~= <x, w>`` for every patch ``x`` in the least-squares
    sense: ``w' = pinv(R^T) w``. With it, DINOv2's /14 weights run as /16 on a 16/14 larger image.
    """
    if isinstance(new_size, int):
        new_size = (new_size, new_size)
    old_size = tuple(weight.shape[-2:])
    if old_size == tuple(new_size):
        return weight
    R = _resize_matrix(old_size, tuple(new_size))  # [new, old]
    pinv = torch.linalg.pinv(R.T)  # [new, old]
    D, C = weight.shape[:2]
    w = weight.reshape(D, C, -1).double() @ pinv.T  # [D, C, new]
    return w.reshape(D, C, *new_size).to(weight.dtype)
