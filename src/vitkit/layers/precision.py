"""Low-precision inference without re-casting weights on every call.

``torch.autocast`` converts every weight to bf16 on every forward and returns to fp32 around each norm.
:func:`cast_for_inference` converts the weights once instead: linear, convolution, embedding, token and
LayerScale parameters go to ``dtype``; norm weights and the position table stay fp32, and vitkit's
norms compute their statistics in fp32 (then return ``dtype``); RoPE tables, softmax and EoMT's
normalisation constants stay fp32 as well. Inputs may stay fp32: the patch embedding casts them.
"""

from __future__ import annotations

import torch
from torch import nn

from vitkit.layers.norm import LayerNorm, RMSNorm

_KEEP_FP32 = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
_KEEP_FP32_NAMES = ("pos_embed",)


def cast_for_inference(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Cast ``model`` in place for inference in ``dtype`` (see the module doc) and put it in eval mode.

    Norm layers must be vitkit's (they accept lower-precision inputs); a plain ``nn.LayerNorm`` elsewhere
    in the model is refused with its name rather than failing later inside a forward.
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    for name, m in model.named_modules():
        if isinstance(m, _KEEP_FP32):
            if dtype != torch.float32 and isinstance(m, (nn.LayerNorm, nn.RMSNorm)) \
                    and not isinstance(m, (LayerNorm, RMSNorm)):
                raise TypeError(f"{name or type(model).__name__} is a torch norm layer; cast_for_inference "
                                f"needs vitkit.layers.norm.LayerNorm/RMSNorm, which accept {dtype} inputs")
            continue
        for pname, p in m.named_parameters(recurse=False):
            if pname in _KEEP_FP32_NAMES or not p.is_floating_point():
                continue
            p.data = p.data.to(dtype)
    return model.eval()

