"""Detector geometry: panels as CrystFEL describes them, built-in LCLS layouts, lab-frame maps, assembly.

Conventions (CrystFEL's, see ``man crystfel_geometry``):

* A detector is a list of :class:`Panel`. Each panel is a rectangle ``[min_ss..max_ss] x [min_fs..max_fs]``
  (inclusive) of one 2-D *slab* array ``[SS, FS]``, and also one entry ``index`` of the psana *stack*
  ``[P, H, W]`` (``H = ss`` rows, ``W = fs`` columns). Both layouts are read and written.
* The lab frame: x, y in the detector plane, z along the beam; the beam hits ``(0, 0)``. ``corner_x``,
  ``corner_y`` (pixels) place the corner of the panel's first pixel; ``fs`` / ``ss`` are the lab-frame
  (x, y, z) steps of one pixel along fast and slow scan (in pixels). CrystFEL puts integer coordinates at
  pixel *corners*: the lab position of panel coordinate ``(fs, ss)`` is ``corner + fs * fs_vec + ss * ss_vec``.
* vitkit's peak coordinates use NumPy's pixel-*centre* convention (pixel ``[i, j]`` has its centre at
  ``(ss, fs) = (i, j)``); every lab-frame map here adds the half pixel (:meth:`Detector.lab_xyz`). CXI peak
  lists keep NumPy's convention (``indexamajig`` adds the half pixel itself); DIALS' ``xyzobs.px`` adds it.
* ``res`` is pixels per metre; ``clen`` (m) the camera length to the lab origin plane, ``coffset`` (m) an
  extra z offset per panel. Lengths in lab maps are metres.

Built-in layouts (:func:`builtin_detector`): ``epix10k2m`` (16 x 352 x 384, 100 um, four quadrants of 2 x 2
panels in a pinwheel), ``jungfrau4m`` (8 x 512 x 1024, 75 um, two columns of four modules, the right column
rotated by 180 degrees), ``cspad`` (32 x 185 x 388, 109.92 um, four quadrants of four 2x1 pairs),
``single:HxW`` (one H x W panel, 75 um; ``single`` is 1920 x 1920). The multi-panel layouts stack their
panels along the slow-scan axis of the slab (psocake's and PeakNet's CXI layout: ``[P * H, W]``). They are
representative of the real instruments, not a metrology of any one experiment: use the experiment's
``.geom`` for real data.
"""

from __future__ import annotations

import re

from vitkit.apps.peaks.geom import read_geom
from vitkit.apps.peaks.panels import (
    BadRegion,
    Detector,
    DetectorShapeError,
    GeometryError,
    Panel,
    photon_energy_to_wavelength,
)

__all__ = ["Panel", "BadRegion", "Detector", "builtin_detector", "BUILTIN_DETECTORS", "load_detector",
           "DetectorShapeError", "GeometryError", "photon_energy_to_wavelength"]

BUILTIN_DETECTORS = ("epix10k2m", "jungfrau4m", "cspad", "single")


# ------------------------------------------------------------------------------------- built-in layouts
def _rot(v, quarter_turns: int) -> tuple[float, float, float]:
    """Rotate a lab vector by ``quarter_turns`` x 90 degrees about the beam (x -> y)."""
    x, y, z = v
    for _ in range(quarter_turns % 4):
        x, y = -y, x
    return (float(x), float(y), float(z))


def _stacked(specs, shape: tuple[int, int], res: float) -> list[Panel]:
    """Panels stacked along the slab's slow-scan axis in the order given (psana's stack order)."""
    h, w = shape
    return [Panel(name=name, min_fs=0, max_fs=w - 1, min_ss=k * h, max_ss=(k + 1) * h - 1, fs=fs, ss=ss,
                  corner_x=float(cx), corner_y=float(cy), res=res, index=k)
            for k, (name, (cx, cy), fs, ss) in enumerate(specs)]


def _epix10k2m() -> Detector:
    h, w, gap, inner = 352, 384, 4, 18
    specs = []
    for q in range(4):  # quadrants: one layout, rotated by q x 90 degrees about the beam
        for a in range(4):
            row, col = divmod(a, 2)
            local = (inner + col * (w + gap), inner + row * (h + gap), 0.0)
            corner = _rot(local, q)
            specs.append((f"p{4 * q + a}", (corner[0] + 2.5, corner[1] - 4.0), _rot((1, 0, 0), q), _rot((0, 1, 0), q)))
    groups = {f"q{q}": [f"p{4 * q + a}" for a in range(4)] for q in range(4)}
    return Detector(_stacked(specs, (h, w), 10000.0), photon_energy=9500.0, clen=0.1, adu_per_photon=1.0,
                    rigid_groups=groups, rigid_group_collections={"quadrants": list(groups)}, name="epix10k2m")


def _jungfrau4m() -> Detector:
    h, w, gx, gy = 512, 1024, 12, 38
    specs = []
    for m in range(8):
        col, row = divmod(m, 4)  # modules 0-3 left column (top to bottom), 4-7 right column
        top = -2 * h - 1.5 * gy + row * (h + gy)
        if col == 0:
            specs.append((f"m{m}", (-w - gx / 2, top), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)))
        else:  # rotated by 180 degrees: first pixel at the far corner
            specs.append((f"m{m}", (w + gx / 2, top + h), (-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)))
    specs = [(n, (cx + 3.0, cy - 7.0), fs, ss) for n, (cx, cy), fs, ss in specs]
    return Detector(_stacked(specs, (h, w), 1.0 / 75e-6), photon_energy=9500.0, clen=0.1, adu_per_photon=1.0,
                    name="jungfrau4m")


def _cspad() -> Detector:
    h, w, g, inner = 185, 388, 3, 15
    # one quadrant (quadrant-local lab pixels): four pairs of 2x1 sections
    horiz, vert = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0))
    off = w + 12
    quad = [((0, 0), *horiz), ((0, h + g), *horiz),
            ((off + h, 0), *vert), ((off + 2 * h + g, 0), *vert),
            ((h, off), *vert), ((2 * h + g, off), *vert),
            ((off, off), *horiz), ((off, off + h + g), *horiz)]
    specs = []
    for q in range(4):
        for s, ((cx, cy), fs, ss) in enumerate(quad):
            corner = _rot((inner + cx, inner + cy, 0.0), q)
            specs.append((f"q{q}a{s}", (corner[0] - 1.7, corner[1] + 2.3), _rot(fs, q), _rot(ss, q)))
    groups = {f"q{q}": [f"q{q}a{s}" for s in range(8)] for q in range(4)}
    return Detector(_stacked(specs, (h, w), 1.0 / 109.92e-6), photon_energy=9500.0, clen=0.1, adu_per_photon=1.0,
                    rigid_groups=groups, rigid_group_collections={"quadrants": list(groups)}, name="cspad")


def _single(h: int, w: int) -> Detector:
    panel = Panel(name="p0", min_fs=0, max_fs=w - 1, min_ss=0, max_ss=h - 1, corner_x=-w / 2 + 0.3,
                  corner_y=-h / 2 - 0.6, res=1.0 / 75e-6, index=0)
    return Detector([panel], photon_energy=9500.0, clen=0.1, adu_per_photon=1.0, name=f"single:{h}x{w}")


def builtin_detector(name: str) -> Detector:
    """A built-in layout by name: ``epix10k2m``, ``jungfrau4m``, ``cspad``, ``single`` or ``single:HxW``."""
    key = name.strip().lower()
    if key in ("epix10k2m", "epix10ka2m", "epix"):
        det = _epix10k2m()
    elif key == "jungfrau4m":
        det = _jungfrau4m()
    elif key == "cspad":
        det = _cspad()
    elif key == "single" or key.startswith("single:"):
        m = re.fullmatch(r"single(?::(\d+)x(\d+))?", key)
        if not m:
            raise GeometryError(f"detector {name!r}: expected 'single' or 'single:HxW' (e.g. single:1920x1920).")
        h, w = (int(m.group(1)), int(m.group(2))) if m.group(1) else (1920, 1920)
        if h < 16 or w < 16:
            raise GeometryError(f"detector {name!r}: panels must be at least 16 x 16 pixels, found {h} x {w}.")
        det = _single(h, w)
    else:
        raise GeometryError(f"unknown detector {name!r}: expected a .geom file or one of "
                            f"{', '.join(BUILTIN_DETECTORS[:-1])}, single[:HxW].")
    det.source = f"built-in {det.name}"
    return det


def load_detector(spec) -> Detector:
    """A :class:`Detector` from a ``.geom`` path, a built-in name or a Detector (returned as is)."""
    if isinstance(spec, Detector):
        return spec
    s = str(spec)
    if s.endswith(".geom") or "/" in s or s.endswith(".txt"):
        return read_geom(s)
    return builtin_detector(s)
