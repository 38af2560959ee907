"""The one benchmark command: vitkit against timm, transformers and PeakNet's peak finding, in one process.

    python benchmarks/run.py                    # everything (~10 min on 2 cores), table + JSON
    python benchmarks/run.py --json results.json
    python benchmarks/run.py --quick            # a smoke run (~2 min): batch 1, fewer rounds, smaller EoMT

Sections, each run in this process through the section's own module (see their docstrings for method):

1. GEMM peak (2048^3 matmul) in fp32 and bf16: the yardstick for "share of peak".
2. Backbone forward (``backbone.py``): DINOv2 ViT-S/14-reg4 @518, DINOv2 ViT-B/14 @518, DINOv3 ViT-S/16
   @640; batch 1 and 8; fp32 and bf16; vitkit vs timm vs transformers. bf16: peers under autocast, vitkit
   with weights cast once (``cast_for_inference``).
3. EoMT (``eomt.py``): inference vs transformers' EoMT with masks on (p=1) and off (p=0) and vs the bare
   backbone, fp32 and bf16; a training step (forward + loss + backward) vs transformers' EoMT with its
   loss, with peak memory, for vitkit as is and with activation checkpointing.
4. Peak extraction (``peaks.py``) vs PeakNet's method (scipy ``ndimage.label`` + per-component centroid
   loop) on 1920² frames with 500 peaks.

The summary lists every goal of the speed issue with the measured value. The machine may be shared:
timed calls during which other processes used more than 0.25 cores are discarded and repeated.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backbone  # noqa: E402
import common  # noqa: E402
import eomt  # noqa: E402
import peaks  # noqa: E402


def _section(title: str, fn, argv: list[str], tmp: Path, name: str) -> tuple[dict[str, Any] | None, str, float]:
    """Run a section's main() in this process with ``--json``; returns (its JSON, its stdout, seconds)."""
    out = tmp / f"{name}.json"
    buf = io.StringIO()
    print(f"\n=== {title}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = fn([*argv, "--json", str(out)])
    dt = time.perf_counter() - t0
    text = buf.getvalue()
    print(text, flush=True)
    if rc not in (0, None):
        print(f"WARNING: {title} exited with {rc}", file=sys.stderr)
    return (json.loads(out.read_text()) if out.exists() else None), text, dt


def summary(gemm: dict[str, float], bb: dict | None, em: dict | None, pk: dict | None) -> list[dict[str, Any]]:
    """One row per goal: what, measured value, goal, met."""
    rows: list[dict[str, Any]] = []
    if bb:
        for r in bb["results"]:
            im = r["impls"]
            vk = im["vitkit"]["median_s"]
            for peer in ("timm", "hf"):
                if peer in im:
                    ratio = im[peer]["median_s"] / vk
                    goal = backbone.GOALS[r["dtype"]] if peer == "timm" else None
                    rows.append({"what": f"backbone {r['case']} B={r['batch']} {r['dtype']}: vitkit / {peer} speed",
                                 "value": ratio, "goal": f">= {goal}" if goal else "-",
                                 "met": None if goal is None else ratio >= goal,
                                 "vitkit_peak_share": im["vitkit"]["peak_share"],
                                 "peer_peak_share": im[peer]["peak_share"]})
            if r["dtype"] == "bf16":
                share = im["vitkit"]["peak_share"]
                rows.append({"what": f"backbone {r['case']} B={r['batch']} bf16: vitkit share of bf16 GEMM peak",
                             "value": share, "goal": ">= 0.5", "met": share >= 0.5})
    if em:
        for g in em.get("goals", []):
            rows.append({"what": f"EoMT {g['what']}", "value": g["value"], "goal": g["goal"], "met": g["met"]})
    if pk:
        rows.append({"what": "peak extraction 1920² / 500 peaks: vitkit / scipy label + centroid loop",
                     "value": pk["ratio_vs_loop"], "goal": f">= {peaks.GOAL:.0f}",
                     "met": pk["ratio_vs_loop"] >= peaks.GOAL})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=Path("benchmark-results.json"), help="combined results")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 1, fewer rounds, EoMT at 256")
    ap.add_argument("--sections", default="backbone,eomt,peaks")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    common.setup_process(2)
    warnings.filterwarnings("ignore")
    env = common.environment()
    common.print_header(env)
    t_start = time.perf_counter()
    common.wait_for_idle(0.25, max_wait=30)
    kernels = {"fp32": common.gemm_peaks(torch.float32), "bf16": common.gemm_peaks(torch.bfloat16)}
    gemm = {dt: max(k.values()) for dt, k in kernels.items()}
    print("GEMM peak (2048^3, best of 5), GFLOP/s: " + "; ".join(
        f"{dt} {gemm[dt]:.0f} (" + ", ".join(f"{n} {v:.0f}" for n, v in k.items()) + ")" for dt, k in kernels.items()))
    md = ["--markdown"] if args.markdown else []

    res: dict[str, Any] = {"env": env, "gemm_peak_gflops": gemm, "gemm_kernels_gflops": kernels, "sections": {}}
    bb = em = pk = None
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "backbone" in sections:
            a = ["--batches", "1", "--warmup", "1", "--reps", "3"] if args.quick else \
                ["--cases", "dinov2_s14reg4_518,dinov2_b14_518,dinov3_s16_640", "--warmup", "1", "--reps", "2"]
            a += ["--gemm-peaks", f"{gemm['fp32']:.1f},{gemm['bf16']:.1f}"]  # one peak for the whole report
            bb, _, dt = _section("backbone forward", backbone.main, a + ["--idle-wait", "20"] + md, tmp, "backbone")
            res["sections"]["backbone"] = {"seconds": dt, "argv": a, "result": bb}
        if "eomt" in sections:
            a = ["--quick", "--sections", "infer,train"] if args.quick else \
                ["--sections", "infer,train", "--infer", "512:1", "--train-size", "512", "--train-batch", "2",
                 "--reps", "3", "--mem-reps", "1", "--idle-wait", "10"]
            em, _, dt = _section("EoMT vs transformers", eomt.main, a + md, tmp, "eomt")
            res["sections"]["eomt"] = {"seconds": dt, "argv": a, "result": em}
        if "peaks" in sections:
            a = ["--frames", "2", "--reps", "5"] if args.quick else ["--frames", "3", "--reps", "9"]
            pk, _, dt = _section("peak extraction vs scipy loop", peaks.main, a, tmp, "peaks")
            res["sections"]["peaks"] = {"seconds": dt, "argv": a, "result": pk}

    rows = summary(gemm, bb, em, pk)
    res["goals"] = rows
    res["elapsed_s"] = time.perf_counter() - t_start
    verdict = {None: "-", True: "MET", False: "not met"}
    table = [[r["what"], f"{r['value']:.2f}", r["goal"], verdict[r["met"]]] for r in rows]
    print("\n=== summary (ratios: > 1 means vitkit is faster; memory: vitkit / HF)")
    print(common.format_table(["goal", "measured", "target", ""], table, markdown=args.markdown))
    print(f"\ntotal {res['elapsed_s']:.0f} s; GEMM peak fp32 {gemm['fp32']:.0f} / bf16 {gemm['bf16']:.0f} GFLOP/s")
    common.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
