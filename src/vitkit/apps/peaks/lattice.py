"""Serial-crystallography still shots (SFX at an XFEL) rendered onto any :class:`~vitkit.apps.peaks.detector.Detector`.

A shot is one randomly oriented crystal hit by one polychromatic, slightly divergent pulse. Everything is
seeded: :func:`simulate_shot` draws all shot-level quantities from the generator it is given and every panel's
noise and defects from a child generator keyed by the panel index, so rendering a subset of the panels gives
exactly the pixels those panels have in a full render.

Conventions
    * Lab frame = the detector's (CrystFEL's): the beam travels along +z and hits lab ``(0, 0)``; x, y span the
      detector plane. Wavelengths are in metres in the API (as :attr:`Detector.wavelength`), crystal lengths in
      angstrom, reciprocal lengths in 1/angstrom **without** 2 pi.
    * Reciprocal basis: the direct cell vectors in Cartesian form are ``a = (a, 0, 0)``, ``b`` in the x-y plane,
      ``c`` completing the right-handed cell (the usual PDB / Busing-Levy orthogonalisation). ``B = inv(M).T``
      where ``M`` has columns ``a, b, c``: the columns of ``B`` are ``a*, b*, c*``. ``U`` is a uniformly random
      rotation per shot, ``A* = U B`` and the scattering vector of reflection ``h = (h, k, l)`` is
      ``s = A* h`` with ``|s| = 1 / d``. Laue condition: ``k_out = k_in + s`` with ``k_in = z / lambda``.
    * Panel coordinates are NumPy pixel centres (pixel ``[i, j]`` has its centre at ``(ss, fs) = (i, j)``),
      panel-local, as everywhere in vitkit.

Reflections and partiality
    Every ``hkl`` with ``d >= d_min`` that the space group allows (systematic absences from a small table,
    :data:`SPACE_GROUPS`) is a candidate. For the shot's mean wavelength ``lambda`` the wavelength that would put
    the ideal lattice point exactly on the Ewald sphere is ``lambda_h = -2 s_z / |s|^2``; its fractional offset
    ``eps = lambda_h / lambda - 1`` is the reflection's excitation error. The pulse spectrum is a Gaussian of
    fractional FWHM ``bandwidth``; everything else is expressed as an equivalent width in ``eps`` by dividing the
    radial (normal to the Ewald sphere) reciprocal-space spread by ``g = lambda |s|^2 / 2`` (= ``d r / d eps``):

    * beam divergence (FWHM angle ``delta``): ``|s| cos(theta) sigma_delta``;
    * mosaicity (FWHM angle ``eta``, rotation of mosaic blocks): ``|s| cos(theta) sigma_eta``;
    * domain size ``D`` (finite number of unit cells, Scherrer ``K = 0.9``): ``0.9 / (2.3548 D)``.

    ``partiality = exp(-eps^2 / (2 (sigma_bw^2 + sigma_o^2)))``: the overlap of the spectrum with the
    reflection's acceptance, normalised to 1 on the sphere (the absolute scale is absorbed into the per-shot
    intensity scale). Reflections with ``partiality >= min_partiality`` are predicted.

Spot position
    The reflection is recorded by the part of the spectrum that overlaps its acceptance: a Gaussian product
    centred at ``eps_c = eps sigma_bw^2 / (sigma_bw^2 + sigma_o^2)`` of width ``sigma_c = sigma_bw sigma_o /
    sqrt(sigma_bw^2 + sigma_o^2)``. The spot centre is the ray at Bragg's angle for ``lambda_c = lambda (1 +
    eps_c)`` (``sin theta_c = lambda_c |s| / 2``) in the azimuth of ``s`` (``k_out`` and ``s`` share their
    transverse part). With a wide spectrum and a sharp crystal ``lambda_c -> lambda_h`` (the exact Bragg
    wavelength of the ideal lattice point); with a monochromatic beam ``lambda_c = lambda`` (mosaic blocks
    rotated into the Bragg condition diffract at the nominal Bragg angle). The ray is intersected with each
    panel's plane in 3-D (corner, fs and ss vectors, z included); a reflection is kept if it lands on a panel.

Spot shape
    A 2-D Gaussian on the panel whose covariance is the angular covariance of the diffracted rays mapped through
    the Jacobian of the ray-to-panel projection, plus an isotropic point spread ``psf`` (px):

    * radial (in the scattering plane): ``(2 tan(theta) sigma_c)^2`` (the recorded sub-band spreads 2 theta)
      ``+ sigma_delta^2 + (lambda sigma_D)^2``;
    * tangential: ``(2 sin(theta) sigma_eta)^2`` (blocks rotated out of the scattering plane all diffract: the
      azimuthal mosaic streak) ``+ sigma_delta^2 + (lambda sigma_D)^2``.

    Sharp crystals give round spots of the PSF's size; a fraction ``streaky_fraction`` of shots has a mosaic
    crystal (``streaky_mosaicity``) whose high-resolution spots are azimuthal streaks. The profile is integrated
    over each pixel with ``oversample^2`` samples (spots whose minor sigma is >= 1 px take one sample per pixel
    with the pixel's box variance 1/12 added to the covariance), truncated at ``R = ceil(3 sigma_major) + 1 <=
    max_spot_radius`` px, and normalised so that its pixel sum over the (unclipped) window is the spot's
    expected photons. Reflections expected to give fewer than ``min_render_photons`` are listed but not rendered.

Intensities
    ``I_full = scale * exp(-B / (2 d^2)) * X`` with ``X ~ Exp(1)`` (acentric Wilson statistics), equal for all
    reflections related by the Laue group (Friedel mates included). ``scale`` (log-uniform per shot) and ``B``
    vary per shot: weak shots with a handful of peaks to strong ones. With ``structure_seed`` set, ``X`` is one
    fixed "structure" for all shots (one protein per experiment); ``None`` draws it per shot. Expected photons
    ``= I_full * partiality * polarisation`` (horizontal polarisation along lab x, fraction ``polarization``).

Background (expected photons per pixel)
    ``Omega_pol * (water * exp(-(s - 1/d_w)^2 / (2 sigma_w^2)) + air / (1 + (2 theta / theta_air)^2)) +
    Omega * constant``, with ``s = 2 sin(theta) / lambda`` of the pixel from the geometry (so the water ring sits
    at water's real ``q = 2 pi / d_w`` ~ 2.0 1/A on any detector), ``Omega = (clen / L)^2 cos(incidence)`` the
    pixel's solid angle relative to a pixel facing the sample at the camera length, ``Omega_pol`` that times
    the polarisation factor. In a fraction ``jet_fraction`` of shots a liquid-jet streak is added inside
    ``Omega_pol``: ``jet * exp(-d^2 / (2 w^2)) / (1 + (2 theta / jet_angle)^2)``, ``d`` the pixel's distance
    (px) from the lab line through the beam at azimuth ``jet_azimuth`` (jittered per shot; uniform when unset).

Detector response, per panel (from the panel's child generator)
    ``ADU = adu_per_photon * (gain * Poisson(expected) + offset + read_noise * N(0, 1))`` with gain = panel gain
    (``1 +- gain_sigma``) times ASIC gain (``1 +- asic_gain_sigma``), offset = pedestal residual per panel and per
    ASIC plus a common-mode residual per ASIC row (all in photon units); then saturation at ``max_adu``, dead
    pixels read 0 and hot pixels read ``U(hot_level) * max_adu`` (a fraction ``hot_saturated_fraction`` exactly
    ``max_adu``). The returned ``good`` mask marks the panel edges (``edge_width``), the dead pixels and the hot
    pixels bad, except a fraction ``hot_unmasked_fraction`` of hot pixels (and ``dead_unmasked_fraction`` of
    dead ones) that a real mask misses. A fraction ``hot_cluster_fraction`` of hot defects are clusters of 2-4
    adjacent pixels, masked or missed together.

Truth
    ``visible``: the reflection's centre pixel (rounded centre) lies on the panel at least one pixel from its
    edge, is not a bad pixel (masked or not) and is inside the reflection's own half-maximum footprint; and the
    expected signal ``S`` within the footprint (good pixels only) satisfies ``S >= min_snr * sqrt(S + B + n
    read_noise^2)``, ``B`` being the expected background photons and ``n`` the number of pixels of the
    footprint. Visible reflections whose centres are closer than ``min_separation`` px (transitively) are
    *merged*: one truth peak at their photon-weighted centroid with their summed photons (they cannot be told
    apart by a finder, but the pixels are real signal, so neither is dropped).
    ``labels = 1`` on the half-maximum footprint (profile ``>= 0.5 *`` its sampled maximum) of every visible
    reflection, 0 elsewhere and on every bad pixel; label fragments that bad pixels cut off from the reflection
    centre are removed, so every label component contains a visible reflection centre and vice versa.

Simplifications (documented, deliberate)
    Gaussian spectrum, mosaic distribution, divergence and domain shape transform (real SASE spectra are spiky,
    real shape transforms have fringes); no Lorentz factor beyond the partiality, no absorption, no
    anisotropic B, no diffuse scattering, no beam stop (the panels' central hole plays its part); a spot's tails
    are clipped at its panel's edges (they never spill onto a neighbouring panel); the spot centre uses the
    Gaussian-product wavelength above (the centroid of a partial reflection is not refined further); read noise
    is Gaussian (torch's sampler, seeded from the panel's generator) and the Poisson draw uses an exact
    inverse-CDF sampler for low counts (NumPy's sampler above).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vitkit.apps.peaks.detector import Detector, load_detector, photon_energy_to_wavelength
from vitkit.errors import ConfigError

__all__ = ["LatticeConfig", "Shot", "simulate_shot", "LatticeStillsDataset", "collate_lattice", "SPACE_GROUPS",
           "REFLECTION_DTYPE", "reciprocal_basis", "allowed_reflections", "random_rotation", "normalize_space_group"]

_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))  # FWHM / sigma of a Gaussian
_POISSON_SPLIT = 6.0  # expected counts above this use NumPy's Poisson sampler, below it the inverse CDF
_POISSON_HEAD = 5  # inverse-CDF thresholds evaluated for every pixel before compaction

REFLECTION_DTYPE = np.dtype([
    ("panel", np.int32),        # detector panel index
    ("fs", np.float64), ("ss", np.float64),  # panel-local NumPy pixel-centre coordinates of the spot centre
    ("h", np.int32), ("k", np.int32), ("l", np.int32),
    ("d", np.float64),          # resolution (A)
    ("photons", np.float64),    # expected integrated photons on the detector (partiality, polarisation applied)
    ("intensity", np.float64),  # fully recorded intensity (photons) before partiality and polarisation
    ("partiality", np.float64),
    ("excitation", np.float64),  # eps = lambda_h / lambda - 1
    ("wavelength", np.float64),  # wavelength lambda_c (m) whose Bragg angle places the spot
    ("sigma_major", np.float32), ("sigma_minor", np.float32),  # spot profile widths (px, Gaussian sigma)
    ("snr", np.float32),        # expected S / sqrt(S + B + n read_noise^2) over the half-maximum footprint
    ("visible", np.bool_),
    ("peak", np.int32),         # row of the truth peak (Shot.peaks of its panel) it belongs to; -1 if not visible
])


# --------------------------------------------------------------------------------------------- space groups
def _ops_closure(generators: Sequence[np.ndarray]) -> np.ndarray:
    """The finite group (integer 3x3 matrices acting on hkl) generated by ``generators`` and inversion."""
    ops = [np.eye(3, dtype=np.int64), -np.eye(3, dtype=np.int64)]
    gens = [np.asarray(g, dtype=np.int64) for g in generators] + [-np.eye(3, dtype=np.int64)]
    changed = True
    while changed:
        changed = False
        for a in list(ops):
            for g in gens:
                m = a @ g
                if not any(np.array_equal(m, o) for o in ops):
                    ops.append(m)
                    changed = True
    return np.stack(ops)


_TWO_Y = [[-1, 0, 0], [0, 1, 0], [0, 0, -1]]
_TWO_Z = [[-1, 0, 0], [0, -1, 0], [0, 0, 1]]
_TWO_X = [[1, 0, 0], [0, -1, 0], [0, 0, -1]]
_FOUR_Z = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
_LAUE = {"-1": [], "2/m": [_TWO_Y], "mmm": [_TWO_Z, _TWO_X], "4/m": [_FOUR_Z], "4/mmm": [_FOUR_Z, _TWO_X]}


@dataclass(frozen=True)
class _SpaceGroup:
    """A space group as the simulator needs it: crystal system (cell check), Laue class (equal intensities) and
    reflection conditions: lattice centring plus screw-axis conditions on the reciprocal axes, ``axial =
    {"h": n}`` meaning ``h00`` is present only for ``h = n m`` (likewise ``"k"``: ``0k0``, ``"l"``: ``00l``)."""

    name: str
    system: str
    laue: str
    centring: str = "P"
    axial: tuple[tuple[str, int], ...] = ()

    def absent(self, h: np.ndarray, k: np.ndarray, l: np.ndarray) -> np.ndarray:  # noqa: E741
        """Mask of systematically absent reflections."""
        if self.centring == "C":
            out = (h + k) % 2 != 0
        elif self.centring == "I":
            out = (h + k + l) % 2 != 0
        elif self.centring == "F":
            out = ((h + k) % 2 != 0) | ((k + l) % 2 != 0)
        else:
            out = np.zeros(h.shape, dtype=bool)
        on_axis = {"h": (k == 0) & (l == 0), "k": (h == 0) & (l == 0), "l": (h == 0) & (k == 0)}
        index = {"h": h, "k": k, "l": l}
        for ax, n in self.axial:
            out |= on_axis[ax] & (index[ax] % n != 0)
        return out


def _sg(name: str, system: str, laue: str, centring: str = "P", **axial: int) -> _SpaceGroup:
    return _SpaceGroup(name, system, laue, centring, tuple(sorted(axial.items())))


SPACE_GROUPS: dict[str, _SpaceGroup] = {g.name: g for g in [
    _sg("P1", "triclinic", "-1"),
    _sg("P2", "monoclinic", "2/m"),
    _sg("P21", "monoclinic", "2/m", k=2),
    _sg("C2", "monoclinic", "2/m", "C"),
    _sg("P222", "orthorhombic", "mmm"),
    _sg("P2221", "orthorhombic", "mmm", l=2),
    _sg("P21212", "orthorhombic", "mmm", h=2, k=2),
    _sg("P212121", "orthorhombic", "mmm", h=2, k=2, l=2),
    _sg("C222", "orthorhombic", "mmm", "C"),
    _sg("C2221", "orthorhombic", "mmm", "C", l=2),
    _sg("I222", "orthorhombic", "mmm", "I"),
    _sg("I212121", "orthorhombic", "mmm", "I"),
    _sg("F222", "orthorhombic", "mmm", "F"),
    _sg("P4", "tetragonal", "4/m"),
    _sg("P41", "tetragonal", "4/m", l=4),
    _sg("P42", "tetragonal", "4/m", l=2),
    _sg("P43", "tetragonal", "4/m", l=4),
    _sg("I4", "tetragonal", "4/m", "I"),
    _sg("P422", "tetragonal", "4/mmm"),
    _sg("P4212", "tetragonal", "4/mmm", h=2, k=2),
    _sg("P4122", "tetragonal", "4/mmm", l=4),
    _sg("P4322", "tetragonal", "4/mmm", l=4),
    _sg("P41212", "tetragonal", "4/mmm", h=2, k=2, l=4),
    _sg("P43212", "tetragonal", "4/mmm", h=2, k=2, l=4),
    _sg("P42212", "tetragonal", "4/mmm", h=2, k=2, l=2),
    _sg("I422", "tetragonal", "4/mmm", "I"),
]}
_SG_ALIASES = {"P121": "P2", "P1211": "P21", "C121": "C2"}


def normalize_space_group(symbol: str) -> str:
    """Canonical table name of a Hermann-Mauguin symbol: ``"P 43 21 2"``, ``"P4(3)2(1)2"``, ``"p4_32_12"`` ->
    ``"P43212"``. Raises :class:`ConfigError` listing the supported groups for anything else."""
    key = "".join(ch for ch in str(symbol).upper() if ch not in " ()_")
    key = _SG_ALIASES.get(key, key)
    if key not in SPACE_GROUPS:
        raise ConfigError(f"space group {symbol!r} is not supported by the lattice simulator; supported: "
                          f"{', '.join(SPACE_GROUPS)} (spaces, parentheses and underscores are ignored, e.g. "
                          f"'P 43 21 2' or 'P4(3)2(1)2'). Add its reflection conditions to SPACE_GROUPS to use it.")
    return key


def _check_cell(cell, group: _SpaceGroup) -> None:
    a, b, c, al, be, ga = cell
    tol = 1e-6
    bad = None
    if group.system == "monoclinic" and (abs(al - 90) > tol or abs(ga - 90) > tol):
        bad = "alpha = gamma = 90 (unique axis b)"
    elif group.system == "orthorhombic" and max(abs(al - 90), abs(be - 90), abs(ga - 90)) > tol:
        bad = "alpha = beta = gamma = 90"
    elif group.system == "tetragonal" and (abs(a - b) > tol * a or max(abs(al - 90), abs(be - 90), abs(ga - 90)) > tol):
        bad = "a = b and alpha = beta = gamma = 90"
    if bad:
        raise ConfigError(f"LatticeConfig: space group {group.name} is {group.system} and needs {bad}, found cell "
                          f"{tuple(cell)}.")


# ------------------------------------------------------------------------------------------------ geometry
def reciprocal_basis(cell: Sequence[float]) -> np.ndarray:
    """``B`` (1/A, no 2 pi): columns ``a*, b*, c*`` in the crystal's Cartesian frame (``a`` along x, ``b`` in
    the x-y plane), so that ``|B @ (h, k, l)| = 1 / d``."""
    a, b, c = (float(x) for x in cell[:3])
    al, be, ga = (math.radians(float(x)) for x in cell[3:])
    cx = c * math.cos(be)
    cy = c * (math.cos(al) - math.cos(be) * math.cos(ga)) / math.sin(ga)
    cz2 = c * c - cx * cx - cy * cy
    if cz2 <= 0:
        raise ConfigError(f"LatticeConfig.cell: angles {tuple(cell[3:])} do not form a cell (zero or imaginary "
                          f"volume); check alpha, beta, gamma.")
    m = np.array([[a, b * math.cos(ga), cx], [0.0, b * math.sin(ga), cy], [0.0, 0.0, math.sqrt(cz2)]])
    return np.linalg.inv(m).T


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3) (normalised Gaussian quaternion)."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def allowed_reflections(cell: Sequence[float], space_group: str, d_min: float) -> np.ndarray:
    """All ``hkl`` (int ``[N, 3]``) with ``d >= d_min`` that the space group does not systematically extinguish
    (both Friedel mates, no ``000``)."""
    return _reflection_table(tuple(float(x) for x in cell), normalize_space_group(space_group), float(d_min),
                             None)[0].copy()


def _canonical_keys(hkl: np.ndarray, laue: str) -> np.ndarray:
    """One integer per Laue-equivalence class (Friedel mates included): the largest encoded equivalent."""
    ops = _ops_closure(_LAUE[laue])
    off = int(np.abs(hkl).max(initial=0)) + 1
    base = 2 * off + 1
    best = None
    for op in ops:
        e = hkl @ op.T + off
        key = (e[:, 0] * base + e[:, 1]) * base + e[:, 2]
        best = key if best is None else np.maximum(best, key)
    return best


@functools.lru_cache(maxsize=8)
def _reflection_table(cell: tuple, sg_name: str, d_min: float, structure_seed: int | None):
    """(hkl int64 [N, 3], 1/d^2 [N], X [N] or None, (h, k, l) float64 columns): candidate reflections and
    their fixed Wilson draws."""
    bmat = reciprocal_basis(cell)
    lim = [int(math.floor(cell[i] / d_min)) + 1 for i in range(3)]  # |h| <= a / d (h = a . s)
    n_est = (2 * lim[0] + 1) * (2 * lim[1] + 1) * (2 * lim[2] + 1)
    if n_est > 3e7:
        raise ConfigError(f"LatticeConfig: {n_est:.3g} hkl candidates for cell {cell} at d_min = {d_min} A is too "
                          f"many; raise d_min.")
    group = SPACE_GROUPS[sg_name]
    hkl = []
    for h in range(-lim[0], lim[0] + 1):  # one h plane at a time keeps memory small
        k, l = np.meshgrid(np.arange(-lim[1], lim[1] + 1), np.arange(-lim[2], lim[2] + 1), indexing="ij")  # noqa: E741
        pl = np.stack([np.full(k.size, h), k.ravel(), l.ravel()], axis=1)
        s = pl @ bmat.T
        inv_d2 = np.einsum("ij,ij->i", s, s)
        keep = (inv_d2 <= 1.0 / d_min ** 2) & (inv_d2 > 0)
        pl = pl[keep]
        keep = ~group.absent(pl[:, 0], pl[:, 1], pl[:, 2])
        hkl.append(pl[keep])
    hkl = np.concatenate(hkl).astype(np.int64)
    s = hkl @ bmat.T
    inv_d2 = np.einsum("ij,ij->i", s, s)
    x = None
    if structure_seed is not None:
        keys = _canonical_keys(hkl, group.laue)
        uniq, inv = np.unique(keys, return_inverse=True)
        x = np.random.default_rng(np.random.SeedSequence([int(structure_seed), 0x57A7])).exponential(size=uniq.size)
        x = x[inv]
    cols = tuple(np.ascontiguousarray(hkl[:, i], dtype=np.float64) for i in range(3))
    for arr in (hkl, inv_d2, x, *cols):
        if arr is not None:
            arr.setflags(write=False)
    return hkl, inv_d2, x, cols


@dataclass
class _PanelGeom:
    shape: tuple[int, int]
    origin: np.ndarray  # lab (m) of the corner of the first pixel
    fs: np.ndarray      # lab (m) step of one pixel along fs
    ss: np.ndarray
    normal: np.ndarray  # fs x ss (unnormalised)
    ginv: np.ndarray    # inverse Gram matrix of (fs, ss)
    clen: float
    maps: dict = field(default_factory=dict)


_GEOM_CACHE: dict[tuple, list[_PanelGeom]] = {}


def _geometry(det: Detector) -> list[_PanelGeom]:
    sig = tuple((p.shape, p.fs, p.ss, p.corner_x, p.corner_y, p.res, det.panel_clen(p), p.coffset) for p in det.panels)
    hit = _GEOM_CACHE.get(sig)
    if hit is not None:
        return hit
    out = []
    for p in det.panels:
        z0 = det.panel_clen(p) + p.coffset
        origin = np.array([p.corner_x / p.res, p.corner_y / p.res, z0])
        f = np.asarray(p.fs, dtype=np.float64) / p.res
        s = np.asarray(p.ss, dtype=np.float64) / p.res
        gram = np.array([[f @ f, f @ s], [s @ f, s @ s]])
        out.append(_PanelGeom(p.shape, origin, f, s, np.cross(f, s), np.linalg.inv(gram), det.panel_clen(p)))
    if len(_GEOM_CACHE) > 8:
        _GEOM_CACHE.clear()
    _GEOM_CACHE[sig] = out
    return out


def _pixel_maps(det: Detector, k: int, g: _PanelGeom, polarization: float) -> dict[str, np.ndarray]:
    """Cached per-pixel maps of a panel: sin(theta), 2 theta, solid angle, solid angle x polarisation and the lab
    x, y (m) of every pixel centre."""
    key = ("maps", polarization)
    if key not in g.maps:
        xyz = det.pixel_xyz(k)
        dist = np.linalg.norm(xyz, axis=-1)
        u = xyz / dist[..., None]
        tt = np.arccos(np.clip(u[..., 2], -1.0, 1.0))
        nhat = g.normal / np.linalg.norm(g.normal)
        omega = (g.clen / dist) ** 2 * np.abs(u @ nhat)
        pol = polarization * (1 - u[..., 0] ** 2) + (1 - polarization) * (1 - u[..., 1] ** 2)
        g.maps[key] = {"sin_theta": np.sin(tt / 2).astype(np.float32), "two_theta": tt.astype(np.float32),
                       "omega": omega.astype(np.float32), "omega_pol": (omega * pol).astype(np.float32),
                       "x": xyz[..., 0].astype(np.float32), "y": xyz[..., 1].astype(np.float32)}
    return g.maps[key]


# -------------------------------------------------------------------------------------------------- config
def _asic_grid_for(shape: tuple[int, int]) -> tuple[int, int]:
    known = {(352, 384): (2, 2), (512, 1024): (2, 4), (185, 388): (1, 2), (185, 194): (1, 1)}
    if shape in known:
        return known[shape]
    return (2, 2) if shape[0] % 2 == 0 and shape[1] % 2 == 0 else (1, 1)


@dataclass(frozen=True)
class LatticeConfig:
    """Parameters of a lattice still shot. ``(lo, hi)`` ranges are drawn once per shot (uniform, or log-uniform
    where noted). Angles of the beam and crystal are FWHM; photon-unit quantities are multiplied by
    ``adu_per_photon`` in the image."""

    # crystal
    cell: tuple[float, float, float, float, float, float] = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)
    """Unit cell ``(a, b, c, alpha, beta, gamma)`` in A and degrees (default: tetragonal lysozyme)."""
    space_group: str = "P43212"
    """Hermann-Mauguin symbol; see :data:`SPACE_GROUPS` (e.g. ``"P 43 21 2"``, ``"P4(3)2(1)2"``, ``"C2"``)."""
    d_min: float = 1.8
    """Resolution limit (A): reflections with ``d < d_min`` are never predicted."""
    domain_size: tuple[float, float] = (1000.0, 10000.0)
    """Mosaic-domain size ``D`` (A), log-uniform; ``D / a`` unit cells per domain. Sets the reciprocal-lattice
    point width (Scherrer: FWHM ``0.9 / D``)."""
    mosaicity: tuple[float, float] = (0.01, 0.1)
    """Mosaic spread (degrees FWHM) of ordinary shots."""
    streaky_fraction: float = 0.15
    """Probability that a shot's crystal is strongly mosaic (``streaky_mosaicity``): azimuthal streaks."""
    streaky_mosaicity: tuple[float, float] = (0.3, 1.0)
    """Mosaic spread (degrees FWHM) of streaky shots."""
    wilson_b: tuple[float, float] = (15.0, 40.0)
    """Overall Wilson B factor (A^2): ``<I> ~ exp(-B / (2 d^2))``."""
    intensity_scale: tuple[float, float] = (20.0, 3000.0)
    """Mean fully recorded photons of a reflection extrapolated to ``d -> inf`` (log-uniform per shot)."""
    structure_seed: int | None = 0
    """Seed of the fixed Wilson intensities (one structure for all shots); ``None``: new intensities per shot."""
    # beam
    photon_energy: float | None = None
    """Photon energy (eV); ``None``: the detector's ``photon_energy``."""
    energy_jitter: float = 1e-3
    """Shot-to-shot jitter of the mean photon energy (fractional standard deviation; SASE ~0.1 %)."""
    bandwidth: tuple[float, float] = (2e-3, 4e-3)
    """Spectral bandwidth (fractional FWHM of a Gaussian spectrum; SASE hard X-rays ~0.2-0.5 %)."""
    divergence: float = 1e-4
    """Beam divergence/convergence (rad, FWHM)."""
    polarization: float = 1.0
    """Fraction of the beam polarised along lab x (XFEL undulators: horizontal, ~1)."""
    min_partiality: float = 1e-3
    """Reflections below this partiality are not predicted."""
    # spot rendering
    psf: tuple[float, float] = (0.5, 1.1)
    """Point-spread (Gaussian sigma, px) added to every spot: detector charge sharing and beam footprint."""
    oversample: int = 2
    """Samples per pixel along each axis when integrating a spot profile over a pixel."""
    max_spot_radius: int = 12
    """Largest half-size (px) of a spot's rendering window (long streaks are truncated there)."""
    min_render_photons: float = 0.1
    """Reflections expected to give fewer photons are listed (never visible) but not rendered: together they
    carry well under 1 % of a shot's Bragg photons, spread over many pixels."""
    # background (expected photons per pixel, before the detector response)
    water_amplitude: tuple[float, float] = (0.2, 5.0)
    """Water-ring peak (photons/px at normal incidence at the camera length), log-uniform."""
    water_ring_d: tuple[float, float] = (3.05, 3.25)
    """Water-ring centre as a d spacing (A): water's main peak at q = 2 pi / d ~ 2.0 1/A."""
    water_ring_fwhm: float = 0.09
    """Water-ring FWHM in ``s = 1 / d`` (1/A): spans ~3.0-3.7 A at half maximum with the defaults."""
    air_amplitude: tuple[float, float] = (0.05, 1.0)
    """Air scatter at 2 theta = 0 (photons/px), log-uniform."""
    air_angle: float = 0.15
    """Air scatter falls as ``1 / (1 + (2 theta / air_angle)^2)`` (rad)."""
    background: tuple[float, float] = (0.01, 0.3)
    """Smooth constant background (photons/px at normal incidence): fluorescence, stray light."""
    jet_fraction: float = 0.5
    """Fraction of shots with a liquid-jet streak: the thin line through the beam centre, perpendicular to the
    jet, that reflection off the jet's surface draws on SFX frames (background, never a peak)."""
    jet_amplitude: tuple[float, float] = (0.5, 20.0)
    """Jet-streak brightness on its axis near the beam (photons/px), log-uniform."""
    jet_azimuth: float | None = None
    """Direction of the streak in the lab x-y plane (degrees from +x; 0: a vertical jet's horizontal streak);
    ``None``: uniform per shot (training sees every direction)."""
    jet_azimuth_jitter: float = 3.0
    """Per-shot jitter of a set ``jet_azimuth`` (degrees, standard deviation)."""
    jet_width: tuple[float, float] = (0.5, 1.5)
    """Gaussian sigma of the streak's cross-section (px), uniform."""
    jet_angle: float = 0.25
    """The streak fades as ``1 / (1 + (2 theta / jet_angle)^2)`` along its length (rad)."""
    # detector response
    adu_per_photon: float | None = None
    """ADU per photon; ``None``: the panel's / detector's ``adu_per_photon``, else 1."""
    max_adu: float | None = None
    """Saturation (ADU); ``None``: the panel's ``max_adu``, else ``10000 * adu_per_photon``; ``inf``: none."""
    gain_sigma: float = 0.05
    """Relative gain error per panel (``gain = 1 + gain_sigma * N(0, 1)``)."""
    asic_gain_sigma: float = 0.01
    """Relative gain error per ASIC (on top of the panel's)."""
    pedestal_sigma: float = 0.1
    """Pedestal residual per panel (photons, standard deviation)."""
    asic_offset_sigma: float = 0.05
    """Pedestal / common-mode residual per ASIC (photons)."""
    common_mode_sigma: float = 0.02
    """Common-mode residual per row of each ASIC (photons)."""
    read_noise: float = 0.1
    """Gaussian read noise (photons, standard deviation per pixel)."""
    asic_grid: tuple[int, int] | None = None
    """ASICs per panel ``(rows, cols)``; ``None``: inferred from the panel shape (epix10k 2 x 2, Jungfrau 2 x 4,
    CSPAD 1 x 2), else 2 x 2 when both sides are even."""
    shot_noise: str = "poisson"
    """``"poisson"`` (exact), ``"gaussian"`` (normal approximation, same variance) or ``"none"``."""
    dead_fraction: float = 5e-4
    """Fraction of pixels that read 0."""
    hot_fraction: float = 2e-3
    """Fraction of pixels that read high (0.2 %: what LCLS epix10k2M runs with a stale mask show)."""
    hot_level: tuple[float, float] = (0.2, 1.0)
    """Hot-pixel value as a fraction of ``max_adu`` (uniform)."""
    hot_saturated_fraction: float = 0.5
    """Fraction of hot pixels that read exactly ``max_adu``."""
    hot_unmasked_fraction: float = 0.3
    """Fraction of hot pixels missing from the returned ``good`` mask (still bad: labels are 0 there)."""
    dead_unmasked_fraction: float = 0.0
    """Fraction of dead pixels missing from the returned ``good`` mask."""
    hot_cluster_fraction: float = 0.1
    """Fraction of hot defects that are clusters (2-4 adjacent hot pixels, masked or missed together, each at
    its own hot level): damaged or bump-bond-shorted groups. Lone hot pixels are easy to reject by size;
    clusters are what a peak finder's minimum pixel count lets through."""
    defect_seed: int | None = None
    """Seed of a fixed defect map (the same dead/hot pixels every shot); ``None``: new defects per shot."""
    edge_width: int = 1
    """Rows/columns at each panel edge marked bad in ``good`` (0: none)."""
    # truth
    min_snr: float = 5.0
    """A reflection is visible (a truth peak a finder must report) if its expected half-maximum signal exceeds
    ``min_snr`` times its noise."""
    weak_snr: float = 2.0
    """Reflections with ``weak_snr <= snr < min_snr`` are *weak*: real but not required. They are neither truth
    nor labelled; :meth:`Shot.weak` lists them so that training ignores their pixels and evaluation treats a
    peak found there as neither right nor wrong (PASCAL VOC's "difficult" objects)."""
    min_separation: float = 3.0
    """Visible reflections closer than this (px) are merged into one truth peak."""

    def __post_init__(self) -> None:
        def rng_ok(name, lo_min=0.0, strict=False):
            lo, hi = getattr(self, name)
            if not (lo >= lo_min and hi >= lo and (lo > lo_min or not strict)) or not math.isfinite(hi):
                raise ConfigError(f"LatticeConfig.{name}: expected a range (lo, hi) with "
                                  f"{lo_min} {'<' if strict else '<='} lo <= hi < inf, found {getattr(self, name)}.")

        if len(self.cell) != 6 or min(self.cell[:3]) <= 0 or not all(0 < x < 180 for x in self.cell[3:]):
            raise ConfigError(f"LatticeConfig.cell: expected (a, b, c, alpha, beta, gamma) with positive lengths (A) "
                              f"and angles in (0, 180) degrees, found {self.cell}.")
        group = SPACE_GROUPS[normalize_space_group(self.space_group)]
        _check_cell(self.cell, group)
        reciprocal_basis(self.cell)  # raises on impossible angles
        if not self.d_min > 0:
            raise ConfigError(f"LatticeConfig.d_min: expected a resolution limit > 0 A, found {self.d_min}.")
        if self.d_min < min(self.cell[:3]) / 2000:
            raise ConfigError(f"LatticeConfig.d_min = {self.d_min} A is far too fine for cell {self.cell}: expected "
                              f"d_min >= {min(self.cell[:3]) / 2000:.3g} A.")
        for name in ("mosaicity", "streaky_mosaicity", "wilson_b", "bandwidth", "water_ring_d", "background",
                     "water_amplitude", "air_amplitude", "intensity_scale"):
            rng_ok(name)
        rng_ok("domain_size", strict=True)
        rng_ok("psf", strict=True)
        rng_ok("hot_level")
        rng_ok("jet_amplitude")
        rng_ok("jet_width", strict=True)
        if not (self.jet_angle > 0 and self.jet_azimuth_jitter >= 0
                and (self.jet_azimuth is None or math.isfinite(self.jet_azimuth))):
            raise ConfigError(f"LatticeConfig.jet_angle / jet_azimuth_jitter / jet_azimuth: expected > 0 / >= 0 / "
                              f"finite, found {self.jet_angle} / {self.jet_azimuth_jitter} / {self.jet_azimuth}.")
        if self.water_ring_d[0] <= 0:
            raise ConfigError(f"LatticeConfig.water_ring_d: expected d > 0 A, found {self.water_ring_d}.")
        for name in ("streaky_fraction", "polarization", "hot_saturated_fraction", "hot_unmasked_fraction",
                     "dead_unmasked_fraction", "dead_fraction", "hot_fraction", "jet_fraction",
                     "hot_cluster_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"LatticeConfig.{name}: expected a fraction in [0, 1], found {v}.")
        if not 0.0 < self.min_partiality < 1.0:
            raise ConfigError(f"LatticeConfig.min_partiality: expected 0 < value < 1, found {self.min_partiality}.")
        for name in ("energy_jitter", "divergence", "gain_sigma", "asic_gain_sigma", "pedestal_sigma",
                     "asic_offset_sigma", "common_mode_sigma", "read_noise", "min_snr", "min_separation",
                     "min_render_photons"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"LatticeConfig.{name}: expected a finite value >= 0, found {v}.")
        if not 0 <= self.weak_snr <= self.min_snr:
            raise ConfigError(f"LatticeConfig.weak_snr: expected 0 <= weak_snr <= min_snr ({self.min_snr}), found "
                              f"{self.weak_snr}.")
        if not self.water_ring_fwhm > 0 or not self.air_angle > 0:
            raise ConfigError(f"LatticeConfig.water_ring_fwhm / air_angle: expected > 0, found "
                              f"{self.water_ring_fwhm} / {self.air_angle}.")
        if self.photon_energy is not None and not self.photon_energy > 0:
            raise ConfigError(f"LatticeConfig.photon_energy: expected eV > 0 or None, found {self.photon_energy}.")
        if self.adu_per_photon is not None and not self.adu_per_photon > 0:
            raise ConfigError(f"LatticeConfig.adu_per_photon: expected > 0 or None, found {self.adu_per_photon}.")
        if self.max_adu is not None and not self.max_adu > 0:
            raise ConfigError(f"LatticeConfig.max_adu: expected > 0, inf or None, found {self.max_adu}.")
        if int(self.oversample) != self.oversample or not 1 <= self.oversample <= 8:
            raise ConfigError(f"LatticeConfig.oversample: expected an integer in 1..8, found {self.oversample}.")
        if int(self.max_spot_radius) != self.max_spot_radius or not 2 <= self.max_spot_radius <= 64:
            raise ConfigError(f"LatticeConfig.max_spot_radius: expected an integer in 2..64, found "
                              f"{self.max_spot_radius}.")
        if int(self.edge_width) != self.edge_width or self.edge_width < 0:
            raise ConfigError(f"LatticeConfig.edge_width: expected an integer >= 0, found {self.edge_width}.")
        if self.asic_grid is not None and (len(self.asic_grid) != 2 or min(self.asic_grid) < 1):
            raise ConfigError(f"LatticeConfig.asic_grid: expected (rows, cols) >= 1 or None, found {self.asic_grid}.")
        if self.shot_noise not in ("poisson", "gaussian", "none"):
            raise ConfigError(f"LatticeConfig.shot_noise: expected 'poisson', 'gaussian' or 'none', found "
                              f"{self.shot_noise!r}.")

    def replace(self, **changes: Any) -> LatticeConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def noiseless(cls, **overrides: Any) -> LatticeConfig:
        """Spots only, in photons: no background, noise, gain/pedestal errors, defects, edges or saturation."""
        clean = dict(water_amplitude=(0.0, 0.0), air_amplitude=(0.0, 0.0), background=(0.0, 0.0),
                     gain_sigma=0.0, asic_gain_sigma=0.0, pedestal_sigma=0.0, asic_offset_sigma=0.0,
                     common_mode_sigma=0.0, read_noise=0.0, shot_noise="none", dead_fraction=0.0, hot_fraction=0.0,
                     jet_fraction=0.0,
                     edge_width=0, max_adu=math.inf, adu_per_photon=1.0)
        clean.update(overrides)
        return cls(**clean)


# ---------------------------------------------------------------------------------------------------- shot
@dataclass
class Shot:
    """One simulated still. Arrays cover the rendered panels (``panels``) in the order requested."""

    images: np.ndarray
    """float32 ``[P, H, W]``: ADU after gain, pedestal, noise, defects and saturation."""
    labels: np.ndarray
    """uint8 ``[P, H, W]``: 1 on the half-maximum footprint of visible reflections, 0 elsewhere and on bad pixels."""
    good: np.ndarray
    """bool ``[P, H, W]``: the bad-pixel mask a beamline would supply (True = good; misses some hot pixels)."""
    panels: np.ndarray
    """int64 ``[P]``: detector panel index of each rendered panel."""
    reflections: np.ndarray
    """Structured array (:data:`REFLECTION_DTYPE`) of the predicted reflections landing on rendered panels."""
    peaks: list[np.ndarray]
    """Per rendered panel float32 ``[n, 3]`` ``(ss, fs, photons)``: the truth peaks (merged visible reflections)."""
    orientation: np.ndarray
    """``U`` (3 x 3): crystal Cartesian frame -> lab frame."""
    a_star: np.ndarray
    """``A* = U B`` (1/A): columns ``a*, b*, c*`` in the lab frame, ``s = A* (h, k, l)``."""
    wavelength: float
    """Mean wavelength of this shot (m; the detector's or config's photon energy with the shot's jitter)."""
    cell: tuple[float, ...]
    space_group: str
    params: dict[str, float] = field(default_factory=dict)
    """Shot-level draws: bandwidth, mosaicity, domain_size, wilson_b, intensity_scale, psf, backgrounds, ..."""

    @property
    def visible(self) -> np.ndarray:
        """The visible reflections (a view of ``reflections``)."""
        return self.reflections[self.reflections["visible"]]

    def weak(self, weak_snr: float) -> list[np.ndarray]:
        """Per rendered panel float32 ``[n, 2]`` ``(ss, fs)`` of the reflections that are not visible but have
        ``snr >= weak_snr`` (:attr:`LatticeConfig.weak_snr`)."""
        r = self.reflections
        w = r[~r["visible"] & (r["snr"] >= weak_snr)]
        return [np.stack([w["ss"][w["panel"] == k], w["fs"][w["panel"] == k]], 1).astype(np.float32)
                for k in self.panels]


def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _draw(rng: np.random.Generator, lohi: tuple[float, float], log: bool = False) -> float:
    """One value from a range; always consumes exactly one uniform so the stream layout never changes."""
    u = float(rng.random())
    lo, hi = float(lohi[0]), float(lohi[1])
    if log and lo > 0:
        return lo * (hi / lo) ** u
    return lo + (hi - lo) * u


def _poisson(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Exact Poisson draws (float32) of ``lam`` (float32, any shape).

    Rates up to ``_POISSON_SPLIT`` use the inverse CDF of one uniform per pixel: the first ``_POISSON_HEAD``
    thresholds for all pixels at once, the rare higher counts on the shrinking set of pixels that need them.
    Larger rates (spot cores) use NumPy's sampler. ~2-3x faster than ``Generator.poisson`` at background rates.
    """
    flat = lam.reshape(-1)
    n = flat.size
    u = rng.random(n, dtype=np.float32)
    big = flat > _POISSON_SPLIT
    small = np.where(big, np.float32(0), np.maximum(flat, np.float32(0)))
    p = np.exp(-small)
    c = p.copy()
    out = (u > c).astype(np.float32)
    for j in range(1, _POISSON_HEAD):
        p *= small
        p *= np.float32(1.0 / j)
        c += p
        out += u > c
    act = np.flatnonzero(u > c)
    if act.size:  # float64 tail: the cumulative sum must be able to reach every float32 uniform
        ua, la = u[act].astype(np.float64), small[act].astype(np.float64)
        pa, ca = p[act].astype(np.float64), c[act].astype(np.float64)
        j = _POISSON_HEAD
        while act.size:
            pa *= la / j
            ca += pa
            done = (ua <= ca) | (pa < 1e-17)
            out[act[done]] = j
            keep = ~done
            act, ua, la, pa, ca = act[keep], ua[keep], la[keep], pa[keep], ca[keep]
            j += 1
    if big.any():
        out[big] = rng.poisson(flat[big])
    return out.reshape(lam.shape)


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 draws seeded from ``rng`` (torch's sampler: ~3x faster than NumPy's here)."""
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2 ** 62)))
    return torch.randn(shape, generator=gen, dtype=torch.float32).numpy()


def _render_spots(fs, ss, cov, photons, shape, oversample, rmax):
    """Noise-free spot profiles of one panel, vectorised per window size.

    Returns the summed image (float32 ``[H * W]``) and a list of groups ``(idx, pix, prof, half)``: spot indices
    ``[m]``, panel flat pixel index of each window pixel ``[m, S*S]`` (-1 off the panel), the profile normalised
    to a window sum of 1 ``[m, S*S]`` and the half-maximum footprint ``[m, S*S]``. The window is centred on the
    rounded spot centre, whose pixel is element ``(S*S) // 2``.
    """
    h, w = shape
    groups = []
    if len(fs) == 0:
        return np.zeros(h * w, dtype=np.float32), groups
    sxx, sxy, syy = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
    root = np.sqrt(0.25 * (sxx - syy) ** 2 + sxy ** 2)
    lmax, lmin = 0.5 * (sxx + syy) + root, 0.5 * (sxx + syy) - root
    rad = np.clip(np.ceil(3.0 * np.sqrt(lmax)).astype(np.int64) + 1, 2, rmax)
    # broad spots (minor sigma >= 1 px): one sample per pixel, the pixel's box folded into the covariance
    osamp = np.where(lmin >= 1.0, 1, int(oversample))
    box = np.where(osamp == 1, 1.0 / 12.0, 0.0) if oversample > 1 else 0.0
    sxx, syy = sxx + box, syy + box
    det = sxx * syy - sxy * sxy
    ia, ib, ic = syy / det, -sxy / det, sxx / det
    ic0, jc0 = np.rint(ss).astype(np.int64), np.rint(fs).astype(np.int64)
    for r, o in sorted(set(zip(rad.tolist(), osamp.tolist()))):
        idx = np.flatnonzero((rad == r) & (osamp == o))
        sub = (np.arange(o) + 0.5) / o - 0.5
        off = np.arange(-r, r + 1)
        s_ = off.size
        ii = ic0[idx, None] + off  # [m, S] rows
        jj = jc0[idx, None] + off
        dy = (ii - ss[idx, None])[:, :, None, None, None] + sub[None, None, None, :, None]
        dx = (jj - fs[idx, None])[:, None, :, None, None] + sub[None, None, None, None, :]
        q = (ia[idx, None, None, None, None] * dx * dx + 2 * ib[idx, None, None, None, None] * dx * dy
             + ic[idx, None, None, None, None] * dy * dy)
        prof = np.exp(-0.5 * q).mean(axis=(3, 4)).reshape(len(idx), s_ * s_)
        prof /= prof.sum(axis=1, keepdims=True)
        half = prof >= 0.5 * prof.max(axis=1, keepdims=True)
        inside = ((ii >= 0) & (ii < h))[:, :, None] & ((jj >= 0) & (jj < w))[:, None, :]
        pix = np.where(inside, ii[:, :, None] * w + jj[:, None, :], -1).reshape(len(idx), s_ * s_)
        groups.append((idx, pix, prof, half))
    pix = np.concatenate([g[1].ravel() for g in groups])
    vals = np.concatenate([(g[2] * photons[g[0], None]).ravel() for g in groups])
    sel = pix >= 0
    return np.bincount(pix[sel], weights=vals[sel], minlength=h * w).astype(np.float32), groups


def _merge_groups(ss: np.ndarray, fs: np.ndarray, min_sep: float) -> np.ndarray:
    """Group index per point: points closer than ``min_sep`` (transitively) share a group."""
    n = len(ss)
    parent = np.arange(n)
    if n < 2 or min_sep <= 0:
        return parent
    d2 = (ss[:, None] - ss[None, :]) ** 2 + (fs[:, None] - fs[None, :]) ** 2
    ii, jj = np.nonzero(np.triu(d2 < min_sep * min_sep, k=1))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(ii, jj):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(a) for a in range(n)])
    return np.unique(roots, return_inverse=True)[1]


_CLUSTER_SHAPES = (((0, 1),), ((1, 0),), ((0, 1), (0, 2)), ((1, 0), (2, 0)), ((0, 1), (1, 0), (1, 1)),
                   ((0, 1), (1, 1)), ((1, 0), (1, 1)))


def _hot_clusters(drng: np.random.Generator, hot: np.ndarray, masked: np.ndarray, val: np.ndarray, fraction: float,
                  shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grow a ``fraction`` of the hot pixels into clusters of 2-4 adjacent pixels (``_CLUSTER_SHAPES``); each added
    pixel shares its seed's masked flag and reads its own hot level (a value drawn like the seed's, scaled by
    0.3-1). Clusters are clipped at the panel border."""
    h, w = shape
    seeds = np.flatnonzero(drng.random(len(hot)) < fraction)
    kinds = drng.integers(0, len(_CLUSTER_SHAPES), len(seeds))
    add_pix, add_mask, add_val = [], [], []
    for i, kind in zip(seeds, kinds):
        r, c = divmod(int(hot[i]), w)
        for dr, dc in _CLUSTER_SHAPES[kind]:
            if r + dr < h and c + dc < w:
                add_pix.append((r + dr) * w + c + dc)
                add_mask.append(masked[i])
                add_val.append(val[i])
    if not add_pix:
        return hot, masked, val
    scale = drng.uniform(0.3, 1.0, len(add_pix))
    return (np.concatenate([hot, np.asarray(add_pix, dtype=hot.dtype)]),
            np.concatenate([masked, np.asarray(add_mask, dtype=bool)]),
            np.concatenate([val, np.asarray(add_val) * scale]))


def _resolve_panels(det: Detector, panels) -> np.ndarray:
    n = len(det.panels)
    if panels is None:
        return np.arange(n, dtype=np.int64)
    sel = np.atleast_1d(np.asarray([det.panel_index(p) for p in np.atleast_1d(panels)], dtype=np.int64))
    if sel.size == 0 or sel.min() < 0 or sel.max() >= n or len(set(sel.tolist())) != sel.size:
        raise ConfigError(f"simulate_shot: panels must be distinct indices in 0..{n - 1} (or panel names), found "
                          f"{panels!r}.")
    return sel


def simulate_shot(rng: np.random.Generator | int | None, detector: Detector | str, cfg: LatticeConfig | None = None,
                  panels: Sequence[int] | None = None) -> Shot:
    """Simulate one still shot of a randomly oriented crystal onto ``detector``.

    Args:
        rng: a NumPy ``Generator`` (advanced in place) or an integer seed.
        detector: a :class:`Detector` or a built-in name / ``.geom`` path; its panels must share one shape.
        cfg: the physics and detector-response parameters (default :class:`LatticeConfig()`).
        panels: detector panel indices (or names) to render; ``None``: all. The rendered pixels of a panel
            are the same whichever subset it is rendered in (for the same generator state).

    Returns:
        a :class:`Shot`.
    """
    cfg = cfg or LatticeConfig()
    rng = _as_rng(rng)
    det = load_detector(detector)
    if det.stack_shape is None:
        raise ConfigError(f"simulate_shot: detector {det.name or det.source} has panels of different shapes "
                          f"{sorted({p.shape for p in det.panels})}; a shot is a [P, H, W] stack.")
    sel = _resolve_panels(det, panels)
    energy = cfg.photon_energy or det.photon_energy
    if not energy:
        raise ConfigError("simulate_shot: no photon energy: set LatticeConfig.photon_energy (eV) or the detector's "
                          "photon_energy.")
    sg_name = normalize_space_group(cfg.space_group)
    group = SPACE_GROUPS[sg_name]
    hkl, inv_d2, x_fixed, hcols = _reflection_table(tuple(float(v) for v in cfg.cell), sg_name, float(cfg.d_min),
                                             cfg.structure_seed)
    geo = _geometry(det)
    h_px, w_px = det.stack_shape[1:]

    # ---- shot-level draws (fixed order and count)
    u_mat = random_rotation(rng)
    lam = photon_energy_to_wavelength(energy) * 1e10 / (1.0 + cfg.energy_jitter * float(rng.standard_normal()))
    bw = _draw(rng, cfg.bandwidth)
    streaky = bool(rng.random() < cfg.streaky_fraction)
    mosaic = _draw(rng, cfg.streaky_mosaicity if streaky else cfg.mosaicity)
    domain = _draw(rng, cfg.domain_size, log=True)
    wilson_b = _draw(rng, cfg.wilson_b)
    scale = _draw(rng, cfg.intensity_scale, log=True)
    psf = _draw(rng, cfg.psf)
    water = _draw(rng, cfg.water_amplitude, log=True)
    water_d = _draw(rng, cfg.water_ring_d)
    air = _draw(rng, cfg.air_amplitude, log=True)
    const = _draw(rng, cfg.background)
    panel_entropy = int(rng.integers(0, 2 ** 63 - 1))
    jet = _draw(rng, cfg.jet_amplitude, log=True) if rng.random() < cfg.jet_fraction else 0.0
    jet_phi = (float(rng.uniform(0.0, math.pi)) if cfg.jet_azimuth is None else
               math.radians(cfg.jet_azimuth + cfg.jet_azimuth_jitter * float(rng.standard_normal())))
    jet_w = _draw(rng, cfg.jet_width)

    # ---- prediction: excitation error and partiality of every candidate reflection
    bmat = reciprocal_basis(cfg.cell)
    a_star = u_mat @ bmat
    sz = hcols[0] * a_star[2, 0] + hcols[1] * a_star[2, 1] + hcols[2] * a_star[2, 2]
    sig_bw, sig_eta = bw / _FWHM, math.radians(mosaic) / _FWHM
    sig_div, sig_dom = cfg.divergence / _FWHM, 0.9 / (_FWHM * domain)
    reach = (sz < 0) & (inv_d2 * lam * lam < 4.0)
    cand = np.flatnonzero(reach)
    s2 = inv_d2[cand]
    eps = -2.0 * sz[cand] / (s2 * lam) - 1.0
    g = 0.5 * lam * s2
    cos2 = 1.0 - 0.25 * lam * lam * s2
    var_o = (s2 * cos2 * (sig_div ** 2 + sig_eta ** 2) + sig_dom ** 2) / (g * g)
    var_t = sig_bw ** 2 + var_o
    part = np.exp(-0.5 * eps * eps / var_t)
    keep = part >= cfg.min_partiality
    cand, s2, eps, var_o, var_t, part = cand[keep], s2[keep], eps[keep], var_o[keep], var_t[keep], part[keep]

    # spot direction: Bragg angle of the recorded sub-band's centre, azimuth of s
    eps_c = eps * (sig_bw ** 2 / var_t)
    lam_c = lam * (1.0 + eps_c)
    smag = np.sqrt(s2)
    sin_t = 0.5 * lam_c * smag
    ok = sin_t < 1.0
    cand, s2, smag, eps, var_o, var_t, part, eps_c, lam_c, sin_t = (
        a[ok] for a in (cand, s2, smag, eps, var_o, var_t, part, eps_c, lam_c, sin_t))
    tt = 2.0 * np.arcsin(sin_t)
    hk = hkl[cand]
    # Wilson draws, last among the shot-level draws and over every excited reflection (whichever panels render)
    if x_fixed is not None:
        xw = x_fixed[cand]
    else:
        uniq, inv = np.unique(_canonical_keys(hk, group.laue), return_inverse=True)
        xw = rng.exponential(size=uniq.size)[inv]
    sxy = hk @ a_star[:2].T
    phi = np.arctan2(sxy[:, 1], sxy[:, 0])
    st, ct, sp, cp = np.sin(tt), np.cos(tt), np.sin(phi), np.cos(phi)
    khat = np.stack([st * cp, st * sp, ct], axis=1)
    e_r = np.stack([ct * cp, ct * sp, -st], axis=1)
    e_t = np.stack([-sp, cp, np.zeros_like(sp)], axis=1)
    sig_c2 = sig_bw ** 2 * var_o / var_t
    cos_t = np.sqrt(1.0 - sin_t ** 2)
    ang_iso = sig_div ** 2 + (lam * sig_dom) ** 2
    var_rad = ang_iso + (2.0 * sin_t / cos_t) ** 2 * sig_c2
    var_tan = ang_iso + (2.0 * sin_t * sig_eta) ** 2

    # ---- intersect the rays with the rendered panels
    n_c = len(cand)
    on_panel = np.full(n_c, -1, dtype=np.int64)
    pos = np.zeros((n_c, 2))
    jac = np.zeros((n_c, 2, 2))  # rows: d(fs, ss) / d(radial angle), d(fs, ss) / d(tangential angle)
    for k in sel:
        pg = geo[k]
        den = khat @ pg.normal
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (pg.origin @ pg.normal) / den
        hit = (on_panel < 0) & (t > 0) & np.isfinite(t)
        if not hit.any():
            continue
        idx = np.flatnonzero(hit)
        rel = t[idx, None] * khat[idx] - pg.origin
        ab = np.stack([rel @ pg.fs, rel @ pg.ss], axis=1) @ pg.ginv.T
        fs_, ss_ = ab[:, 0] - 0.5, ab[:, 1] - 0.5
        inside = (fs_ >= -0.5) & (fs_ < pg.shape[1] - 0.5) & (ss_ >= -0.5) & (ss_ < pg.shape[0] - 0.5)
        idx = idx[inside]
        on_panel[idx] = k
        pos[idx, 0], pos[idx, 1] = fs_[inside], ss_[inside]
        for row, e in enumerate((e_r, e_t)):
            ed = (e[idx] @ pg.normal) / den[idx]
            dx = t[idx, None] * (e[idx] - khat[idx] * ed[:, None])
            jac[idx, row] = np.stack([dx @ pg.fs, dx @ pg.ss], axis=1) @ pg.ginv.T
    landed = np.flatnonzero(on_panel >= 0)
    n = len(landed)
    hk = hk[landed]
    cand = cand[landed]
    jr, jt = jac[landed, 0], jac[landed, 1]
    cov = (var_rad[landed, None, None] * jr[:, :, None] * jr[:, None, :]
           + var_tan[landed, None, None] * jt[:, :, None] * jt[:, None, :]) + psf * psf * np.eye(2)
    kh = khat[landed]
    pol = cfg.polarization * (1 - kh[:, 0] ** 2) + (1 - cfg.polarization) * (1 - kh[:, 1] ** 2)

    # ---- intensities (Wilson)
    xw = xw[landed]
    s2l = inv_d2[cand]
    i_full = scale * np.exp(-0.5 * wilson_b * s2l) * xw
    photons = i_full * part[landed] * pol

    refl = np.zeros(n, dtype=REFLECTION_DTYPE)
    refl["panel"] = on_panel[landed]
    refl["fs"], refl["ss"] = pos[landed, 0], pos[landed, 1]
    refl["h"], refl["k"], refl["l"] = hk[:, 0], hk[:, 1], hk[:, 2]
    refl["d"] = 1.0 / np.sqrt(s2l)
    refl["photons"], refl["intensity"], refl["partiality"] = photons, i_full, part[landed]
    refl["excitation"], refl["wavelength"] = eps[landed], lam_c[landed] * 1e-10
    ev = np.linalg.eigvalsh(cov) if n else np.zeros((0, 2))
    refl["sigma_minor"], refl["sigma_major"] = np.sqrt(ev[:, 0]), np.sqrt(ev[:, 1])
    refl["peak"] = -1

    # ---- per-panel rendering, noise and defects
    n_sel = len(sel)
    images = np.empty((n_sel, h_px, w_px), dtype=np.float32)
    labels = np.zeros((n_sel, h_px, w_px), dtype=np.uint8)
    goods = np.empty((n_sel, h_px, w_px), dtype=bool)
    peaks: list[np.ndarray] = []
    lam_m = lam * 1e-10
    s_w, sig_w = 1.0 / water_d, cfg.water_ring_fwhm / _FWHM
    for pos_k, k in enumerate(sel):
        p = det.panels[k]
        prng = np.random.default_rng(np.random.SeedSequence(panel_entropy, spawn_key=(int(k),)))
        adu = float(cfg.adu_per_photon or p.adu_per_photon or det.adu_per_photon or 1.0)
        max_adu = float(cfg.max_adu if cfg.max_adu is not None else (p.max_adu or 1e4 * adu))
        maps = _pixel_maps(det, int(k), geo[k], cfg.polarization)
        # expected background photons
        bg = np.zeros((h_px, w_px), dtype=np.float32)
        if water > 0:
            z = (maps["sin_theta"] * np.float32(2.0 / lam) - np.float32(s_w)) * np.float32(1.0 / sig_w)
            bg += np.float32(water) * np.exp(np.float32(-0.5) * z * z)
        if air > 0:
            bg += np.float32(air) / (1 + (maps["two_theta"] * np.float32(1.0 / cfg.air_angle)) ** 2)
        if jet > 0:  # distance (px) of each pixel from the line through the beam at azimuth jet_phi
            d = np.abs(maps["x"] * np.float32(math.sin(jet_phi)) - maps["y"] * np.float32(math.cos(jet_phi)))
            d *= np.float32(p.res / jet_w)
            bg += (np.float32(jet) * np.exp(np.float32(-0.5) * d * d)
                   / (1 + (maps["two_theta"] * np.float32(1.0 / cfg.jet_angle)) ** 2))
        bg *= maps["omega_pol"]
        if const > 0:
            bg += np.float32(const) * maps["omega"]
        # spots
        mine = np.flatnonzero((refl["panel"] == k) & (photons >= cfg.min_render_photons))
        spot_img, spot_groups = _render_spots(refl["fs"][mine], refl["ss"][mine], cov[mine], photons[mine],
                                              (h_px, w_px), cfg.oversample, cfg.max_spot_radius)
        expected = bg.ravel() + spot_img

        # detector state: gains, offsets, defects (panel generator, fixed order)
        ga, gb = cfg.asic_grid or _asic_grid_for((h_px, w_px))
        gain_p = 1.0 + cfg.gain_sigma * prng.standard_normal()
        gain_a = gain_p * (1.0 + cfg.asic_gain_sigma * prng.standard_normal((ga, gb)))
        off_a = cfg.pedestal_sigma * prng.standard_normal() + cfg.asic_offset_sigma * prng.standard_normal((ga, gb))
        cm = cfg.common_mode_sigma * prng.standard_normal((h_px, gb))
        drng = (np.random.default_rng(np.random.SeedSequence(int(cfg.defect_seed), spawn_key=(int(k),)))
                if cfg.defect_seed is not None else prng)
        npix = h_px * w_px
        n_dead = int(drng.binomial(npix, cfg.dead_fraction)) if cfg.dead_fraction > 0 else 0
        n_hot = int(drng.binomial(npix, cfg.hot_fraction)) if cfg.hot_fraction > 0 else 0
        dead = drng.integers(0, npix, n_dead)
        dead_masked = drng.random(n_dead) >= cfg.dead_unmasked_fraction
        hot = drng.integers(0, npix, n_hot)
        hot_masked = drng.random(n_hot) >= cfg.hot_unmasked_fraction
        hot_val = np.where(drng.random(n_hot) < cfg.hot_saturated_fraction, 1.0,
                           drng.uniform(*cfg.hot_level, size=n_hot)) * (max_adu if math.isfinite(max_adu) else 1e6)
        if cfg.hot_cluster_fraction > 0 and n_hot:
            hot, hot_masked, hot_val = _hot_clusters(drng, hot, hot_masked, hot_val, cfg.hot_cluster_fraction,
                                                     (h_px, w_px))
        bad = np.zeros(npix, dtype=bool)
        bad[dead] = True
        bad[hot] = True
        good = np.ones((h_px, w_px), dtype=bool)
        e = int(cfg.edge_width)
        if e:
            good[:e], good[-e:], good[:, :e], good[:, -e:] = False, False, False, False
        good = good.ravel()
        edge_bad = ~good
        good[dead[dead_masked]] = False
        good[hot[hot_masked]] = False
        bad |= edge_bad

        # truth: visibility, labels (footprints never include bad pixels), merged peaks
        lab = labels[pos_k].reshape(npix)
        vis_local = np.zeros(len(mine), dtype=bool)
        snr = np.zeros(len(mine), dtype=np.float32)
        rn2 = cfg.read_noise ** 2
        bgf = bg.ravel()
        c_ss, c_fs = np.rint(refl["ss"][mine]).astype(np.int64), np.rint(refl["fs"][mine]).astype(np.int64)
        in_core = (c_ss >= 1) & (c_ss <= h_px - 2) & (c_fs >= 1) & (c_fs <= w_px - 2)
        centre_bad = bad[np.clip(c_ss, 0, h_px - 1) * w_px + np.clip(c_fs, 0, w_px - 1)]
        fp_store = []
        cut = False
        for idx, pix, prof, half in spot_groups:
            okpix = pix >= 0
            hin = half & okpix
            fp = hin.copy()
            fp[okpix] &= ~bad[pix[okpix]]
            sig = (prof * fp).sum(axis=1) * photons[mine[idx]]
            bgs = np.where(fp, bgf[np.maximum(pix, 0)], 0.0).sum(axis=1)
            nfp = fp.sum(axis=1)
            snr_i = sig / np.sqrt(np.maximum(sig + bgs + nfp * rn2, 1e-12))
            centre_half = half[:, half.shape[1] // 2]
            vis = (snr_i >= cfg.min_snr) & (nfp > 0) & centre_half & in_core[idx] & ~centre_bad[idx]
            vis_local[idx] = vis
            snr[idx] = snr_i
            fp_store.append((pix[vis], fp[vis]))
            cut = cut or bool((hin[vis] != fp[vis]).any())
        for pix_v, fp_v in fp_store:
            lab[pix_v[fp_v]] = 1
        vis_idx = mine[vis_local]
        refl["visible"][mine] = vis_local
        refl["snr"][mine] = snr
        if len(vis_idx):
            lab2 = labels[pos_k]
            cs, cf = c_ss[vis_local], c_fs[vis_local]
            if cut:  # bad pixels in a footprint may cut fragments off it: keep only components with a centre
                from scipy import ndimage

                comp, _ = ndimage.label(lab2, structure=np.ones((3, 3), dtype=bool))
                keep_ids = np.zeros(comp.max() + 1, dtype=bool)
                keep_ids[comp[cs, cf]] = True
                keep_ids[0] = False
                lab2[~keep_ids[comp]] = 0
            grp = _merge_groups(refl["ss"][vis_idx], refl["fs"][vis_idx], cfg.min_separation)
            ng = int(grp.max()) + 1
            wsum = np.bincount(grp, weights=refl["photons"][vis_idx], minlength=ng)
            wts = np.maximum(refl["photons"][vis_idx], 1e-12)
            wn = np.bincount(grp, weights=wts, minlength=ng)
            pk = np.empty((ng, 3), dtype=np.float32)
            pk[:, 0] = np.bincount(grp, weights=wts * refl["ss"][vis_idx], minlength=ng) / wn
            pk[:, 1] = np.bincount(grp, weights=wts * refl["fs"][vis_idx], minlength=ng) / wn
            pk[:, 2] = wsum
            refl["peak"][vis_idx] = grp
        else:
            pk = np.zeros((0, 3), dtype=np.float32)
        peaks.append(pk)

        # detector response
        if cfg.shot_noise == "poisson":
            counts = _poisson(prng, expected)
        elif cfg.shot_noise == "gaussian":
            counts = expected + np.sqrt(np.maximum(expected, 0)) * _normal(prng, (npix,))
        else:
            counts = expected.astype(np.float32, copy=True)
        img = images[pos_k]
        counts = counts.reshape(h_px, w_px)
        rows = [(r * h_px) // ga for r in range(ga + 1)]
        cols = [(c * w_px) // gb for c in range(gb + 1)]
        for r in range(ga):  # ASIC blocks: gain, offset and per-row common mode on views
            for c in range(gb):
                blk = (slice(rows[r], rows[r + 1]), slice(cols[c], cols[c + 1]))
                np.multiply(counts[blk], np.float32(gain_a[r, c]), out=img[blk])
                img[blk] += (off_a[r, c] + cm[rows[r]:rows[r + 1], c, None]).astype(np.float32)
        if cfg.read_noise > 0:
            img += np.float32(cfg.read_noise) * _normal(prng, (h_px, w_px))
        if adu != 1.0:
            img *= np.float32(adu)
        if math.isfinite(max_adu):
            np.minimum(img, np.float32(max_adu), out=img)
        flat = img.reshape(npix)
        flat[dead] = 0.0
        flat[hot] = hot_val
        goods[pos_k] = good.reshape(h_px, w_px)

    params = dict(bandwidth=bw, mosaicity=mosaic, streaky=float(streaky), domain_size=domain, wilson_b=wilson_b,
                  intensity_scale=scale, psf=psf, water_amplitude=water, water_ring_d=water_d, air_amplitude=air,
                  background=const, jet_amplitude=jet, jet_azimuth=math.degrees(jet_phi), jet_width=jet_w,
                  divergence=cfg.divergence, photon_energy=photon_energy_to_wavelength(lam_m))
    return Shot(images=images, labels=labels, good=goods, panels=sel, reflections=refl, peaks=peaks,
                orientation=u_mat, a_star=a_star, wavelength=lam_m, cell=tuple(cfg.cell), space_group=sg_name,
                params=params)


# ------------------------------------------------------------------------------------------------- dataset
class LatticeStillsDataset(torch.utils.data.Dataset):
    """``n`` lattice still shots generated on access; item ``i`` depends only on ``(seed, i)``.

    Each item draws its generator from ``np.random.SeedSequence([seed, i])``, picks ``panels_per_item`` distinct
    panels with it, and renders only those panels of a fresh shot (:func:`simulate_shot`).

    Items (``panels_per_item = 1``): ``image`` float32 ``[1, H, W]`` (ADU, raw), ``label`` int64 ``[H, W]``,
    ``good`` bool ``[H, W]``, ``peaks`` float32 ``[n, 3]`` ``(ss, fs, photons)`` of the truth peaks on the panel,
    ``weak`` float32 ``[m, 2]`` ``(ss, fs)`` of its weak reflections (:meth:`Shot.weak`), ``panel`` int. With
    ``panels_per_item = k > 1`` (or ``None`` for all panels): ``image`` ``[k, 1, H, W]``,
    ``label`` ``[k, H, W]``, ``good`` ``[k, H, W]``, ``peaks`` and ``weak`` lists of ``k`` tensors and ``panel``
    int64 ``[k]``.
    Batch with :func:`collate_lattice`.
    """

    def __init__(self, n: int, detector: Detector | str = "epix10k2m", cfg: LatticeConfig | None = None,
                 seed: int = 0, panels_per_item: int | None = 1):
        if n < 0:
            raise ConfigError(f"LatticeStillsDataset: expected n >= 0, found {n}.")
        self.n = int(n)
        self.detector = load_detector(detector)
        self.cfg = cfg or LatticeConfig()
        self.seed = int(seed)
        n_pan = len(self.detector.panels)
        if panels_per_item is not None and not 1 <= int(panels_per_item) <= n_pan:
            raise ConfigError(f"LatticeStillsDataset.panels_per_item: expected 1..{n_pan} or None (all panels), "
                              f"found {panels_per_item}.")
        self.panels_per_item = panels_per_item

    def __len__(self) -> int:
        return self.n

    def generator(self, index: int) -> np.random.Generator:
        """The generator that produces item ``index``."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, index]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.n <= index < self.n:
            raise IndexError(f"LatticeStillsDataset index {index} out of range for {self.n} shots.")
        index %= self.n
        rng = self.generator(index)
        n_pan = len(self.detector.panels)
        if self.panels_per_item is None:
            chosen = np.arange(n_pan)
        else:
            chosen = np.sort(rng.choice(n_pan, size=int(self.panels_per_item), replace=False))
        shot = simulate_shot(rng, self.detector, self.cfg, panels=chosen)
        weak = shot.weak(self.cfg.weak_snr)
        if self.panels_per_item == 1:
            return {"image": torch.from_numpy(shot.images[0])[None],
                    "label": torch.from_numpy(shot.labels[0].astype(np.int64)),
                    "good": torch.from_numpy(shot.good[0]), "peaks": torch.from_numpy(shot.peaks[0]),
                    "weak": torch.from_numpy(weak[0]), "panel": int(chosen[0])}
        return {"image": torch.from_numpy(shot.images)[:, None],
                "label": torch.from_numpy(shot.labels.astype(np.int64)), "good": torch.from_numpy(shot.good),
                "peaks": [torch.from_numpy(p) for p in shot.peaks], "weak": [torch.from_numpy(w) for w in weak],
                "panel": torch.from_numpy(chosen.astype(np.int64))}


def collate_lattice(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`LatticeStillsDataset` items: ``image``, ``label`` and ``good`` stacked, ``panel`` a tensor,
    ``peaks`` a list (one tensor per item, or one list per item when items hold several panels)."""
    return {"image": torch.stack([b["image"] for b in batch]), "label": torch.stack([b["label"] for b in batch]),
            "good": torch.stack([b["good"] for b in batch]),
            "panel": torch.as_tensor(np.stack([np.asarray(b["panel"]) for b in batch])),
            "peaks": [b["peaks"] for b in batch]}
