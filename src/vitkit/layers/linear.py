"""The linear map of every vitkit transformer block, run through oneDNN on CPU when no gradient is needed.

PyTorch's ``F.linear`` sends fp32 GEMMs on x86 CPUs to MKL. On CPUs that MKL does not give its
AVX-512 kernels (AMD EPYC here) that reaches 155-175 GFLOP/s, while oneDNN, which PyTorch also ships,
reaches 390-410 on the same two cores (``benchmarks/RESULTS.md``). In bf16 both go to oneDNN, but
``F.linear`` first copies the bias into the output and runs the activation as a separate pass; oneDNN
applies bias and GELU/ReLU/SiLU to the accumulator before it is written (and in fp32, before bf16
rounding).

:func:`linear` takes the oneDNN path only where it is exact up to summation order and needs no
autograd: a CPU tensor in fp32 or bf16, a weight of the same dtype, nothing that requires a gradient,
and not inside ``torch.compile`` (inductor chooses its own kernels). Everything else, including all
training, runs ``F.linear`` followed by the activation. :func:`set_onednn` switches the path off, e.g.
for bit-exact comparisons with a model that uses ``F.linear``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

try:
    _LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default
except (AttributeError, RuntimeError):  # a build without oneDNN
    _LINEAR_POINTWISE = None

# activation name -> (oneDNN post-op, algorithm), and the eager function used otherwise
_FUSED = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", ""),
          "silu": ("swish", "")}
_EAGER = {None: lambda x: x, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
          "relu": F.relu, "silu": F.silu}

_enabled = (_LINEAR_POINTWISE is not None and torch.backends.mkldnn.is_available()
            and os.environ.get("VITKIT_ONEDNN", "1") != "0")


def set_onednn(enabled: bool) -> bool:
    """Switch the oneDNN inference path on or off for the whole process; returns the previous setting.

    ``VITKIT_ONEDNN=0`` in the environment starts with it off. Switching it on where PyTorch was built
    without oneDNN raises.
    """
    global _enabled
    if enabled and (_LINEAR_POINTWISE is None or not torch.backends.mkldnn.is_available()):
        raise RuntimeError("this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    previous, _enabled = _enabled, bool(enabled)
    return previous


def onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """True when :func:`linear` on these operands runs oneDNN (see the module doc for the conditions)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    return (_enabled and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype == x.dtype and weight.device.type == "cpu" and not needs_grad
            and not torch.compiler.is_compiling())


def fusable_activation(module: nn.Module) -> str | None:
    """The :func:`linear` activation name equal to ``module`` (``nn.GELU``, ``nn.ReLU`` or ``nn.SiLU``),
    else None: any other module is applied after :func:`linear` instead."""
    if type(module) is nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return {nn.ReLU: "relu", nn.SiLU: "silu"}.get(type(module))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """``activation(x @ weight.T + bias)``; ``activation`` is None, ``"gelu"`` (erf), ``"gelu_tanh"``,
    ``"relu"`` or ``"silu"``. Gradients flow as through ``F.linear`` whenever one is needed."""
    if activation not in _FUSED:
        raise ValueError(f"activation {activation!r} cannot be fused; expected one of {list(_FUSED)}")
    if onednn_applies(x, weight, bias):
        attr, algorithm = _FUSED[activation]
        # oneDNN runs a reference (100x slower) kernel for a weight with padded rows: give it a dense one
        return _LINEAR_POINTWISE(x, weight.contiguous(), bias, attr, [], algorithm)
    return _EAGER[activation](F.linear(x, weight, bias))
