"""Aggregator memory: keeping only the last output (``intermediate_layers=[-1]``) vs all ``depth`` outputs.

    python benchmarks/aggregator.py                       # default run (~3-6 min on 2 shared cores)
    python benchmarks/aggregator.py --frames 4 --modes infer   # quick check
    python benchmarks/aggregator.py --json out.json

Model: ``vitkit.Aggregator`` with VGGT's depth (24 frame + 24 global blocks) at ViT-Ti width (192, 3 heads of 64,
qk_norm, 4 register tokens) on a randomly initialised 12-block DINOv3 ViT-S/16 layout narrowed to the same
width (the machine is 2 shared cores; memory ratios depend on depth and token counts, hardly on width), input
``[1, S, 3, 224, 224]`` in [0, 1] (P = 1 + 4 + 196 = 201 tokens per frame). VGGT-1B is width 1024: every
activation and output scales by 1024 / 192, the ratios stay.

Modes (every (mode, keep) pair runs in its own fresh subprocess, so allocator state and cached buffers of one
configuration never hide or inflate another's):

* ``infer``: ``eval()`` + ``torch.inference_mode()``, one forward, output list held until after the call.
* ``train``: ``train()`` with gradient checkpointing on every block (as VGGT trains), forward, loss on the last
  output only, backward; the output list stays alive until backward has finished (as a caller holding it for
  its heads would).
* ``train_nockpt``: the same without gradient checkpointing: the activations saved for backward are the same in
  both settings and dominate, so little is saved there (shown for honesty).

Memory: peak resident set size (RSS) of the child during the measured call minus its RSS just before it
(``PeakRSS`` from benchmarks/eomt.py: ``gc.collect()`` + ``malloc_trim(0)``, then the kernel's peak-RSS
counter is reset through ``/proc/self/clear_refs`` and ``VmHWM`` read afterwards; a 1 ms ``VmRSS`` sampler
where that reset is not allowed). Weights and the input are resident before the call and not counted.
Children run with glibc's ``MALLOC_MMAP_THRESHOLD_=131072`` (``--malloc mmap``, the default): every block of
128 KiB or more is its own mapping, returned to the OS when freed, so RSS follows live tensor memory. With
glibc's default dynamic threshold (``--malloc default``) freed blocks are kept in the heap and reused
depending on allocation order, and the peak RSS then measures fragmentation as much as tensors (in training
it came out larger for the configuration that stores less). One
warm-up call on a 2-frame sequence first pays one-time costs (thread pools, kernel caches), which would
otherwise land in whichever configuration runs first. "outputs" is the size of the returned tensors
(kept layers x B x S x P x 2C x 4 bytes) and "param grads" that of the weight gradients backward allocates
(the same in both settings), both computed, not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GOAL = 0.4  # peak-memory ratio last-only / all, inference
ARCH = dict(embed_dim=192, depth=24, num_heads=3, n_storage_tokens=4, qk_norm=True, img_size=224, patch_size=16,
            patch_embed="dinov3_vits16", patch_embed_kwargs=dict(embed_dim=192, num_heads=3))
MIB = 1024 ** 2


def child(mode: str, keep: str, frames: int, size: int, threads: int) -> dict[str, Any]:
    import vitkit
    from eomt import PeakRSS  # one /proc reader for all benchmarks

    common.setup_process(threads, tune_allocator=False)  # keep the MALLOC_MMAP_THRESHOLD_ given for memory
    torch.manual_seed(0)
    agg = vitkit.Aggregator(**ARCH, intermediate_layers=[-1] if keep == "last" else None)
    train = mode.startswith("train")
    agg.train(train)
    agg.set_grad_checkpointing(mode == "train")
    x = torch.rand(1, frames, 3, size, size, generator=torch.Generator().manual_seed(0))
    warm = x[:, :2].clone()

    def call(images: torch.Tensor) -> list[torch.Tensor]:
        if not train:
            with torch.inference_mode():
                outs, _ = agg(images)
                return outs
        outs, _ = agg(images)
        outs[-1].square().mean().backward()  # heads on the last layer only; the list is still held here
        agg.zero_grad(set_to_none=True)
        return [o.detach() for o in outs]

    call(warm)
    with PeakRSS() as pr:
        outs = call(x)
    grads = sum(p.numel() * p.element_size() for p in agg.parameters() if p.requires_grad) if train else 0
    return {"mode": mode, "keep": keep, "frames": frames, "size": size, "delta": pr.delta, "peak": pr.peak,
            "before": pr.before, "method": PeakRSS.method, "n_outputs": len(outs), "grad_bytes": grads,
            "output_bytes": sum(o.numel() * o.element_size() for o in outs),
            "tokens_per_frame": outs[-1].shape[2]}


def run_child(mode: str, keep: str, frames: int, size: int, threads: int, malloc: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, keep, str(frames), str(size), "--threads", str(threads)]
    env = dict(os.environ)
    if malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode:
        raise RuntimeError(f"child {mode}/{keep} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["infer", "train", "train_nockpt"],
                    choices=["infer", "train", "train_nockpt"])
    ap.add_argument("--frames", type=int, nargs="+", default=[8])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", choices=["mmap", "default"], default="mmap",
                    help="glibc allocation in the children: mmap every block >= 128 KiB (default), or glibc's default")
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--child", nargs=4, metavar=("MODE", "KEEP", "FRAMES", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, keep, frames, size = args.child
        print(json.dumps(child(mode, keep, int(frames), int(size), args.threads)))
        return 0

    common.setup_process(args.threads)
    env = common.environment()
    common.print_header(env)
    print(f"model   : Aggregator {ARCH}")
    rows, results = [], []
    for frames in args.frames:
        for mode in args.modes:
            res = {keep: run_child(mode, keep, frames, args.size, args.threads, args.malloc)
                   for keep in ("all", "last")}
            results += list(res.values())
            ratio = res["last"]["delta"] / res["all"]["delta"]
            rows.append([mode, str(frames), f"{res['all']['delta'] / MIB:.0f}", f"{res['last']['delta'] / MIB:.0f}",
                         f"{res['all']['output_bytes'] / MIB:.0f}", f"{res['last']['output_bytes'] / MIB:.0f}",
                         f"{res['all']['grad_bytes'] / MIB:.0f}", f"{ratio:.2f}x"])
            print(f"  {mode} S={frames}: all {res['all']['delta'] / MIB:.0f} MiB, last {res['last']['delta'] / MIB:.0f}"
                  f" MiB -> {ratio:.2f}x", flush=True)
    print(f"\nmemory  : {results[0]['method']}; peak RSS of a fresh process during one call minus RSS before it; "
          f"malloc {'MALLOC_MMAP_THRESHOLD_=131072' if args.malloc == 'mmap' else 'glibc default'}")
    print(f"input   : [1, S, 3, {args.size}, {args.size}], {results[0]['tokens_per_frame']} tokens per frame\n")
    header = ["mode", "S", "all MiB", "last MiB", "outputs all", "outputs last", "param grads", "last/all"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    infer = [r for r in rows if r[0] == "infer"]
    if infer:
        worst = max(float(r[-1][:-1]) for r in infer)
        print(f"\ngoal: inference peak with intermediate_layers=[-1] < {GOAL}x of keeping all -> "
              f"{'met' if worst < GOAL else 'NOT met'} (worst {worst:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "arch": ARCH, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
