"""Shared helpers for vitkit benchmarks: environment header, GEMM peak, interleaved timing, tables.

Everything here runs in the calling process; no subprocesses, no network.
"""

from __future__ import annotations

import gc
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def setup_threads(n: int = 2) -> None:
    """Pin intra-op parallelism (and inter-op, which must be set before any parallel work)."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set / parallel work already started
        pass


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags(wanted: Sequence[str] = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2")) -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("timm", "transformers", "vitkit"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - report, don't fail
            out[mod] = f"unavailable ({type(e).__name__})"
    return out


def environment() -> dict[str, Any]:
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "versions": versions(),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()),
    }


def print_header(env: dict[str, Any]) -> None:
    print(f"command : {env['command']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(f"machine : {env['cpu']}, {env['logical_cpus']} logical CPUs, torch threads {env['torch_threads']}, "
          f"capability {env['cpu_capability']}, flags {' '.join(env['cpu_flags'])}")


# --------------------------------------------------------------------------------------------- GEMM peak
def gemm_peak(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` GFLOP/s of an ``n x n x n`` matmul in ``dtype`` (2 n^3 FLOPs).

    The best (not the median) is used because it is a ceiling: the share of peak reported for a model is
    then conservative.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    with torch.inference_mode():
        for _ in range(2):
            a @ b
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# ------------------------------------------------------------------------------------- interleaved timing
def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, reps: int,
                     progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Time several callables round-robin and return each one's list of wall times (seconds).

    Each round calls every function once; the starting function rotates from round to round
    (a, b, c / b, c, a / c, a, b ...) so that none is always first after a context switch and slow drift
    (thermal, other tenants) is spread evenly over all of them. ``warmup`` rounds are run and discarded.
    The garbage collector is disabled while timing.
    """
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(warmup + reps):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                t0 = time.perf_counter()
                fns[k]()
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[k].append(dt)
            if progress is not None:
                progress(f"round {r + 1}/{warmup + reps}" + (" (warm-up)" if r < warmup else ""))
    finally:
        if was_enabled:
            gc.enable()
    return times


def summarize(ts: Sequence[float]) -> dict[str, float]:
    med = statistics.median(ts)
    return {
        "median_s": med,
        "min_s": min(ts),
        "max_s": max(ts),
        # relative spread: half the interquartile-ish range over the median (robust for small n)
        "spread": (max(ts) - min(ts)) / med if len(ts) > 1 else 0.0,
        "n": len(ts),
    }


# ---------------------------------------------------------------------------------------------- tables
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        parts = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts)

    out = [line(cells[0])]
    if markdown:
        out.append("|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2))
                                   for i, w in enumerate(widths)) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def top_ops(prof: "torch.profiler.profile", n: int = 15) -> list[dict[str, Any]]:
    """The ``n`` ops with the most self CPU time from a finished profiler."""
    evs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in evs) or 1.0
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in evs[:n]]
