"""The implementations the kernel dispatcher (:mod:`vitkit.kernels`) chooses between.

Each operation has a *stock* implementation -- exactly what PyTorch's own modules compute (``F.linear`` and the
activation, ``F.scaled_dot_product_attention``, ``torch.matmul``) -- and CPU-inference candidates that compute
the same result up to summation order:

* ``onednn`` linear: oneDNN's fused linear (``torch.ops.mkldnn._linear_pointwise``), bias and GELU/ReLU/SiLU
  applied to the accumulator before it is written. On CPUs that MKL does not give its AVX-512 kernels (AMD EPYC)
  PyTorch's fp32 GEMM reaches 155-175 GFLOP/s where oneDNN reaches 390-410 on the same two cores; on an Intel
  Xeon the two are closer (``benchmarks/RESULTS.md``).
* ``blocked`` attention: softmax attention as two GEMMs per (image, head) over blocks of query rows.
* ``batched`` attention: the same as two batched matmuls over every (image, head) at once, the whole score matrix
  in memory; for many short sequences (the peak model's 64 x 64-pixel windows: 32 windows x 4 heads x 69 tokens,
  1.1-1.2 ms against stock SDPA's 1.7-1.8 ms on the AMD EPYC host, ~6 % of a whole event). Offered only where that
  matrix stays small (:data:`BATCHED_MAX`).
* ``onednn`` batched matmul: one oneDNN GEMM per batch element.

Which candidate is faster depends on the CPU, the dtype and the shape; the dispatcher measures it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default
except (AttributeError, RuntimeError):  # a build without oneDNN
    LINEAR_POINTWISE = None

# activation name -> (oneDNN post-op, algorithm), and the eager function of the stock path
FUSED = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", ""),
         "silu": ("swish", "")}
EAGER = {None: lambda x: x, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "relu": F.relu, "silu": F.silu}


def onednn_available() -> bool:
    return LINEAR_POINTWISE is not None and torch.backends.mkldnn.is_available()


# ---------------------------------------------------------------------------------------------- linear
def linear_stock(x, weight, bias=None, activation=None):
    return EAGER[activation](F.linear(x, weight, bias))


def linear_onednn(x, weight, bias=None, activation=None):
    attr, algorithm = FUSED[activation]
    # oneDNN runs a reference (100x slower) kernel for a weight with padded rows: give it a dense one
    return LINEAR_POINTWISE(x, weight.contiguous(), bias, attr, [], algorithm)


# ------------------------------------------------------------------------------------------- attention
def attention_stock(q, k, v, attn_mask=None):
    """SDPA; with a mask over the first R < N query rows, the masked rows and the rest in two calls. Returns
    tokens-major ``[B, N, heads * head_dim]``."""
    B, H, N, d = q.shape
    if attn_mask is not None and attn_mask.shape[-2] < N:
        R = attn_mask.shape[-2]
        head = F.scaled_dot_product_attention(q[:, :, :R], k, v, attn_mask=attn_mask)
        tail = F.scaled_dot_product_attention(q[:, :, R:], k, v)
        x = torch.cat([head, tail], dim=2)
    else:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return x.transpose(1, 2).reshape(B, N, H * d)


def attention_blocked(q, k, v, attn_mask=None, chunk: int = 512):
    """Softmax attention as two oneDNN GEMMs per (image, head) over blocks of ``chunk`` query rows (the score
    matrix stays ``chunk x N``). Scores and softmax stay in the input dtype, as the fused kernel's inputs;
    softmax accumulates in fp32 either way. ``attn_mask`` as :func:`attention_stock`."""
    B, H, N, d = q.shape
    out = q.new_empty(B, N, H, d)
    q = q * d ** -0.5
    k, vt = k.contiguous(), v.transpose(-1, -2).contiguous()  # dense per-head GEMM operands
    R = 0 if attn_mask is None else attn_mask.shape[-2]
    blocked = None if attn_mask is None else ~attn_mask
    rows = [(i, min(i + chunk, R)) for i in range(0, R, chunk)] + [(i, min(i + chunk, N)) for i in range(R, N, chunk)]
    for b in range(B):
        for h in range(H):
            for i, j in rows:
                scores = linear_onednn(q[b, h, i:j], k[b, h])
                if i < R:
                    scores.masked_fill_(blocked[b % blocked.shape[0], h % blocked.shape[1], i:j], float("-inf"))
                out[b, i:j, h] = linear_onednn(torch.softmax(scores, dim=-1), vt[b, h])
    return out.view(B, N, H * d)


def attention_batched(q, k, v, attn_mask=None):
    """Softmax attention as two batched matmuls over all (image, head) pairs, scores ``[B, heads, N, N]`` in the
    input dtype (softmax accumulates in fp32). ``attn_mask`` as :func:`attention_stock`."""
    B, H, N, d = q.shape
    scores = torch.matmul(q * d ** -0.5, k.transpose(-1, -2))
    if attn_mask is not None:
        scores[:, :, :attn_mask.shape[-2]].masked_fill_(~attn_mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(B, N, H * d)


BATCHED_MAX = 1 << 25
"""``batched`` attention is a candidate only when (images x heads) x tokens^2, each rounded up to a power of two as
the dispatcher's shape classes are, is at most this (32 M scores: ViT-S at 518-640 px per image, not 1024 px)."""


# --------------------------------------------------------------------------------------------- matmul
def bmm_stock(a, b):
    return torch.matmul(a, b)


def bmm_onednn(a, b):
    """``a [B, M, K] @ b [B, K, N]`` as one oneDNN GEMM per batch element against ``b[i].T`` (no copy when
    ``b`` is the transpose of a dense ``[B, N, K]``, e.g. channels-last feature maps)."""
    return torch.stack([linear_onednn(x, y.transpose(0, 1)) for x, y in zip(a, b)])


LINEAR = {"stock": linear_stock, "onednn": linear_onednn}
ATTENTION = {"stock": attention_stock, "blocked": attention_blocked, "batched": attention_batched}
ATTENTION_LARGE = {"stock": attention_stock, "blocked": attention_blocked}  # scores too large to hold at once
BMM = {"stock": bmm_stock, "onednn": bmm_onednn}
