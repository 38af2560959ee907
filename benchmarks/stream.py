"""Streaming inference on Ray (`vitkit stream`): throughput with 1 and 2 model actors, object-store bytes per frame.

    python benchmarks/stream.py                               # 64 frames of 512 x 512, actors 1 and 2, 2 rounds
    python benchmarks/stream.py --size 1696 --frames 24       # PeakNet's assembled size (slow on 2 cores)
    python benchmarks/stream.py --checkpoint runs/x --json out.json

Model: ``--checkpoint`` (a run directory, .ckpt or exported model), or by default a tiny EoMT (embed 32, depth 2,
patch 8, 64 x 64 windows) trained for 16 steps on synthetic frames (~20 s), so that its masks -- and with them
the peak-finding load -- look like a real model's (sparse peaks), not random. A 512 x 512 frame is 121
overlapping 64 x 64 windows (sliding-window inference at native resolution, as `vitkit predict`).

Data: ``--frames`` synthetic frames (vitkit.apps.peaks.synthetic) written once to a .npy file and streamed with
``source.kind=files`` (memory-mapped: the driver's read cost is negligible).

Method: one Ray with ``max(actors) + 1`` logical CPUs; for each actor count (``--reps`` rounds, order alternating)
a full `run_stream`: actors with ``torch_threads=1`` and ``num_cpus=1``, ``--batch-size`` frames per batch, 2
peak workers at 0.5 CPU, cap ``--cap`` frames in flight. Throughput is frames written per second of streaming
(actor start-up and warm-up excluded) and the "steady" rate over the middle 80 % of the writes (no pipeline fill
or drain); the best round per actor count is reported. Before each round the script waits (up to 60 s) for the
machine to be quiet and records the load average.

Object-store bytes per frame: what the stages put in Ray's object store per frame -- the bit-packed mask and the
peak list (the frame itself, float32 H*W*4, goes in either way) -- against what PeakNet's pipeline ships: float32
logits ``[num_classes, H, W]``.

Goals: 2 actors >= 1.8x the frames/s of 1 actor; results <= 1/4 of the float32 logits per frame.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TRAIN = ["trainer.max_steps=16", "module.lr=1e-2", "module.warmup_steps=2", "model.embed_dim=32", "model.depth=2",
         "model.num_q=4", "data.num_train=64", "data.num_val=2", "data.num_test=0", "data.frame_shape=[64,64]",
         "trainer.val_check_interval=16", "predict.overlays=0"]
GOAL_SPEEDUP = 1.8
GOAL_BYTES = 0.25


def train_tiny(run: Path) -> Path:
    res = subprocess.run([sys.executable, "-m", "vitkit.cli", "train", f"run_dir={run}", *TRAIN],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res.returncode:
        raise SystemExit(f"training the benchmark model failed:\n{res.stderr[-3000:]}")
    return run


def make_frames(path: Path, n: int, size: int, seed: int = 0) -> Path:
    from vitkit.apps.peaks.synthetic import SynthConfig, SyntheticPeakDataset

    ds = SyntheticPeakDataset(n, cfg=SynthConfig(shape=(size, size)), seed=seed)
    np.save(path, np.stack([ds[i]["image"].numpy()[0] for i in range(n)]).astype(np.float32))
    return path


def run_once(ckpt: Path, frames: Path, out: Path, actors: int, args) -> dict:
    from vitkit.infer.ray import run_stream

    overrides = [f"model.checkpoint={ckpt}", "source.kind=files", f"source.path={frames}", f"output.dir={out}",
                 f"model.num_actors={actors}", "model.num_cpus=1", "model.torch_threads=1",
                 f"model.batch_size={args.batch_size}", "peaks.workers=2", "peaks.num_cpus=0.5",
                 f"max_frames_in_flight={args.cap}", "report_every_s=0"]
    waited = common.wait_for_idle(0.25, max_wait=60)
    load0 = os.getloadavg()[0]
    s = run_stream("default", overrides, log=None)
    ob = s["object_store_bytes"]
    return {"actors": actors, "frames": s["frames_written"], "frames_per_s": s["frames_per_s"],
            "steady_frames_per_s": s["steady_frames_per_s"], "latency_p50_s": s["latency_s"]["p50"],
            "latency_p95_s": s["latency_s"]["p95"], "peaks": s["peaks"], "startup_s": s["startup_s"],
            "results_bytes_per_frame": ob["results_per_frame"], "frame_bytes_per_frame": ob["frames_per_frame"],
            "logits_bytes_per_frame": ob["float32_logits_per_frame"], "loadavg_before": load0,
            "waited_for_idle_s": waited}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512, help="frame height = width")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--actors", default="1,2", help="comma list of actor counts")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--cap", type=int, default=16, help="max_frames_in_flight")
    ap.add_argument("--reps", type=int, default=2, help="rounds per actor count (best reported)")
    ap.add_argument("--checkpoint", help="model to use (default: train a tiny one)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import ray

    env = common.environment()
    common.print_header(env)
    counts = [int(a) for a in args.actors.split(",")]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitkit-stream-bench-") as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else train_tiny(tmp / "model")
        frames = make_frames(tmp / "frames.npy", args.frames, args.size)
        ray.init(num_cpus=max(counts) + 1, include_dashboard=False, log_to_driver=False)
        rounds = []
        try:
            for r in range(args.reps):
                for a in (counts if r % 2 == 0 else counts[::-1]):
                    res = run_once(ckpt, frames, tmp / f"out_{a}_{r}", a, args)
                    rounds.append(res)
                    print(f"round {r}: {a} actor(s): {res['frames_per_s']:.2f} frames/s (steady "
                          f"{res['steady_frames_per_s'] or float('nan'):.2f}), p50 {res['latency_p50_s']:.3f} s, "
                          f"load {res['loadavg_before']:.2f}", flush=True)
        finally:
            ray.shutdown()
    best = {a: max((r for r in rounds if r["actors"] == a), key=lambda r: r["frames_per_s"]) for a in counts}
    base = best[counts[0]]["frames_per_s"]
    rows = []
    for a in counts:
        b = best[a]
        rows.append([a, f"{b['frames_per_s']:.2f}", f"{(b['steady_frames_per_s'] or float('nan')):.2f}",
                     f"{b['frames_per_s'] / base:.2f}x", f"{b['latency_p50_s']:.3f}", f"{b['latency_p95_s']:.3f}",
                     f"{b['results_bytes_per_frame']:.0f}", f"{b['logits_bytes_per_frame']:.0f}",
                     f"{b['results_bytes_per_frame'] / b['logits_bytes_per_frame']:.4f}"])
    print(f"\n{args.frames} frames of {args.size}x{args.size}, batch {args.batch_size}, cap {args.cap}, one torch "
          f"thread per actor")
    print(common.format_table(["actors", "frames/s", "steady fr/s", "x 1 actor", "p50 s", "p95 s",
                               "result B/frame", "logits B/frame", "ratio"], rows))
    speedup = best[counts[-1]]["frames_per_s"] / base if len(counts) > 1 else None
    ratio = max(b["results_bytes_per_frame"] / b["logits_bytes_per_frame"] for b in best.values())
    print("\ngoals:")
    if speedup is not None:
        print(f"  {counts[-1]} actors vs {counts[0]}: {speedup:.3f}x (goal >= {GOAL_SPEEDUP}x) -> "
              f"{'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}")
    print(f"  object-store results per frame / float32 logits: {ratio:.4f} (goal <= {GOAL_BYTES}) -> "
          f"{'met' if ratio <= GOAL_BYTES else 'NOT met'}")
    print(f"elapsed {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "args": vars(args), "rounds": rounds,
                                               "best": {str(k): v for k, v in best.items()}, "speedup": speedup,
                                               "results_vs_logits": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
