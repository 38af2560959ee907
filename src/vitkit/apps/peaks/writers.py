"""Atomic writers of the peaks app besides CXI (:mod:`vitkit.apps.peaks.cxi`): PeakNet zarr stores, peak CSV files
(and their reader) and overlay PNGs. Every file goes through :mod:`vitkit.atomic`."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitkit.apps.peaks.sources import ALL_CHUNKS_ATTR, UnsupportedFormatError, check_label_shape
from vitkit.atomic import atomic_path
from vitkit.errors import InputError


def _frames_array(images, what: str) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise InputError(f"{what}: expected frames (N, H, W) or one frame (H, W), found shape {a.shape}.")
    return a


def _jsonable(obj: Any) -> Any:
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"metadata value of type {type(o).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(obj, default=default))
    except TypeError as e:
        raise InputError(f"write_zarr: {e}; expected metadata made of dicts, lists, strings and numbers.") from e


def write_zarr(path: str | os.PathLike, images, labels=None, metadata: dict | Sequence[dict] | None = None,
               zarr_format: int = 2, clevel: int = 3) -> Path:
    """Write a PeakNet zarr store atomically: ``images (B, H, W) float32``, ``labels (B, H, W)``.

    Chunks are ``(1, H, W)``, compressed with Blosc zstd (level ``clevel``, byte shuffle) as PeakNet's dataset
    writer does; ``zarr_format=2`` (default) stays readable by the zarr 2 library PeakNet uses. Labels keep
    their integer dtype (bool becomes uint8). ``metadata`` is stored as the group attribute ``metadata``
    (JSON): a dict, or a list with one dict per frame (PeakNet stores per-event dicts as an object array;
    an attribute avoids the object codec). An existing target is replaced. Every image chunk is stored (also
    all-zero frames) and the image array is marked so (``vitkit_all_chunks_stored``): a chunk lost in a copy is
    then reported at open (:class:`ZarrSource`) instead of read as zeros.

    Returns the path written.
    """
    import numcodecs
    import zarr

    imgs = _frames_array(images, "write_zarr(images)").astype(np.float32, copy=False)
    labs = None
    if labels is not None:
        labs = _frames_array(labels, "write_zarr(labels)")
        check_label_shape(imgs.shape, labs.shape, "write_zarr",
                           "Pass labels cropped/padded like the images, or labels=None.")
        if labs.dtype == bool:
            labs = labs.astype(np.uint8)
        elif not np.issubdtype(labs.dtype, np.integer):
            raise InputError(f"write_zarr: expected integer or bool labels, found {labs.dtype}; labels are class "
                             "ids (0 background, 1 peak). Round or threshold them first.")
    if metadata is not None:
        if isinstance(metadata, (list, tuple)) and len(metadata) != len(imgs):
            raise InputError(f"write_zarr: {len(metadata)} metadata entries for {len(imgs)} frames; expected one "
                             "per frame (or a single dict for the store).")
        metadata = _jsonable(list(metadata) if isinstance(metadata, tuple) else metadata)
    n, h, w = imgs.shape
    if zarr_format == 2:
        comp: dict[str, Any] = {"compressors": numcodecs.Blosc(cname="zstd", clevel=clevel,
                                                                shuffle=numcodecs.Blosc.SHUFFLE)}
    else:
        comp = {"compressors": zarr.codecs.BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle")}
    with atomic_path(path) as tmp:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format)
        a = g.create_array("images", shape=imgs.shape, chunks=(1, h, w), dtype="float32",
                           config={"write_empty_chunks": True}, **comp)
        a[...] = imgs
        a.attrs[ALL_CHUNKS_ATTR] = True  # after the chunks: a copy that lost chunks is then caught at open
        if labs is not None:
            b = g.create_array("labels", shape=labs.shape, chunks=(1, h, w), dtype=labs.dtype, **comp)
            b[...] = labs
        if metadata is not None:
            g.attrs["metadata"] = metadata
    return Path(path)


def peak_table(p, what: str) -> np.ndarray:
    """``p`` (a peak table or ``[n, 2|3]`` rows) as a peak table; errors name ``what``."""
    from vitkit.apps.peaks.peakfind import as_peak_table

    try:
        return as_peak_table(p)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None


CSV_COLUMNS = ("frame", "panel", "fs", "ss", "slab_fs", "slab_ss", "x_lab", "y_lab", "intensity", "npix",
               "max_value", "snr")


def write_csv(path: str | os.PathLike, peaks_per_frame: Iterable) -> Path:
    """Write peaks as CSV, one row per peak, atomically, with the header
    ``frame,panel,fs,ss,slab_fs,slab_ss,x_lab,y_lab,intensity,npix,max_value,snr``: ``fs``/``ss`` panel-local
    and ``slab_fs``/``slab_ss`` slab pixels (NumPy pixel-centre convention), ``x_lab``/``y_lab`` lab-frame
    **metres** (empty without a geometry), ``snr`` the photometric SNR, as in
    :data:`~vitkit.apps.peaks.peakfind.PEAK_DTYPE`.

    ``peaks_per_frame`` may be any iterable (e.g. a generator over a long run) of peak tables or ``[n, 3]``
    ``(y, x, intensity)`` rows; frames without peaks have no rows. Floats keep 9 significant digits
    (float32 round trip; lab metres to 1e-9 relative).
    """
    def fmt(v) -> str:
        return "" if v != v else f"{v:.9g}"

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(CSV_COLUMNS)
            for i, p in enumerate(peaks_per_frame):
                for r in peak_table(p, f"write_csv(peaks_per_frame[{i}])"):
                    wr.writerow([i, int(r["panel"]), fmt(r["fs"]), fmt(r["ss"]), fmt(r["slab_fs"]), fmt(r["slab_ss"]),
                                 fmt(r["x_lab"]), fmt(r["y_lab"]), fmt(r["intensity"]), int(r["npix"]),
                                 fmt(r["max_value"]), fmt(r["snr"])])
    return Path(path)


def read_csv_peaks(path: str | os.PathLike, n_frames: int | None = None) -> list[np.ndarray]:
    """Peak tables from a :func:`write_csv` file, one per frame; ``n_frames`` pads with empty tables. Files of
    earlier versions (no ``snr`` column) read with ``snr`` NaN."""
    from vitkit.apps.peaks.peakfind import empty_peaks

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = tuple(c.strip() for c in rows[0]) if rows else ()
    if header not in (CSV_COLUMNS, CSV_COLUMNS[:-1]):
        raise UnsupportedFormatError(f"{path}: expected the header {','.join(CSV_COLUMNS)}, found "
                                     f"{','.join(rows[0]) if rows else 'an empty file'}.")
    data = np.array([[float(c) if c != "" else np.nan for c in r] for r in rows[1:] if r],
                    dtype=np.float64).reshape(-1, len(header))
    frame = data[:, 0].astype(np.int64)
    n = max(int(frame.max()) + 1 if len(frame) else 0, n_frames or 0)
    out = []
    for i in range(n):
        sel = data[frame == i]
        t = empty_peaks(len(sel))
        t["snr"] = np.nan
        for j, name in enumerate(header[1:], start=1):
            t[name] = sel[:, j]
        out.append(t)
    return out


def save_overlay_png(path: str | os.PathLike, frame, peaks, true_peaks=None, radius: float = 6.0,
                     title: str | None = None, max_inches: float = 10.0, dpi: int = 100) -> Path:
    """Save a PNG of ``frame`` (log-scaled: ``log10(1 + max(frame, 0))``, clipped at the 99.9th percentile)
    with red circles at ``peaks`` and, if given, green dashed circles at ``true_peaks``; atomically.

    Uses matplotlib's Agg canvas directly (no pyplot state, no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    img = np.asarray(frame, dtype=np.float32)
    if img.ndim != 2:
        raise InputError(f"save_overlay_png: expected one frame [H, W], found shape {img.shape}.")
    h, w = img.shape
    disp = np.log10(1.0 + np.maximum(np.nan_to_num(img), 0.0))
    vmax = float(np.percentile(disp, 99.9)) or 1.0
    scale = max_inches / max(h, w)
    fig = Figure(figsize=(max(w * scale, 2.0), max(h * scale, 2.0) + (0.3 if title else 0.0)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1 if not title else 1 - 0.3 / fig.get_figheight()))
    ax.imshow(disp, cmap="gray_r", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    for pts, color, style, label in ((true_peaks, "lime", "--", "true"), (peaks, "red", "-", "found")):
        if pts is None:
            continue
        t = peak_table(pts, f"save_overlay_png({label})")
        circles = [Circle((x, y), radius) for y, x in zip(t["ss"], t["fs"])]
        ax.add_collection(PatchCollection(circles, facecolor="none", edgecolor=color, linestyle=style,
                                          linewidth=0.8))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    if title:
        fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    return Path(path)
