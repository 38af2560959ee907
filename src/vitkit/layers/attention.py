"""Multi-head self-attention; the kernels (SDPA, blocked GEMMs, oneDNN linear) are :mod:`vitkit.kernels`' choice."""

from __future__ import annotations

import torch
from torch import nn

from vitkit.kernels import Linear, attention, linear
from vitkit.layers.norm import LayerNorm
from vitkit.layers.rope import apply_rope


class KMaskedLinear(Linear):
    """The fused qkv projection with the key part of its bias zeroed in the forward pass (DINOv3's
    ``LinearKMaskedBias``; the mask is a non-persistent buffer, so the state dict is a plain linear's)."""

    def __init__(self, dim: int, bias: bool = True, device=None, dtype=None):
        super().__init__(dim, 3 * dim, bias=bias, device=device, dtype=dtype)
        mask = torch.ones(3 * dim, device=device)
        mask[dim:2 * dim] = 0
        self.register_buffer("bias_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias * self.bias_mask.to(self.bias.dtype)
        return linear(x, self.weight, bias)


class Attention(nn.Module):
    """Fused-qkv self-attention (keys ``qkv``, ``proj``; optional ``q_norm``/``k_norm``).

    Args:
        dim: token width; ``num_heads`` must divide it.
        qkv_bias: bias on the fused qkv projection.
        mask_k_bias: zero the key part of the qkv bias in the forward pass (DINOv3's
            ``LinearKMaskedBias``). The key bias matters once RoPE rotates keys per position.
        proj_bias: bias on the output projection.
        qk_norm: LayerNorm over each head's queries and keys before attention.

    The projections are ``nn.Linear`` modules (:class:`vitkit.kernels.Linear`) called as modules, so their
    forward hooks fire; the attention kernel is :func:`vitkit.kernels.attention`'s choice.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, mask_k_bias: bool = False,
                 proj_bias: bool = True, qk_norm: bool = False, norm_eps: float = 1e-6,
                 device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.mask_k_bias = mask_k_bias and qkv_bias
        self.qkv = KMaskedLinear(dim, qkv_bias, **dd) if self.mask_k_bias else Linear(dim, 3 * dim, qkv_bias, **dd)
        self.q_norm = LayerNorm(self.head_dim, eps=norm_eps, **dd) if qk_norm else nn.Identity()
        self.k_norm = LayerNorm(self.head_dim, eps=norm_eps, **dd) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim, bias=proj_bias, **dd)

    def qkv_heads(self, x: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project ``x`` [B, N, C] to q, k, v [B, heads, N, head_dim] (norms and RoPE applied)."""
        B, N, C = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: tokens [B, N, C].
            rope: ``(sin, cos)`` for the last ``HW`` tokens, or None.
            attn_mask: boolean [B, 1 or heads, R, N], True = may attend; None for full attention. With
                R < N only the first R tokens' attention is masked (EoMT's query rows) and the other rows
                run unmasked, so the mask never needs the full N x N.
        """
        q, k, v = self.qkv_heads(x, rope)
        return self.proj(attention(q, k, v, attn_mask))

    def attention_probs(self, x: torch.Tensor, rope=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The softmax attention map [B, heads, N, N] (for inspection; not used in forward)."""
        q, k, _ = self.qkv_heads(x, rope)
        scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.float().softmax(-1).to(q.dtype)
