"""Helpers shared by test files, imported as ``from helpers import randomise, rel``.

pytest puts ``tests/`` on ``sys.path`` (rootdir conftest, no ``__init__.py``), so this module needs no package
name: a top-level ``tests`` package installed by some other distribution cannot shadow it.
"""

from __future__ import annotations

import torch
from torch import nn

# Tolerances on the relative error (max |a - b| / max |b|) of a whole-model comparison, stated from the dtype:
# fp32 rounding (~6e-8 per op) accumulated over a few blocks stays well under 1e-5; bf16 keeps 8 mantissa bits
# (~4e-3 per op), which a few blocks grow to a few 1e-2.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """LayerScale gammas (every parameter named ``*gamma``) around 1 +- 0.2 and biases N(0, 0.1).

    Presets start LayerScale at 1e-5, which mutes every block: a wrong kernel or a wrong scale inside a block then
    changes the output by ~1e-5 and no comparison can see it. Returns ``model`` (changed in place).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error: max |a - ref| / max |ref|, computed in fp32."""
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


def free_port() -> int:
    """A TCP port free on localhost now (the OS picks it), for a rendezvous started right after."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (not a package) once per process, as module ``vitkit_benchmarks_<name>``."""
    import importlib.util
    import sys
    from pathlib import Path

    mod_name = f"vitkit_benchmarks_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod
