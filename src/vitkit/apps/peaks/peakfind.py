"""Segmentation mask -> peak list: connected components, intensity-weighted centroids, integrated intensity.

This is PeakNet's post-processing (``ndimage.label`` with a 3 x 3 structure, then one centroid per
component), vectorised: no Python loop over components. Every per-component quantity is a ``np.bincount``
over the component id of each mask pixel.

Two labelling back-ends give identical components and the same ordering:

* ``"ndimage"``: ``scipy.ndimage.label`` on the full frame (best for dense masks);
* ``"sparse"``: a graph over the mask pixels only -- the neighbour links of every mask pixel are found with
  four (8-connectivity) or two (4-connectivity) vectorised look-ups and the components with
  ``scipy.sparse.csgraph.connected_components``. Its cost scales with the number of mask pixels rather than
  the frame size, which is what Bragg-peak masks are (~0.1-1 % of a 1920 x 1920 frame).

``"auto"`` (default) picks ``"sparse"`` when at most 5 % of the pixels are set.

Coordinates use the pixel-centre convention of NumPy/SciPy: the centre of pixel ``[i, j]`` is ``(y, x) =
(i, j)``. Components are ordered by their first pixel in raster (row-major) order, which is the order of
``scipy.ndimage.label``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from vitkit.errors import InputError

__all__ = ["PEAK_DTYPE", "empty_peaks", "as_peak_table", "LONE_PIXEL_RATIO", "lone_pixels", "find_peaks",
           "measure_components", "local_signal", "SNR_RADIUS", "peaks_per_frame", "label_components", "logits_to_mask"]

_SPARSE_MAX_FILL = 0.05

PEAK_DTYPE = np.dtype([("panel", np.int32), ("fs", np.float64), ("ss", np.float64), ("slab_fs", np.float64),
                       ("slab_ss", np.float64), ("x_lab", np.float64), ("y_lab", np.float64),
                       ("intensity", np.float64), ("npix", np.int32), ("max_value", np.float64),
                       ("snr", np.float64)])
"""A peak table row (:mod:`vitkit.apps.peaks.finder` documents the fields)."""


def empty_peaks(n: int = 0) -> np.ndarray:
    """A peak table of ``n`` zeroed rows."""
    return np.zeros(n, dtype=PEAK_DTYPE)


def as_peak_table(p) -> np.ndarray:
    """A peak table from a table (returned as is) or ``[n, 2|3]`` rows ``(y, x[, intensity])`` of one frame
    (panel 0; slab = panel coordinates; lab coordinates and ``max_value`` NaN, ``npix`` 0)."""
    if isinstance(p, np.ndarray) and p.dtype == PEAK_DTYPE:
        return p
    if hasattr(p, "detach"):
        p = p.detach().cpu().numpy()
    a = np.asarray(p, dtype=np.float64)
    if a.size == 0:
        return empty_peaks()
    if a.ndim != 2 or a.shape[1] not in (2, 3):
        raise InputError(f"expected a peak table or peaks [n, 3] (y, x, intensity) / [n, 2] (y, x), found shape "
                         f"{a.shape}.")
    t = empty_peaks(len(a))
    t["ss"] = t["slab_ss"] = a[:, 0]
    t["fs"] = t["slab_fs"] = a[:, 1]
    t["intensity"] = a[:, 2] if a.shape[1] == 3 else 0.0
    t["x_lab"] = t["y_lab"] = t["max_value"] = t["snr"] = np.nan
    return t


def _structure(connectivity: int) -> np.ndarray:
    if connectivity == 8:
        return np.ones((3, 3), dtype=bool)
    if connectivity == 4:
        return ndimage.generate_binary_structure(2, 1)
    raise InputError(f"connectivity: expected 4 or 8, found {connectivity!r}.")


def _as_mask_image(mask, image) -> tuple[np.ndarray, np.ndarray]:
    mask = np.asarray(mask)
    image = np.asarray(image)
    if mask.ndim != 2:
        raise InputError(f"find_peaks: expected a 2-D mask [H, W], found shape {mask.shape}. "
                         "Call it once per frame, or use peaks_per_frame for a stack.")
    if image.shape != mask.shape:
        raise InputError(f"find_peaks: the image shape {image.shape} differs from the mask shape {mask.shape}; "
                         "pass the frame the mask was predicted from (unpadded to the same size).")
    if mask.dtype != bool:
        mask = mask != 0
    return mask, image


def label_components(mask: np.ndarray, connectivity: int = 8,
                     method: Literal["auto", "ndimage", "sparse"] = "auto") -> tuple[np.ndarray, np.ndarray, int]:
    """Connected components of a boolean mask, returned for the mask pixels only.

    Returns:
        ``flat`` int64 ``[k]`` (raster indices of the mask pixels, increasing), ``comp`` int64 ``[k]`` (the
        component of each, ``0 .. n-1`` in order of first pixel) and ``n``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"label_components: expected a 2-D mask, found shape {mask.shape}.")
    mask = mask if mask.dtype == bool else mask != 0
    structure = _structure(connectivity)
    h, w = mask.shape
    flat = np.flatnonzero(mask)
    k = flat.size
    if k == 0:
        return flat, np.zeros(0, dtype=np.int64), 0
    if method == "auto":
        method = "sparse" if k <= _SPARSE_MAX_FILL * mask.size else "ndimage"
    if method == "ndimage":
        lab, n = ndimage.label(mask, structure=structure)
        return flat, lab.ravel()[flat].astype(np.int64) - 1, int(n)
    if method != "sparse":
        raise InputError(f"label_components: method must be 'auto', 'ndimage' or 'sparse', found {method!r}.")

    mflat = mask.ravel()
    ids = np.empty(mask.size, dtype=np.int64)  # only entries at mask pixels are ever read
    ids[flat] = np.arange(k)
    y, x = np.divmod(flat, w)
    offsets = [(0, 1), (1, -1), (1, 0), (1, 1)] if connectivity == 8 else [(0, 1), (1, 0)]
    src, dst = [], []
    node = np.arange(k)
    for dy, dx in offsets:  # forward neighbours only: each undirected link once
        ok = (y + dy < h) & (x + dx >= 0) & (x + dx < w)
        cand = flat[ok] + (dy * w + dx)
        hit = mflat[cand]
        src.append(node[ok][hit])
        dst.append(ids[cand[hit]])
    src = np.concatenate(src)
    dst = np.concatenate(dst)
    graph = coo_matrix((np.ones(src.size, dtype=np.int8), (src, dst)), shape=(k, k)).tocsr()
    n, comp = connected_components(graph, directed=False)
    # renumber by first pixel (raster order), as ndimage.label does
    _, first = np.unique(comp, return_index=True)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n)
    return flat, rank[comp], int(n)


def measure_components(mask: np.ndarray, image: np.ndarray, min_pixels: int = 1, connectivity: int = 8,
                       method: Literal["auto", "ndimage", "sparse"] = "auto", good: np.ndarray | None = None,
                       unit: float | None = None, snr_radius: int | None = None) -> dict[str, np.ndarray]:
    """Per connected component of ``mask``: centroid ``y``, ``x`` (intensity-weighted, weights
    ``max(image, 0)``; the unweighted mean when they sum to 0), ``intensity`` (sum of ``image``), ``npix`` and
    ``max_value``, each an array over the components (first pixel, raster order) with at least
    ``min_pixels`` pixels. Only mask pixels enter any value: pass ``mask & good`` and a masked pixel never
    contributes to a centroid or an intensity. With ``snr_radius``, also the photometry of
    :func:`local_signal` (``good``: the good pixels ``[H, W]``; ``unit``: one photon in ADU)."""
    mask, image = _as_mask_image(mask, image)
    flat, comp, n = label_components(mask, connectivity, method)
    w = mask.shape[1]
    y, x = np.divmod(flat, w)
    val = image.ravel()[flat].astype(np.float64)
    wt = np.maximum(val, 0.0)
    cnt = np.bincount(comp, minlength=n).astype(np.float64)
    sw = np.bincount(comp, wt, minlength=n)
    weighted = sw > 0
    out = {}
    for name, coord in (("y", y), ("x", x)):
        c = coord.astype(np.float64)
        mean = np.bincount(comp, c, minlength=n) / np.maximum(cnt, 1)
        cw = np.bincount(comp, wt * c, minlength=n)
        out[name] = np.where(weighted, cw / np.where(weighted, sw, 1.0), mean)
    out["intensity"] = np.bincount(comp, val, minlength=n)
    out["npix"] = cnt.astype(np.int64)
    mx = np.full(n, -np.inf)
    np.maximum.at(mx, comp, val)
    out["max_value"] = mx
    if snr_radius is not None:
        out.update(local_signal(image, good, flat, comp, n, unit, snr_radius))
    if min_pixels > 1:
        keep = cnt >= min_pixels
        out = {k: v[keep] for k, v in out.items()}
    return out


SNR_RADIUS = 5
"""Half-width (px) around a peak where :func:`local_signal` measures its background (PeakFinder's choice)."""
_LINE_PIXELS = 4
_LINES = np.stack([np.sin(np.arange(8) * np.pi / 8), np.cos(np.arange(8) * np.pi / 8)], 1)  # every 22.5 degrees


def local_signal(image: np.ndarray, good: np.ndarray | None, flat: np.ndarray, comp: np.ndarray, n: int,
                 unit: float | None = None, radius: int = SNR_RADIUS) -> dict[str, np.ndarray]:
    """Background-subtracted signal of each component and its variance, for a photometric SNR
    ``signal / sqrt(noise2)`` as peakfinder8 and the simulator's visibility rule judge a spot.

    The components are given as :func:`label_components` returns them (``flat``, ``comp``, ``n``). Each one's
    aperture is its pixels grown by one (the spot's wings; good pixels only). Its *background* pixels are the
    good pixels within ``radius`` px of its bounding box that lie at least 3 px from every component (the
    panel's when fewer than 8 such pixels exist): their median is the background level, ``1.4826 * MAD`` the
    noise sigma. What is subtracted is the larger of that level over the aperture and, for each of 8 lines
    through it (every 22.5 degrees), the aperture's background *along the line*: pixel by pixel, the median of
    the background pixels met by moving the aperture clear of itself along the line, 4 steps each way (at
    least 4 of the 8 for every pixel, else the line is skipped). A fluctuation on a jet streak, a common-mode
    row or a ring edge stands out of the median around it but not out of the line it lies on; a spot sitting
    on such a line keeps its own signal. ``noise2 = npix * sigma^2 + unit * max(signal, 0)``: background noise
    plus the signal's own Poisson noise when one photon is ``unit`` ADU (None: no Poisson term). Returns
    float64 ``signal`` and ``noise2`` ``[n]`` in a dict.
    """
    img = np.asarray(image)
    if not np.issubdtype(img.dtype, np.floating):
        img = img.astype(np.float64)
    h, w = img.shape
    ok = np.isfinite(img) if good is None else (np.asarray(good, dtype=bool) & np.isfinite(img))
    out = {"signal": np.zeros(n), "noise2": np.zeros(n)}
    if n == 0:
        return out
    # every component at once (an event can hold a thousand): its pixels, aperture pixels and line samples are
    # rows of flat arrays, reduced per component with bincount / reduceat; sums and medians in float64
    y, x = np.divmod(flat, w)
    lo_y, hi_y = np.full(n, h), np.full(n, -1)
    lo_x, hi_x = np.full(n, w), np.full(n, -1)
    np.minimum.at(lo_y, comp, y)
    np.maximum.at(hi_y, comp, y)
    np.minimum.at(lo_x, comp, x)
    np.maximum.at(hi_x, comp, x)
    y0, y1 = np.maximum(lo_y - radius, 0), np.minimum(hi_y + radius + 1, h)
    x0, x1 = np.maximum(lo_x - radius, 0), np.minimum(hi_x + radius + 1, w)
    near = np.zeros((h, w), dtype=bool)  # within 2 px of a component pixel: a 5x5 dilation, written directly
    two = np.arange(-2, 3)
    near[np.clip(y[:, None, None] + two[None, :, None], 0, h - 1),
         np.clip(x[:, None, None] + two[None, None, :], 0, w - 1)] = True
    background = ok & ~near
    level, sigma, count = _window_median_mad(img, background, y0, y1, x0, x1)
    few = count < 8
    if few.any():  # the panel's background instead
        sample = img[background].astype(np.float64)[::max(1, int(background.sum()) // 16384)]
        level[few] = panel_level = float(np.median(sample)) if sample.size else 0.0
        sigma[few] = 1.4826 * float(np.median(np.abs(sample - panel_level))) if sample.size else 0.0
    # aperture: the component's pixels grown by one, inside its window, good pixels only
    one = np.arange(-1, 2)
    ay = (y[:, None, None] + one[None, :, None]).repeat(3, 2).reshape(-1)
    ax = (x[:, None, None] + one[None, None, :]).repeat(3, 1).reshape(-1)
    ac = comp.repeat(9)
    inb = (ay >= y0[ac]) & (ay < y1[ac]) & (ax >= x0[ac]) & (ax < x1[ac])
    key = np.unique(ac[inb].astype(np.int64) * (h * w) + ay[inb] * w + ax[inb])  # by component, then raster
    ac, af = np.divmod(key, h * w)
    py, px = np.divmod(af, w)
    good_ap = ok[py, px]
    ac, py, px = ac[good_ap], py[good_ap], px[good_ap]
    npix = np.bincount(ac, minlength=n)
    total = np.bincount(ac, img[py, px].astype(np.float64), minlength=n)
    # how far the component reaches from its centre: the line samples start clear of the aperture
    cnt = np.bincount(comp, minlength=n)
    ry, rx = (y - y0[comp]).astype(np.float64), (x - x0[comp]).astype(np.float64)
    my, mx = np.bincount(comp, ry, minlength=n) / cnt, np.bincount(comp, rx, minlength=n) / cnt
    ext = np.zeros(n)
    np.maximum.at(ext, comp, (ry - my[comp]) ** 2 + (rx - mx[comp]) ** 2)
    steps = 2.0 * np.sqrt(ext)[:, None] + 3.0 + np.arange(_LINE_PIXELS, dtype=np.float64)
    t = np.concatenate([steps, -steps], 1)[ac]  # [aperture pixel, step]
    sy = np.rint(py[:, None, None] + t[:, None, :] * _LINES[None, :, :1]).astype(np.int64)  # [pixel, line, step]
    sx = np.rint(px[:, None, None] + t[:, None, :] * _LINES[None, :, 1:]).astype(np.int64)
    inside = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
    sy, sx = np.where(inside, sy, 0), np.where(inside, sx, 0)
    use = inside & background[sy, sx]
    k = use.sum(axis=2)  # [pixel, line]
    med = _sorted_median(np.sort(np.where(use, img[sy, sx], np.inf), axis=2), k)  # the unused sort last
    along = np.full((n, len(_LINES)), -np.inf)  # per component and line: the sum of its pixels' medians
    has = npix > 0
    starts = np.concatenate([[0], np.cumsum(npix)[:-1]])[has]
    if has.any():
        along[has] = np.where(np.minimum.reduceat(k, starts, axis=0) >= _LINE_PIXELS,
                              np.add.reduceat(med, starts, axis=0), -np.inf)
    line = np.maximum(level * npix, along.max(axis=1))
    out["signal"] = sig = total - line
    out["noise2"] = npix * sigma * sigma + float(unit or 0.0) * np.maximum(sig, 0.0)
    return out


def _window_median_mad(img: np.ndarray, use_map: np.ndarray, y0, y1, x0, x1
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, ``1.4826 * MAD`` and count of the ``use_map`` pixels of ``img`` in each window ``[y0:y1, x0:x1]``
    (as :func:`numpy.median` computes them on float64 values; 0 where a window has none).
    Windows are gathered in groups of one padded size, so the work is a few sorts, not one call per window."""
    n = len(y0)
    level, sigma, count = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)
    hh, ww = y1 - y0, x1 - x0
    bh, bw = -(-hh // 8) * 8, -(-ww // 8) * 8
    group = bh * (int(bw.max()) + 1) + bw
    for g in np.unique(group):
        sel = np.flatnonzero(group == g)
        ry, rx = np.arange(bh[sel[0]]), np.arange(bw[sel[0]])
        inside = (ry[None, :, None] < hh[sel, None, None]) & (rx[None, None, :] < ww[sel, None, None])
        yy = np.where(inside, y0[sel, None, None] + ry[None, :, None], 0)
        xx = np.where(inside, x0[sel, None, None] + rx[None, None, :], 0)
        use = (inside & use_map[yy, xx]).reshape(len(sel), -1)
        k = use.sum(1)
        vals = np.sort(np.where(use, img[yy, xx].astype(np.float64).reshape(len(sel), -1), np.inf), axis=1)
        med = _sorted_median(vals, k)
        dev = np.sort(np.abs(vals - med[:, None]), axis=1)  # the unused stay inf, last
        level[sel], sigma[sel], count[sel] = med, 1.4826 * _sorted_median(dev, k), k
    return level, sigma, count


def _sorted_median(vals: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Median of the first ``k`` values along the last axis of sorted ``vals`` (``k`` one count per row; 0 where it
    is 0): the middle one, or the mean of the two, as :func:`numpy.median`."""
    lo = np.take_along_axis(vals, (np.maximum(k - 1, 0) // 2)[..., None], axis=-1)[..., 0].astype(np.float64)
    hi = np.take_along_axis(vals, (k // 2)[..., None], axis=-1)[..., 0].astype(np.float64)
    return np.where(k > 0, 0.5 * (lo + hi), 0.0)


LONE_PIXEL_RATIO = 30.0
"""The default of :func:`lone_pixels`, used alike by training (the data module) and PeakFinder."""


def lone_pixels(image: np.ndarray, good: np.ndarray | None = None, ratio: float = LONE_PIXEL_RATIO,
                unit: float | None = None, samples: int = 16384, max_group: int = 4) -> np.ndarray:
    """Pixels that are bright on their own: unmasked hot pixels (single or in small clusters) and zingers,
    found per image.

    A pixel is *lone* when its value above the image's median exceeds ``ratio`` times the brightest of its 8
    neighbours above the median, that being at least the noise sigma (``1.4826 * MAD``) and ``unit`` (one
    photon in ADU, when known). A group of up to ``max_group`` 8-connected candidates (pixels above ``ratio``
    noise sigmas; hot defects come in clusters of 2-4) is lone in the same way: its dimmest pixel above the
    median exceeds ``ratio`` times the brightest pixel of the ring around it. A Bragg spot is never lone: the
    detector's point spread puts, for a spot of sigma 0.3 px centred on a pixel, 1/19 of its peak value into
    each side neighbour (0.5 px: 1/5; a spot between two pixels puts ~1/4 of each into the ring), and a
    saturated spot has saturated neighbours. Only candidates are examined, so the cost follows their number.
    ``image`` and ``good`` are ``[H, W]``; returns bool ``[H, W]``.
    """
    img = np.asarray(image)
    vals = img if good is None else img[np.asarray(good, dtype=bool)]
    vals = vals.ravel()[::max(1, vals.size // samples)]
    out = np.zeros(img.shape, dtype=bool)
    if vals.size == 0:
        return out
    base = float(np.median(vals))
    noise = max(1.4826 * float(np.median(np.abs(vals - base))), float(unit or 0.0), 1e-12)
    cand = np.flatnonzero(img.ravel() - base > ratio * noise)
    if cand.size == 0:
        return out
    h, w = img.shape
    y, x = np.divmod(cand, w)
    is_cand = np.zeros(img.shape, dtype=bool)
    is_cand.ravel()[cand] = True
    nb = np.full(cand.size, -np.inf)  # brightest neighbour
    ring = np.full(cand.size, -np.inf)  # brightest neighbour that is not a candidate
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                yy, xx = y + dy, x + dx
                ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                v = img[yy[ok], xx[ok]]
                nb[ok] = np.maximum(nb[ok], v)
                ring[ok] = np.where(is_cand[yy[ok], xx[ok]], ring[ok], np.fmax(ring[ok], v))  # NaN: a bad pixel
    val = img.ravel()[cand] - base
    lone = val > ratio * np.maximum(nb - base, noise)
    if max_group > 1:  # small groups of candidates: their dimmest pixel against their ring
        _, comp, n = label_components(is_cand, 8, "sparse")  # raster order = the order of cand
        size = np.bincount(comp, minlength=n)
        low = np.full(n, np.inf)
        np.minimum.at(low, comp, val)
        top = np.full(n, -np.inf)
        np.fmax.at(top, comp, ring)
        group = (size > 1) & (size <= max_group) & (low > ratio * np.maximum(top - base, noise))
        lone |= group[comp]
    out.ravel()[cand[lone]] = True
    return out


def find_peaks(mask: np.ndarray, image: np.ndarray, min_pixels: int = 1, connectivity: int = 8,
               method: Literal["auto", "ndimage", "sparse"] = "auto") -> np.ndarray:
    """Peaks of one frame from its segmentation mask.

    Args:
        mask: ``[H, W]`` bool (or any dtype; non-zero = peak pixel).
        image: ``[H, W]`` the detector frame (any real dtype; summed in float64).
        min_pixels: components with fewer pixels are dropped.
        connectivity: 8 (3 x 3 structure, PeakNet's choice) or 4.
        method: labelling back-end (module docstring); results do not depend on it.

    Returns:
        float64 ``[n, 3]`` rows ``(y, x, integrated_intensity)`` from :func:`measure_components`. NaN pixels in
        a component make its row NaN (:func:`vitkit.apps.peaks.open_frames` rejects such frames).
    """
    c = measure_components(mask, image, min_pixels, connectivity, method)
    return np.stack([c["y"], c["x"], c["intensity"]], axis=1).reshape(-1, 3)


def peaks_per_frame(masks: Iterable[np.ndarray], images: Iterable[np.ndarray], min_peaks: int = 0,
                    max_peaks: int | None = 2048, min_pixels: int = 1, connectivity: int = 8,
                    method: Literal["auto", "ndimage", "sparse"] = "auto") -> list[np.ndarray]:
    """:func:`find_peaks` over a stack of frames, with PeakNet's per-frame peak-count filters.

    * a frame with fewer than ``min_peaks`` peaks is not a hit: it gets an empty ``[0, 3]`` list
      (cxi-pipeline-ray uses ``min_num_peak = 10``);
    * a frame with more than ``max_peaks`` peaks keeps the ``max_peaks`` with the largest integrated
      intensity, in their original (raster) order; ``None`` keeps all. 2048 is CrystFEL's/Cheetah's usual
      ``max_num_peak``, the width of the CXI peak arrays.

    ``masks`` and ``images`` are ``[N, H, W]`` arrays or iterables of ``[H, W]`` frames of equal length.
    """
    out = []
    it_m, it_i = iter(masks), iter(images)
    sentinel = object()
    i = 0
    while True:
        m, im = next(it_m, sentinel), next(it_i, sentinel)
        if m is sentinel and im is sentinel:
            return out
        if m is sentinel or im is sentinel:
            raise InputError(f"peaks_per_frame: masks and images differ in length (one ended after {i} frames); "
                             "pass one mask per image.")
        p = find_peaks(m, im, min_pixels=min_pixels, connectivity=connectivity, method=method)
        if len(p) < min_peaks:
            p = p[:0]
        elif max_peaks is not None and len(p) > max_peaks:
            keep = np.sort(np.argsort(-p[:, 2], kind="stable")[:max_peaks])
            p = p[keep]
        out.append(p)
        i += 1


def logits_to_mask(logits, threshold: float | None = None) -> np.ndarray:
    """Peak mask from segmentation logits ``[..., C, H, W]`` (NumPy array or torch tensor).

    * ``C == 2`` (PeakNet: background, peak): ``argmax`` over classes when ``threshold`` is None (what
      cxi-pipeline-ray does since March 2026), else ``softmax(logits)[peak] >= threshold`` (the older
      ``find_peak_w_threshold``);
    * ``C == 1`` (a single peak logit): ``sigmoid(logit) >= threshold`` (default 0.5).

    Returns a bool array ``[..., H, W]``.
    """
    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim < 3 or logits.shape[-3] not in (1, 2):
        raise InputError(f"logits_to_mask: expected logits [..., C, H, W] with C = 1 or 2, found shape "
                         f"{logits.shape}.")
    if logits.shape[-3] == 1:
        d = logits[..., 0, :, :]
        t = 0.5 if threshold is None else threshold
    else:
        d = logits[..., 1, :, :] - logits[..., 0, :, :]  # softmax[peak] = sigmoid(l1 - l0)
        if threshold is None:
            return d > 0  # argmax; ties go to class 0 like np.argmax
        t = threshold
    if not 0.0 < t < 1.0:
        return np.full(d.shape, t <= 0.0)
    return d >= np.float32(np.log(t / (1.0 - t)))
