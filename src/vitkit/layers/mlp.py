"""Feed-forward layers: the classic two-layer MLP and a fused SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.kernels import Linear, fusable_activation, hooked, linear
from vitkit.layers.activation import QuickGELU, get_act_layer  # noqa: F401 - QuickGELU: its old home


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` — keys ``fc1``, ``fc2`` as in Meta's and timm's checkpoints."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = Linear(dim, hidden_dim, bias=bias, **dd)
        self.act = get_act_layer(act)
        self.fc2 = Linear(hidden_dim, dim, bias=bias, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = fusable_activation(self.act)
        if act is None or hooked(self.fc1, self.act):  # e.g. QuickGELU; or hooks that must see fc1 and act apart
            return self.fc2(self.act(self.fc1(x)))
        return self.fc2(linear(x, self.fc1.weight, self.fc1.bias, act))  # activation fused into fc1's GEMM


class SwiGLU(nn.Module):
    """Fused SwiGLU: ``w3(silu(x1) * x2)`` with ``x1, x2 = w12(x).chunk(2)``.

    The gate and value projections share one GEMM (``w12``, Meta DINOv2's layout). Checkpoints
    with separate projections (DINOv3 ``w1``/``w2``, HF ``gate_proj``/``up_proj``) are
    concatenated gate-first at load time.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.w12 = Linear(dim, 2 * hidden_dim, bias=bias, **dd)
        self.w3 = Linear(hidden_dim, dim, bias=bias, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def swiglu_hidden_dim(dim: int, ratio: float, align: int = 8) -> int:
    """Meta's SwiGLU width: two thirds of ``int(dim * ratio)``, rounded up to ``align``.

    DINOv2 ViT-g: 1536 * 4 -> 6144 -> 4096; DINOv3 ViT-S+: 384 * 6 -> 1536.
    """
    d = int(int(dim * ratio) * 2 / 3)
    return d + (-d % align)
