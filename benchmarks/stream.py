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

Soak (``--soak N``): ``vitkit stream`` (a subprocess that starts its own Ray) with 2 model actors reads ``N``
single-panel events (``--soak-size``, 64 x 96 by default: what 2 CPU cores can push 10,000 of in minutes) from a
ZeroMQ PUSH socket fed by a producer thread in this process, twice:

* ``block``: the producer sends as fast as the socket takes them (far faster than the model); the pipeline
  holds at most ``max_frames_in_flight`` events and the sender blocks. Every event must be written once.
* ``drop_oldest``: the producer sends at 2x the rate the block run achieved; the stream reads on and drops the
  oldest waiting events. written + dropped must equal N.

Memory: the stream's own peak RSS (``VmHWM``: driver, model actors, writer, peak workers) from its
``stream_stats.json``, and the RSS of its whole process tree (driver, Ray's raylet/GCS/object store, workers)
sampled every 0.5 s from here once the stream is up: the mean 20-30 % into the run (Ray's start-up workers are
gone by then) against the mean over the last 10 % shows whether memory grows with N.
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

TRAIN = ["data=synthetic", "trainer.max_steps=16", "module.lr=1e-2", "module.warmup_steps=2", "model.embed_dim=32",
         "model.depth=2",
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
    from vitkit.apps.peaks.stream.ray import run_stream

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


def tree_rss_mib(root: int) -> float:
    """Summed VmRSS of ``root`` and all its descendants (shared pages count once per process)."""
    parent, rss = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = {ln.split(":")[0]: ln.split(":", 1)[1].split() for ln in (d / "status").read_text().splitlines()
                      if ln.startswith(("PPid:", "VmRSS:"))}
        except OSError:
            continue
        parent[int(d.name)] = int(fields["PPid"][0])
        rss[int(d.name)] = int(fields.get("VmRSS", ["0"])[0]) / 1024.0
    keep, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in keep]
        keep.update(kids)
        frontier = kids
    return sum(rss.get(p, 0.0) for p in keep)


def soak_once(ckpt: Path, tmp: Path, n: int, policy: str, rate_hz: float | None, args) -> dict:
    import threading

    from vitkit.apps.peaks.stream.producer import produce
    from vitkit.apps.peaks.synthetic import SynthConfig, SyntheticPeakDataset

    ds = SyntheticPeakDataset(16, SynthConfig(shape=tuple(args.soak_size)), seed=1)
    pool = [ds[i]["image"].numpy()[0] for i in range(16)]
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{so.getsockname()[1]}"
    out = tmp / f"soak_{policy}"
    cmd = [sys.executable, "-m", "vitkit.cli", "stream", "default", f"model.checkpoint={ckpt}", "source.kind=zmq",
           f"source.endpoints={endpoint}", f"source.overflow={policy}", "source.buffer_events=16",
           f"output.dir={out}", "ray.num_cpus=2", "model.num_actors=2", "model.num_cpus=0.5", "peaks.num_cpus=0.5",
           f"model.batch_size={args.soak_batch}", f"max_frames_in_flight={args.cap * 2}", "report_every_s=30",
           "--report"]
    sent: dict = {}
    prod = threading.Thread(target=lambda: sent.update(produce(
        endpoint, ((f"soak:{i}", pool[i % 16]) for i in range(n)), rate_hz=rate_hz, send_timeout_s=600)),
        daemon=True)
    waited = common.wait_for_idle(0.25, max_wait=60)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    err: list[str] = []
    ready = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            err.append(line)
            if "model actor(s) ready" in line:
                ready.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    samples, started = [], False
    while proc.poll() is None:
        if ready.is_set():  # the producer starts once the stream is up (start-up is not the soak)
            if not started:
                prod.start()
                started = True
            samples.append((time.perf_counter() - t0, tree_rss_mib(proc.pid)))
        time.sleep(0.5)
    stdout = proc.stdout.read()
    reader.join(10)
    stderr = "".join(err)
    prod.join(60)
    if proc.returncode:
        raise SystemExit(f"soak ({policy}) failed:\n{stderr[-3000:]}")
    s = json.loads((out / "stream_stats.json").read_text())
    k = max(1, len(samples) // 10)
    rss = [r for _, r in samples]
    early = rss[2 * k:3 * k] or rss[:k]  # 20-30 % into the run: Ray's start-up workers are gone by then
    return {"policy": policy, "events": n, "rate_hz": rate_hz, "sent": sent.get("sent"),
            "producer_s": sent.get("seconds"), "producer_blocked_s": sent.get("blocked_s"),
            "written": s["frames_written"], "dropped": s["events_dropped"], "malformed": s["messages_malformed"],
            "duplicates": s["duplicates_dropped"], "frames_per_s": s["frames_per_s"],
            "latency_p50_s": s["latency_s"]["p50"], "latency_p95_s": s["latency_s"]["p95"],
            "max_in_flight_seen": s["max_frames_in_flight_seen"], "cap": s["max_frames_in_flight"],
            "peak_rss_mib": s["peak_rss_mib"], "tree_rss_early_mib": float(np.mean(early)) if rss else None,
            "tree_rss_last10_mib": float(np.mean(rss[-k:])) if rss else None,
            "tree_rss_max_mib": max(rss) if rss else None, "stages": s["stages"], "limiting": s["limiting_stage"],
            "wall_s": time.perf_counter() - t0, "waited_for_idle_s": waited,
            "report": [ln for ln in stdout.splitlines()]}


def soak(args) -> None:
    env = common.environment()
    common.print_header(env)
    with tempfile.TemporaryDirectory(prefix="vitkit-soak-") as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else train_tiny(tmp / "model")
        runs = [soak_once(ckpt, tmp, args.soak, "block", None, args)]
        runs.append(soak_once(ckpt, tmp, args.soak, "drop_oldest", 2 * runs[0]["frames_per_s"], args))
    rows = []
    for r in runs:
        pr = r["peak_rss_mib"]
        rows.append([r["policy"], r["sent"], r["written"], r["dropped"], r["duplicates"],
                     f"{r['frames_per_s']:.1f}", "max" if r["rate_hz"] is None else f"{r['rate_hz']:.1f}",
                     f"{100 * r['producer_blocked_s'] / max(r['producer_s'], 1e-9):.0f} %",
                     f"{r['max_in_flight_seen']}/{r['cap']}", f"{pr['driver']:.0f}",
                     "/".join(f"{m:.0f}" for m in pr["model_actors"] if m is not None),
                     f"{r['tree_rss_early_mib']:.0f} -> {r['tree_rss_last10_mib']:.0f} "
                     f"(max {r['tree_rss_max_mib']:.0f})",
                     f"{r['latency_p50_s']:.2f}/{r['latency_p95_s']:.2f}", r["limiting"]["stage"]])
    print(f"\nsoak: {args.soak} events of {args.soak_size[0]}x{args.soak_size[1]} over zmq, 2 actors, batch "
          f"{args.soak_batch}, cap {args.cap * 2}")
    print(common.format_table(["policy", "sent", "written", "dropped", "dup", "events/s", "send Hz", "sender blocked",
                               "in flight", "driver MiB", "actors MiB", "tree RSS MiB (20-30 % -> last 10 %)",
                               "p50/p95 s", "limit"], rows))
    for r in runs:
        ok = r["written"] + r["dropped"] == r["sent"] == args.soak and r["duplicates"] == 0
        print(f"  {r['policy']}: every event accounted for (written + dropped = sent = {args.soak}): "
              f"{'yes' if ok else 'NO'}; {r['limiting']['why']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "args": vars(args), "soak": runs}, indent=2) + "\n")


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
    ap.add_argument("--soak", type=int, default=0, metavar="N", help="soak test over zmq with N events instead")
    ap.add_argument("--soak-size", type=int, nargs=2, default=[64, 96], metavar=("H", "W"))
    ap.add_argument("--soak-batch", type=int, default=8)
    args = ap.parse_args()
    if args.soak:
        soak(args)
        return

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
