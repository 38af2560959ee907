"""peakfinder8 (Cheetah / OnDA / psocake's classical Bragg-peak finder) from psana's wheel, as a baseline.

    pip install --no-deps psana      # the wheel carries the compiled extension psana/peakfinder8*.so

psana's package ``__init__`` needs the rest of LCLS-II's software stack; only the extension is loaded here,
straight from its ``.so`` (:func:`load_pf8`), so nothing else of psana is imported.

The extension's function (checked by calling it; Cython ``def`` with positional arguments)::

    peakfinder_8(max_num_peaks, data float32 [SS, FS] C-contiguous, mask int8 [SS, FS] (1 = good),
                 pix_r float32 [SS, FS] (distance to the beam, px), asic_nx, asic_ny, nasics_x, nasics_y,
                 adc_thresh, hitfinder_min_snr, hitfinder_min_pix_count, hitfinder_max_pix_count,
                 hitfinder_local_bg_radius)
    -> (x, y, total_intensity, com_index, npix, max_intensity, sigma, snr)   # 8 lists, one entry per peak

``x`` / ``y`` are the intensity-weighted centre of mass in the array's pixel indices (fast, slow): a single
bright pixel ``[i, j]`` comes back at ``(x, y) = (j, i)``, i.e. NumPy's pixel-centre convention -- the
convention CXI files carry and vitkit uses (measured: ``tests/test_dials.py``). The array is read as
``nasics_y x nasics_x`` ASICs of ``asic_ny x asic_nx``; a peak never crosses an ASIC edge and the background
statistics (mean and sigma per radius ring, iteratively clipped) are gathered over the whole array, per ring of
``pix_r``. So :func:`pf8_find` passes one event at a time as the panel stack ``[P * H, W]`` (each panel an
``a x b`` grid of ASICs) with the radius map from the geometry, as psocake and OnDA feed a detector's slab.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vitkit.apps.peaks.detector import Detector
from vitkit.apps.peaks.metrics import peak_metrics
from vitkit.apps.peaks.peakfind import PEAK_DTYPE

__all__ = ["Pf8Unavailable", "Pf8Params", "load_pf8", "pf8_available", "pf8_find", "pf8_radius_map", "asic_grid",
           "tune_pf8", "DEFAULT_GRID", "per_panel_points"]


class Pf8Unavailable(RuntimeError):
    """psana's peakfinder8 extension is not installed."""


@functools.lru_cache(maxsize=1)
def load_pf8():
    """The ``peakfinder_8`` function of psana's compiled extension, loaded without importing ``psana``."""
    spec = importlib.util.find_spec("psana")  # top-level: finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise Pf8Unavailable("psana is not installed: `pip install --no-deps psana` (its wheel has peakfinder8).")
    sos = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("peakfinder8*.so"))
    if not sos:
        raise Pf8Unavailable(f"no peakfinder8*.so in {list(spec.submodule_search_locations)}: this psana wheel "
                             f"lacks the extension.")
    name = "psana.peakfinder8"  # the extension's init function is PyInit_peakfinder8
    loader = importlib.machinery.ExtensionFileLoader(name, str(sos[0]))
    mod_spec = importlib.util.spec_from_file_location(name, str(sos[0]), loader=loader)
    module = importlib.util.module_from_spec(mod_spec)
    loader.exec_module(module)
    return module.peakfinder_8


def pf8_available() -> tuple[bool, str]:
    try:
        load_pf8()
    except (Pf8Unavailable, ImportError, OSError) as e:
        return False, str(e)
    return True, "psana peakfinder8"


@dataclass(frozen=True)
class Pf8Params:
    """peakfinder8's parameters (psocake's names in brackets), image units = ADU."""

    adc_threshold: float = 10.0
    """[threshold] a peak's brightest pixel must exceed this (ADU above the local background)."""
    minimum_snr: float = 5.0
    """[minSNR] pixels must stand this many ring-sigmas above the ring mean."""
    min_pixel_count: int = 2
    """[minPixCount] smallest peak (pixels)."""
    max_pixel_count: int = 200
    """[maxPixCount] largest peak (pixels)."""
    local_bg_radius: int = 3
    """[localBgRadius] annulus radius (px) of the local background around each peak."""
    min_res: float = 0.0
    """[minRes] ignore pixels closer than this to the beam (px)."""
    max_res: float = 1e9
    """[maxRes] ignore pixels farther than this from the beam (px)."""
    max_num_peaks: int = 2048


def asic_grid(shape: tuple[int, int]) -> tuple[int, int]:
    """ASICs per panel ``(rows, cols)`` of the LCLS detectors (epix10k 2 x 2 of 176 x 192, Jungfrau 2 x 4 of
    256 x 256, CSPAD 2x1 1 x 2 of 185 x 194); 1 x 1 for anything else."""
    return {(352, 384): (2, 2), (512, 1024): (2, 4), (185, 388): (1, 2)}.get(tuple(shape), (1, 1))


_RADIUS: dict[int, tuple[Detector, np.ndarray]] = {}


def pf8_radius_map(detector: Detector) -> np.ndarray:
    """float32 ``[P, H, W]``: each pixel centre's distance from the beam axis in pixels (lab x, y)."""
    hit = _RADIUS.get(id(detector))
    if hit is not None and hit[0] is detector:
        return hit[1]
    r = np.stack([np.hypot(*detector.pixel_xyz(k)[..., :2].transpose(2, 0, 1)) * p.res
                  for k, p in enumerate(detector.panels)]).astype(np.float32)
    _RADIUS[id(detector)] = (detector, r)
    return r


def pf8_find(detector: Detector, event: np.ndarray, good: np.ndarray | None, params: Pf8Params | None = None,
             radius: np.ndarray | None = None) -> np.ndarray:
    """Run peakfinder8 on one event ``[P, H, W]`` (bad pixels: ``good`` False) and return a peak table.

    Returns a structured array of vitkit's ``PEAK_DTYPE`` (panel, panel-local ``fs, ss`` in NumPy's
    pixel-centre convention, slab and lab positions, ``intensity`` = peakfinder8's background-subtracted total
    intensity, ``npix``, ``max_value``).
    """
    pf8 = load_pf8()
    p = params or Pf8Params()
    ev = np.asarray(event, dtype=np.float32)
    if ev.ndim != 3 or detector.stack_shape is None or ev.shape != detector.stack_shape:
        raise ValueError(f"pf8_find: expected one event {detector.stack_shape} for {detector.name}, found {ev.shape}.")
    n_p, h, w = ev.shape
    r = pf8_radius_map(detector) if radius is None else radius
    mask = np.ones(ev.shape, dtype=np.int8) if good is None else np.asarray(good, dtype=np.int8)
    if p.min_res > 0 or p.max_res < 1e8:
        mask = mask * ((r >= p.min_res) & (r <= p.max_res)).astype(np.int8)
    ga, gb = asic_grid((h, w))
    out = pf8(int(p.max_num_peaks), np.ascontiguousarray(ev.reshape(n_p * h, w)),
              np.ascontiguousarray(mask.reshape(n_p * h, w)), np.ascontiguousarray(r.reshape(n_p * h, w)),
              w // gb, h // ga, gb, ga * n_p, float(p.adc_threshold), float(p.minimum_snr), int(p.min_pixel_count),
              int(p.max_pixel_count), int(p.local_bg_radius))
    x, y = np.asarray(out[0], dtype=np.float64), np.asarray(out[1], dtype=np.float64)
    t = np.zeros(len(x), dtype=PEAK_DTYPE)
    if not len(x):
        return t
    panel = np.clip(np.floor((y + 0.5) / h).astype(np.int64), 0, n_p - 1)
    t["panel"] = panel
    t["fs"], t["ss"] = x, y - panel * h
    mins = np.array([[q.min_fs, q.min_ss] for q in detector.panels], dtype=np.float64)
    t["slab_fs"], t["slab_ss"] = t["fs"] + mins[panel, 0], t["ss"] + mins[panel, 1]
    for k in np.unique(panel):
        sel = panel == k
        xyz = detector.lab_xyz(int(k), t["fs"][sel], t["ss"][sel])
        t["x_lab"][sel], t["y_lab"][sel] = xyz[:, 0], xyz[:, 1]
    t["intensity"] = np.asarray(out[2], dtype=np.float64)
    t["npix"] = np.asarray(out[4], dtype=np.float64).astype(np.int32)
    t["max_value"] = np.asarray(out[5], dtype=np.float64)
    return t


# --------------------------------------------------------------------------------------------- tuning
def per_panel_points(table, n_panels: int) -> list[np.ndarray]:
    """Split a peak list (structured with ``panel, fs, ss``, or ``[n, 3]`` ``(panel, fs, ss)``) into per-panel
    ``[n, 2]`` ``(ss, fs)`` arrays -- the frames :func:`vitkit.apps.peaks.metrics.peak_metrics` matches in."""
    if isinstance(table, np.ndarray) and table.dtype.names:
        pan, fs, ss = table["panel"], table["fs"], table["ss"]
    else:
        a = np.asarray(table, dtype=np.float64)
        a = a.reshape(0, 3) if a.size == 0 else a
        pan, fs, ss = a[:, 0], a[:, 1], a[:, 2]
    pan = np.asarray(pan).astype(np.int64)
    return [np.stack([ss[pan == k], fs[pan == k]], axis=1).astype(np.float64) for k in range(n_panels)]


DEFAULT_GRID: dict[str, Sequence[Any]] = {
    "adc_threshold": (2.0, 5.0, 10.0, 20.0, 40.0),
    "minimum_snr": (3.0, 4.0, 5.0, 7.0),
    "min_pixel_count": (1, 2, 3),
    "local_bg_radius": (3, 5),
}


def _events_and_masks(shots_calib) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    events, goods = [], []
    for s in shots_calib:
        if hasattr(s, "images"):
            events.append(np.asarray(s.images, dtype=np.float32))
            goods.append(getattr(s, "good", None))
        else:
            ev, g = s
            events.append(np.asarray(ev, dtype=np.float32))
            goods.append(g)
    return events, goods


def evaluate_pf8(detector: Detector, events, goods, truth, params: Pf8Params, radius: float = 2.0,
                 weak: Sequence | None = None) -> dict[str, Any]:
    """peakfinder8 with ``params`` on ``events`` scored against ``truth`` (per event, panel/fs/ss peak lists):
    peak precision / recall / F1 / centroid RMSE pooled over events, matching per panel within ``radius`` px;
    ``weak``: per event, per panel ``[n, 2]`` ``(ss, fs)`` don't-care reflections (as ``vitkit evaluate``)."""
    n_p = len(detector.panels)
    pred_frames, true_frames = [], []
    t0 = time.perf_counter()
    for ev, g, tr in zip(events, goods, truth):
        found = pf8_find(detector, ev, g, params)
        pred_frames += per_panel_points(found, n_p)
        true_frames += per_panel_points(tr, n_p)
    dt = time.perf_counter() - t0
    ignore = None if weak is None else [w for per_event in weak for w in per_event]
    m = peak_metrics(pred_frames, true_frames, radius=radius, ignore_list=ignore)
    m["seconds_per_event"] = dt / max(len(events), 1)
    return m


def tune_pf8(shots_calib: Iterable, truth: Sequence, grid: dict[str, Sequence[Any]] | None = None,
             detector: Detector | None = None, radius: float = 2.0, base: Pf8Params | None = None,
             log=None, weak: Sequence | None = None) -> tuple[Pf8Params, list[dict[str, Any]]]:
    """Grid search of peakfinder8's parameters maximising peak F1 on a calibration split.

    Args:
        shots_calib: simulated shots (objects with ``images`` ``[P, H, W]`` and ``good``) or ``(event, good)``
            pairs.
        truth: per shot the true peaks (structured ``panel, fs, ss`` or ``[n, 3]`` ``(panel, fs, ss)``).
        grid: parameter name -> values (:class:`Pf8Params` fields); every combination is tried
            (default :data:`DEFAULT_GRID`, 120 combinations).
        detector: the geometry (required).
        radius: matching radius (px), per panel.
        weak: per shot, per panel don't-care reflections (:func:`evaluate_pf8`).
        base: values of the parameters the grid does not name.

    Returns:
        ``(best params, all trials sorted by F1 (best first))``; ties go to higher precision.
    """
    if detector is None:
        raise ValueError("tune_pf8: pass detector= (the geometry of the shots).")
    grid = dict(DEFAULT_GRID if grid is None else grid)
    unknown = set(grid) - set(Pf8Params.__dataclass_fields__)
    if unknown:
        raise ValueError(f"tune_pf8: unknown peakfinder8 parameters {sorted(unknown)}; expected names from "
                         f"{list(Pf8Params.__dataclass_fields__)}.")
    events, goods = _events_and_masks(shots_calib)
    if len(events) != len(truth):
        raise ValueError(f"tune_pf8: {len(events)} calibration shots but {len(truth)} truth lists.")
    base = base or Pf8Params()
    names = list(grid)
    trials = []
    for combo in itertools.product(*(grid[k] for k in names)):
        params = replace(base, **dict(zip(names, combo)))
        m = evaluate_pf8(detector, events, goods, truth, params, radius, weak)
        trials.append({"params": asdict(params), **m})
        if log is not None:
            log(f"  pf8 {dict(zip(names, combo))}: F1 {m['peak_f1']:.3f} (P {m['peak_precision']:.3f}, "
                f"R {m['peak_recall']:.3f})")
    trials.sort(key=lambda t: (-t["peak_f1"], -t["peak_precision"]))
    return Pf8Params(**trials[0]["params"]), trials
