"""One dispatcher for the CPU kernels of every vitkit model: chosen by measurement, never slower than stock.

Model code calls :func:`linear`, :func:`attention` and :func:`bmm` and never asks which CPU it is on. Each
operation has a *stock* implementation (what PyTorch's own modules compute: ``F.linear`` + activation, SDPA,
``torch.matmul``) and CPU-inference candidates (:mod:`vitkit.kernels.candidates`: oneDNN's fused linear, blocked
and batched GEMM attention, per-image oneDNN GEMMs). Where a candidate applies -- a CPU tensor in fp32 or bf16,
nothing that needs a gradient, not inside ``torch.compile`` -- the first call of each *shape class* (operation, dtype,
activation, bucketed sizes, torch threads) runs every candidate on the real operands, times them (a warm-up and
the best of a few runs: milliseconds), checks each against the stock result within the dtype's tolerance, and
keeps the fastest exact one for the rest of the process. A stock implementation is always a candidate, so on any
machine vitkit is at worst as fast as stock PyTorch plus that one measurement. Training, accelerators and
``torch.compile`` always take the stock path.

Modes: ``VITKIT_KERNELS=tuned`` (default: the measured choice) or ``stock`` (PyTorch's kernels everywhere,
bit-identical to ``F.linear`` + SDPA); :func:`set_mode` switches at run time. ``VITKIT_ONEDNN=0`` and
``set_onednn(False)`` are the older spellings of ``stock``.

Autocast is honoured: under ``torch.autocast("cpu", dtype)`` the operands are cast as PyTorch's autocast casts
them for ``F.linear`` / SDPA / ``matmul`` (weights once per autocast region, as autocast's own cache does) and the
result has that dtype.

:func:`choices` returns what was measured and chosen, for benchmark reports.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

from vitkit.kernels import candidates as C

__all__ = ["linear", "attention", "bmm", "Linear", "fusable_activation", "hooked", "set_mode", "mode", "choices",
           "set_onednn", "onednn_available", "MODES"]

MODES = ("tuned", "stock")
_REPS = 3          # timed runs per candidate (best of), after one warm-up
_SLOW_S = 0.05     # a candidate slower than this per call is timed once only
_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}  # max |a - b| / max |stock|


def _initial_mode() -> str:
    if os.environ.get("VITKIT_ONEDNN", "1") == "0":
        return "stock"
    m = os.environ.get("VITKIT_KERNELS", "tuned").strip().lower()
    if m not in MODES:
        raise ValueError(f"VITKIT_KERNELS={m!r}: expected one of {MODES}.")
    return m


_mode = _initial_mode()
_ONEDNN = C.onednn_available()
_chosen: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float | None]] = {}
_lock = threading.Lock()


def onednn_available() -> bool:
    """True when this PyTorch build has oneDNN's fused linear (the candidates need it)."""
    return C.onednn_available()


def set_mode(new: str) -> str:
    """``"tuned"`` or ``"stock"`` for the whole process; returns the previous mode."""
    global _mode
    if new not in MODES:
        raise ValueError(f"kernel mode {new!r}: expected one of {MODES}.")
    previous, _mode = _mode, new
    return previous


def mode() -> str:
    return _mode


def set_onednn(enabled: bool) -> bool:
    """Older spelling: ``set_onednn(False)`` is ``set_mode("stock")``. Returns whether it was on before."""
    if enabled and not onednn_available():
        raise RuntimeError("this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    return set_mode("tuned" if enabled else "stock") == "tuned"


def choices() -> list[dict]:
    """The measured shape classes: operation, key, candidate timings (ms; None = not exact) and the choice."""
    with _lock:
        return [{"op": k[0], "key": list(map(str, k[1:])), "chosen": _chosen.get(k),
                 "ms": {n: (None if s is None else round(1e3 * s, 4)) for n, s in t.items()}}
                for k, t in _timings.items()]


# ------------------------------------------------------------------------------------------- dispatch
def _bucket(n: int) -> int:
    """Sizes in one power-of-two octave share a measurement."""
    return 1 << max(0, int(n) - 1).bit_length()


def _eligible(*tensors: torch.Tensor | None) -> bool:
    """The candidates may apply: tuned mode, oneDNN present, CPU operands, no gradient needed, not compiling."""
    if torch.compiler.is_compiling() or _mode != "tuned" or not _ONEDNN:  # inductor chooses its own kernels
        return False
    grad = torch.is_grad_enabled()
    return all(t.device.type == "cpu" and not (grad and t.requires_grad) for t in tensors if t is not None)


def _fast_dtype(*tensors: torch.Tensor | None) -> bool:
    """The operands share one dtype the candidates take (fp32 or bf16)."""
    ts = [t for t in tensors if t is not None]
    return ts[0].dtype in (torch.float32, torch.bfloat16) and all(t.dtype == ts[0].dtype for t in ts)


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal up to the dtype's tolerance (relative to the largest finite stock value); non-finite values must sit
    in the same places (a NaN in the input propagates alike through every candidate)."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return False
    if ref.numel() == 0:
        return True
    a, b = out.float(), ref.float()
    fin = torch.isfinite(b)
    if not torch.equal(fin, torch.isfinite(a)) or not torch.equal(a[~fin].nan_to_num(), b[~fin].nan_to_num()):
        return False
    if not fin.any():
        return True
    scale = b[fin].abs().max().clamp_min(1e-6)
    return bool(((a[fin] - b[fin]).abs().max() / scale) <= _TOL.get(ref.dtype, 1e-4))


def _dispatch(key: tuple, impls: dict[str, Callable], args: tuple) -> torch.Tensor:
    if any(isinstance(a, torch.Tensor) and a.numel() == 0 for a in args):
        return impls["stock"](*args)  # nothing to compute or time; candidates need not handle empty operands
    name = _chosen.get(key)
    if name is not None:
        return impls[name](*args)
    # first call of this shape class: run every candidate, time it, keep the fastest exact one
    outs, times = {}, {}
    for n, f in impls.items():
        out = f(*args)  # warm-up (first calls build kernels and caches)
        best = None
        for _ in range(_REPS):
            t0 = time.perf_counter()
            out = f(*args)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
            if dt > _SLOW_S:
                break
        outs[n], times[n] = out, best
    ref = outs["stock"]
    for n in impls:
        if n != "stock" and not _close(outs[n], ref):
            warnings.warn(f"vitkit.kernels: candidate {n!r} for {key[0]} {key[1:]} differs from stock PyTorch "
                          "beyond the dtype's tolerance; it is not used.", RuntimeWarning, stacklevel=3)
            times[n] = None
    name = min((n for n in impls if times[n] is not None), key=lambda n: times[n])
    with _lock:
        _chosen[key], _timings[key] = name, times
    return outs[name]


# -------------------------------------------------------------------------------------------- autocast
_cast_cache: dict[int, tuple] = {}  # id(parameter) -> (weakref, version, cast); tensors cannot be dict keys
_cast_region = [False]


def _autocast_dtype(*tensors: torch.Tensor | None) -> torch.dtype | None:
    """The CPU autocast dtype when autocast applies to these operands, else None."""
    on = torch.is_autocast_enabled("cpu")
    if not on:
        if _cast_region[0]:  # autocast's own cache lives as long as its region: so does ours
            _cast_cache.clear()
            _cast_region[0] = False
        return None
    if not any(t is not None and t.device.type == "cpu" and t.is_floating_point() for t in tensors):
        return None
    _cast_region[0] = True
    return torch.get_autocast_dtype("cpu")


def _cast(t: torch.Tensor | None, dtype: torch.dtype, cache: bool) -> torch.Tensor | None:
    """``t`` in ``dtype`` as autocast casts it; parameters (leaves that require grad) are cached per region."""
    if t is None or t.dtype == dtype or not t.is_floating_point():
        return t
    if not (cache and t.is_leaf and t.requires_grad and torch.is_autocast_cache_enabled()):
        return t.to(dtype)
    hit = _cast_cache.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2].dtype == dtype:
        return hit[2]
    with torch.no_grad():
        out = t.to(dtype)
    _cast_cache[id(t)] = (weakref.ref(t), t._version, out)
    return out


# ----------------------------------------------------------------------------------------- operations
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """``activation(x @ weight.T + bias)``; ``activation`` is None, ``"gelu"`` (erf), ``"gelu_tanh"``,
    ``"relu"`` or ``"silu"``. Gradients flow as through ``F.linear`` whenever one is needed."""
    if activation not in C.FUSED:
        raise ValueError(f"activation {activation!r} cannot be fused; expected one of {list(C.FUSED)}")
    if not _eligible(x, weight, bias):  # training, accelerators, compile, stock mode: autocast acts natively
        return C.linear_stock(x, weight, bias, activation)
    dt = _autocast_dtype(x, weight)
    if dt is not None:
        x, weight, bias = _cast(x, dt, False), _cast(weight, dt, True), _cast(bias, dt, True)
    if not _fast_dtype(x, weight, bias):
        return C.linear_stock(x, weight, bias, activation)
    key = ("linear", x.dtype, activation, bias is not None, _bucket(x.numel() // max(x.shape[-1], 1)),
           x.shape[-1], weight.shape[0], torch.get_num_threads())
    return _dispatch(key, C.LINEAR, (x, weight, bias, activation))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Softmax attention of ``q, k, v`` ``[B, heads, N, head_dim]``; returns tokens-major
    ``[B, N, heads * head_dim]``. ``attn_mask`` (boolean ``[B or 1, heads or 1, R, N]``, True = may attend)
    restricts the first R query rows (EoMT's queries); the other rows attend everywhere."""
    if not _eligible(q, k, v):
        return C.attention_stock(q, k, v, attn_mask)
    dt = _autocast_dtype(q, k, v)
    if dt is not None:
        q, k, v = _cast(q, dt, False), _cast(k, dt, False), _cast(v, dt, False)
    if not _fast_dtype(q, k, v):
        return C.attention_stock(q, k, v, attn_mask)
    B, H, N, d = q.shape
    # masked rows: none (0), all (-1: e.g. padded keys, any N shares the class) or EoMT's first R query rows
    rows = 0 if attn_mask is None else -1 if attn_mask.shape[-2] == N else attn_mask.shape[-2]
    key = ("attention", q.dtype, _bucket(B * H), _bucket(N), d, rows, torch.get_num_threads())
    impls = C.ATTENTION if key[2] * key[3] ** 2 <= C.BATCHED_MAX else C.ATTENTION_LARGE
    return _dispatch(key, impls, (q, k, v, attn_mask))


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [B, M, K] @ b [B, K, N]`` (``torch.matmul``'s result)."""
    if not _eligible(a, b):
        return C.bmm_stock(a, b)
    dt = _autocast_dtype(a, b)
    if dt is not None:
        a, b = _cast(a, dt, False), _cast(b, dt, False)
    if not _fast_dtype(a, b):
        return C.bmm_stock(a, b)
    key = ("bmm", a.dtype, a.shape[0], _bucket(a.shape[1]), a.shape[2], _bucket(b.shape[2]), torch.get_num_threads())
    return _dispatch(key, C.BMM, (a, b))


# -------------------------------------------------------------------------------------------- modules
class Linear(nn.Linear):
    """``nn.Linear`` whose forward goes through :func:`linear` (same parameters, same state-dict keys, same
    forward hooks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def fusable_activation(module: nn.Module) -> str | None:
    """The :func:`linear` activation name equal to ``module`` (``nn.GELU``, ``nn.ReLU`` or ``nn.SiLU``),
    else None: any other module is applied after :func:`linear` instead."""
    if type(module) is nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return {nn.ReLU: "relu", nn.SiLU: "silu"}.get(type(module))


def hooked(*modules: nn.Module) -> bool:
    """True when any of ``modules`` (or every module, globally) has forward hooks: callers then call the modules
    themselves instead of fusing them, so the hooks see what they expect."""
    from torch.nn.modules import module as M

    if M._global_forward_hooks or M._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
