"""torch.compile gain: vitkit backbone and EoMT inference, eager vs compiled (fullgraph, inductor), one process.

    python benchmarks/compile.py                       # ViT-S/14-reg4 @518 and EoMT ViT-S/16 @512, B=1
    python benchmarks/compile.py --size 224 --reps 5

fp32 runs the fp32 model; bf16 runs the model cast once with ``cast_for_inference`` (both eager and
compiled). Eager and compiled calls alternate; medians are reported with the one-off compile time.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=None, help="image size for both models (default 518 / 512)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--freezing", action="store_true",
                    help="inductor's inference mode: weights become constants, prepacked for oneDNN/MKL")
    args = ap.parse_args(argv)
    if args.freezing:
        import torch._inductor.config as inductor_config  # not "import torch.x": that would make torch local

        inductor_config.freezing = True
    common.setup_process(2)
    warnings.filterwarnings("ignore")
    import vitkit
    from vitkit.layers.precision import cast_for_inference

    common.print_header(common.environment())
    rows = []
    for name in ("backbone", "eomt"):
        size = args.size or (518 if name == "backbone" else 512)
        torch.manual_seed(0)
        if name == "backbone":
            base = vitkit.create_backbone("dinov2_vits14_reg", img_size=size).eval()
            title = f"DINOv2 ViT-S/14-reg4 @{size} forward_features"
        else:
            base = vitkit.EoMT("dinov3_vits16", num_classes=2, num_q=100, img_size=size).eval()
            base.masked_attn_enabled = False  # the inference model
            title = f"EoMT ViT-S/16 Q=100 @{size} (masks off)"
        x = torch.randn(1, 3, size, size)
        for dt in args.dtypes.split(","):
            model = base if dt == "fp32" else cast_for_inference(copy.deepcopy(base))
            eager = model.forward_features if name == "backbone" else model
            torch._dynamo.reset()
            compiled = torch.compile(eager, fullgraph=True)
            with torch.inference_mode():
                t0 = time.perf_counter()
                compiled(x)
                t_compile = time.perf_counter() - t0
                fns = {"eager": lambda f=eager, x=x: f(x), "compiled": lambda f=compiled, x=x: f(x)}
                times, _ = common.time_interleaved(fns, warmup=1, reps=args.reps)
            med = {k: common.summarize(v)["median_s"] * 1e3 for k, v in times.items()}
            rows.append([title, dt, f"{med['eager']:.0f}", f"{med['compiled']:.0f}",
                         f"{med['eager'] / med['compiled']:.2f}", f"{t_compile:.0f}"])
            print(rows[-1], file=sys.stderr, flush=True)
    print(common.format_table(["model", "dtype", "eager ms", "compiled ms", "speed-up", "compile s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
