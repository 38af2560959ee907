"""Peak finding on detector events: the one inference path of the peaks app.

``PeakFinder`` takes events as they come off a detector -- psana panel stacks ``[P, H, W]`` (or batches
``[N, P, H, W]``), CrystFEL slabs ``[SS, FS]``, or plain single-panel frames -- and returns one typed peak
table per event. Every panel goes through the model as it is (no padding of 16 panels into one image):
the panels of all events in a call are normalised one by one (:func:`vitkit.tasks.transforms.robust_normalise`
over their good pixels), tiled into the model's window and batched together. A bad pixel (the mask, the
geometry's bad regions) is zero in the model input, is never part of a peak and never enters a centroid or
an intensity; a peak never spans two panels.

Peak tables are NumPy structured arrays of :data:`PEAK_DTYPE`:

=============== ===================================================================================
``panel``       panel index (the detector's panel order; psana stack index for built-in layouts)
``fs``, ``ss``  panel-local position, NumPy pixel-centre convention (pixel ``[i, j]`` centre = ``(i, j)``)
``slab_fs``,    position in the CrystFEL slab (``panel min_fs/min_ss`` + panel-local): what CXI's
``slab_ss``     ``peakXPosRaw`` / ``peakYPosRaw`` hold
``x_lab``,      lab-frame position in metres (CrystFEL's frame: beam along +z through (0, 0); the half
``y_lab``       pixel of CrystFEL's corner convention applied). NaN when no geometry was given
``intensity``   sum of the raw pixel values over the peak's pixels (ADU, no background subtraction)
``npix``        number of pixels in the peak
``max_value``   brightest raw pixel of the peak
=============== ===================================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.apps.peaks.detector import Detector, DetectorShapeError, load_detector
from vitkit.apps.peaks.peakfind import LONE_PIXEL_RATIO, PEAK_DTYPE, SNR_RADIUS, empty_peaks, measure_components
from vitkit.errors import CheckpointError, CheckpointNotFoundError, ConfigError, InputError
from vitkit.weights.io import read_json

__all__ = ["PEAK_DTYPE", "PeakFinder", "empty_peaks", "load_model", "read_mask", "bad_region_mask",
           "EventSource", "event_peaks", "event_good", "run_geometry", "MERGE_RADIUS"]

MERGE_RADIUS = 3.0
"""Peaks closer than this (px) are one peak (:func:`merge_close`); the simulator's truth merges alike."""

MODEL_CONFIG_KEY = "vitkit_model_config"


# ------------------------------------------------------------------------------------------- model
def load_model(checkpoint: str | Path, bf16: bool = False):
    """An EoMT from a training run: a run directory, a Lightning ``.ckpt`` or an exported model dir. ``bf16``:
    weights cast once to bfloat16 for inference (:func:`vitkit.layers.precision.cast_for_inference`: norms,
    positions and softmax stay fp32; masks then differ slightly from fp32)."""
    model = _load_model(checkpoint)
    if bf16:
        from vitkit.layers.precision import cast_for_inference

        cast_for_inference(model, torch.bfloat16)
    return model


def _load_model(checkpoint: str | Path):
    from hydra.utils import instantiate

    from vitkit.models.eomt import EoMT
    from vitkit.tasks.train.distributed import is_sharded_checkpoint, load_full_state_dict
    from vitkit.weights.io import read_checkpoint

    path = Path(checkpoint)
    if path.is_dir() and (path / "model" / "config.json").exists():
        return EoMT.from_pretrained(path / "model")
    if path.is_dir() and (path / "config.json").exists():
        return EoMT.from_pretrained(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        path = path / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {checkpoint}: pass a run directory, a .ckpt file or a "
                                      f"model directory written by vitkit")
    if is_sharded_checkpoint(path):  # FSDP: a directory of shards
        ckpt = load_full_state_dict(path)
    else:
        ckpt = read_checkpoint(path)[0]
    if not isinstance(ckpt, dict) or MODEL_CONFIG_KEY not in ckpt:
        raise CheckpointError(f"{path} was not written by `vitkit train` (no {MODEL_CONFIG_KEY})")
    cfg = dict(ckpt[MODEL_CONFIG_KEY])
    cfg["pretrained"] = False  # the checkpoint carries the trained weights
    model = instantiate(cfg)
    sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(sd, strict=True)
    return model.eval()


def sparse_of_run(run: str | Path) -> tuple[Path, float]:
    """``(model directory, threshold)`` of a run's sparse-token finder: ``sparse_model/`` and ``sparse.json``, which
    ``vitkit train`` writes (:mod:`vitkit.apps.peaks.sparse`)."""
    path = Path(run)
    model_dir, stats = path / "sparse_model", path / "sparse.json"
    if not (model_dir / "config.json").exists() or not stats.exists():
        raise CheckpointNotFoundError(f"{run} has no sparse-token model ({model_dir.name}/ and {stats.name}): sparse "
                                      f"inference needs a run directory of `vitkit train` with sparse.fit on")
    threshold = read_json(stats).get("threshold")
    if not isinstance(threshold, (int, float)):
        raise CheckpointError(f"{stats} has no numeric 'threshold' (found {threshold!r}); re-run vitkit train")
    return model_dir, float(threshold)


def choose_sparse(run: str | Path, sparse: bool | None = None, device: str | torch.device = "cpu"
                  ) -> tuple[bool, str]:
    """``(use the run's sparse-token model, why)``: what ``vitkit predict``/``evaluate``, the stream and
    :meth:`PeakFinder.from_run` run. ``sparse`` True or False is the caller's choice (``--sparse`` / ``--dense``);
    None decides by the run's own evidence: the sparse-token model when ``vitkit train`` found it held the accuracy
    on the run's held-out frames (``sparse.json``'s ``default``: its peak F1 within ``sparse.max_f1_drop`` of the
    dense model's) and the model runs on a CPU. On a GPU the dense path is the default: the sparse path's many small
    kernels are not faster there until captured in a CUDA graph (docs/gpu.md). A checkpoint file or an exported model
    directory (not a run directory) is that model: dense unless ``sparse`` is True."""
    if sparse is not None:
        return bool(sparse), ("sparse-token model (asked for: --sparse, model.sparse=true)" if sparse
                              else "dense model (asked for: --dense, model.sparse=false)")
    stats = Path(run) / "sparse.json"
    if not stats.is_file():
        return False, "dense model (the run has no sparse-token model)"
    held = read_json(stats).get("held_out")
    if held is None:
        return False, (f"dense model ({stats} has no held-out comparison: a run from before sparse-token models were "
                       "checked, or one without held-out frames; --sparse or model.sparse=true uses it anyway)")
    if not (isinstance(held, dict) and isinstance(held.get("default"), bool)
            and all(isinstance(held.get(k), (int, float)) for k in ("dense_peak_f1", "sparse_peak_f1"))):
        raise CheckpointError(f"{stats}: 'held_out' needs 'default' (true or false), 'dense_peak_f1' and "
                              f"'sparse_peak_f1' (numbers); found {held!r}")
    f1 = f"held-out peak F1 {held['sparse_peak_f1']:.4f} vs dense {held['dense_peak_f1']:.4f}"
    if not held["default"]:
        return False, (f"dense model (the sparse-token model lost accuracy: {f1}; --sparse or model.sparse=true "
                       "uses it anyway)")
    if torch.device(device).type != "cpu":
        return False, f"dense model (on {device}; --sparse or model.sparse=true for the sparse-token model, {f1})"
    return True, f"sparse-token model ({f1}; --dense or model.sparse=false for the dense model)"


def run_geometry(checkpoint: str | Path) -> Path | None:
    """The ``detector.geom`` a training run wrote beside its checkpoints (None if it has none)."""
    path = Path(checkpoint)
    for cand in (path, path.parent, path.parent.parent):
        if (cand / "detector.geom").exists():
            return cand / "detector.geom"
    return None


# ------------------------------------------------------------------------------------------- masks
def bad_region_mask(detector: Detector) -> np.ndarray:
    """Good-pixel mask ``[P, H, W]`` (True = good) of the geometry's bad regions (``badNAME/...``)."""
    stack = detector.stack_shape
    good = np.ones(stack, dtype=bool)
    for r in detector.bad_regions:
        if r.min_fs is not None:
            for k, p in enumerate(detector.panels):
                if r.panel is not None and r.panel != p.name:
                    continue
                f0, f1 = max(r.min_fs, p.min_fs), min(r.max_fs, p.max_fs)
                s0, s1 = max(r.min_ss, p.min_ss), min(r.max_ss, p.max_ss)
                if f0 <= f1 and s0 <= s1:
                    good[k, s0 - p.min_ss:s1 - p.min_ss + 1, f0 - p.min_fs:f1 - p.min_fs + 1] = False
        else:
            for k, p in enumerate(detector.panels):
                if r.panel is not None and r.panel != p.name:
                    continue
                xyz = detector.pixel_xyz(k) * p.res  # lab pixels
                inside = ((xyz[..., 0] >= r.min_x) & (xyz[..., 0] <= r.max_x) & (xyz[..., 1] >= r.min_y)
                          & (xyz[..., 1] <= r.max_y))
                good[k] &= ~inside
    return good


def _read_array(path: str, key: str | None) -> np.ndarray:
    """A whole array from .npy / HDF5 / zarr (errors name the file)."""
    from vitkit.apps.peaks.io import FramesNotFoundError, H5Source, NpySource, ZarrSource, _kind

    if not os.path.exists(path):
        raise FramesNotFoundError(f"mask file {path} does not exist.")
    kind = _kind(path)
    if kind == "npy":
        return np.asarray(NpySource._load(path))
    if kind == "hdf5":
        src = H5Source.__new__(H5Source)
        src.path, src._file, src._pid = path, None, None
        f = src._open()
        try:
            names = src._datasets(f)
            if key is None:
                known = ("/data/data", "/mask", "/data", "/entry_1/data_1/mask")
                key = next((k for k in known if k.lstrip("/") in names), names[0] if len(names) == 1 else None)
            if key is None or key.lstrip("/") not in names:
                from vitkit.apps.peaks.io import DatasetKeyError

                raise DatasetKeyError(f"{path}: no mask dataset {key!r}; the file has {src._listing(f, names)}. "
                                      f"Pass --mask-key <dataset>.", names)
            return np.asarray(f[key][()])
        finally:
            src.close()
    if kind == "zarr":
        src = ZarrSource.__new__(ZarrSource)
        src.path, src._group, src._pid = path, None, None
        g = src._open()
        names = src._names(g)
        key = key or ("mask" if "mask" in names else (names[0] if len(names) == 1 else None))
        if key is None or key not in names:
            from vitkit.apps.peaks.io import DatasetKeyError

            raise DatasetKeyError(f"{path}: no mask array {key!r}; the store has {names}.", names)
        return np.asarray(g[key][...])
    raise InputError(f"{path}: a mask must be .npy, HDF5 or zarr, found a {kind} file.")


def read_mask(path: str | os.PathLike, detector: Detector, key: str | None = None, good_bits: int | None = None,
              bad_bits: int | None = None) -> np.ndarray:
    """A bad-pixel mask file as a good-pixel mask ``[P, H, W]`` (True = good), in stack or slab layout.

    Which values mean good: with neither ``good_bits`` nor ``bad_bits`` (psana, psocake, Cheetah's
    ``pixelmask`` convention) non-zero = good, 0 = bad. Otherwise CrystFEL's rule: a pixel is good when all
    ``good_bits`` are set and none of ``bad_bits`` is (``mask_good = 0x0000``, ``mask_bad = 0xffff``: 0 = good).
    The geometry's ``mask_good`` / ``mask_bad`` are used when the arguments are None and it has them.
    """
    path = os.fspath(path)
    a = _read_array(path, key)
    if good_bits is None and bad_bits is None:
        good_bits, bad_bits = detector.mask_good, detector.mask_bad
    if a.dtype == bool:
        good = a if not bad_bits else ~a
    elif good_bits is None and bad_bits is None:
        good = a != 0
    else:
        if not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"{path}: mask bits (good {good_bits}, bad {bad_bits}) need an integer mask, found "
                             f"{a.dtype}.")
        g = int(good_bits or 0)
        good = ((a & g) == g) & ((a & int(bad_bits or 0)) == 0)
    try:
        return detector.to_panels(good, f"mask {path}")[0]
    except DetectorShapeError as e:
        raise DetectorShapeError(f"{e} A mask has one value per pixel of one event.") from None


# ------------------------------------------------------------------------------------------- events
class EventSource:
    """Detector events ``[P, H, W]`` float32 from a :class:`~vitkit.apps.peaks.io.FrameSource` of stacks
    ``(N, P, H, W)``, slabs ``(N, SS, FS)`` or one stack ``(P, H, W)``, checked against ``detector``.

    Non-finite pixels are allowed on bad pixels (``good`` False, where psana may write NaN); anywhere else
    they raise :class:`~vitkit.apps.peaks.io.NaNFrameError` naming the file and the event.
    """

    def __init__(self, frames, detector: Detector, good: np.ndarray | None = None):
        from vitkit.apps.peaks.io import FramesNotFoundError

        self.frames, self.detector, self.good = frames, detector, good
        self.path = frames.path
        if len(frames) == 0:
            raise FramesNotFoundError(f"{self.path}: the file holds no frames; expected detector events.")
        fshape = tuple(frames.frame_shape or ())
        stack, slab = detector.stack_shape, detector.slab_shape
        self.single_stack = len(fshape) == 2 and (len(frames), *fshape) == stack and fshape != slab
        ok = (len(fshape) == 3 and fshape == stack) or (len(fshape) == 2 and fshape == slab) or self.single_stack
        if not ok:
            n = "N" if len(frames) != 1 else "1"
            raise DetectorShapeError(
                f"{self.path}: frames of shape {fshape} ({len(frames)} of them) do not fit the detector "
                f"{detector._where()}: expected [{n}, {', '.join(map(str, stack))}] panel stacks or "
                f"[{n}, {slab[0]}, {slab[1]}] slabs. Check --geometry (it describes "
                f"{len(detector)} panels of {stack[1]} x {stack[2]}).")
        frames.check_finite = False  # checked here, against the good pixels
        for part in getattr(frames, "sources", []):
            part.check_finite = False

    def __len__(self) -> int:
        return 1 if self.single_stack else len(self.frames)

    def describe(self, i: int) -> str:
        return self.path if self.single_stack else self.frames.describe(i)

    def __getitem__(self, i: int) -> np.ndarray:
        from vitkit.apps.peaks.io import NaNFrameError

        raw = self.frames[:] if self.single_stack else self.frames[i]
        ev = self.detector.to_panels(raw, self.describe(i))[0].astype(np.float32, copy=False)
        bad = ~np.isfinite(ev)
        if bad.any():
            unmasked = bad if self.good is None else bad & self.good
            if unmasked.any():
                raise NaNFrameError(
                    f"{self.describe(i)} has {int(unmasked.sum())} NaN/inf pixel(s) on good pixels (of {ev.size}, "
                    f"shape {ev.shape}); expected finite values. Mask them (--mask) or replace them.", frame=i)
            ev = np.where(bad, 0.0, ev).astype(np.float32)
        return ev


# ------------------------------------------------------------------------------------------- peaks
def merge_close(c: dict[str, np.ndarray], radius: float) -> dict[str, np.ndarray]:
    """Merge components (:func:`~vitkit.apps.peaks.peakfind.measure_components` output) whose centroids lie
    closer than ``radius`` px, transitively: one peak with summed intensity and pixels, the brightest pixel and
    the intensity-weighted centroid (one spot cut in two by noise or a streak is one peak, as the simulator's
    truth merges reflections closer than its ``min_separation``)."""
    n = len(c["y"])
    if radius <= 0 or n < 2:
        return c
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pairs = cKDTree(np.stack([c["y"], c["x"]], 1)).query_pairs(radius, output_type="ndarray")
    if not len(pairs):
        return c
    _, group = connected_components(coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)),
                                    directed=False)
    _, first = np.unique(group, return_index=True)
    order = np.argsort(first)  # groups in the order of their first component (raster order kept)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    g = rank[group]
    m = len(order)
    w = np.maximum(c["intensity"], 0.0) + 1e-12
    sw = np.bincount(g, w, minlength=m)
    out = {"y": np.bincount(g, w * c["y"], minlength=m) / sw, "x": np.bincount(g, w * c["x"], minlength=m) / sw,
           "intensity": np.bincount(g, c["intensity"], minlength=m),
           "npix": np.bincount(g, c["npix"], minlength=m).astype(np.int64)}
    for name in ("signal", "noise2"):  # photometry (measure_components' snr_radius): sums too
        if name in c:
            out[name] = np.bincount(g, c[name], minlength=m)
    mx = np.full(m, -np.inf)
    np.maximum.at(mx, g, c["max_value"])
    out["max_value"] = mx
    return out


def event_peaks(detector: Detector | None, event: np.ndarray, mask: np.ndarray, min_pixels: int = 1,
                max_peaks: int | None = 2048, min_peaks: int = 0, good: np.ndarray | None = None,
                merge_radius: float = 0.0, min_snr: float | None = None) -> np.ndarray:
    """Peak table of one event from its peak mask ``[P, H, W]`` (already AND-ed with the good pixels):
    8-connected components per panel, intensity-weighted centroids and sums on the raw event, components
    closer than ``merge_radius`` px merged (:func:`merge_close`), each with its photometric ``snr``
    (:func:`~vitkit.apps.peaks.peakfind.local_signal`: against the local background or the brightest line
    through the peak, in photons when the detector gives ``adu_per_photon``); peaks below ``min_snr`` are
    dropped (None: none). With ``good`` (``[P, H, W]``, True = good), a peak whose centroid falls on a bad
    pixel is dropped: its own pixels are good, but the place it reports is not."""
    unit = None if detector is None else detector.photon_adu()
    parts = []
    for k in range(event.shape[0]):
        c = merge_close(measure_components(mask[k], event[k], min_pixels=min_pixels,
                                           good=None if good is None else good[k],
                                           unit=None if unit is None else float(unit[k]), snr_radius=SNR_RADIUS),
                        merge_radius)
        sig, n2 = c.pop("signal"), c.pop("noise2")
        with np.errstate(divide="ignore", invalid="ignore"):  # noise-free data: an infinite SNR
            c["snr"] = np.where(n2 > 0, sig / np.sqrt(n2), np.sign(sig) * np.inf)
        keep = np.ones(len(c["y"]), dtype=bool)
        if min_snr is not None:
            keep &= c["snr"] >= min_snr
        if good is not None and len(c["y"]):
            h, w = good.shape[-2:]
            keep &= good[k, np.clip(np.rint(c["y"]).astype(np.int64), 0, h - 1),
                         np.clip(np.rint(c["x"]).astype(np.int64), 0, w - 1)]
        c = {name: v[keep] for name, v in c.items()}
        t = empty_peaks(len(c["y"]))
        t["panel"], t["fs"], t["ss"] = k, c["x"], c["y"]
        t["intensity"], t["npix"], t["max_value"], t["snr"] = c["intensity"], c["npix"], c["max_value"], c["snr"]
        if detector is not None:
            p = detector.panels[k]
            t["slab_fs"], t["slab_ss"] = t["fs"] + p.min_fs, t["ss"] + p.min_ss
            xyz = detector.lab_xyz(k, t["fs"], t["ss"])
            t["x_lab"], t["y_lab"] = xyz[:, 0], xyz[:, 1]
        else:
            t["slab_fs"], t["slab_ss"] = t["fs"], t["ss"]
            t["x_lab"] = t["y_lab"] = np.nan
        parts.append(t)
    table = np.concatenate(parts) if parts else empty_peaks()
    if len(table) < min_peaks:
        return table[:0]
    if max_peaks is not None and len(table) > max_peaks:
        table = table[np.sort(np.argsort(-table["intensity"], kind="stable")[:max_peaks])]
    return table


def event_good(event: np.ndarray, good: np.ndarray | None, unit=None,
               lone_pixel_ratio: float = LONE_PIXEL_RATIO) -> np.ndarray:
    """Good pixels ``[P, H, W]`` of one event: ``good`` (None: all) without the event's lone pixels (hot pixels
    the mask missed, zingers; :func:`~vitkit.apps.peaks.peakfind.lone_pixels`); ``unit``: one photon in ADU
    per panel ``[P]`` or None."""
    from vitkit.apps.peaks.peakfind import lone_pixels

    g = np.ones(event.shape, dtype=bool) if good is None else np.array(good, dtype=bool)
    for k in range(event.shape[0]):
        g[k] &= ~lone_pixels(event[k], g[k], lone_pixel_ratio, None if unit is None else unit[k])
    return g


def _check_model(model) -> None:
    """A peak finder's model must have a peak class: class 0 is the background, class 1 the peak."""
    n = getattr(model, "num_classes", None)
    if model is not None and n is not None and n < 2:
        raise ConfigError(f"PeakFinder: the model has num_classes={n}, so no peak class; a peak-finding model "
                          f"needs num_classes >= 2 (class 0 background, class 1 peak).")


class PeakFinder:
    """A trained model plus a detector: events in, peak tables out.

    Args:
        model: a trained :class:`vitkit.EoMT` (eval mode is set); None: a finder that only extracts peaks from
            masks it is given (:meth:`peaks`), e.g. in a worker beside the one that runs the model.
        detector: a :class:`Detector`, a ``.geom`` path or a built-in name; None: each event is a single
            panel of whatever shape it has (lab coordinates NaN).
        good: good-pixel mask ``[P, H, W]`` (True = good; any layout :meth:`Detector.to_panels` accepts) or a
            mask file path (:func:`read_mask`); the geometry's bad regions are always applied.
        device: torch device of the model.
        overlap: sliding-window overlap inside a panel; batch_size: windows per forward pass.
        min_pixels, min_peaks, max_peaks: peak filters (per peak; per event: fewer than ``min_peaks`` -> none,
            more than ``max_peaks`` -> the brightest).
        merge_radius: components whose centroids are closer than this (px) are one peak (:func:`merge_close`).
        threshold: peak pixels (cores) are where the peak class's share of the class probabilities exceeds
            this (0.5: the peak class wins; default 0.6).
        min_snr: a peak's photometric SNR must reach this (None: no test): its pixels grown by one, against the
            larger of the local background and the background along the brightest line through it (a jet
            streak, a common-mode row; :func:`event_peaks`). The model says *where* peaks are and what is not
            one (rings, defects, most of a streak); the SNR decides the faint ones at the visibility limit,
            where the model's cores shrink to one or two pixels: a ``min_pixels`` cut lost them (86 of 107
            misses on 24 epix10k2M shots) and this test keeps them. The defaults (``min_pixels`` 1, ``min_snr``
            5.5, lone hot clusters masked) were chosen on simulated shots outside every training and held-out
            split (seeds 5 and 7, 24 shots each) with two trained models: F1 0.948 / 0.967 and 0.960 / 0.972,
            against 0.910 / 0.944 and 0.899 / 0.947 for ``min_pixels`` 3 without an SNR test (5: 0.944 /
            0.966 and 0.959 / 0.972; 6: 0.946 / 0.964 and 0.957 / 0.969; the local background alone, 6: 0.926
            / 0.957 and 0.948 / 0.961).
        hysteresis: each peak core then grows into the pixels connected to it whose peak share exceeds
            ``hysteresis`` (Canny's hysteresis), so a streak the model is less sure of in its middle stays one
            peak. None: no growing.
        lone_pixel_ratio: pixels bright on their own (unmasked hot pixels, zingers;
            :func:`~vitkit.apps.peaks.peakfind.lone_pixels`) are bad pixels of the event; None: no such check.
            Training applies the same rule (the data module), so the model never sees them.
        sparse_threshold: sparse-token inference (:func:`~vitkit.tasks.postprocess.sparse_semantic_inference`):
            only patch tokens whose :func:`~vitkit.apps.peaks.sparse.spot_evidence` exceeds this go through the
            model (EoMT's :meth:`~vitkit.EoMT.forward_sparse`); for a model fine-tuned for it and the threshold
            fitted with it (``vitkit train`` writes both: :meth:`from_run` with ``sparse=True``). None: dense.
            ``kept_tokens`` counts ``[kept, all]`` patch tokens over the finder's life.

    Non-finite pixels (NaN, inf) of an event are bad pixels of that event, like masked ones: excluded from the
    normalisation, zero in the model input, never part of a peak, a centroid or an intensity. The rest of the
    panel is processed as usual. An empty batch of events (``[0, P, H, W]``) gives empty masks and no tables; a
    panel without pixels (``H`` or ``W`` 0) is an :class:`~vitkit.errors.InputError`.

    Raises:
        ConfigError: the model has no peak class (``num_classes < 2``: class 0 is the background, 1 the peak).

    Usage::

        finder = PeakFinder.from_run("runs/x", geometry="det.geom", mask="mask.h5")
        for event in events:                      # [P, H, W] from psana, a file, a socket
            peaks = finder(event)[0]              # structured array: panel, fs, ss, x_lab, y_lab, intensity...
    """

    def __init__(self, model, detector=None, good=None, device: str | torch.device = "cpu", overlap: float = 0.25,
                 batch_size: int = 32, min_pixels: int = 1, min_peaks: int = 0, max_peaks: int | None = 2048,
                 merge_radius: float = MERGE_RADIUS, threshold: float = 0.6, hysteresis: float | None = 0.25,
                 lone_pixel_ratio: float | None = LONE_PIXEL_RATIO, sparse_threshold: float | None = None,
                 min_snr: float | None = 5.5):
        _check_model(model)
        self.sparse_threshold, self.kept_tokens = sparse_threshold, [0, 0]
        self.model = None if model is None else model.eval().to(device)
        self.device = torch.device(device)
        self.detector = None if detector is None else load_detector(detector)
        self.overlap, self.batch_size = overlap, batch_size
        self.min_pixels, self.min_peaks, self.max_peaks = min_pixels, min_peaks, max_peaks
        self.merge_radius, self.hysteresis, self.lone_pixel_ratio = merge_radius, hysteresis, lone_pixel_ratio
        self.threshold, self.min_snr = threshold, min_snr
        self.good = None
        if self.detector is not None:
            if isinstance(good, (str, os.PathLike)):
                good = read_mask(good, self.detector)
            elif good is not None:
                good = self.detector.to_panels(np.asarray(good, dtype=bool), "mask")[0]
            regions = bad_region_mask(self.detector)
            self.good = regions if good is None else (good & regions)
        elif good is not None:
            self.good = np.asarray(good, dtype=bool)
            self.good = self.good[None] if self.good.ndim == 2 else self.good

    def with_model(self, model, device: str | torch.device | None = None) -> PeakFinder:
        """A copy of this finder (detector, mask, filters) that runs ``model`` on ``device``."""
        import copy

        _check_model(model)
        out = copy.copy(self)
        out.kept_tokens = [0, 0]
        out.device = torch.device(device) if device is not None else self.device
        out.model = None if model is None else model.eval().to(out.device)
        return out

    @property
    def sparse(self) -> bool:
        """Whether this finder runs sparse-token inference (``sparse_threshold`` set)."""
        return self.sparse_threshold is not None

    @property
    def kept_token_fraction(self) -> float | None:
        """Share of the patch tokens the sparse path computed over the finder's life (None: a dense finder)."""
        return self.kept_tokens[0] / max(self.kept_tokens[1], 1) if self.sparse else None

    @classmethod
    def from_run(cls, run: str | os.PathLike, geometry=None, mask=None, bf16: bool = False,
                 sparse: bool | None = None, **kwargs: Any) -> PeakFinder:
        """A finder from a ``vitkit train`` run (directory, ``.ckpt`` or exported model). ``geometry``
        defaults to the run's ``detector.geom``; ``bf16``: the model in bfloat16 (:func:`load_model`);
        ``sparse``: True, the run's sparse-token model and threshold (:func:`sparse_of_run`) instead of its model;
        False, its dense model; None, as :func:`choose_sparse` decides from the run's held-out comparison."""
        if geometry is None:
            geometry = run_geometry(run)
        if choose_sparse(run, sparse, kwargs.get("device", "cpu"))[0]:
            model_dir, kwargs["sparse_threshold"] = sparse_of_run(run)
            return cls(load_model(model_dir, bf16), geometry, mask, **kwargs)
        return cls(load_model(run, bf16), geometry, mask, **kwargs)

    def _events(self, events) -> np.ndarray:
        a = events if isinstance(events, np.ndarray) else np.asarray(events)
        if self.detector is not None:
            ev = self.detector.to_panels(a, "events")
        elif a.ndim == 2:
            ev = a[None, None]
        elif a.ndim == 3:
            ev = a[:, None]
        elif a.ndim == 4:
            ev = a
        else:
            raise InputError(f"PeakFinder: expected an event [P, H, W], events [N, P, H, W] or frames [N, H, W], "
                             f"found shape {a.shape}.")
        if 0 in ev.shape[1:]:
            raise InputError(f"PeakFinder: events of shape {a.shape} have panels without pixels "
                             f"(panel stack {ev.shape[1:]}); every panel needs at least one pixel.")
        return ev

    def _good(self, ev: np.ndarray, good: np.ndarray | None) -> np.ndarray | None:
        """Good pixels ``[N, P, H, W]`` of events ``ev``: the finder's mask AND a call's own (``[P, H, W]`` or
        ``[N, P, H, W]``) AND the events' finite pixels AND NOT their lone pixels (``lone_pixel_ratio``)."""
        shape = ev.shape
        for g in (self.good, good):
            if g is not None and np.shape(g)[-3:] != shape[1:]:
                raise DetectorShapeError(f"PeakFinder: the mask has shape {np.shape(g)}, the events {shape[1:]}; "
                                         f"expected one mask value per pixel of an event.")
        g = self.good if good is None else (np.asarray(good, dtype=bool) if self.good is None
                                             else self.good & np.asarray(good, dtype=bool))
        if shape[0] == 0:
            return np.zeros(shape, dtype=bool)
        if np.issubdtype(ev.dtype, np.inexact):  # NaN/inf pixels are bad pixels of their event
            finite = np.isfinite(ev)
            if not finite.all():
                g = finite if g is None else (np.broadcast_to(g, shape) & finite)
        if self.lone_pixel_ratio is None:
            return None if g is None else np.broadcast_to(g, shape)
        unit = None if self.detector is None else self.detector.photon_adu()
        g = np.broadcast_to(np.ones(shape[1:], dtype=bool) if g is None else g, shape)
        return np.stack([event_good(ev[i], g[i], unit, self.lone_pixel_ratio) for i in range(shape[0])])

    def find(self, events, good: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(masks [N, P, H, W], peak tables)`` of raw events; ``good``: this call's own good-pixel mask
        (``[P, H, W]`` or per event ``[N, P, H, W]``), combined with the finder's."""
        ev = self._events(events)
        g = self._good(ev, good)
        masks = self._masks(ev, g)
        return masks, self._peaks(ev, masks, g)

    def masks(self, events, good: np.ndarray | None = None) -> np.ndarray:
        """Peak masks ``[N, P, H, W]`` bool of raw events (the model's peak class, AND the good pixels)."""
        ev = self._events(events)
        return self._masks(ev, self._good(ev, good))

    def peaks(self, events, masks: np.ndarray, good: np.ndarray | None = None) -> list[np.ndarray]:
        """Peak tables of raw events from their :meth:`masks` (``good`` as given to :meth:`masks`)."""
        ev = self._events(events)
        return self._peaks(ev, masks, self._good(ev, good))

    def __call__(self, events) -> list[np.ndarray]:
        """Peak tables (:data:`PEAK_DTYPE`), one per event, of an event ``[P, H, W]`` or events ``[N, P, H, W]``
        (slabs, or frames ``[N, H, W]`` without a detector)."""
        return self.find(events)[1]

    @torch.no_grad()
    def _masks(self, ev: np.ndarray, g: np.ndarray | None) -> np.ndarray:
        from vitkit.tasks.postprocess import semantic_inference

        if self.model is None:
            raise InputError("PeakFinder: this finder has no model (built with model=None); it can only extract "
                             "peaks from given masks (PeakFinder.peaks).")
        n, p, h, w = ev.shape
        if n == 0:
            return np.zeros(ev.shape, dtype=bool)
        x = self.model_input(ev, g)
        if self.sparse:
            from vitkit.apps.peaks.sparse import spot_evidence
            from vitkit.tasks.postprocess import sparse_semantic_inference

            probs, kept, total = sparse_semantic_inference(self.model, x, spot_evidence(x), self.sparse_threshold,
                                                           overlap=self.overlap)
            self.kept_tokens = [self.kept_tokens[0] + kept, self.kept_tokens[1] + total]
        else:
            probs = semantic_inference(self.model, x, overlap=self.overlap, batch_size=self.batch_size)
        out = (probs[:, 1] > self.threshold * (probs[:, 0] + probs[:, 1])).cpu().numpy().reshape(n, p, h, w)
        if self.hysteresis is not None:  # grow each peak into its connected pixels above the low threshold
            from scipy import ndimage

            low = (probs[:, 1] > self.hysteresis * (probs[:, 0] + probs[:, 1])).cpu().numpy().reshape(n, p, h, w)
            if g is not None:
                low &= g
            three = np.ones((3, 3), dtype=bool)
            for i in range(n):
                for k in range(p):
                    core = out[i, k]
                    if not core.any():
                        continue
                    if self.min_pixels > 1:  # seeds are cores of at least min_pixels pixels
                        lab, _ = ndimage.label(core, structure=three)
                        core = core & (np.bincount(lab.ravel())[lab] >= self.min_pixels)
                    out[i, k] = ndimage.binary_propagation(core, structure=three, mask=low[i, k] | core)
        if g is not None:
            out &= g
        return out

    def model_input(self, ev: np.ndarray, g: np.ndarray | None) -> torch.Tensor:
        """The normalised panels ``[N * P, 1, H, W]`` (on the finder's device) the model sees for events ``ev``
        ``[N, P, H, W]`` with good pixels ``g`` (from :meth:`_good`)."""
        from vitkit.tasks.transforms import robust_normalise

        n, p, h, w = ev.shape
        unit = None if self.detector is None else self.detector.photon_adu()
        gt = None if g is None else torch.from_numpy(np.array(g))
        x = torch.from_numpy(np.ascontiguousarray(ev, dtype=np.float32)).reshape(n * p, 1, h, w)
        if unit is not None:
            unit = torch.from_numpy(np.tile(unit, n)).float()
        return robust_normalise(x, None if gt is None else gt.reshape(n * p, 1, h, w), unit=unit).to(self.device)

    def _peaks(self, ev: np.ndarray, masks: np.ndarray, g: np.ndarray | None) -> list[np.ndarray]:
        return [event_peaks(self.detector, e, m, self.min_pixels, self.max_peaks, self.min_peaks,
                            None if g is None else g[i], self.merge_radius, self.min_snr)
                for i, (e, m) in enumerate(zip(ev, masks))]
