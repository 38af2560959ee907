"""Sparse-token EoMT against dense EoMT on the peaks app's held-out shots: speed at batch 1 and peak F1.

    python benchmarks/sparse_tokens.py --run runs/<main job run>            # 24 held-out shots, 3 timed rounds
    python benchmarks/sparse_tokens.py --run RUN --shots 8 --reps 2 --bf16  # and both models in bfloat16

The run is a ``vitkit train`` run: its model (dense), and its sparse-token model and threshold (``sparse_model/``,
``sparse.json``: :mod:`vitkit.apps.peaks.sparse`). Rows: dense; the sparse finder (``vitkit predict --sparse``);
the same kept tokens through the *dense* model (what the fine-tune adds); both at window overlap 0 (what the
overlap costs); optionally both models with bfloat16 weights; and the floor, the sparse finder keeping no
token (normalisation, lone pixels, spot evidence, extraction of nothing). Every finder is
:class:`~vitkit.apps.peaks.finder.PeakFinder` with the same extraction rules, fed one whole epix10k2M event at a
time (batch 1, end to end).

Data: simulated lattice stills on the run's detector (``detector.geom``), default :class:`LatticeConfig`, seed 2
(the main job's held-out ``test`` split: ``--shots 24`` is exactly the shots ``vitkit train`` evaluates). Peak F1
with ``vitkit evaluate``'s code (:func:`vitkit.apps.peaks.job.evaluate`, 2 px, weak reflections don't-care).
Timing: all finders round-robin (:func:`common.time_interleaved`), each call the whole test split event by event;
seconds per event = call time / shots; calls during which other processes used > 0.25 cores are repeated. The JSON
(``--out``) has the machine, the run's sparse statistics and every timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a vitkit train run directory (model/, sparse_model/, "
                    "sparse.json, detector.geom)")
    ap.add_argument("--shots", type=int, default=24, help="held-out shots (default 24: the main job's test split)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (default 3; one warm-up round)")
    ap.add_argument("--bf16", action="store_true", help="also time both finders with bfloat16 weights "
                    "(vitkit predict --bf16)")
    ap.add_argument("--out", type=Path, default=Path("sparse_out"), help="output directory for the JSON")
    args = ap.parse_args(argv)

    from vitkit.apps.peaks.finder import PeakFinder, load_model, sparse_of_run
    from vitkit.apps.peaks.job import evaluate, event_of, truth_of
    from vitkit.apps.peaks.lattice import LatticeConfig, LatticeStillsDataset
    from vitkit.weights.io import read_json

    common.setup_process(args.threads)
    env = common.environment()
    common.print_header(env)
    geom = args.run / "detector.geom"
    model = load_model(args.run).eval()
    dense = PeakFinder(model, str(geom) if geom.exists() else "epix10k2m")
    det = dense.detector
    sparse_dir, threshold = sparse_of_run(args.run)
    sparse_model = load_model(sparse_dir).eval()
    test = LatticeStillsDataset(args.shots, det, LatticeConfig(), seed=2, panels_per_item=None)
    true_masks, true_peaks, weak = truth_of(test)
    events = [(event_of(it)[None], event_of(it["good"]).astype(bool)) for it in (test[i] for i in range(len(test)))]

    finders: dict[str, Any] = {
        "dense": dense,
        "sparse (vitkit predict --sparse)": PeakFinder(sparse_model, det, sparse_threshold=threshold),
        "sparse tokens, dense model (no fine-tune)": PeakFinder(model, det, sparse_threshold=threshold),
        "dense, overlap 0": PeakFinder(model, det, overlap=0.0),
        "sparse, overlap 0": PeakFinder(sparse_model, det, sparse_threshold=threshold, overlap=0.0),
    }
    if args.bf16:  # the other inference speed-up: the weights in bfloat16 (vitkit predict --bf16, either model)
        finders["dense bf16"] = PeakFinder(load_model(args.run, bf16=True), det)
        finders["sparse bf16"] = PeakFinder(load_model(sparse_dir, bf16=True), det, sparse_threshold=threshold)
    finders["floor (no token kept)"] = PeakFinder(sparse_model, det, sparse_threshold=float("inf"))

    rows: dict[str, dict[str, Any]] = {}
    for name, f in finders.items():  # accuracy (and the first, warm-up pass of each finder)
        masks, tables = [], []
        for ev, good in events:
            m, t = f.find(ev, good)
            masks.append(m[0])
            tables.extend(t)
        kept = f.kept_token_fraction
        met = evaluate(masks, tables, true_masks, true_peaks, radius=2.0, weak=weak)
        rows[name] = {"peak_f1": met["peak_f1"], "peak_precision": met["peak_precision"],
                      "peak_recall": met["peak_recall"], "kept_token_fraction": kept}
        print(f"{name}: F1 {met['peak_f1']:.4f} (P {met['peak_precision']:.3f} R {met['peak_recall']:.3f})"
              + ("" if kept is None else f", kept {kept:.3f} of the tokens"), flush=True)

    def split_of(f):
        return lambda: [f.find(ev, good) for ev, good in events]

    times, stats = common.time_interleaved({k: split_of(f) for k, f in finders.items()}, warmup=1, reps=args.reps,
                                           progress=lambda s: print(s, flush=True), idle_wait=30.0)
    d = statistics.median(times["dense"]) / len(events)
    table = []
    for name, r in rows.items():
        s = statistics.median(times[name]) / len(events)
        r.update(s_per_event=s, speedup_vs_dense=d / s, f1_minus_dense=r["peak_f1"] - rows["dense"]["peak_f1"],
                 times_s=times[name])
        kept = "-" if r["kept_token_fraction"] is None else f"{r['kept_token_fraction']:.3f}"
        table.append([name, f"{r['peak_f1']:.4f}", f"{r['f1_minus_dense']:+.4f}", f"{r['peak_recall']:.3f}", kept,
                      f"{s:.3f}", f"{d / s:.2f}x"])
    headers = ["finder", "peak F1", "vs dense", "recall", "kept tokens", "s/event", "speed-up"]
    print(common.format_table(headers, table))
    print(common.format_table(headers, table, markdown=True))
    doc = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
           "timing_stats": stats, "shots": len(events), "sparse_json": read_json(args.run / "sparse.json")}
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "sparse_tokens.json", doc)
    return doc


if __name__ == "__main__":
    main()
