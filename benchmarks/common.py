"""Shared helpers for vitkit benchmarks: environment header, GEMM peak, interleaved timing, tables.

Everything here runs in the calling process; no subprocesses, no network.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def setup_process(n: int = 2, tune_allocator: bool = True) -> None:
    """Pin intra-op parallelism (and inter-op, which must be set before any parallel work), and keep freed
    memory in the heap (:func:`vitkit.runtime.tune_cpu_allocator`): the same for every implementation
    timed in the process, so ratios are unaffected, while page faults no longer add 10-15 % to each."""
    from vitkit.runtime import tune_cpu_allocator

    if tune_allocator:
        tune_cpu_allocator()
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


def kernel_report() -> dict[str, Any]:
    """vitkit's kernel dispatcher: its mode and what it measured and chose in this process (vitkit.kernels)."""
    from vitkit import kernels

    return {"mode": kernels.mode(), "choices": kernels.choices()}


def print_kernels() -> None:
    """One line per shape class the dispatcher measured: the chosen kernel and the candidates' times."""
    rep = kernel_report()
    print(f"\nvitkit kernels (mode {rep['mode']}): {len(rep['choices'])} shape classes measured")
    for c in rep["choices"]:
        times = ", ".join(f"{n} {'inexact' if ms is None else f'{ms:.3f} ms'}" for n, ms in c["ms"].items())
        print(f"  {c['op']:<9} {' '.join(c['key'])}: {c['chosen']} ({times})")


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
        "torch_build": {"version": torch.__version__, "cuda": torch.version.cuda,
                        "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available()},
    }


def print_header(env: dict[str, Any]) -> None:
    print(f"command : {env['command']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(f"machine : {env['cpu']}, {env['logical_cpus']} logical CPUs, torch threads {env['torch_threads']}, "
          f"capability {env['cpu_capability']}, flags {' '.join(env['cpu_flags']) or '-'} (no amx_bf16 unless "
          "listed), vitkit kernels " + __import__("vitkit.kernels", fromlist=["mode"]).mode())


# --------------------------------------------------------------------------------------------- GEMM peak
def gemm_peaks(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5, max_foreign: float = 0.25,
               attempts: int = 6) -> dict[str, float]:
    """Best GFLOP/s of an ``n x n x n`` GEMM in ``dtype`` (2 n^3 FLOPs), per kernel: ``matmul`` is
    ``torch.matmul`` (MKL for fp32 on x86, oneDNN for bf16), ``onednn`` is oneDNN's matmul as vitkit's
    inference path calls it. On CPUs MKL gives no AVX-512 kernels (AMD) the two differ by up to 2.5x
    in fp32.

    The best (not the median) is used because it is a ceiling: the share of peak reported for a model is
    then conservative. Attempts of ``reps`` GEMMs are repeated (after waiting for a quiet machine) until
    one ran while other processes used < ``max_foreign`` cores; the best over all attempts is returned.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    kernels = {"matmul": lambda: a @ b}
    if torch.backends.mkldnn.is_available():
        kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    out = {}
    with torch.inference_mode():
        for name, gemm in kernels.items():
            best = float("inf")
            for _ in range(2):
                gemm()
            for _ in range(attempts):
                fl = ForeignLoad()
                fl.start()
                for _ in range(reps):
                    t0 = time.perf_counter()
                    gemm()
                    best = min(best, time.perf_counter() - t0)
                if fl.stop() < max_foreign:
                    break
                wait_for_idle(max_foreign, max_wait=30)
            out[name] = 2 * n ** 3 / best / 1e9
    return out


def gemm_peak(dtype: torch.dtype = torch.float32, **kw: Any) -> float:
    """The machine's GEMM peak in ``dtype``: the best kernel of :func:`gemm_peaks`."""
    return max(gemm_peaks(dtype, **kw).values())


# ----------------------------------------------------------------------------------------- contention
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_counters() -> tuple[float, float] | None:
    """(machine busy CPU-seconds incl. steal, this process's CPU-seconds), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(i) for i in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            s = f.read()
        fields = s[s.rindex(")") + 2:].split()
        mine = int(fields[11]) + int(fields[12])  # utime + stime (all threads)
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / _TICK, mine / _TICK


class ForeignLoad:
    """Measures how many cores *other* processes (and the hypervisor, via steal) used between
    ``start()`` and ``stop()``: (machine busy - own CPU time) / wall time."""

    def start(self) -> None:
        self._c0, self._t0 = _cpu_counters(), time.perf_counter()

    def stop(self) -> float:
        c1, t1 = _cpu_counters(), time.perf_counter()
        if self._c0 is None or c1 is None or t1 <= self._t0:
            return 0.0
        return max(0.0, ((c1[0] - self._c0[0]) - (c1[1] - self._c0[1])) / (t1 - self._t0))


def wait_for_idle(threshold: float = 0.25, window: float = 1.0, max_wait: float = 60.0) -> float:
    """Block until other processes use < ``threshold`` cores over a ``window`` (or ``max_wait`` s passed).

    Returns the seconds waited."""
    t0 = time.perf_counter()
    fl = ForeignLoad()
    while time.perf_counter() - t0 < max_wait:
        fl.start()
        time.sleep(window)
        if fl.stop() < threshold:
            break
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------- interleaved timing
def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, reps: int,
                     progress: Callable[[str], None] | None = None, max_foreign: float | None = 0.25,
                     max_retries: int | None = None, idle_wait: float = 0.0
                     ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time several callables round-robin; return each one's wall times (seconds) and run statistics.

    Each round calls every function once; the starting function rotates from round to round
    (a, b, c / b, c, a / c, a, b ...) so that none is always first after a context switch and slow drift
    (thermal, other tenants) is spread evenly over all of them. ``warmup`` rounds are run and discarded.
    A timed call during which other processes used more than ``max_foreign`` cores (see
    :class:`ForeignLoad`) is discarded and repeated right away, after waiting up to ``idle_wait`` s for a
    quiet machine; at most ``max_retries`` such repeats per setting (default ``3 * reps * len(fns)``),
    after which contended calls are kept and counted. The garbage collector is disabled while timing.
    """
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    stats: dict[str, Any] = {"foreign_load": {k: [] for k in names}, "discarded_calls": 0,
                             "contended_calls_kept": 0, "idle_wait_s": 0.0}
    retries_left = 3 * reps * len(names) if max_retries is None else max_retries
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    fl = ForeignLoad()
    try:
        for r in range(warmup + reps):
            order = names[r % len(names):] + names[:r % len(names)]
            msgs = []
            for k in order:
                while True:
                    fl.start()
                    t0 = time.perf_counter()
                    fns[k]()
                    dt = time.perf_counter() - t0
                    load = fl.stop()
                    if r < warmup:
                        msgs.append(f"{k} {dt * 1e3:.0f} ms")
                        break
                    contended = max_foreign is not None and load > max_foreign
                    if contended and retries_left > 0:
                        retries_left -= 1
                        stats["discarded_calls"] += 1
                        msgs.append(f"{k} {dt * 1e3:.0f} ms DISCARDED (others {load:.2f} cores)")
                        if idle_wait > 0:
                            gc.enable()
                            stats["idle_wait_s"] += wait_for_idle(max_foreign, max_wait=idle_wait)
                            gc.disable()
                        continue
                    stats["contended_calls_kept"] += int(contended)
                    stats["foreign_load"][k].append(load)
                    times[k].append(dt)
                    msgs.append(f"{k} {dt * 1e3:.0f} ms")
                    break
            if progress is not None:
                progress(f"round {r + 1}/{warmup + reps}{' (warm-up)' if r < warmup else ''}: " + ", ".join(msgs))
    finally:
        if was_enabled:
            gc.enable()
    return times, stats


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


def profile_calls(fn: Callable[[], Any], iters: int, attempts: int = 4, max_foreign: float | None = 0.25,
                  max_wait: float = 20.0) -> tuple[torch.profiler.profile, float, float]:
    """Profile ``iters`` calls of ``fn`` (CPU activities); repeat, up to ``attempts`` times after waiting for
    a quiet machine, while other processes used more than ``max_foreign`` cores. Returns the least contended
    run as ``(profiler, wall seconds per call, other processes' cores)``."""
    from torch.profiler import ProfilerActivity, profile

    best = None
    for _ in range(attempts):
        wait_for_idle(max_foreign or 0.25, max_wait=max_wait)
        fl = ForeignLoad()
        fl.start()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            wall = (time.perf_counter() - t0) / iters
        load = fl.stop()
        if best is None or load < best[2]:
            best = (prof, wall, load)
        if max_foreign is None or load <= max_foreign:
            break
    return best


def write_json(path: Path, doc: Any) -> None:
    """Write a benchmark's results (non-JSON values as strings) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(doc, dict):
        doc.setdefault("kernels", kernel_report())  # what vitkit's dispatcher chose on this machine
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {path}")


def top_ops(prof: torch.profiler.profile, n: int = 15) -> list[dict[str, Any]]:
    """The ``n`` ops with the most self CPU time from a finished profiler."""
    evs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in evs) or 1.0
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in evs[:n]]
