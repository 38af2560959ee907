"""EoMT speed and memory: vitkit vs Hugging Face transformers, in one process.

    python benchmarks/eomt.py                 # full run (~5-8 min on 2 idle cores)
    python benchmarks/eomt.py --quick         # small sizes, few rounds (~1-2 min): checks that everything runs
    python benchmarks/eomt.py --json out.json
    python benchmarks/eomt.py --sections infer --infer 512:1 --dtypes fp32
    python benchmarks/eomt.py --profile       # torch.profiler top ops instead of timing (first --infer case)

Models: ViT-S/16 EoMT (DINOv2-with-registers layout: dim 384, depth 12, 6 heads, 4 registers), 100 queries,
3 query blocks, 2 classes. For every size a ``transformers.EomtForUniversalSegmentation`` is built (random
init), saved with ``save_pretrained`` and loaded back with ``vitkit.from_pretrained`` so both compute the same
function (outputs are compared once in fp32). "masks on" = ``attn_mask_probs`` = 1 (as freshly built: masked
attention in the query blocks, with the intermediate mask predictions it needs); "masks off" = the buffer
zeroed (HF and vitkit then skip the intermediate predictions); "bare" = vitkit's backbone alone
(``model.encoder.forward_features``) at the same size, to show the cost of the EoMT head.

1. Inference: eval(), ``torch.inference_mode()``; bf16 = ``torch.autocast("cpu", torch.bfloat16)`` with fp32
   weights and input. Per setting (size, batch, dtype) all variants run round-robin (the first one rotates
   each round) for ``warmup`` discarded rounds and ``reps`` timed rounds; the median wall time is reported.
   Timed calls during which other processes used more than ``--max-foreign`` cores are discarded and
   repeated (see ``time_interleaved`` in benchmarks/common.py). Ratio = vitkit speed / HF speed = t_HF / t_vitkit.
2. Training step (fp32, train(), masks on p=1): forward + loss + backward (``zero_grad(set_to_none=True)``
   after each step, no optimizer) on synthetic targets (3 rectangle masks per image). HF computes its own loss
   (``mask_labels``/``class_labels``, ``train_num_points`` = ``--num-points``); vitkit uses
   ``vitkit.tasks.loss.MaskClassificationLoss(num_classes, num_points=--num-points)``. Timed round-robin like
   inference. Memory is measured afterwards, one implementation at a time (see "memory" below).
3. Large input: vitkit EoMT at ``--big`` (default 1920x1920, ViT-S/16, batch 1, masks on, eval, fp32) run
   once: wall time and peak RSS. HF is not run there; its masked-attention mask is computed analytically
   (HF builds a dense [B, N, N] bool mask, expands it to the heads and turns it into an additive float mask:
   ``.float()`` and ``masked_fill(~mask)`` each materialise [B, heads, N, N]). To check that formula,
   HF and vitkit are both measured once at ``--check`` (default 1024).

Memory: peak resident set size (RSS) of this process during one call, minus the RSS just before it. Before
each measured call: ``gc.collect()`` and glibc ``malloc_trim(0)`` (so memory freed by earlier calls and kept
by the allocator does not hide the new peak), then the kernel's peak-RSS counter is reset by writing ``5`` to
``/proc/self/clear_refs``; after the call ``VmHWM`` from ``/proc/self/status`` is the exact peak. Where that
reset is not allowed, a background thread samples ``VmRSS`` every millisecond instead (may miss short
spikes). The method used is printed. Memory calls are not used for speed (after malloc_trim they pay
first-touch page faults).

Note: ``vitkit.from_pretrained`` on a transformers 5.x EoMT directory saved with the default 2 labels fails
(the saved config.json then has neither ``num_labels`` nor ``id2label`` and vitkit assumes 150 classes); the
benchmark then retries with ``num_classes`` given and records that in the notes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import inspect
import io
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from vitkit.runtime import tune_cpu_allocator  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
GOALS = {
    "infer_masks_on": 2.5,  # vitkit speed / HF speed, masks on (p=1)
    "infer_masks_off": 1.2,  # vitkit speed / HF speed, masks off (p=0)
    "head_overhead": 0.15,  # vitkit EoMT (masks off) time / bare backbone time - 1
    "train_speed": 1.5,  # vitkit step speed / HF step speed
    "train_memory": 0.7,  # vitkit peak RSS delta / HF peak RSS delta
    "big_memory_gib": 24.0,  # vitkit peak RSS at --big
}
ARCH = dict(dim=384, depth=12, heads=6, registers=4, patch=16)
GIB = 1024 ** 3
MIB = 1024 ** 2


# --------------------------------------------------------------------------------------------- memory
def _proc_kib(path: str, field: str) -> int | None:
    """A ``Field:  N kB`` value from a /proc file (``/proc/self/status``, ``/proc/meminfo``)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _status_kib(field: str) -> int | None:
    return _proc_kib("/proc/self/status", field)


def rss_bytes() -> int:
    return (_status_kib("VmRSS") or 0) * 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def mmap_large_blocks(threshold: int = 128 * 1024):
    """While measuring memory: glibc serves blocks above ``threshold`` with mmap and returns them at
    once, so a peak-RSS delta does not depend on freed heap kept from earlier work. Only around memory
    measurements: mmap for every large block slows compute several-fold. Afterwards the threshold is set
    to glibc's dynamic maximum (32 MiB), close to where a long-running process settles."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        yield
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, threshold)
    _malloc_trim()
    try:
        yield
    finally:
        tune_cpu_allocator()
        _malloc_trim()


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakRSS:
    """Context manager: peak RSS (bytes) of this process inside the block, and the RSS just before it.

    Uses the kernel's high-water mark (reset via /proc/self/clear_refs) when allowed, else a 1 ms sampler
    thread. ``delta`` = peak - RSS before (what the block needed on top of what was already resident)."""

    method = "VmHWM reset via /proc/self/clear_refs" if _can_reset_hwm() else "VmRSS sampled every 1 ms"

    def __enter__(self) -> PeakRSS:
        gc.collect()
        _malloc_trim()
        self.before = rss_bytes()
        self.peak = self.before
        self._hwm = _can_reset_hwm()
        if not self._hwm:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        if self._hwm:
            self.peak = max(self.before, (_status_kib("VmHWM") or 0) * 1024)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.before


def hf_mask_bytes(batch: int, n_tokens: int, heads: int) -> dict[str, int]:
    """Bytes of HF EoMT's masked-attention mask per query block (transformers 5.x ``EomtForUniversalSegmentation``).

    ``torch.ones(B, N, N, bool)`` -> ``[:, None].expand(heads)`` -> ``.float()`` (B*heads*N*N*4) ->
    ``masked_fill(~mask, -1e9)``: ``~`` on the expanded view materialises B*heads*N*N bools and masked_fill
    (out of place) another float copy. Peak while building = all four; the last float copy stays alive
    as the block's mask (and, in training, is saved for backward by every query block).
    """
    nn_ = batch * n_tokens * n_tokens
    return {"bool": nn_, "not": nn_ * heads, "float": 4 * nn_ * heads, "peak_build": nn_ * (1 + heads + 8 * heads),
            "kept_per_block": 4 * nn_ * heads}


def vitkit_mask_bytes(batch: int, n_tokens: int, num_q: int) -> int:
    """vitkit's mask: bool [B, 1, Q, N] for the query rows only."""
    return batch * num_q * n_tokens


# ------------------------------------------------------------------------------------------------ models
def n_tokens(size: int, num_q: int) -> int:
    return (size // ARCH["patch"]) ** 2 + 1 + ARCH["registers"] + num_q


def build_pair(size: int, num_q: int, num_classes: int, train_num_points: int = 12544,
               notes: dict[str, Any] | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(HF model, vitkit model with the same weights) at ``size`` x ``size``."""
    from transformers import EomtConfig, EomtForUniversalSegmentation

    import vitkit

    cfg = EomtConfig(hidden_size=ARCH["dim"], num_hidden_layers=ARCH["depth"], num_attention_heads=ARCH["heads"],
                     image_size=size, patch_size=ARCH["patch"], num_queries=num_q, num_blocks=3,
                     num_labels=num_classes, num_register_tokens=ARCH["registers"],
                     train_num_points=train_num_points)
    hf = EomtForUniversalSegmentation(cfg)
    with tempfile.TemporaryDirectory() as d:
        with contextlib.redirect_stderr(io.StringIO()):  # progress bars
            hf.save_pretrained(d)
        try:
            vk = vitkit.from_pretrained(d)
        except Exception as e:  # noqa: BLE001 - see the note; retry with the class count given explicitly
            if notes is not None:
                notes["from_pretrained"] = (f"vitkit.from_pretrained(dir) failed ({type(e).__name__}: "
                                            f"{str(e)[:160]}...); loaded with num_classes={num_classes}")
            vk = vitkit.from_pretrained(d, num_classes=num_classes)
    if notes is not None:
        notes["hf_attn_implementation"] = str(hf.config._attn_implementation)
    return hf, vk


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _progress(prefix: str) -> Callable[[str], None]:
    t0 = time.perf_counter()

    def p(msg: str) -> None:
        print(f"  [{time.perf_counter() - t0:6.1f}s] {prefix}: {msg}", file=sys.stderr, flush=True)

    return p


def _timed(fns: dict[str, Callable[[], Any]], warmup: int, reps: int, label: str, max_foreign: float | None,
           max_retries: int | None, idle_wait: float) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """``common.time_interleaved`` with its statistics normalised to: discarded, contended_kept,
    foreign_load_mean (cores used by other processes during the kept timings)."""
    kw: dict[str, Any] = {}
    if "idle_wait" in inspect.signature(common.time_interleaved).parameters:
        kw["idle_wait"] = min(idle_wait, 5.0)  # per discarded call: wait a little for a quiet machine
    times, st = common.time_interleaved(fns, warmup, reps, progress=_progress(label), max_foreign=max_foreign,
                                        max_retries=max_retries, **kw)
    loads = st.get("foreign_load", [])
    if isinstance(loads, dict):
        loads = [v for vs in loads.values() for v in vs]
    out = {"discarded": st.get("discarded_calls", st.get("discarded_rounds", 0)),
           "contended_kept": st.get("contended_calls_kept", st.get("contended_rounds_kept", 0)),
           "foreign_load_mean": sum(loads) / len(loads) if loads else 0.0, "raw": st}
    return times, out


def _summ(ts: list[float]) -> dict[str, Any]:
    s = common.summarize(ts)
    s["ms"] = s["median_s"] * 1e3
    s["times_s"] = ts
    return s


# -------------------------------------------------------------------------------------------- inference
INFER_VARIANTS = ("hf_on", "vitkit_on", "hf_off", "vitkit_off", "vitkit_bare")


def infer_models(size: int, num_q: int, num_classes: int, notes: dict[str, Any]) -> dict[str, Callable]:
    """The five variants as callables ``f(x)`` (eval models; masks on = fresh buffers, off = zeroed)."""
    hf, vk = build_pair(size, num_q, num_classes, notes=notes)
    hf.eval()
    vk.eval()
    assert float(hf.attn_mask_probs.min()) == 1.0 and float(vk.attn_mask_probs.min()) == 1.0
    hf_off, vk_off = copy.deepcopy(hf), copy.deepcopy(vk)
    hf_off.attn_mask_probs.zero_()
    vk_off.attn_mask_probs.zero_()
    enc = vk_off.encoder
    return {
        "hf_on": lambda x: hf(pixel_values=x).masks_queries_logits,
        "vitkit_on": lambda x: vk(x)[0][-1],
        "hf_off": lambda x: hf_off(pixel_values=x).masks_queries_logits,
        "vitkit_off": lambda x: vk_off(x)[0][-1],
        "vitkit_bare": lambda x: enc.forward_features(x)["x_norm_patchtokens"],
        "_modules": (hf, vk, hf_off, vk_off),
    }


def _runner(fn: Callable, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode(), _autocast(dtype):
            return fn(x)

    return run


def cast_variants(fns: dict[str, Callable]) -> dict[str, Callable]:
    """vitkit's bf16 inference path: the vitkit variants on copies cast once with
    ``vitkit.layers.precision.cast_for_inference`` (run without autocast; HF stays under autocast)."""
    from vitkit.layers.precision import cast_for_inference

    _, vk, _, vk_off = fns["_modules"]
    vk_c, vk_off_c = (cast_for_inference(copy.deepcopy(m)) for m in (vk, vk_off))
    enc = vk_off_c.encoder
    return {"vitkit_on": lambda x: vk_c(x)[0][-1], "vitkit_off": lambda x: vk_off_c(x)[0][-1],
            "vitkit_bare": lambda x: enc.forward_features(x)["x_norm_patchtokens"], "_modules": (vk_c, vk_off_c)}


def run_inference(cases: list[tuple[int, int]], dtypes: list[str], num_q: int, num_classes: int,
                  warmup: Callable[[int], int], reps: Callable[[int], int], max_foreign: float | None,
                  idle_wait: float, max_retries: Callable[[int], int | None], vitkit_bf16: str = "cast"
                  ) -> tuple[list[dict], dict]:
    """``vitkit_bf16``: "cast" (weights cast once, vitkit's bf16 path) or "autocast" (like HF)."""
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for size in sorted({s for s, _ in cases}):
        torch.manual_seed(0)
        notes: dict[str, Any] = {}
        t0 = time.perf_counter()
        fns = infer_models(size, num_q, num_classes, notes)
        notes["build_s"] = time.perf_counter() - t0
        g = torch.Generator().manual_seed(1)
        x1 = torch.randn(1, 3, size, size, generator=g)
        with torch.inference_mode():  # parity (and a first warm-up of every variant)
            a, b = fns["hf_on"](x1), fns["vitkit_on"](x1)
            c, d = fns["hf_off"](x1), fns["vitkit_off"](x1)
            fns["vitkit_bare"](x1)
        notes["max_abs_diff_fp32_masks_on"] = float((a - b).abs().max())
        notes["max_abs_diff_fp32_masks_off"] = float((c - d).abs().max())
        notes["mask_logits_shape"] = list(b.shape)
        info[str(size)] = notes
        casted = cast_variants(fns) if "bf16" in dtypes and vitkit_bf16 == "cast" else None
        print(f"model   : {size}x{size}: {n_tokens(size, num_q)} tokens in the query blocks; "
              + ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}" for k, v in notes.items()),
              flush=True)
        for batch in [bb for s, bb in cases if s == size]:
            x = torch.randn(batch, 3, size, size, generator=g)
            for dt_name in dtypes:
                run = {k: _runner(fns[k], x, DTYPES[dt_name]) for k in INFER_VARIANTS}
                if dt_name == "bf16" and casted is not None:
                    run.update({k: _runner(casted[k], x, None) for k in INFER_VARIANTS if k in casted})
                waited = common.wait_for_idle(max_foreign, max_wait=idle_wait) if max_foreign and idle_wait else 0.0
                times, st = _timed(run, warmup(batch), reps(batch), f"infer {size} B={batch} {dt_name}", max_foreign,
                                   max_retries(batch), idle_wait)
                v = {k: _summ(ts) for k, ts in times.items()}
                t = {k: s["median_s"] for k, s in v.items()}
                rows.append({
                    "size": size, "batch": batch, "dtype": dt_name, "variants": v,
                    "vitkit_bf16": vitkit_bf16 if dt_name == "bf16" else None,
                    "ratio_masks_on": t["hf_on"] / t["vitkit_on"],
                    "ratio_masks_off": t["hf_off"] / t["vitkit_off"],
                    "overhead_off_vs_bare": t["vitkit_off"] / t["vitkit_bare"] - 1,
                    "overhead_on_vs_bare": t["vitkit_on"] / t["vitkit_bare"] - 1,
                    "hf_overhead_off_vs_bare": t["hf_off"] / t["vitkit_bare"] - 1,
                    "waited_for_idle_s": waited, "discarded": st["discarded"],
                    "contended_kept": st["contended_kept"], "foreign_load_mean": st["foreign_load_mean"],
                })
        del fns, casted
        gc.collect()
        _malloc_trim()
    return rows, info


def render_inference(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    headers = ["size", "B", "dtype", "HF on ms", "vitkit on ms", "x HF (on)", "HF off ms", "vitkit off ms",
               "x HF (off)", "bare ms", "EoMT off/bare", "EoMT on/bare", "spread", "other load"]
    out = []
    for r in rows:
        v = r["variants"]
        out.append([f"{r['size']}", r["batch"], r["dtype"], f"{v['hf_on']['ms']:.0f}", f"{v['vitkit_on']['ms']:.0f}",
                    f"{r['ratio_masks_on']:.2f}", f"{v['hf_off']['ms']:.0f}", f"{v['vitkit_off']['ms']:.0f}",
                    f"{r['ratio_masks_off']:.2f}", f"{v['vitkit_bare']['ms']:.0f}",
                    f"{100 * r['overhead_off_vs_bare']:+.0f}%", f"{100 * r['overhead_on_vs_bare']:+.0f}%",
                    f"{100 * max(s['spread'] for s in v.values()):.0f}%",
                    f"{r['foreign_load_mean']:.2f}" + ("!" if r["contended_kept"] else "")])
    return common.format_table(headers, out, markdown=markdown)


# --------------------------------------------------------------------------------------------- training
def make_targets(batch: int, size: int, num_classes: int, k: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Deterministic synthetic instance targets: ``k`` random axis-aligned rectangles per image."""
    g = torch.Generator().manual_seed(2)
    masks, labels = [], []
    for _ in range(batch):
        m = torch.zeros(k, size, size, dtype=torch.bool)
        for j in range(k):
            y0, x0 = (torch.randint(0, size // 2, (2,), generator=g)).tolist()
            h, w = (torch.randint(size // 8, size // 2, (2,), generator=g)).tolist()
            m[j, y0:y0 + h, x0:x0 + w] = True
        masks.append(m)
        labels.append(torch.randint(0, num_classes, (k,), generator=g))
    return masks, labels


def train_steps(size: int, batch: int, num_q: int, num_classes: int, num_points: int, notes: dict[str, Any]
                ) -> dict[str, Callable[[], float]]:
    from vitkit.tasks.loss import MaskClassificationLoss

    hf, vk = build_pair(size, num_q, num_classes, train_num_points=num_points, notes=notes)
    hf.train()
    vk.train()
    assert float(hf.attn_mask_probs.min()) == 1.0 and float(vk.attn_mask_probs.min()) == 1.0
    crit = MaskClassificationLoss(num_classes, num_points=num_points)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))
    masks, labels = make_targets(batch, size, num_classes)
    hf_masks = [m.float() for m in masks]
    targets = [{"masks": m, "labels": lab} for m, lab in zip(masks, labels)]

    def hf_step() -> float:
        out = hf(pixel_values=x, mask_labels=hf_masks, class_labels=labels)
        out.loss.backward()
        hf.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def vk_step(model=vk) -> float:
        mask_logits, class_logits = model(x)
        total, _ = crit(mask_logits, class_logits, targets)
        total.backward()
        model.zero_grad(set_to_none=True)
        return float(total.detach())

    vk_ckpt = copy.deepcopy(vk)
    vk_ckpt.set_grad_checkpointing(True)  # blocks and upscaler recomputed in backward
    return {"hf": hf_step, "vitkit": vk_step, "vitkit_ckpt": lambda: vk_step(vk_ckpt), "_modules": (hf, vk, crit)}


def run_training(size: int, batch: int, num_q: int, num_classes: int, num_points: int, warmup: int, reps: int,
                 mem_reps: int, max_foreign: float | None, idle_wait: float, max_retries: int | None
                 ) -> dict[str, Any]:
    torch.manual_seed(0)
    notes: dict[str, Any] = {}
    steps = train_steps(size, batch, num_q, num_classes, num_points, notes)
    fns = {k: steps[k] for k in ("hf", "vitkit", "vitkit_ckpt")}
    losses = {k: [] for k in fns}
    timed = {k: (lambda f=f, k=k: losses[k].append(f())) for k, f in fns.items()}
    waited = common.wait_for_idle(max_foreign, max_wait=idle_wait) if max_foreign and idle_wait else 0.0
    times, st = _timed(timed, warmup, reps, f"train {size} B={batch} fp32", max_foreign, max_retries, idle_wait)
    mem: dict[str, list[dict[str, float]]] = {k: [] for k in fns}
    with mmap_large_blocks():
        for i in range(mem_reps):  # one implementation at a time, alternating
            for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
                with PeakRSS() as pr:
                    t0 = time.perf_counter()
                    fns[k]()
                    dt = time.perf_counter() - t0
                mem[k].append({"delta_bytes": pr.delta, "peak_bytes": pr.peak, "before_bytes": pr.before,
                               "wall_s": dt})
                print(f"  memory {k}: +{pr.delta / MIB:.0f} MiB over {pr.before / MIB:.0f} MiB ({dt:.1f} s)",
                      file=sys.stderr, flush=True)
    v = {k: _summ(ts) for k, ts in times.items()}
    peak = {k: max(m["delta_bytes"] for m in ms) for k, ms in mem.items()}
    res = {
        "size": size, "batch": batch, "dtype": "fp32", "num_points": num_points, "variants": v, "memory": mem,
        "peak_delta_bytes": peak, "ratio_speed": v["hf"]["median_s"] / v["vitkit"]["median_s"],
        "ratio_memory": peak["vitkit"] / peak["hf"] if peak["hf"] else float("nan"),
        "ratio_speed_ckpt": v["hf"]["median_s"] / v["vitkit_ckpt"]["median_s"],
        "ratio_memory_ckpt": peak["vitkit_ckpt"] / peak["hf"] if peak["hf"] else float("nan"),
        "loss_median": {k: sorted(ls)[len(ls) // 2] for k, ls in losses.items() if ls},
        "notes": notes, "waited_for_idle_s": waited, "discarded": st["discarded"],
        "contended_kept": st["contended_kept"], "foreign_load_mean": st["foreign_load_mean"],
        "hf_masks_kept_for_backward_bytes":
            3 * hf_mask_bytes(batch, n_tokens(size, num_q), ARCH["heads"])["kept_per_block"],
    }
    del steps, fns, timed
    gc.collect()
    _malloc_trim()
    return res


def render_training(r: dict[str, Any], markdown: bool = False) -> str:
    v, p = r["variants"], r["peak_delta_bytes"]
    headers = ["size", "B", "HF ms/step", "vitkit ms/step", "x HF (speed)", "HF peak MiB", "vitkit peak MiB",
               "vitkit/HF mem", "+ckpt ms/step", "x HF (+ckpt)", "+ckpt peak MiB", "+ckpt/HF mem",
               "loss HF", "loss vitkit", "spread", "other load"]
    ck = "vitkit_ckpt" in v
    row = [r["size"], r["batch"], f"{v['hf']['ms']:.0f}", f"{v['vitkit']['ms']:.0f}", f"{r['ratio_speed']:.2f}",
           f"{p['hf'] / MIB:.0f}", f"{p['vitkit'] / MIB:.0f}", f"{r['ratio_memory']:.2f}",
           f"{v['vitkit_ckpt']['ms']:.0f}" if ck else "-", f"{r['ratio_speed_ckpt']:.2f}" if ck else "-",
           f"{p['vitkit_ckpt'] / MIB:.0f}" if ck else "-", f"{r['ratio_memory_ckpt']:.2f}" if ck else "-",
           f"{r['loss_median'].get('hf', float('nan')):.2f}", f"{r['loss_median'].get('vitkit', float('nan')):.2f}",
           f"{100 * max(s['spread'] for s in v.values()):.0f}%",
           f"{r['foreign_load_mean']:.2f}" + ("!" if r["contended_kept"] else "")]
    return common.format_table(headers, [row], markdown=markdown)


# ------------------------------------------------------------------------------------------ large input
def run_big(size: int, check: int | None, num_q: int, num_classes: int) -> dict[str, Any]:
    import vitkit

    out: dict[str, Any] = {"size": size, "check_size": check, "memory_method": PeakRSS.method}
    heads = ARCH["heads"]
    if check:  # measured HF vs vitkit at a moderate size, to check the analytic HF mask model
        pair = dict(zip(("hf", "vitkit"), build_pair(check, num_q, num_classes)))
        xc = torch.randn(1, 3, check, check, generator=torch.Generator().manual_seed(4))
        meas = {}
        for k, model in pair.items():
            model.eval()
            kw = {"pixel_values": xc} if k == "hf" else {"x": xc}
            with torch.inference_mode():
                model(**kw)  # warm-up (first-call allocations, oneDNN primitives)
                with PeakRSS() as pr:
                    t0 = time.perf_counter()
                    model(**kw)
                    dt = time.perf_counter() - t0
            meas[k] = {"delta_bytes": pr.delta, "wall_s": dt}
            print(f"  check {check}: {k} +{pr.delta / MIB:.0f} MiB, {dt:.1f} s", file=sys.stderr, flush=True)
        n = n_tokens(check, num_q)
        est = hf_mask_bytes(1, n, heads)
        out["check"] = {"measured": meas, "tokens": n, "hf_mask_analytic": est,
                        "hf_minus_vitkit_bytes": meas["hf"]["delta_bytes"] - meas["vitkit"]["delta_bytes"]}
        del pair, xc, model
        gc.collect()
        _malloc_trim()

    n = n_tokens(size, num_q)
    vk = vitkit.EoMT(backbone="dinov2_vits14_reg", patch_size=ARCH["patch"], img_size=(size, size), in_chans=3,
                     num_classes=num_classes, num_q=num_q, num_blocks=3).eval()
    assert float(vk.attn_mask_probs.min()) == 1.0 and vk.masked_attn_enabled
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        with PeakRSS() as pr:
            t0 = time.perf_counter()
            m, c = vk(x)
            shapes = [list(t.shape) for t in m]
            del m, c
            dt = time.perf_counter() - t0
    est = hf_mask_bytes(1, n, heads)
    out.update({
        "tokens": n, "wall_s": dt, "peak_rss_bytes": pr.peak, "rss_before_bytes": pr.before, "delta_bytes": pr.delta,
        "mask_logits_shapes": shapes, "vitkit_mask_bytes": vitkit_mask_bytes(1, n, num_q), "hf_mask_analytic": est,
        "fits_24gib": pr.peak < GOALS["big_memory_gib"] * GIB,
        "mem_total_bytes": (lambda kib: kib * 1024 if kib else None)(_meminfo_kib("MemTotal")),
    })
    del vk, x
    gc.collect()
    _malloc_trim()
    return out


def _meminfo_kib(field: str) -> int | None:
    return _proc_kib("/proc/meminfo", field)


def render_big(r: dict[str, Any]) -> str:
    est = r["hf_mask_analytic"]
    lines = [
        f"vitkit EoMT ViT-S/16 @ {r['size']}x{r['size']}, B=1, masks on, eval, fp32: {r['tokens']} tokens; "
        f"wall {r['wall_s']:.1f} s; peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB "
        f"(+{r['delta_bytes'] / GIB:.2f} GiB over {r['rss_before_bytes'] / GIB:.2f} GiB before the call) -> "
        f"{'fits' if r['fits_24gib'] else 'does NOT fit'} in {GOALS['big_memory_gib']:.0f} GiB",
        f"  vitkit mask per query block: bool [1, 1, Q, N] = {r['vitkit_mask_bytes'] / MIB:.1f} MiB",
        f"  HF mask per query block (analytic): float [1, {ARCH['heads']}, N, N] kept = "
        f"{est['kept_per_block'] / GIB:.2f} GiB; "
        f"peak while building (bool N*N + ~mask + 2 float copies) = {est['peak_build'] / GIB:.2f} GiB",
    ]
    if r.get("check"):
        c = r["check"]
        m = c["measured"]
        lines.append(
            f"  check @ {r['check_size']} ({c['tokens']} tokens, one call each), measured peak RSS delta: HF "
            f"{m['hf']['delta_bytes'] / MIB:.0f} MiB ({m['hf']['wall_s']:.1f} s) of which the analytic mask build "
            f"is {c['hf_mask_analytic']['peak_build'] / MIB:.0f} MiB; vitkit "
            f"{m['vitkit']['delta_bytes'] / MIB:.0f} MiB ({m['vitkit']['wall_s']:.1f} s)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- profiling
def _wrap(obj: Any, name: str, label: str) -> None:
    """Instance-level wrapper so the profiler shows the time spent inside ``obj.name`` as ``label``."""
    fn = getattr(obj, name)

    def wrapped(*a: Any, **kw: Any) -> Any:
        with torch.profiler.record_function(label):
            return fn(*a, **kw)

    setattr(obj, name, wrapped)


def run_profile(size: int, batch: int, dtypes: list[str], num_q: int, num_classes: int, train_size: int,
                train_batch: int, num_points: int, top: int, sections: list[str], max_foreign: float | None = 0.25,
                attempts: int = 4) -> dict[str, Any]:
    result: dict[str, Any] = {}

    def show(key: str, prof: Any, wall: float, iters: int, load: float) -> None:
        ops = common.top_ops(prof, top)
        evs = {e.key: e for e in prof.key_averages()}
        regions = {k: evs[k].cpu_time_total / 1e3 / iters for k in evs if k.startswith(("hf.", "vitkit."))}
        result[key] = {"wall_ms": wall * 1e3, "top_ops": ops, "regions_ms": regions, "foreign_load": load}
        reg = ", ".join(f"{k} {v:.0f}" for k, v in sorted(regions.items()))
        print(f"\n== {key}: {wall * 1e3:.0f} ms per call under the profiler (other processes {load:.2f} cores); "
              f"top {top} ops by self CPU time "
              f"(per call){'; regions (total ms per call): ' + reg if regions else ''}")
        print(common.format_table(["op", "calls", "self ms", "share"],
                                  [[o["op"][:60], o["calls"] // iters, f"{o['self_ms'] / iters:.1f}",
                                    f"{100 * o['share']:.1f}%"] for o in ops]))

    if "infer" in sections:
        torch.manual_seed(0)
        fns = infer_models(size, num_q, num_classes, {})
        hf, vk, hf_off, vk_off = fns["_modules"]
        for m, lab in ((hf, "hf"), (hf_off, "hf"), (vk, "vitkit"), (vk_off, "vitkit")):
            _wrap(m, "predict", f"{lab}.predict (mask/class heads)")
        _wrap(vk, "attn_mask", "vitkit.attn_mask")
        x = torch.randn(batch, 3, size, size)
        for dt_name in dtypes:
            for k in INFER_VARIANTS:
                run = _runner(fns[k], x, DTYPES[dt_name])
                run()
                prof, wall, load = common.profile_calls(run, 2, attempts, max_foreign)
                show(f"infer {size} B={batch} {dt_name} {k}", prof, wall, 2, load)
        del fns, hf, vk, hf_off, vk_off
    if "train" in sections:
        torch.manual_seed(0)
        steps = train_steps(train_size, train_batch, num_q, num_classes, num_points, {})
        hf, vk, crit = steps["_modules"]
        _wrap(hf, "predict", "hf.predict (mask/class heads)")
        _wrap(hf, "get_loss_dict", "hf.loss")
        _wrap(crit, "forward", "vitkit.loss")
        _wrap(vk, "predict", "vitkit.predict (mask/class heads)")
        _wrap(vk, "attn_mask", "vitkit.attn_mask")
        for k in ("hf", "vitkit"):
            steps[k]()
            prof, wall, load = common.profile_calls(steps[k], 1, attempts, max_foreign)
            show(f"train {train_size} B={train_batch} fp32 {k}", prof, wall, 1, load)
    return result


# ------------------------------------------------------------------------------------------------- main
def parse_cases(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item:
            s, _, b = item.partition(":")
            out.append((int(s), int(b or 1)))
    return out


def goals(infer_rows: list[dict], train: dict | None, big: dict | None) -> list[dict[str, Any]]:
    g: list[dict[str, Any]] = []
    for r in infer_rows:
        tag = f"infer {r['size']} B={r['batch']} {r['dtype']}"
        g.append({"what": f"{tag} masks on, vitkit/HF speed", "value": r["ratio_masks_on"],
                  "goal": f">= {GOALS['infer_masks_on']}", "met": r["ratio_masks_on"] >= GOALS["infer_masks_on"]})
        g.append({"what": f"{tag} masks off, vitkit/HF speed", "value": r["ratio_masks_off"],
                  "goal": f">= {GOALS['infer_masks_off']}", "met": r["ratio_masks_off"] >= GOALS["infer_masks_off"]})
        g.append({"what": f"{tag} EoMT (masks off) over bare backbone", "value": r["overhead_off_vs_bare"],
                  "goal": f"<= +{100 * GOALS['head_overhead']:.0f}%",
                  "met": r["overhead_off_vs_bare"] <= GOALS["head_overhead"]})
    if train:
        tag = f"train {train['size']} B={train['batch']} fp32"
        g.append({"what": f"{tag} vitkit/HF step speed", "value": train["ratio_speed"],
                  "goal": f">= {GOALS['train_speed']}", "met": train["ratio_speed"] >= GOALS["train_speed"]})
        g.append({"what": f"{tag} vitkit/HF peak RSS delta", "value": train["ratio_memory"],
                  "goal": f"<= {GOALS['train_memory']}", "met": train["ratio_memory"] <= GOALS["train_memory"]})
        if "ratio_memory_ckpt" in train:
            g.append({"what": f"{tag} vitkit+checkpointing/HF step speed", "value": train["ratio_speed_ckpt"],
                      "goal": f">= {GOALS['train_speed']}", "met": train["ratio_speed_ckpt"] >= GOALS["train_speed"]})
            g.append({"what": f"{tag} vitkit+checkpointing/HF peak RSS delta", "value": train["ratio_memory_ckpt"],
                      "goal": f"<= {GOALS['train_memory']}",
                      "met": train["ratio_memory_ckpt"] <= GOALS["train_memory"]})
    if big:
        g.append({"what": f"vitkit masked inference @ {big['size']} peak RSS GiB", "value": big["peak_rss_bytes"] / GIB,
                  "goal": f"< {GOALS['big_memory_gib']:.0f}", "met": big["fits_24gib"]})
    return g


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small sizes and few rounds: infer 256:1, train 256 B=2, big 768, check 512")
    ap.add_argument("--sections", default="infer,train,big", help="comma list of infer,train,big")
    ap.add_argument("--infer", default=None, help="SIZE:BATCH list (default 512:1,512:4,640:1; --quick 256:1)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="inference dtypes: comma list of fp32,bf16")
    ap.add_argument("--num-q", type=int, default=100)
    ap.add_argument("--num-classes", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=None, help="default 512 (--quick: 256)")
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--num-points", type=int, default=12544, help="loss points (HF train_num_points)")
    ap.add_argument("--big", type=int, default=None, help="large-input size (default 1920; --quick: 768)")
    ap.add_argument("--check", type=int, default=None,
                    help="size at which HF and vitkit masked-inference memory are both measured (default 1024; "
                         "--quick: 512; 0 skips)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed rounds (default 5 for B=1 inference, 3 for B>1 and training; --quick: 3 / 2)")
    ap.add_argument("--mem-reps", type=int, default=None, help="memory measurements per training impl (default 2)")
    ap.add_argument("--vitkit-bf16", choices=("autocast", "cast"), default="cast",
                    help="vitkit's bf16 inference: weights cast once (default) or autocast like HF")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="discard and repeat timed calls during which other processes used more than this many "
                         "cores (0 disables); also wait up to --idle-wait s for a quiet machine before each setting")
    ap.add_argument("--idle-wait", type=float, default=None, help="default 30 s (--quick: 3 s)")
    ap.add_argument("--json", type=Path, default=None, help="also write all results (raw times included) here")
    ap.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing, profile (torch.profiler, top ops by self CPU) the first --infer case "
                         "(all variants, --dtypes) and a training step")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)

    common.setup_process(args.threads)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    q = args.quick
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if any(s not in ("infer", "train", "big") for s in sections):
        ap.error("--sections must be a subset of infer,train,big")
    cases = parse_cases(args.infer or ("256:1" if q else "512:1,512:4,640:1"))
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes must be a subset of {sorted(DTYPES)}")
    train_size = args.train_size or (256 if q else 512)
    big = args.big or (768 if q else 1920)
    check = args.check if args.check is not None else (512 if q else 1024)
    w = args.warmup if args.warmup is not None else 1

    def reps(b: int) -> int:
        return args.reps if args.reps is not None else ((3 if b == 1 else 2) if q else (5 if b == 1 else 3))

    def retries(b: int) -> int | None:
        # repeats of contended calls per setting (bounded so that a busy machine cannot stretch the run)
        return len(INFER_VARIANTS) * (1 if q else 2)

    train_reps = args.reps if args.reps is not None else (2 if q else 3)
    mem_reps = args.mem_reps if args.mem_reps is not None else (1 if q else 2)
    max_foreign = args.max_foreign or None
    idle_wait = args.idle_wait if args.idle_wait is not None else (3.0 if q else 30.0)

    env = common.environment()
    common.print_header(env)
    print(f"memory  : {PeakRSS.method}; MemTotal {(_meminfo_kib('MemTotal') or 0) / 1024 ** 2:.1f} GiB")
    if args.profile:
        res = run_profile(cases[0][0], cases[0][1], dtypes, args.num_q, args.num_classes, train_size,
                          args.train_batch, args.num_points, args.top, sections, args.max_foreign or None)
        if args.json:
            common.write_json(args.json, {"env": env, "profile": res})
        return 0
    print(f"method  : ViT-S/16 EoMT, Q={args.num_q}, C={args.num_classes}, 3 query blocks; round-robin, warm-up {w}, "
          f"median of timed rounds; bf16 = torch.autocast('cpu', bfloat16) (vitkit: {args.vitkit_bf16}); "
          f"other load > {max_foreign} cores "
          f"-> that call is repeated", flush=True)

    t_start = time.perf_counter()
    doc: dict[str, Any] = {"env": env, "goals_spec": GOALS, "memory_method": PeakRSS.method}
    infer_rows: list[dict] = []
    train_res = big_res = None
    if "infer" in sections:
        infer_rows, info = run_inference(cases, dtypes, args.num_q, args.num_classes, lambda b: w, reps, max_foreign,
                                         idle_wait, retries, vitkit_bf16=args.vitkit_bf16)
        doc["inference"] = {"models": info, "results": infer_rows}
        print("\n1. inference (eval, inference_mode), ms per batch; x HF = vitkit speed / HF speed; "
              "EoMT x/bare = vitkit EoMT time over vitkit bare backbone - 1")
        print(render_inference(infer_rows, markdown=args.markdown), flush=True)
    if "train" in sections:
        train_res = run_training(train_size, args.train_batch, args.num_q, args.num_classes, args.num_points, w,
                                 train_reps, mem_reps, max_foreign, idle_wait, 2 if q else 4)
        doc["training"] = train_res
        print(f"\n2. training step (train(), masks on p=1, fp32, forward + loss ({args.num_points} points) + "
              f"backward); peak = max over {mem_reps} measured step(s) of peak RSS - RSS before ({PeakRSS.method})")
        print(render_training(train_res, markdown=args.markdown))
        print(f"   HF keeps 3 float [B, heads, N, N] masks for backward: "
              f"{train_res['hf_masks_kept_for_backward_bytes'] / MIB:.0f} MiB; notes {train_res['notes']}",
              flush=True)
    if "big" in sections:
        big_res = run_big(big, check or None, args.num_q, args.num_classes)
        doc["big"] = big_res
        print("\n3. large input (one call)")
        print(render_big(big_res), flush=True)
    elapsed = time.perf_counter() - t_start
    gl = goals(infer_rows, train_res, big_res)
    doc["goals"] = gl
    doc["elapsed_s"] = elapsed
    if gl:
        print("\ngoals:")
        for g in gl:
            val = f"{100 * g['value']:+.0f}%" if "bare" in g["what"] else f"{g['value']:.2f}"
            print(f"  {g['what']}: {val} (goal {g['goal']}) {'MET' if g['met'] else 'NOT met'}")
    common.print_kernels()
    print(f"\ntotal benchmark time {elapsed:.0f} s")
    if args.json:
        common.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
