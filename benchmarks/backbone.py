"""Backbone forward speed: vitkit vs timm vs Hugging Face transformers, in one process.

    python benchmarks/backbone.py                      # full run (~6-8 min on 2 cores)
    python benchmarks/backbone.py --quick              # batch 1, 3 timed rounds
    python benchmarks/backbone.py --cases dinov3_s16_640 --dtypes bf16 --batches 1
    python benchmarks/backbone.py --json out.json
    python benchmarks/backbone.py --profile --cases dinov2_s14reg4_518 --batches 1 --dtypes fp32

Method: every model is eval() and runs under ``torch.inference_mode()``; bf16 means
``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward of timm and transformers (weights and
input in fp32), and vitkit's bf16 inference path for vitkit: a copy cast once with
``vitkit.layers.precision.cast_for_inference`` (norms, positions and RoPE in fp32), fp32 input, no
autocast (``--vitkit-bf16 autocast`` times vitkit under autocast like the peers).
Per setting (case, batch, dtype) the implementations are called
round-robin (starting implementation rotating each round) for ``warmup`` discarded rounds and ``reps``
timed rounds; the median wall time (time.perf_counter) is reported. The machine may be shared: a timed call
during which other processes used more than ``--max-foreign`` cores (from /proc/stat minus this process's
CPU time) is discarded and repeated after waiting for a quiet machine. vitkit's weights are loaded from the
timm model's state dict (so vitkit and timm compute the same function; their outputs are compared once),
the transformers model keeps its own random weights (weights do not affect the cost of these kernels).

Columns: ms per batch, images/s, ``x timm`` / ``x hf`` = vitkit speed / peer speed (> 1: vitkit faster),
and the share of the machine's GEMM peak (measured at start with a 2048^3 matmul in fp32 and in bf16)
reached by each implementation, using an analytic FLOP count (2 x MACs of patch embed, qkv, QK^T, AV,
proj and MLP; norms, softmax, GELU, RoPE are not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

IMPLS = ("vitkit", "timm", "hf")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
GOALS = {"fp32": 1.0, "bf16": 2.0}  # vitkit speed / timm speed


# ------------------------------------------------------------------------------------------------- FLOPs
def vit_flops(batch: int, img: tuple[int, int], patch: int, dim: int, depth: int, mlp_hidden: int,
              num_prefix: int, in_chans: int = 3, gated_mlp: bool = False) -> dict[str, float]:
    """Analytic forward FLOPs (2 x multiply-accumulates) of a plain pre-norm ViT.

    Counted: patch embedding (conv as GEMM), and per block qkv projection, QK^T, AV, output projection
    and the MLP (two matrices, or three for a gated/SwiGLU MLP). Not counted: norms, softmax, GELU,
    RoPE, LayerScale, residual adds (all O(N*D), < 1 % here).
    """
    hw = (img[0] // patch) * (img[1] // patch)
    n = num_prefix + hw
    macs = {
        "patch_embed": hw * in_chans * patch * patch * dim,
        "qkv": depth * n * dim * 3 * dim,
        "attn_qk": depth * n * n * dim,  # sum over heads of N x N x head_dim
        "attn_av": depth * n * n * dim,
        "proj": depth * n * dim * dim,
        "mlp": depth * n * dim * mlp_hidden * (3 if gated_mlp else 2),
    }
    out = {k: 2.0 * v * batch for k, v in macs.items()}
    out["total"] = sum(out.values())
    out["tokens"] = n
    return out


# ------------------------------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    name: str
    title: str
    img: int
    patch: int
    dim: int
    depth: int
    heads: int
    mlp_hidden: int
    num_prefix: int
    build: Callable[[], dict[str, tuple[torch.nn.Module, Callable[[torch.Tensor], Any]]]]
    notes: dict[str, str] = dataclasses.field(default_factory=dict)

    def flops(self, batch: int) -> dict[str, float]:
        return vit_flops(batch, (self.img, self.img), self.patch, self.dim, self.depth, self.mlp_hidden,
                         self.num_prefix)


def _copy_timm_into_vitkit(vk: torch.nn.Module, tm: torch.nn.Module, notes: dict[str, str]) -> None:
    import vitkit

    try:
        sd = {k: v.detach().clone() for k, v in tm.state_dict().items()}
        report = vitkit.load_weights(vk, sd)
        notes["weights"] = f"vitkit loaded timm's state dict (format {report.format}); hf: own random init"
    except Exception as e:  # noqa: BLE001 - the benchmark still runs with random weights
        notes["weights"] = f"random (vitkit.load_weights(timm state dict) failed: {type(e).__name__}: {e})"
        print(f"WARNING: could not copy timm weights into vitkit: {type(e).__name__}: {e}", file=sys.stderr)


def _build(vitkit_name: str, timm_name: str, hf_config: str, hf_model: str, img: int,
           **hf_kw: Any) -> tuple[dict, dict[str, str]]:
    """vitkit (holding timm's weights), timm and transformers (own random init) models of one architecture."""
    import timm
    import transformers

    import vitkit

    notes: dict[str, str] = {}
    vk = vitkit.create_backbone(vitkit_name, img_size=img).eval()
    tm = timm.create_model(timm_name, pretrained=False, img_size=img, num_classes=0).eval()
    cfg = getattr(transformers, hf_config)(image_size=img, **hf_kw)
    hf = getattr(transformers, hf_model)._from_config(cfg, attn_implementation="sdpa").eval()
    _copy_timm_into_vitkit(vk, tm, notes)
    notes["hf_attn"] = str(hf.config._attn_implementation)
    notes["timm_fused_attn"] = str(getattr(tm.blocks[0].attn, "fused_attn", "?"))
    models = {
        "vitkit": (vk, lambda x: vk.forward_features(x)["x_norm_patchtokens"]),
        "timm": (tm, lambda x: tm.forward_features(x)),
        "hf": (hf, lambda x: hf(pixel_values=x).last_hidden_state),
    }
    return models, notes


def _build_dinov2() -> tuple[dict, dict[str, str]]:
    return _build("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", "Dinov2WithRegistersConfig",
                  "Dinov2WithRegistersModel", 518, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                  mlp_ratio=4, patch_size=14, num_register_tokens=4, layerscale_value=1e-5, layer_norm_eps=1e-6)


def _build_dinov2_base() -> tuple[dict, dict[str, str]]:
    return _build("dinov2_vitb14", "vit_base_patch14_dinov2", "Dinov2Config", "Dinov2Model", 518, hidden_size=768,
                  num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14, layerscale_value=1e-5,
                  layer_norm_eps=1e-6)


def _build_dinov3() -> tuple[dict, dict[str, str]]:
    # the _qkvb variant has the qkv bias that the released DINOv3 ViT-S (and vitkit's preset) has
    return _build("dinov3_vits16", "vit_small_patch16_dinov3_qkvb", "DINOv3ViTConfig", "DINOv3ViTModel", 640,
                  hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                  patch_size=16, num_register_tokens=4, layerscale_value=1e-5, query_bias=True, key_bias=False,
                  value_bias=True)


CASES: dict[str, Case] = {
    "dinov2_s14reg4_518": Case("dinov2_s14reg4_518", "DINOv2 ViT-S/14 reg4 @518", 518, 14, 384, 12, 6, 1536, 5,
                               _build_dinov2),
    "dinov2_b14_518": Case("dinov2_b14_518", "DINOv2 ViT-B/14 @518", 518, 14, 768, 12, 12, 3072, 1,
                           _build_dinov2_base),
    "dinov3_s16_640": Case("dinov3_s16_640", "DINOv3 ViT-S/16 @640", 640, 16, 384, 12, 6, 1536, 5,
                           _build_dinov3),
}


# --------------------------------------------------------------------------------------------- running
def _runner(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], Any]:
    def run() -> Any:
        ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            return fn(x)

    return run


def _parity(models: dict, case: Case, x: torch.Tensor) -> float | None:
    """Max |vitkit - timm| over patch tokens in fp32 (both hold the same weights)."""
    if "vitkit" not in models or "timm" not in models:
        return None
    with torch.inference_mode():
        a = models["vitkit"][1](x)
        b = models["timm"][1](x)[:, case.num_prefix:]
    return float((a.float() - b.float()).abs().max())


def _progress(prefix: str) -> Callable[[str], None]:
    t0 = time.perf_counter()

    def p(msg: str) -> None:
        print(f"  [{time.perf_counter() - t0:6.1f}s] {prefix}: {msg}", file=sys.stderr, flush=True)

    return p


def run_case(case: Case, batches: list[int], dtypes: list[str], impls: list[str], warmup: dict[int, int],
             reps: dict[int, int], peaks: dict[str, float], max_foreign: float | None = 0.25,
             idle_wait: float = 60.0, vitkit_bf16: str = "autocast") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``vitkit_bf16="cast"`` times vitkit's bf16 rows on a copy cast once with ``cast_for_inference``
    (no autocast); timm and transformers always run under autocast."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    built, notes = case.build()
    models = {k: v for k, v in built.items() if k in impls}
    info: dict[str, Any] = {"notes": notes, "build_s": time.perf_counter() - t0,
                            "params": {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in models.items()}}
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(1, 3, case.img, case.img, generator=g)
    try:
        info["max_abs_diff_vitkit_timm_fp32"] = _parity(models, case, x1)
    except Exception as e:  # noqa: BLE001
        info["max_abs_diff_vitkit_timm_fp32"] = f"failed: {type(e).__name__}: {e}"
    rows = []
    cast_fn = None
    if "bf16" in dtypes and vitkit_bf16 == "cast" and "vitkit" in models:
        import copy

        from vitkit.layers.precision import cast_for_inference

        vk_cast = cast_for_inference(copy.deepcopy(models["vitkit"][0]))
        cast_fn = lambda x: vk_cast.forward_features(x)["x_norm_patchtokens"]  # noqa: E731
    for dt_name in dtypes:
        dtype = DTYPES[dt_name]
        for b in batches:
            x = torch.randn(b, 3, case.img, case.img, generator=g)
            fns = {k: _runner(fn, x, dtype) for k, (_, fn) in models.items()}
            if dt_name == "bf16" and vitkit_bf16 == "cast" and "vitkit" in models:
                fns["vitkit"] = _runner(cast_fn, x, None)
            waited = common.wait_for_idle(max_foreign, max_wait=idle_wait) if max_foreign and idle_wait else 0.0
            times, tstats = common.time_interleaved(fns, warmup[b], reps[b],
                                                    progress=_progress(f"{case.name} B={b} {dt_name}"),
                                                    max_foreign=max_foreign, idle_wait=idle_wait)
            fl = case.flops(b)["total"]
            peak = peaks[dt_name]
            row: dict[str, Any] = {"case": case.name, "title": case.title, "batch": b, "dtype": dt_name,
                                   "vitkit_bf16": vitkit_bf16 if dt_name == "bf16" else None,
                                   "gflop": fl / 1e9, "impls": {}, "waited_for_idle_s": waited,
                                   "foreign_load_mean": max(
                                       (sum(v) / len(v) for v in tstats["foreign_load"].values() if v), default=0.0),
                                   "discarded_calls": tstats["discarded_calls"],
                                   "idle_wait_in_timing_s": tstats["idle_wait_s"],
                                   "contended_calls_kept": tstats["contended_calls_kept"],
                                   "foreign_load_per_call": tstats["foreign_load"]}
            for k, ts in times.items():
                s = common.summarize(ts)
                s.update(ms=s["median_s"] * 1e3, img_s=b / s["median_s"], gflops=fl / s["median_s"] / 1e9,
                         peak_share=fl / s["median_s"] / 1e9 / peak, times_s=ts)
                row["impls"][k] = s
            add_ratios(row)
            rows.append(row)
    del models, built
    return rows, info


def add_ratios(row: dict[str, Any]) -> None:
    """``ratio``: peer median / vitkit median; ``ratio_rounds``: the same per round (calls of one round ran
    back to back, so these paired ratios are free of slow drift and show the noise of the ratio)."""
    im = row["impls"]
    if "vitkit" not in im:
        return
    vk = im["vitkit"]
    row["ratio"] = {k: v["median_s"] / vk["median_s"] for k, v in im.items() if k != "vitkit"}
    row["ratio_rounds"] = {k: [p / q for p, q in zip(v["times_s"], vk["times_s"])]
                           for k, v in im.items() if k != "vitkit"}


def _ratio_cell(r: dict[str, Any], k: str) -> str:
    rr = r.get("ratio_rounds", {}).get(k)
    if not rr or len(rr) < 2:
        return f"{r['ratio'][k]:.2f}"
    return f"{r['ratio'][k]:.2f} [{min(rr):.2f}-{max(rr):.2f}]"


def render(rows: list[dict[str, Any]], impls: list[str], markdown: bool = False) -> str:
    peers = [k for k in impls if k != "vitkit"]
    headers = ["case", "B", "dtype"] + [f"{k} ms" for k in impls]
    if "vitkit" in impls:
        headers += ["vitkit img/s"] + [f"x {k}" for k in peers]
    headers += [f"%peak {k}" for k in impls] + ["spread", "other load"]
    out = []
    for r in rows:
        im = r["impls"]
        line = [r["title"] if markdown else r["case"], r["batch"], r["dtype"]]
        line += [f"{im[k]['ms']:.0f}" for k in impls]
        if "vitkit" in impls:
            line += [f"{im['vitkit']['img_s']:.2f}"] + [_ratio_cell(r, k) for k in peers]
        line += [f"{100 * im[k]['peak_share']:.0f}%" for k in impls]
        line += [f"{100 * max(im[k]['spread'] for k in impls):.0f}%",
                 f"{r['foreign_load_mean']:.2f}" + ("!" if r["contended_calls_kept"] else "")]
        out.append(line)
    return common.format_table(headers, out, markdown=markdown)


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vitkit/timm against the target per row. ``verdict`` is MET / NOT met on the median ratio, with
    "(within noise)" when the per-round ratios straddle the target."""
    out = []
    for r in rows:
        if "ratio" not in r or "timm" not in r["ratio"]:
            continue
        target = GOALS[r["dtype"]]
        got = r["ratio"]["timm"]
        rr = r.get("ratio_rounds", {}).get("timm") or [got]
        met = got >= target
        verdict = "MET" if met else "NOT met"
        if min(rr) < target <= max(rr):
            verdict += " (within noise)"
        out.append({"case": r["case"], "batch": r["batch"], "dtype": r["dtype"], "target": target,
                    "vitkit_over_timm": got, "per_round": rr, "met": met, "verdict": verdict})
    return out


def print_report(rows: list[dict[str, Any]], impls: list[str], markdown: bool) -> list[dict[str, Any]]:
    print()
    print(render(rows, impls, markdown=markdown))
    print("\nx peer = vitkit speed / peer speed (>1: vitkit faster), median [range of the per-round paired ratios]; "
          "%peak = analytic GFLOP/s over the GEMM peak of the same dtype; spread = (max-min)/median of the "
          "noisiest implementation; other load = mean cores used by other processes during the kept calls "
          "('!': some kept calls exceeded --max-foreign)")
    gl = goals(rows)
    if gl:
        print("\ngoals (vitkit speed / timm speed):")
        for g in gl:
            print(f"  {g['case']:20s} B={g['batch']} {g['dtype']}: {g['vitkit_over_timm']:.2f}x "
                  f"(goal >= {g['target']}x) {g['verdict']}")
    return gl


# ------------------------------------------------------------------------------------------- profiling
def profile(cases: list[Case], batch: int, dtypes: list[str], impls: list[str], top: int = 15,
            iters: int = 2) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for case in cases:
        torch.manual_seed(0)
        built, _ = case.build()
        x = torch.randn(batch, 3, case.img, case.img)
        for dt_name in dtypes:
            for k in impls:
                run = _runner(built[k][1], x, DTYPES[dt_name])
                run()
                run()
                prof, wall, load = common.profile_calls(run, iters, attempts=10, max_wait=60)
                ops = common.top_ops(prof, top)
                key = f"{case.name} B={batch} {dt_name} {k}"
                result[key] = {"wall_ms_profiled": wall * 1e3, "top_ops": ops, "foreign_load": load}
                print(f"\n== {key}: {wall * 1e3:.0f} ms/forward under the profiler (other processes: {load:.2f} "
                      f"cores); top {top} ops by self CPU time, per forward")
                print(common.format_table(
                    ["op", "calls/fwd", "self ms/fwd", "share"],
                    [[o["op"][:60], o["calls"] // iters, f"{o['self_ms'] / iters:.1f}", f"{100 * o['share']:.1f}%"]
                     for o in ops]))
        del built
    return result


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {sorted(CASES)}")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list of vitkit,timm,hf")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16")
    ap.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,8; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="batch 1 only, 1 warm-up + 3 timed rounds")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: 2 for B=1, 1 for B>1)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default: 7 for B=1, 3 for B>1)")
    ap.add_argument("--vitkit-bf16", choices=("autocast", "cast"), default="cast",
                    help="vitkit's bf16 rows: weights cast once (default) or autocast like the peers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gemm-peaks", default=None, metavar="FP32,BF16",
                    help="GFLOP/s measured by the caller (benchmarks/run.py), instead of measuring again")
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="discard and repeat timed calls during which other processes used more than this many "
                         "cores (0 disables); also wait up to --idle-wait s for a quiet machine before each setting")
    ap.add_argument("--idle-wait", type=float, default=60.0)
    ap.add_argument("--json", type=Path, default=None, help="also write all results (raw times included) here")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--from-json", type=Path, default=None, help="re-print the report of a saved --json run")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing, profile each implementation (torch.profiler, top ops by self CPU)")
    ap.add_argument("--top", type=int, default=15, help="ops shown per implementation with --profile")
    args = ap.parse_args(argv)

    common.setup_process(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; known: {sorted(CASES)}")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if any(i not in IMPLS for i in impls):
        ap.error(f"--impls must be a subset of {IMPLS}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes must be a subset of {sorted(DTYPES)}")
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,8")).split(",")]
    warmup = {b: args.warmup if args.warmup is not None else (1 if args.quick or b > 1 else 2) for b in batches}
    reps = {b: args.reps if args.reps is not None else (3 if args.quick or b > 1 else 7) for b in batches}

    if args.from_json:
        doc = json.loads(args.from_json.read_text())
        e = doc["env"]
        print(f"(saved run) command : {e['command']}")
        print("versions: " + ", ".join(f"{k} {v}" for k, v in e["versions"].items()))
        print(f"GEMM peak: fp32 {doc['gemm_peak_gflops']['fp32']:.0f} GFLOP/s, bf16 "
              f"{doc['gemm_peak_gflops']['bf16']:.0f} GFLOP/s; elapsed {doc['elapsed_s']:.0f} s")
        rows = doc["results"]
        for r in rows:
            add_ratios(r)
        print_report(rows, [k for k in IMPLS if k in rows[0]["impls"]], args.markdown)
        return 0

    env = common.environment()
    common.print_header(env)
    if args.profile:
        res = profile([CASES[c] for c in cases], batches[0], dtypes, impls, top=args.top)
        if args.json:
            common.write_json(args.json, {"env": env, "profile": res})
        return 0

    t_start = time.perf_counter()
    if args.max_foreign and args.idle_wait:
        common.wait_for_idle(args.max_foreign, max_wait=args.idle_wait)
    if args.gemm_peaks:
        peaks = dict(zip(("fp32", "bf16"), map(float, args.gemm_peaks.split(","))))
    else:
        peaks = {"fp32": common.gemm_peak(torch.float32), "bf16": common.gemm_peak(torch.bfloat16)}
    print(f"GEMM peak (2048^3, best kernel of 5 runs each): fp32 {peaks['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s")
    print(f"method  : round-robin over {impls}, warm-up {warmup}, timed rounds {reps} (per batch size), "
          f"median; bf16 = torch.autocast('cpu', bfloat16) for the peers, vitkit: {args.vitkit_bf16}; "
          "inference_mode; eval()")
    for c in cases:
        fl = CASES[c].flops(1)
        print(f"flops   : {CASES[c].title}: {fl['tokens']} tokens, {fl['total'] / 1e9:.1f} GFLOP per image")
    sys.stdout.flush()

    all_rows: list[dict[str, Any]] = []
    infos: dict[str, Any] = {}
    for c in cases:
        rows, info = run_case(CASES[c], batches, dtypes, impls, warmup, reps, peaks,
                              max_foreign=args.max_foreign or None, idle_wait=args.idle_wait,
                              vitkit_bf16=args.vitkit_bf16)
        all_rows += rows
        infos[c] = info
        print(f"case    : {CASES[c].title}: params {info['params']}, max|vitkit-timm| fp32 "
              f"{info['max_abs_diff_vitkit_timm_fp32']}, notes {info['notes']}")
    elapsed = time.perf_counter() - t_start

    gl = print_report(all_rows, impls, args.markdown)
    common.print_kernels()
    print(f"\ntotal benchmark time {elapsed:.0f} s")
    if args.json:
        doc = {"env": env, "gemm_peak_gflops": peaks, "warmup": warmup, "reps": reps, "cases": infos,
               "results": all_rows, "goals": gl, "elapsed_s": elapsed}
        common.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
