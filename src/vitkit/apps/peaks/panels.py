"""A detector as CrystFEL describes it: :class:`Panel`, :class:`BadRegion` and :class:`Detector` (lab-frame maps,
assembly), with the errors about geometry and shapes. The conventions are in :mod:`vitkit.apps.peaks.detector`;
``.geom`` files are read and written by :mod:`vitkit.apps.peaks.geom`, built-in layouts live in
:mod:`vitkit.apps.peaks.detector`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from vitkit.errors import InputError

__all__ = ["Panel", "BadRegion", "Detector", "DetectorShapeError", "GeometryError", "photon_energy_to_wavelength"]

_HC_EV_M = 1.239841984e-6  # h c in eV m


class GeometryError(InputError):
    """A geometry description (``.geom`` file or built-in name) is malformed or inconsistent."""


class DetectorShapeError(InputError):
    """Data (frames or a mask) does not have the shape the detector geometry describes."""


def photon_energy_to_wavelength(energy_ev: float) -> float:
    """Wavelength in metres of a photon of ``energy_ev`` electronvolts."""
    return _HC_EV_M / float(energy_ev)


@dataclass
class Panel:
    """One detector panel (CrystFEL's panel section). Vectors are lab-frame (x, y, z) in pixels."""

    name: str
    min_fs: int
    max_fs: int
    min_ss: int
    max_ss: int
    fs: tuple[float, float, float] = (1.0, 0.0, 0.0)
    ss: tuple[float, float, float] = (0.0, 1.0, 0.0)
    corner_x: float = 0.0
    corner_y: float = 0.0
    res: float = 10000.0
    """pixels per metre (10000 = 100 um pixels)"""
    clen: float | None = None
    """camera length (m); None: the detector's"""
    coffset: float = 0.0
    adu_per_photon: float | None = None
    max_adu: float | None = None
    index: int | None = None
    """position in the psana stack ``[P, H, W]`` (CrystFEL's per-panel ``dim1``); None: slab-only panel"""
    no_index: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """``(ss, fs)`` size of the panel: ``(H, W)``."""
        return self.max_ss - self.min_ss + 1, self.max_fs - self.min_fs + 1

    @property
    def pixel_size(self) -> float:
        """Pixel pitch in metres."""
        return 1.0 / self.res

    @property
    def slab_slice(self) -> tuple[slice, slice]:
        return slice(self.min_ss, self.max_ss + 1), slice(self.min_fs, self.max_fs + 1)

    def replace(self, **changes) -> Panel:
        return dataclasses.replace(self, **changes)


@dataclass
class BadRegion:
    """A rectangle of bad pixels: in panel pixels (``panel`` set; ``min_fs..max_fs``, ``min_ss..max_ss``
    inclusive, slab coordinates as CrystFEL writes them) or in lab pixels (``min_x..max_x``, ``min_y..max_y``)."""

    name: str
    panel: str | None = None
    min_fs: int | None = None
    max_fs: int | None = None
    min_ss: int | None = None
    max_ss: int | None = None
    min_x: float | None = None
    max_x: float | None = None
    min_y: float | None = None
    max_y: float | None = None


@dataclass
class Detector:
    """A detector: its panels and the experiment-wide values a ``.geom`` file carries."""

    panels: list[Panel]
    photon_energy: float | None = None
    """eV"""
    clen: float | None = None
    """default camera length (m) of panels without their own"""
    adu_per_photon: float | None = None
    data: str = "/entry_1/data_1/data"
    mask_file: str | None = None
    mask: str | None = None
    mask_good: int | None = None
    mask_bad: int | None = None
    bad_regions: list[BadRegion] = field(default_factory=list)
    rigid_groups: dict[str, list[str]] = field(default_factory=dict)
    rigid_group_collections: dict[str, list[str]] = field(default_factory=dict)
    name: str | None = None
    source: str | None = None
    """where the geometry came from (a file path or a built-in name), used in error messages"""
    clen_from: str | None = None
    """``.geom`` files may read the camera length per event from the data (``clen = /LCLS/detector_1/EncoderValue``):
    that location (with its unit, if any) is kept here and ``clen`` is None"""
    photon_energy_from: str | None = None
    """likewise for ``photon_energy = /LCLS/photon_energy_eV`` (``photon_energy`` is None then)"""

    def __post_init__(self) -> None:
        if not self.panels:
            raise GeometryError(f"{self._where()}: a detector needs at least one panel.")
        names = [p.name for p in self.panels]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise GeometryError(f"{self._where()}: panel names must be unique, found {dup} more than once.")

    # ------------------------------------------------------------------------------------- shapes
    def _where(self) -> str:
        return self.source or self.name or "detector"

    def __len__(self) -> int:
        return len(self.panels)

    @property
    def panel_names(self) -> list[str]:
        return [p.name for p in self.panels]

    @property
    def panel_shape(self) -> tuple[int, int] | None:
        """``(H, W)`` when all panels share one shape (then frames can be ``[P, H, W]`` stacks), else None."""
        shapes = {p.shape for p in self.panels}
        return shapes.pop() if len(shapes) == 1 else None

    @property
    def stack_shape(self) -> tuple[int, int, int] | None:
        """``(P, H, W)`` of a psana-style stack, or None when panel shapes differ."""
        s = self.panel_shape
        return None if s is None else (len(self.panels), *s)

    @property
    def slab_shape(self) -> tuple[int, int]:
        """``(SS, FS)`` of the slab that holds every panel."""
        return (max(p.max_ss for p in self.panels) + 1, max(p.max_fs for p in self.panels) + 1)

    @property
    def wavelength(self) -> float | None:
        """Wavelength in metres (from ``photon_energy``), or None."""
        return None if not self.photon_energy else photon_energy_to_wavelength(self.photon_energy)

    def panel_clen(self, p: Panel) -> float:
        clen = p.clen if p.clen is not None else self.clen
        if clen is None:
            raise GeometryError(f"{self._where()}: panel {p.name} has no camera length (clen); set clen globally "
                                f"or per panel.")
        return float(clen)

    def photon_adu(self) -> np.ndarray | None:
        """ADU of one photon per panel ``[P]`` (the panel's ``adu_per_photon``, else the detector's), or None
        when the geometry does not say."""
        vals = [p.adu_per_photon or self.adu_per_photon for p in self.panels]
        return None if any(v is None for v in vals) else np.asarray(vals, dtype=np.float64)

    def panel_index(self, name_or_index) -> int:
        if isinstance(name_or_index, (int, np.integer)):
            return int(name_or_index)
        try:
            return self.panel_names.index(name_or_index)
        except ValueError:
            raise GeometryError(f"{self._where()}: no panel named {name_or_index!r}; panels are "
                                f"{self.panel_names}.") from None

    # ---------------------------------------------------------------------------- data layouts
    def to_panels(self, data, what: str = "data") -> np.ndarray:
        """Frames in either layout as a panel stack.

        ``data`` is ``[N, P, H, W]`` (psana stacks), ``[N, SS, FS]`` (CrystFEL slabs), one stack ``[P, H, W]``
        or one slab ``[SS, FS]``. Returns ``[N, P, H, W]`` (a view where the layout allows) for detectors whose
        panels share a shape. ``what`` names the data (a file) in the error raised on any other shape.
        """
        a = data if isinstance(data, np.ndarray) else np.asarray(data)
        stack, slab = self.stack_shape, self.slab_shape
        if stack is None:
            raise DetectorShapeError(f"{self._where()}: panels of different shapes "
                                     f"{sorted({p.shape for p in self.panels})} cannot be stacked; {what} must be "
                                     f"read panel by panel (Detector.panel_view).")
        if a.ndim == 4 and a.shape[1:] == stack:
            return a
        if a.ndim == 3 and a.shape == stack and (a.shape[1:] != slab):
            return a[None]
        if a.ndim in (2, 3) and a.shape[-2:] == slab:
            slabs = a if a.ndim == 3 else a[None]
            if len(self.panels) == 1 and self.panels[0].shape == slab:
                return slabs[:, None]
            out = np.empty((len(slabs), *stack), dtype=a.dtype)
            for k, p in enumerate(self.panels):
                out[:, k] = slabs[(slice(None), *p.slab_slice)]
            return out
        raise DetectorShapeError(
            f"{what}: shape {tuple(a.shape)} does not fit the detector {self._where()} ({len(self.panels)} panels "
            f"of {stack[1]} x {stack[2]}): expected [N, {stack[0]}, {stack[1]}, {stack[2]}] panel stacks, "
            f"[N, {slab[0]}, {slab[1]}] slabs, or one event of either.")

    def to_slab(self, panels) -> np.ndarray:
        """``[..., P, H, W]`` panel stack -> ``[..., SS, FS]`` slab (pixels outside every panel are 0)."""
        a = np.asarray(panels)
        if a.shape[-3:] != self.stack_shape:
            raise DetectorShapeError(f"to_slab: expected [..., {', '.join(map(str, self.stack_shape or ()))}], found "
                                     f"{tuple(a.shape)}.")
        out = np.zeros((*a.shape[:-3], *self.slab_shape), dtype=a.dtype)
        for k, p in enumerate(self.panels):
            out[(..., *p.slab_slice)] = a[..., k, :, :]
        return out

    # ------------------------------------------------------------------------------- lab frame
    def lab_xyz(self, panel, fs, ss) -> np.ndarray:
        """Lab-frame positions in metres ``[..., 3]`` of panel-local NumPy coordinates ``(fs, ss)`` (pixel
        centre at integers; the half pixel of CrystFEL's corner convention is added here)."""
        p = self.panels[self.panel_index(panel)]
        fs = np.asarray(fs, dtype=np.float64) + 0.5
        ss = np.asarray(ss, dtype=np.float64) + 0.5
        fv, sv = np.asarray(p.fs, dtype=np.float64), np.asarray(p.ss, dtype=np.float64)
        px = (np.array([p.corner_x, p.corner_y, 0.0]) + fs[..., None] * fv + ss[..., None] * sv) / p.res
        px[..., 2] += self.panel_clen(p) + p.coffset
        return px

    def pixel_xyz(self, panel) -> np.ndarray:
        """Lab positions (m) of every pixel centre of a panel: ``[H, W, 3]``."""
        p = self.panels[self.panel_index(panel)]
        h, w = p.shape
        ss, fs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        return self.lab_xyz(panel, fs, ss)

    def two_theta(self, panel) -> np.ndarray:
        """Scattering angle (rad) of every pixel centre of a panel ``[H, W]``."""
        xyz = self.pixel_xyz(panel)
        return np.arctan2(np.hypot(xyz[..., 0], xyz[..., 1]), xyz[..., 2])

    def beam_center(self, panel) -> tuple[float, float]:
        """Where the beam axis (lab x = y = 0) meets the panel's plane, in panel-local NumPy coordinates
        ``(fs, ss)`` (may lie outside the panel)."""
        p = self.panels[self.panel_index(panel)]
        m = np.array([[p.fs[0], p.ss[0]], [p.fs[1], p.ss[1]]], dtype=np.float64)
        fs, ss = np.linalg.solve(m, -np.array([p.corner_x, p.corner_y]))
        return float(fs - 0.5), float(ss - 0.5)

    def lab_extent(self) -> tuple[float, float, float, float]:
        """``(x_min, x_max, y_min, y_max)`` in lab pixels of the corners of all panels."""
        xs, ys = [], []
        for p in self.panels:
            h, w = p.shape
            for f, s in ((0, 0), (w, 0), (0, h), (w, h)):
                xs.append(p.corner_x + f * p.fs[0] + s * p.ss[0])
                ys.append(p.corner_y + f * p.fs[1] + s * p.ss[1])
        return min(xs), max(xs), min(ys), max(ys)

    def assemble(self, panels, fill: float = np.nan, binning: int = 1) -> tuple[np.ndarray, tuple]:
        """Render one event ``[P, H, W]`` (or a slab) into a lab-frame image (nearest pixel, panel z ignored).

        Returns ``(image [Y, X], (x0, y0, step))``: image pixel ``[r, c]`` covers lab pixels
        ``x0 + c * step``, ``y0 + r * step`` (rows follow +y: show it with the origin at the bottom for the view
        facing the beam, as CrystFEL does). Pixels that no
        panel covers are ``fill``.
        """
        stack = self.to_panels(panels, "assemble")[0]
        x0, x1, y0, y1 = self.lab_extent()
        step = float(binning)
        x0, y0 = math.floor(x0), math.floor(y0)
        nx, ny = int(math.ceil((x1 - x0) / step)), int(math.ceil((y1 - y0) / step))
        out = np.full((ny, nx), fill, dtype=np.float32 if stack.dtype.kind == "f" else np.float64)
        for k, p in enumerate(self.panels):
            h, w = p.shape
            m = np.array([[p.fs[0], p.ss[0]], [p.fs[1], p.ss[1]]], dtype=np.float64)
            inv = np.linalg.inv(m)
            cx = [p.corner_x + f * p.fs[0] + s * p.ss[0] for f, s in ((0, 0), (w, 0), (0, h), (w, h))]
            cy = [p.corner_y + f * p.fs[1] + s * p.ss[1] for f, s in ((0, 0), (w, 0), (0, h), (w, h))]
            c0, c1 = max(int((min(cx) - x0) / step), 0), min(int(math.ceil((max(cx) - x0) / step)), nx)
            r0, r1 = max(int((min(cy) - y0) / step), 0), min(int(math.ceil((max(cy) - y0) / step)), ny)
            yy, xx = np.meshgrid(y0 + (np.arange(r0, r1) + 0.5) * step, x0 + (np.arange(c0, c1) + 0.5) * step,
                                 indexing="ij")
            f = inv[0, 0] * (xx - p.corner_x) + inv[0, 1] * (yy - p.corner_y)
            s = inv[1, 0] * (xx - p.corner_x) + inv[1, 1] * (yy - p.corner_y)
            fi, si = np.floor(f).astype(np.int64), np.floor(s).astype(np.int64)
            ok = (fi >= 0) & (fi < w) & (si >= 0) & (si < h)
            region = out[r0:r1, c0:c1]
            region[ok] = stack[k][si[ok], fi[ok]]
        return out, (float(x0), float(y0), step)

    def replace(self, **changes) -> Detector:
        return dataclasses.replace(self, **changes)
