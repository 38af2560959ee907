"""The one pre-norm transformer block every vitkit model runs."""

from __future__ import annotations

import torch
from torch import nn

from vitkit.layers.attention import Attention
from vitkit.layers.drop_path import DropPath
from vitkit.layers.layer_scale import LayerScale
from vitkit.layers.mlp import Mlp, SwiGLU
from vitkit.layers.norm import make_norm


class Block(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``, with drop path on both branches.

    Keys match Meta's DINOv2/DINOv3 and timm: ``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``,
    ``norm2``, ``mlp.fc1``/``mlp.fc2`` (or ``mlp.w12``/``mlp.w3``), ``ls2.gamma``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, ffn_layer: str = "mlp",
                 act: str = "gelu", qkv_bias: bool = True, mask_k_bias: bool = False,
                 proj_bias: bool = True, ffn_bias: bool = True, qk_norm: bool = False,
                 layer_scale_init: float | None = None, norm: str = "layernorm", norm_eps: float = 1e-6,
                 drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = make_norm(norm, dim, norm_eps, **dd)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, mask_k_bias=mask_k_bias,
                              proj_bias=proj_bias, qk_norm=qk_norm, norm_eps=norm_eps, **dd)
        self.ls1 = LayerScale(dim, layer_scale_init, **dd) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = make_norm(norm, dim, norm_eps, **dd)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, mlp_hidden_dim, act=act, bias=ffn_bias, **dd)
        elif ffn_layer == "swiglu":
            self.mlp = SwiGLU(dim, mlp_hidden_dim, bias=ffn_bias, **dd)
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected 'mlp' or 'swiglu'")
        self.ls2 = LayerScale(dim, layer_scale_init, **dd) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rope=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
