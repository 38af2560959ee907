"""Peak finding speed: vitkit's vectorised ``find_peaks`` vs the per-component SciPy loop, in one process.

    python benchmarks/peaks.py                    # 1920 x 1920, ~500 peaks, 3 frames, 15 timed rounds
    python benchmarks/peaks.py --naive            # also time the full-frame per-label loop once (~20 s)
    python benchmarks/peaks.py --size 1696 --peaks 800 --json out.json

Data: synthetic frames from ``vitkit.apps.peaks.synthetic`` (noisy image, background, ring, gaps, beam
stop); the mask is the half-maximum label, i.e. what a perfect PeakNet would predict (~0.25 % of the pixels).

Implementations (all give the same peaks: intensity-weighted centroid with weights ``max(image, 0)``,
unweighted mean when the weights sum to 0, integrated intensity = sum of the image over the component):

* ``vitkit``          ``find_peaks`` (method "auto" -> "sparse" for such masks: connected components on the
                      graph of mask pixels, then ``np.bincount`` reductions);
* ``vitkit_ndimage``  ``find_peaks(method="ndimage")``: ``ndimage.label`` on the full frame, then bincounts;
* ``loop``            ``find_peaks_loop``, the PeakNet reference method: ``ndimage.label`` (3 x 3), then a
                      Python loop over components calling ``ndimage.center_of_mass`` and ``sum`` -- on each
                      component's bounding box (``ndimage.find_objects``), the fast way to write that loop;
* ``vitkit_snr``      ``measure_components(..., snr_radius=5)``: the same peaks plus PeakFinder's photometric SNR
                      (``local_signal``: local and along-line backgrounds, every component of the frame at once);
                      what it costs on top of ``vitkit`` is the SNR;
* ``naive_loop``      (``--naive``, timed once) the same loop with ``center_of_mass(weights, labels, i)`` and
                      ``ndimage.sum(image, labels, i)`` over the full frame for every component.

Timing: the implementations run round-robin (rotating start) for ``--warmup`` discarded and ``--reps`` kept
rounds, each round over all frames; medians are reported, in ms per frame. Rounds during which other
processes used > 0.25 cores are repeated (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from vitkit.apps.peaks import SynthConfig, find_peaks, make_frame  # noqa: E402
from vitkit.apps.peaks.peakfind import measure_components  # noqa: E402

GOAL = 5.0  # vitkit speed / loop speed


def find_peaks_loop(mask: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Reference (PeakNet-style) peak finder: ndimage.label + a Python loop over components."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    out = np.empty((n, 3), dtype=np.float64)
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        sub = lab[sl]
        img = image[sl].astype(np.float64)  # float64 like vitkit (float32 products lose ~1e-5 px)
        w = np.clip(img, 0, None)
        if w[sub == i].sum() > 0:
            cy, cx = ndimage.center_of_mass(w, sub, i)
        else:
            cy, cx = ndimage.center_of_mass(sub == i)
        out[i - 1] = (cy + sl[0].start, cx + sl[1].start, ndimage.sum(img, sub, i))
    return out


def find_peaks_naive_loop(mask: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The same loop without bounding boxes: every scipy call scans the whole frame."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    image = image.astype(np.float64)  # float32 products inside center_of_mass lose ~1e-4 px at x ~ 1000
    weights = np.clip(image, 0, None)
    out = np.empty((n, 3), dtype=np.float64)
    for i in range(1, n + 1):
        if ndimage.sum(weights, lab, i) > 0:
            cy, cx = ndimage.center_of_mass(weights, lab, i)
        else:
            cy, cx = ndimage.center_of_mass(lab == i)
        out[i - 1] = (cy, cx, ndimage.sum(image, lab, i))
    return out


def with_snr(mask: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``(y, x, intensity)`` from :func:`measure_components` with the SNR photometry PeakFinder computes."""
    c = measure_components(mask, image, snr_radius=5)
    assert np.all(np.isfinite(c["signal"]))
    return np.stack([c["y"], c["x"], c["intensity"]], 1)


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |d position| px, max relative |d intensity|); inf when the peak counts differ."""
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if not len(a):
        return 0.0, 0.0
    dpos = float(np.abs(a[:, :2] - b[:, :2]).max())
    dint = float((np.abs(a[:, 2] - b[:, 2]) / np.maximum(np.abs(b[:, 2]), 1e-12)).max())
    return dpos, dint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, nargs="+", default=[1920], help="frame size H [W]")
    ap.add_argument("--peaks", type=int, default=500)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--naive", action="store_true", help="also time the full-frame per-label loop once")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    shape = (args.size[0], args.size[-1])

    env = common.environment()
    common.print_header(env)
    cfg = SynthConfig(shape=shape, n_peaks=(args.peaks, args.peaks))
    rng = np.random.default_rng(args.seed)
    data = []
    for _ in range(args.frames):
        img, lab, true = make_frame(rng, cfg)
        data.append((lab.astype(bool), img, len(true)))
    fill = np.mean([m.mean() for m, _, _ in data])
    print(f"data    : {args.frames} frames {shape[0]}x{shape[1]}, {np.mean([d[2] for d in data]):.0f} peaks/frame, "
          f"mask fill {fill * 100:.2f} %")

    impls = {
        "vitkit": lambda m, i: find_peaks(m, i),
        "vitkit_ndimage": lambda m, i: find_peaks(m, i, method="ndimage"),
        "vitkit_snr": with_snr,
        "loop": find_peaks_loop,
    }
    # correctness first
    refs = [find_peaks_loop(m, i) for m, i, _ in data]
    worst = {}
    for name, fn in impls.items():
        diffs = [compare(fn(m, i), r) for (m, i, _), r in zip(data, refs)]
        worst[name] = (max(d[0] for d in diffs), max(d[1] for d in diffs))
    ok = all(max(w) <= 1e-4 for w in worst.values())

    def runner(fn):
        return lambda: [fn(m, i) for m, i, _ in data]

    times, stats = common.time_interleaved({k: runner(f) for k, f in impls.items()}, warmup=args.warmup,
                                           reps=args.reps)
    label_only = common.time_interleaved(
        {"label": runner(lambda m, i: ndimage.label(m, structure=np.ones((3, 3), dtype=int)))}, warmup=1,
        reps=args.reps)[0]["label"]
    med = {k: common.summarize(v)["median_s"] * 1e3 / args.frames for k, v in times.items()}
    spread = {k: common.summarize(v)["spread"] for k, v in times.items()}
    med_label = common.summarize(label_only)["median_s"] * 1e3 / args.frames

    rows = []
    for k in impls:
        rows.append([k, f"{med[k]:.2f}", f"{spread[k] * 100:.0f} %", f"{med['loop'] / med[k]:.1f}x",
                     f"{worst[k][0]:.1e}", f"{worst[k][1]:.1e}"])
    naive = None
    if args.naive:
        m, i, _ = data[0]
        t0 = time.perf_counter()
        out = find_peaks_naive_loop(m, i)
        naive = (time.perf_counter() - t0) * 1e3
        dn = compare(out, refs[0])
        ok = ok and max(dn) <= 1e-4
        rows.append(["naive_loop (1 run)", f"{naive:.0f}", "-", f"{med['loop'] / naive:.3f}x", f"{dn[0]:.1e}",
                     f"{dn[1]:.1e}"])
    print()
    print(common.format_table(["impl", "ms/frame", "spread", "x loop speed", "max |dpos| px", "max rel |dI|"],
                              rows))
    ratio = med["loop"] / med["vitkit"]
    print(f"\nndimage.label alone: {med_label:.2f} ms/frame (a floor for every ndimage-based method)")
    print(f"discarded calls (other load): {stats['discarded_calls']}, contended kept: "
          f"{stats['contended_calls_kept']}")
    if naive is not None:
        print(f"vitkit vs naive full-frame loop: {naive / med['vitkit']:.0f}x")
    print(f"\nvitkit find_peaks vs loop: {ratio:.1f}x (goal >= {GOAL:.0f}x): {'MET' if ratio >= GOAL else 'NOT MET'}")
    print(f"same peaks to 1e-4: {'yes' if ok else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "env": env, "shape": shape, "frames": args.frames, "mask_fill": fill, "ms_per_frame": med,
            "spread": spread, "label_ms": med_label, "naive_loop_ms": naive, "ratio_vs_loop": ratio,
            "max_diff": worst, "same_peaks": ok}, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
