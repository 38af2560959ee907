"""Bragg-peak finding on simulated epix10k2M lattice stills: accuracy, speed per core and DIALS indexing.

    python benchmarks/peakfinding.py                        # 20 test shots, 8 calibration shots
    python benchmarks/peakfinding.py --shots 50 --out bench_out --run runs/peaknet_epix
    python benchmarks/peakfinding.py --no-dials --grid small   # finders only, quick

Data: :func:`vitkit.apps.peaks.lattice.simulate_shot` on the built-in epix10k2M (16 x 352 x 384), default
:class:`LatticeConfig` (P4(3)2(1)2 lysozyme cell, SASE bandwidth, mosaicity, water ring, noise, gains, dead and
hot pixels) with one fixed defect map (``defect_seed``) so that one bad-pixel mask serves the whole run, as at a
beamline. Two disjoint splits from fixed seeds: ``--calib`` calibration shots (seed 1) used only to tune
peakfinder8, and ``--shots`` test shots (seed 2) on which everything is measured.

Finders:

* ``truth``        the simulator's true visible spots (merged within 3 px): the reference for indexing.
* ``peakfinder8``  psana's peakfinder8 (Cheetah's algorithm; benchmarks/pf8.py), its parameters chosen by grid
                   search for the best peak F1 on the calibration split, fed one event at a time as the panel
                   stack with the geometry's radius map and the bad-pixel mask.
* ``vitkit``       :class:`vitkit.apps.peaks.finder.PeakFinder` from a trained run (``--run``); skipped with a
                   message when no run is given or it cannot be loaded.

Per finder: peak precision / recall / F1 and centroid RMSE (px) against the truth, matched one-to-one per panel
within ``--radius`` px (vitkit.apps.peaks.metrics), and how many unmatched peaks sit on simulated reflections
that the truth leaves out as too weak (``min_snr``); frames per second per core (only the finding is timed:
one thread -- ``torch.set_num_threads(1)``, OMP/MKL/OpenBLAS 1 -- median over the test events); and, when DIALS is
installed, the DIALS stills indexing rate (shots indexed with the right cell / shots), the share of shots indexed
with the right orientation (<= 1 degree from the truth), the median orientation error and the rate on "hits"
(shots with >= 10 true peaks) -- see vitkit.apps.peaks.dials. DIALS runs in the system Python with ``--nproc``
processes. The JSON (``--out``/peakfinding.json) holds everything, including the tuned parameters, the tuning
trials and per-shot indexing results.

Measured: see benchmarks/RESULTS.md ("Real detectors"). ``--shots 20 --reps 1`` with the main job's run: tuned
peakfinder8 F1 0.957 (strict 0.892), 12.6 events/s per core; vitkit F1 0.929 (strict 0.789), 0.13 events/s per
core; DIALS indexes 16/20 shots for both (every hit), the truth 15/20.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # one core per finder, set before numpy
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import pf8  # noqa: E402
from vitkit.apps.peaks.detector import builtin_detector  # noqa: E402
from vitkit.apps.peaks.lattice import LatticeConfig, simulate_shot  # noqa: E402
from vitkit.apps.peaks.metrics import peak_metrics  # noqa: E402

CALIB_SEED, TEST_SEED, DEFECT_SEED = 1, 2, 7
HIT_MIN_PEAKS = 10
GRIDS = {
    "default": pf8.DEFAULT_GRID,
    "small": {"adc_threshold": (5.0, 10.0, 20.0), "minimum_snr": (4.0, 5.0, 6.0), "min_pixel_count": (1, 2)},
}


def simulate(n: int, seed: int, cfg: LatticeConfig, detector) -> list:
    rng = np.random.default_rng(seed)
    return [simulate_shot(rng, detector, cfg) for _ in range(n)]


def truth_table(shot) -> np.ndarray:
    """The shot's true peaks as ``[n, 4]`` ``(panel, fs, ss, photons)``."""
    rows = [np.stack([np.full(len(pk), shot.panels[k]), pk[:, 1], pk[:, 0], pk[:, 2]], axis=1)
            for k, pk in enumerate(shot.peaks)]
    return np.concatenate(rows) if rows else np.zeros((0, 4))


def run_hot_mask(events: list, good: np.ndarray, unit: np.ndarray, level: float = 10.0,
                 freq: float = 0.5) -> np.ndarray:
    """Cheetah's automatic hot-pixel mask (``useAutoHotpixel``/``hotpixFreq``) from calibration events: a good pixel
    reading more than ``level`` photons above its panel's median in at least ``freq`` of the events is bad for the
    run. Bragg spots of randomly oriented crystals do not come back to the same pixel shot after shot; stuck and
    hot pixels, single or in clusters, do. Returns the augmented good mask ``[P, H, W]``."""
    hits = np.zeros(good.shape, dtype=np.int32)
    for ev in events:
        med = np.array([np.median(ev[k][good[k]]) if good[k].any() else 0.0 for k in range(len(ev))])
        hits += (ev - med[:, None, None]) > level * unit[:, None, None]
    return good & (hits < freq * len(events))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs (VALUE in YAML) as LatticeConfig keyword arguments; lists become tuples."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in LatticeConfig.__dataclass_fields__:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of LatticeConfig's fields")
        v = yaml.safe_load(value)
        out[key] = tuple(v) if isinstance(v, list) else v
    return out


def score(found: list, truth: list, n_panels: int, radius: float, weak: list | None) -> dict[str, Any]:
    """``vitkit evaluate``'s peak metrics: matched per panel; ``weak`` (per shot, per panel) are don't-care."""
    pred_frames, true_frames = [], []
    for f, t in zip(found, truth):
        pred_frames += pf8.per_panel_points(f, n_panels)
        true_frames += pf8.per_panel_points(t[:, :3], n_panels)
    ignore = None if weak is None else [w for per_shot in weak for w in per_shot]
    return peak_metrics(pred_frames, true_frames, radius=radius, ignore_list=ignore)


def unmatched_on_weak_reflections(found: list, shots: list, truth: list, n_panels: int, radius: float) -> dict:
    """Predicted peaks with no true peak within ``radius`` px, and how many of them sit within ``radius`` of a
    simulated reflection the truth leaves out (below its visibility threshold, ``min_snr``): those are real
    spots, not noise, even though they count as false positives."""
    from scipy.spatial import cKDTree

    n_far = n_weak = 0
    for f, shot, t in zip(found, shots, truth):
        pred = pf8.per_panel_points(f, n_panels)
        true = pf8.per_panel_points(t[:, :3], n_panels)
        refl = shot.reflections[~shot.reflections["visible"]]
        for k in range(n_panels):
            if not len(pred[k]):
                continue
            far = np.ones(len(pred[k]), dtype=bool)
            if len(true[k]):
                far = cKDTree(true[k]).query(pred[k], distance_upper_bound=radius)[0] > radius
            n_far += int(far.sum())
            weak = refl[refl["panel"] == k]
            if far.any() and len(weak):
                d = cKDTree(np.stack([weak["ss"], weak["fs"]], axis=1)).query(pred[k][far],
                                                                               distance_upper_bound=radius)[0]
                n_weak += int((d <= radius).sum())
    return {"unmatched": n_far, "unmatched_on_subthreshold_reflections": n_weak}


def time_finder(fn, events: list, reps: int = 1) -> tuple[list, dict[str, Any]]:
    """Run ``fn(event)`` over the events ``reps`` times; per-event wall times (best of the reps per event)."""
    results, per_event = None, [float("inf")] * len(events)
    fl = common.ForeignLoad()
    fl.start()
    t_all = time.perf_counter()
    for _ in range(reps):
        out = []
        for i, ev in enumerate(events):
            t0 = time.perf_counter()
            out.append(fn(ev))
            per_event[i] = min(per_event[i], time.perf_counter() - t0)
        results = out
    wall = time.perf_counter() - t_all
    med = statistics.median(per_event)
    return results, {"median_s_per_frame": med, "frames_per_s_per_core": 1.0 / med, "total_s": wall,
                     "other_processes_cores": fl.stop(), "reps": reps}


def fmt(v, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, spec)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shots", type=int, default=20, help="test shots (default 20)")
    ap.add_argument("--calib", type=int, default=8, help="calibration shots for tuning peakfinder8 (default 8)")
    ap.add_argument("--out", type=Path, default=Path("peakfinding_out"), help="output directory (JSON, DIALS files)")
    ap.add_argument("--run", type=Path, default=None, help="a trained vitkit run directory (PeakFinder.from_run)")
    ap.add_argument("--model", choices=("auto", "dense", "sparse"), default="auto",
                    help="the run's model: auto = what `vitkit predict` runs without --dense/--sparse (default)")
    ap.add_argument("--radius", type=float, default=2.0, help="peak matching radius, px (default 2.0, as vitkit "
                                                               "evaluate)")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="default", help="peakfinder8 tuning grid")
    ap.add_argument("--nproc", type=int, default=2, help="DIALS worker processes (default 2)")
    ap.add_argument("--reps", type=int, default=2, help="timing repetitions per event (best kept; default 2)")
    ap.add_argument("--no-dials", action="store_true", help="skip the DIALS indexing")
    ap.add_argument("--no-hot-mask", action="store_true",
                    help="skip the rows with a run hot-pixel mask (Cheetah's automatic one, from the calibration "
                         "shots) added to both finders")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="LatticeConfig override for calibration and test shots (repeatable), e.g. "
                         "--set intensity_scale=[5,300]; values are YAML")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    env = common.environment()
    common.print_header(env)
    det = builtin_detector("epix10k2m")
    cfg = LatticeConfig(defect_seed=DEFECT_SEED, **parse_overrides(args.set))
    n_p = len(det.panels)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    calib = simulate(args.calib, CALIB_SEED, cfg, det)
    test = simulate(args.shots, TEST_SEED, cfg, det)
    print(f"simulated {len(calib)} calibration + {len(test)} test shots in {time.perf_counter() - t0:.1f} s "
          f"(test: {sum(len(truth_table(s)) for s in test)} true peaks, "
          f"{sum(len(truth_table(s)) >= HIT_MIN_PEAKS for s in test)} hits with >= {HIT_MIN_PEAKS})")
    truth_calib = [truth_table(s) for s in calib]
    truth_test = [truth_table(s) for s in test]
    weak_calib = [s.weak(cfg.weak_snr) for s in calib]  # real reflections below min_snr: don't-care
    weak_test = [s.weak(cfg.weak_snr) for s in test]
    events = [s.images for s in test]
    good = test[0].good
    same_mask = all(np.array_equal(s.good, good) for s in test)

    hot_good = None
    if not args.no_hot_mask:
        unit = det.photon_adu()
        hot_good = run_hot_mask([s.images for s in calib], good, np.ones(n_p) if unit is None else unit)
        print(f"run hot-pixel mask from the {len(calib)} calibration shots: {int((good & ~hot_good).sum())} more "
              f"bad pixels ({int((~good).sum())} in the supplied mask)")
    finders: dict[str, dict[str, Any]] = {}
    found: dict[str, list] = {}
    finders["truth"] = {"status": "ok", "note": "the simulator's true visible spots"}
    found["truth"] = truth_test

    # ---- peakfinder8
    ok, why = pf8.pf8_available()
    if ok:
        t0 = time.perf_counter()
        grid = GRIDS[args.grid]
        best, trials = pf8.tune_pf8(calib, truth_calib, grid, detector=det, radius=args.radius, weak=weak_calib)
        print(f"peakfinder8 tuned on {len(calib)} calibration shots ({len(trials)} settings, "
              f"{time.perf_counter() - t0:.0f} s): {best}  calibration F1 {trials[0]['peak_f1']:.3f}")
        pf8.pf8_find(det, events[0], good, best)  # warm-up (builds the radius map once, outside the timing)
        res, timing = time_finder(lambda ev: pf8.pf8_find(det, ev, good, best), events, reps=args.reps)
        finders["peakfinder8"] = {"status": "ok", "params": best.__dict__, "tuning_grid": {k: list(v) for k, v in
                                                                                          grid.items()},
                                  "tuning_trials": trials, "timing": timing}
        found["peakfinder8"] = res
        if hot_good is not None:
            calib_hot = [(s.images, hot_good) for s in calib]
            best_h, trials_h = pf8.tune_pf8(calib_hot, truth_calib, grid, detector=det, radius=args.radius,
                                            weak=weak_calib)
            print(f"peakfinder8 + run hot mask tuned: {best_h}  calibration F1 {trials_h[0]['peak_f1']:.3f}")
            res, timing = time_finder(lambda ev: pf8.pf8_find(det, ev, hot_good, best_h), events, reps=args.reps)
            finders["peakfinder8 + hot mask"] = {"status": "ok", "params": best_h.__dict__, "timing": timing,
                                                 "tuning_trials": trials_h[:10]}
            found["peakfinder8 + hot mask"] = res
    else:
        finders["peakfinder8"] = {"status": f"skipped: {why}"}
        print(f"peakfinder8 skipped: {why}")

    # ---- vitkit
    if args.run is None:
        finders["vitkit"] = {"status": "skipped: no --run given (a trained run directory)"}
        print("vitkit PeakFinder skipped: pass --run RUN_DIR (a `vitkit train` run) to measure it")
    else:
        try:
            from vitkit.apps.peaks.finder import PeakFinder, choose_sparse

            sparse, why = choose_sparse(args.run, {"auto": None, "dense": False, "sparse": True}[args.model])
            print(f"vitkit PeakFinder: {why}")
            finder = PeakFinder.from_run(args.run, geometry=det, mask=good, sparse=sparse)
        except Exception as e:  # noqa: BLE001 - report why and go on with the others
            finders["vitkit"] = {"status": f"skipped: cannot load {args.run}: {type(e).__name__}: {e}"}
            print(f"vitkit PeakFinder skipped: cannot load {args.run}: {type(e).__name__}: {e}")
        else:
            finder(events[0][None])  # warm-up
            res, timing = time_finder(lambda ev: finder(ev[None])[0], events, reps=args.reps)
            finders["vitkit"] = {"status": "ok", "run": str(args.run), "model": why, "timing": timing}
            found["vitkit"] = res
            if hot_good is not None:
                finder_h = PeakFinder.from_run(args.run, geometry=det, mask=hot_good, sparse=sparse)
                res, timing = time_finder(lambda ev: finder_h(ev[None])[0], events, reps=args.reps)
                finders["vitkit + hot mask"] = {"status": "ok", "run": str(args.run), "timing": timing}
                found["vitkit + hot mask"] = res

    for name, tabs in found.items():
        finders[name]["peaks"] = score(tabs, truth_test, n_p, args.radius, weak_test)
        finders[name]["peaks_strict"] = score(tabs, truth_test, n_p, args.radius, None)  # weak spots count as FP
        finders[name]["peaks"].update(unmatched_on_weak_reflections(tabs, test, truth_test, n_p, args.radius))

    # ---- DIALS indexing
    dials_doc: dict[str, Any] = {}
    if args.no_dials:
        dials_doc["status"] = "skipped: --no-dials"
    else:
        from vitkit.apps.peaks import dials as vd

        ok, why = vd.dials_available()
        if not ok:
            dials_doc["status"] = f"skipped: {why}"
            print(f"DIALS indexing skipped: {why}")
        else:
            dials_doc.update(status="ok", version=why, phil=list(vd.DEFAULT_PHIL), indexer="stills")
            hits = np.array([len(t) >= HIT_MIN_PEAKS for t in truth_test])
            for name, tabs in found.items():
                t0 = time.perf_counter()
                res = vd.index_stills(det, tabs, cfg.cell, cfg.space_group, args.out / f"dials_{name}",
                                      true_orientations=[s.a_star for s in test],
                                      wavelength=[s.wavelength for s in test], nproc=args.nproc)
                summ = vd.indexing_summary(res)
                summ["hits"] = int(hits.sum())
                summ["indexing_rate_hits"] = (float(np.mean([r["correct_cell"] for r, h in zip(res, hits) if h]))
                                              if hits.any() else float("nan"))
                summ["seconds"] = time.perf_counter() - t0
                finders[name]["dials"] = summ
                finders[name]["dials_per_shot"] = [{k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                                    for k, v in r.items()} for r in res]
                print(f"DIALS {name}: {summ['indexed_right_cell']}/{summ['shots']} indexed with the right cell, "
                      f"median orientation error {fmt(summ.get('median_orientation_error_deg'), '.3f')} deg "
                      f"({summ['seconds']:.0f} s)")

    # ---- report
    headers = ["finder", "precision", "recall", "F1", "F1 strict", "RMSE px", "frames/s/core", "DIALS rate",
               "rate (hits)", "orient. ok", "median err deg"]
    rows, notes = [], []
    for name, d in finders.items():
        if d.get("status") != "ok":
            rows.append([name] + ["-"] * (len(headers) - 1))
            notes.append(f"{name}: {d['status']}")
            continue
        m, dl, tm = d["peaks"], d.get("dials", {}), d.get("timing", {})
        rows.append([name, fmt(m["peak_precision"]), fmt(m["peak_recall"]), fmt(m["peak_f1"]),
                     fmt(d["peaks_strict"]["peak_f1"]), fmt(m["centroid_rmse_px"]),
                     fmt(tm.get("frames_per_s_per_core"), ".1f"),
                     fmt(dl.get("indexing_rate")), fmt(dl.get("indexing_rate_hits")),
                     fmt(dl.get("correct_orientation_rate")), fmt(dl.get("median_orientation_error_deg"), ".3f")])
    print()
    print(common.format_table(headers, rows))
    for name, d in finders.items():
        m = d.get("peaks")
        if m and m["unmatched"]:
            notes.append(f"{name}: {m['unmatched']} peaks with no true peak within {args.radius} px, "
                         f"{m['unmatched_on_subthreshold_reflections']} of them on a simulated reflection below the "
                         f"truth's visibility threshold (real, weak spots)")
    if dials_doc.get("status", "").startswith("skipped"):
        notes.append(f"DIALS: {dials_doc['status']}")
    for note in notes:
        print(note)
    doc = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
           "data": {"detector": "epix10k2m", "config": {k: str(v) for k, v in cfg.__dict__.items()},
                    "calib_seed": CALIB_SEED, "test_seed": TEST_SEED, "calib_shots": len(calib),
                    "test_shots": len(test), "true_peaks": int(sum(len(t) for t in truth_test)),
                    "one_mask_for_all_shots": bool(same_mask)},
           "dials": dials_doc, "finders": finders}
    common.write_json(args.out / "peakfinding.json", doc)
    return doc


if __name__ == "__main__":
    main()
