"""Drawing a detector in the lab frame (matplotlib's Agg canvas, no pyplot state, no display needed).

:func:`draw_detector` shows CrystFEL's lab frame as CrystFEL's GUI does (looking into the beam, z towards the viewer:
+x to the right, +y up),
in millimetres: every panel's outline, its name at its centre, an arrow along the fast-scan direction starting at
the centre of its first pixel (data ``[0, 0]``), the beam (lab ``x = y = 0``) as a red cross, optionally one event
rendered under the outlines (:meth:`Detector.assemble`, log scale) and lab-frame positions (e.g. predicted peaks)
as circles.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vitkit.apps.peaks.detector import Detector
from vitkit.atomic import atomic_path
from vitkit.errors import InputError

__all__ = ["draw_detector"]


def _corners(p) -> np.ndarray:
    """Lab x, y (pixels) of a panel's four corners, in drawing order."""
    h, w = p.shape
    return np.array([[p.corner_x + f * p.fs[0] + s * p.ss[0], p.corner_y + f * p.fs[1] + s * p.ss[1]]
                     for f, s in ((0, 0), (w, 0), (w, h), (0, h))])


def draw_detector(detector: Detector, path: str | os.PathLike, image=None, peaks=None, *, title: str | None = None,
                  peak_radius_px: float = 6.0, size_inches: float = 8.0, dpi: int = 100) -> Path:
    """Save a PNG of the detector layout in the lab frame (axes in mm), atomically; returns the path.

    ``image``: one event, ``[P, H, W]`` or a slab ``[SS, FS]``, drawn under the outlines with
    ``log10(1 + max(value, 0))`` (clipped at the 99.9th percentile; pixels no panel covers are blank).
    ``peaks``: lab-frame positions in metres, ``[n, 2]`` (x, y) or ``[n, 3]`` (x, y, z; z is ignored), drawn as
    circles of ``peak_radius_px`` pixels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Polygon

    det = detector
    mm0 = 1e3 / det.panels[0].res  # mm per (first panel's) pixel
    pts = None
    if peaks is not None:
        pts = np.asarray(peaks.detach().cpu() if hasattr(peaks, "detach") else peaks, dtype=np.float64)
        if pts.size == 0:
            pts = np.zeros((0, 2))
        if pts.ndim != 2 or pts.shape[1] not in (2, 3):
            raise InputError(f"draw_detector: peaks must be lab positions in metres [n, 2] (x, y) or [n, 3], found "
                             f"shape {pts.shape}.")
    fig = Figure(figsize=(size_inches, size_inches), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if image is not None:
        img, (x0, y0, step) = det.assemble(image)
        disp = np.log10(1.0 + np.maximum(img, 0.0))
        finite = disp[np.isfinite(disp)]
        vmax = float(np.percentile(finite, 99.9)) if finite.size else 1.0
        ny, nx = img.shape
        ax.imshow(np.ma.masked_invalid(disp), cmap="gray_r", vmin=0.0, vmax=vmax or 1.0, origin="lower",
                  interpolation="nearest", extent=(x0 * mm0, (x0 + nx * step) * mm0, y0 * mm0, (y0 + ny * step) * mm0))
    outlines, xs, ys = [], [], []
    arrow_len = 0.25 * min(min(p.shape) for p in det.panels)
    font = max(4.0, min(8.0, 160.0 / max(len(det.panels), 1) ** 0.5))
    for p in det.panels:
        mm = 1e3 / p.res
        c = _corners(p) * mm
        xs += list(c[:, 0])
        ys += list(c[:, 1])
        outlines.append(Polygon(c, closed=True))
        fv, sv = np.array(p.fs[:2]), np.array(p.ss[:2])
        start = (np.array([p.corner_x, p.corner_y]) + 0.5 * fv + 0.5 * sv) * mm
        end = start + arrow_len * fv / np.linalg.norm(fv) * mm
        ax.annotate("", xy=tuple(end), xytext=tuple(start),
                    arrowprops=dict(arrowstyle="-|>", color="tab:orange", lw=1.0, shrinkA=0, shrinkB=0))
        ax.plot([start[0]], [start[1]], "o", color="tab:orange", ms=2.5)
        centre = c.mean(axis=0)
        ax.text(centre[0], centre[1], p.name, ha="center", va="center", fontsize=font, color="tab:blue")
    ax.add_collection(PatchCollection(outlines, facecolor="none", edgecolor="tab:blue", linewidth=0.8))
    ax.plot([0.0], [0.0], "+", color="red", ms=14, mew=1.5)
    ax.annotate("beam", (0.0, 0.0), xytext=(6, 6), textcoords="offset points", color="red", fontsize=8)
    if pts is not None and len(pts):
        r = peak_radius_px * mm0
        ax.add_collection(PatchCollection([Circle((x * 1e3, y * 1e3), r) for x, y in pts[:, :2]],
                                          facecolor="none", edgecolor="red", linewidth=0.8))
    x_lo, x_hi, y_lo, y_hi = min(xs + [0.0]), max(xs + [0.0]), min(ys + [0.0]), max(ys + [0.0])
    pad = 0.03 * max(x_hi - x_lo, y_hi - y_lo, 1e-3)
    ax.set_xlim(x_lo - pad, x_hi + pad)
    ax.set_ylim(y_lo - pad, y_hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("lab x (mm)")
    ax.set_ylabel("lab y (mm)")
    if title is None:
        clen = f", clen {det.clen * 1e3:g} mm" if det.clen is not None else ""
        title = (f"{det.name or 'detector'}: {len(det.panels)} panels{clen} (facing the beam; arrows: fast scan "
                 f"from the first pixel)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    return Path(path)
