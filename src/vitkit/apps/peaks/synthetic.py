"""Seeded, reproducible synthetic X-ray diffraction frames with Bragg peaks, labels and true peak lists.

A frame is built in image units (think ADU; ``photon_scale`` ADU per photon) as::

    expected = smooth background + diffuse water ring + Bragg peaks        (noise free)
    expected *= beam-stop transmission inside the beam-stop shadow
    image = photon_scale * Poisson(expected / photon_scale) + N(0, read_noise^2)
    image[panel gaps] = 0;  image[dead pixels] = 0;  image[hot pixels] = saturation
    image = min(image, saturation)

Peaks
    Each peak has a sub-pixel centre ``(y, x)`` (pixel-centre convention: the centre of pixel ``[i, j]`` is
    ``(i, j)``), a width ``sigma`` drawn uniformly from ``cfg.sigma``, an integrated intensity drawn
    log-uniformly from ``cfg.intensity`` (three orders of magnitude by default) and a profile: a Gaussian or,
    with probability ``cfg.pseudo_voigt_fraction``, a pseudo-Voigt ``(1 - eta) G + eta L`` with
    ``eta ~ U(cfg.eta)``. ``L(r) = 1 / (1 + r^2 / gamma^2)`` with ``gamma = sigma * sqrt(2 ln 2)``, so both
    components have their half maximum at the same radius ``sigma * sqrt(2 ln 2)`` (the half-maximum area is
    ``pi * 2 ln 2 * sigma^2`` for every ``eta``). The profile is sampled at pixel centres on a disk of radius
    ``R = ceil(cfg.window_sigmas * sigma) + 1`` around the true centre, multiplied by a raised-cosine taper
    over the outer 30 % of the disk (so truncation is smooth and symmetric: it does not bias centroids), and
    normalised so that its pixel sum is exactly the integrated intensity.

    Peaks never overlap: their ``(2R+1)^2`` windows are disjoint and separated by at least one pixel (so
    8-connected components of the labels are exactly the peaks), they stay one pixel clear of the frame
    edge, the panel gaps and the beam-stop shadow (peaks there would be invisible, so they are not part of the
    truth). If the requested count does not fit, as many as fit are placed.

Labels
    ``label = 1`` where the background-free profile of a peak is at least half of its maximum over the
    sampled pixels (the half-maximum rule of PeakNet's dataset writer); 0 elsewhere.

True peak list
    ``float32 [n, 3]`` rows ``(y, x, integrated_intensity)``: the exact sub-pixel centre and the noise-free
    pixel sum of the peak (before beam-stop, dead/hot pixels, noise and saturation). Rows are in placement
    order (random).

Defaults (:class:`SynthConfig`) target 256 x 256 training crops: 15-40 peaks, sigma 0.7-3 px, integrated
intensities 1e2-1e5, background 1-4 per pixel plus a water ring of 2-10 at 40-80 % of the half-size,
Poisson noise at one unit per photon, read noise 0.5. The weakest broad peaks (I ~ 100, sigma ~ 3) have a
peak pixel of ~2 over a background of ~1-4 (about 3 sigma summed over their half-maximum area) and are hard
to see; the brightest sharp ones reach ~3e4 (below the 65535 saturation). Generating a default frame takes
~6 ms on one core, about 5 of which are NumPy's exact Poisson sampler; ``shot_noise="gaussian"`` (a
normal approximation with the same mean and variance) takes ~2 ms.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from vitkit.errors import ConfigError

__all__ = ["SynthConfig", "make_frame", "make_panel_stack", "SyntheticPeakDataset", "collate_peaks"]

_SQRT_2LN2 = math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of a synthetic diffraction frame. Ranges ``(lo, hi)`` are sampled per frame or per peak.

    Lengths given as fractions are relative to ``scale = min(H, W) / 2`` of the (assembled) detector.
    """

    shape: tuple[int, int] = (256, 256)
    """Frame shape ``(H, W)``; any size, square or not."""
    n_peaks: tuple[int, int] = (15, 40)
    """Requested number of peaks per frame (per panel in :func:`make_panel_stack`), inclusive range."""
    sigma: tuple[float, float] = (0.7, 3.0)
    """Peak width (Gaussian sigma, px), uniform."""
    intensity: tuple[float, float] = (1e2, 1e5)
    """Integrated peak intensity (image units), log-uniform."""
    pseudo_voigt_fraction: float = 0.5
    """Probability that a peak is a pseudo-Voigt rather than a pure Gaussian."""
    eta: tuple[float, float] = (0.1, 0.6)
    """Lorentzian fraction of pseudo-Voigt peaks, uniform."""
    window_sigmas: float = 3.0
    """Support radius of a peak, ``R = ceil(window_sigmas * sigma) + 1`` px."""
    photon_scale: float | None = 1.0
    """Image units per photon for the shot noise; ``None`` or 0 disables shot noise."""
    shot_noise: Literal["poisson", "gaussian"] = "poisson"
    """Exact Poisson sampling, or a normal approximation with the same variance (~3x faster)."""
    read_noise: float = 0.5
    """Standard deviation of the additive Gaussian read noise (image units)."""
    background: tuple[float, float] = (1.0, 4.0)
    """Mean smooth background level per pixel, uniform per frame."""
    background_variation: float = 0.3
    """Relative amplitude of the low-frequency background modulation (0 gives a flat background)."""
    ring_radius: tuple[float, float] = (0.4, 0.8)
    """Water-ring radius, fraction of ``scale``."""
    ring_width: float = 0.05
    """Water-ring Gaussian width, fraction of ``scale``."""
    ring_amplitude: tuple[float, float] = (2.0, 10.0)
    """Water-ring peak height (image units per pixel); ``(0, 0)`` disables the ring."""
    center_jitter: float = 0.03
    """Beam centre offset from the detector centre, fraction of ``scale`` (each axis, uniform +-)."""
    panel_grid: tuple[int, int] = (2, 2)
    """Panels per axis of a single frame; the ``gap_width`` rows/columns between them are 0."""
    gap_width: int = 4
    """Width of the panel gaps (px); 0 disables them."""
    beamstop_radius: float = 0.06
    """Beam-stop radius, fraction of ``scale``; 0 disables the beam stop (and its arm)."""
    beamstop_transmission: float = 0.02
    """Fraction of the signal transmitted inside the beam-stop shadow."""
    dead_fraction: float = 2e-4
    """Fraction of pixels that read 0."""
    hot_fraction: float = 5e-5
    """Fraction of pixels that read ``saturation``."""
    saturation: float | None = 65535.0
    """Detector saturation: the image is clipped to it and hot pixels take it; ``None``: no clipping."""

    def __post_init__(self) -> None:
        h, w = self.shape
        if h < 16 or w < 16:
            raise ConfigError(f"SynthConfig.shape: expected (H, W) with both >= 16, found {self.shape}.")
        lo, hi = self.n_peaks
        if not 0 <= lo <= hi:
            raise ConfigError(f"SynthConfig.n_peaks: expected 0 <= lo <= hi, found {self.n_peaks}.")
        if not 0 < self.sigma[0] <= self.sigma[1]:
            raise ConfigError(f"SynthConfig.sigma: expected 0 < lo <= hi, found {self.sigma}.")
        if not 0 < self.intensity[0] <= self.intensity[1]:
            raise ConfigError(f"SynthConfig.intensity: expected 0 < lo <= hi, found {self.intensity}.")
        if not (0.0 <= self.eta[0] <= self.eta[1] <= 1.0 and 0.0 <= self.pseudo_voigt_fraction <= 1.0):
            raise ConfigError(f"SynthConfig.eta / pseudo_voigt_fraction must lie in [0, 1], found "
                              f"{self.eta} / {self.pseudo_voigt_fraction}.")
        if self.shot_noise not in ("poisson", "gaussian"):
            raise ConfigError(f"SynthConfig.shot_noise: expected 'poisson' or 'gaussian', found {self.shot_noise!r}.")

    def replace(self, **changes: Any) -> SynthConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def noiseless(cls, **overrides: Any) -> SynthConfig:
        """Peaks only: no background, ring, noise, gaps, beam stop, defects or saturation."""
        clean = dict(photon_scale=None, read_noise=0.0, background=(0.0, 0.0), background_variation=0.0,
                     ring_amplitude=(0.0, 0.0), gap_width=0, beamstop_radius=0.0, dead_fraction=0.0,
                     hot_fraction=0.0, saturation=None)
        clean.update(overrides)
        return cls(**clean)


# ------------------------------------------------------------------------------------------- event-level
@dataclass
class _Event:
    """Random quantities shared by all panels of one detector read-out (assembled coordinates)."""

    center: tuple[float, float]
    scale: float
    bg_level: float
    bg_mod: tuple[float, float, float, float]  # ky, phase_y, kx, phase_x (radians per px, radians)
    ring_r0: float
    ring_amp: float
    bs_radius: float
    bs_angle: float


def _draw_event(rng: np.random.Generator, cfg: SynthConfig, assembled: tuple[int, int]) -> _Event:
    h, w = assembled
    scale = min(h, w) / 2.0
    jy, jx = rng.uniform(-cfg.center_jitter, cfg.center_jitter, size=2) * scale
    # one to three periods of background modulation across the detector
    ky, kx = rng.uniform(1.0, 3.0, size=2) * 2 * math.pi / np.array([h, w])
    py, px = rng.uniform(0, 2 * math.pi, size=2)
    return _Event(center=((h - 1) / 2.0 + jy, (w - 1) / 2.0 + jx), scale=scale,
                  bg_level=float(rng.uniform(*cfg.background)), bg_mod=(float(ky), float(py), float(kx), float(px)),
                  ring_r0=float(rng.uniform(*cfg.ring_radius)) * scale,
                  ring_amp=float(rng.uniform(*cfg.ring_amplitude)),
                  bs_radius=cfg.beamstop_radius * scale, bs_angle=float(rng.uniform(0, 2 * math.pi)))


def _gap_lines(length: int, n_panels: int, gap: int) -> np.ndarray:
    """Indices of the gap rows (or columns) splitting ``length`` into ``n_panels`` panels."""
    if gap <= 0 or n_panels <= 1:
        return np.zeros(0, dtype=np.int64)
    starts = [round(k * length / n_panels - gap / 2) for k in range(1, n_panels)]
    return np.unique(np.concatenate([np.arange(s, s + gap) for s in starts]).clip(0, length - 1))


# ------------------------------------------------------------------------------------------------- peaks
def _place_peaks(rng: np.random.Generator, cfg: SynthConfig, forbidden: np.ndarray, n: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random non-overlapping peak centres ``(y, x)``, widths and support radii.

    Rejection sampling on an occupancy map: a candidate is kept if its ``(2R+1)^2`` window plus a one-pixel
    margin touches neither a kept window, nor a forbidden pixel, nor the frame edge.
    """
    h, w = forbidden.shape
    k = 4 * n + 32
    ys = rng.uniform(-0.5, h - 0.5, size=k)
    xs = rng.uniform(-0.5, w - 0.5, size=k)
    sig = rng.uniform(*cfg.sigma, size=k)
    rad = np.ceil(cfg.window_sigmas * sig).astype(np.int64) + 1
    pad = int(rad.max()) + 2
    occ = np.pad(forbidden, pad, constant_values=True)
    yc = np.rint(ys).astype(np.int64) + pad
    xc = np.rint(xs).astype(np.int64) + pad
    keep = []
    for i in range(k):
        if len(keep) == n:
            break
        r, y0, x0 = rad[i], yc[i], xc[i]
        if occ[y0 - r - 1:y0 + r + 2, x0 - r - 1:x0 + r + 2].any():
            continue
        occ[y0 - r:y0 + r + 1, x0 - r:x0 + r + 1] = True
        keep.append(i)
    keep = np.asarray(keep, dtype=np.int64)
    return np.stack([ys[keep], xs[keep]], axis=1), sig[keep], rad[keep]


def _render_peaks(centres: np.ndarray, sigma: np.ndarray, radius: np.ndarray, eta: np.ndarray,
                  intensity: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free peak image (float32) and half-maximum label (uint8), vectorised over all peaks.

    Every peak is evaluated on a common ``(2 Rmax + 1)^2`` window around its rounded centre; pixels outside
    its own support disk are zero. Windows of different peaks are disjoint where non-zero, so the values are
    written with plain fancy indexing.
    """
    h, w = shape
    img = np.zeros(h * w, dtype=np.float32)
    lab = np.zeros(h * w, dtype=np.uint8)
    n = len(centres)
    if n == 0:
        return img.reshape(shape), lab.reshape(shape)
    rw = int(radius.max())
    off = np.arange(-rw, rw + 1)
    yc = np.rint(centres[:, 0]).astype(np.int64)
    xc = np.rint(centres[:, 1]).astype(np.int64)
    py = yc[:, None] + off  # (n, S)
    px = xc[:, None] + off
    dy = py - centres[:, :1]
    dx = px - centres[:, 1:]
    r2 = dy[:, :, None] ** 2 + dx[:, None, :] ** 2  # (n, S, S)
    s2 = (sigma ** 2)[:, None, None]
    g2 = (sigma * _SQRT_2LN2)[:, None, None] ** 2
    e = eta[:, None, None]
    prof = (1.0 - e) * np.exp(-r2 / (2.0 * s2)) + e / (1.0 + r2 / g2)
    # raised-cosine taper from 0.7 R to R (zero beyond R): smooth, symmetric truncation
    rr = radius[:, None, None].astype(np.float64)
    t = np.clip((rr - np.sqrt(r2)) / (0.3 * rr), 0.0, 1.0)
    prof *= 0.5 - 0.5 * np.cos(np.pi * t)
    prof /= prof.sum(axis=(1, 2), keepdims=True)
    half = prof >= 0.5 * prof.max(axis=(1, 2), keepdims=True)
    sel = prof > 0
    flat = (py[:, :, None] * w + px[:, None, :])
    img[flat[sel]] = (prof * intensity[:, None, None])[sel]
    lab[flat[sel & half]] = 1
    return img.reshape(shape), lab.reshape(shape)


# ------------------------------------------------------------------------------------------------ frames
def _render(rng: np.random.Generator, cfg: SynthConfig, ev: _Event, shape: tuple[int, int],
            offset: tuple[int, int], gaps: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = shape
    y = np.arange(h, dtype=np.float32) + np.float32(offset[0] - ev.center[0])
    x = np.arange(w, dtype=np.float32) + np.float32(offset[1] - ev.center[1])
    r = np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)

    # beam-stop shadow: a disk around the beam plus a holding arm towards the detector edge
    if ev.bs_radius > 0:
        ca, sa = math.cos(ev.bs_angle), math.sin(ev.bs_angle)
        along = y[:, None] * np.float32(sa) + x[None, :] * np.float32(ca)
        across = np.abs(y[:, None] * np.float32(ca) - x[None, :] * np.float32(sa))
        shadow = (r <= ev.bs_radius) | ((along > 0) & (across <= 0.35 * ev.bs_radius))
    else:
        shadow = np.zeros(shape, dtype=bool)
    forbidden = shadow.copy()
    gy = gx = np.zeros(0, dtype=np.int64)
    if gaps:
        gy = _gap_lines(h, cfg.panel_grid[0], cfg.gap_width)
        gx = _gap_lines(w, cfg.panel_grid[1], cfg.gap_width)
        forbidden[gy, :] = True
        forbidden[:, gx] = True

    # peaks
    n_req = int(rng.integers(cfg.n_peaks[0], cfg.n_peaks[1] + 1))
    centres, sigma, radius = _place_peaks(rng, cfg, forbidden, n_req)
    n = len(centres)
    lo, hi = cfg.intensity
    intensity = np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))
    eta = np.where(rng.random(n) < cfg.pseudo_voigt_fraction, rng.uniform(*cfg.eta, size=n), 0.0)
    peak_img, label = _render_peaks(centres, sigma, radius, eta, intensity, shape)

    # smooth background: separable low-frequency modulation, parasitic scatter near the beam, water ring
    ky, phy, kx, phx = ev.bg_mod
    v = np.float32(cfg.background_variation)
    my = 1.0 + v * np.cos(ky * (np.arange(h) + offset[0]) + phy).astype(np.float32)
    mx = 1.0 + v * np.cos(kx * (np.arange(w) + offset[1]) + phx).astype(np.float32)
    expected = np.float32(ev.bg_level) * (my[:, None] * mx[None, :]) * (
        1.0 + np.exp(-r / np.float32(0.25 * ev.scale)))
    if ev.ring_amp > 0:
        rw = np.float32(cfg.ring_width * ev.scale)
        expected += np.float32(ev.ring_amp) * np.exp(-0.5 * ((r - np.float32(ev.ring_r0)) / rw) ** 2)
    expected += peak_img
    if shadow.any():
        expected[shadow] *= np.float32(cfg.beamstop_transmission)

    # noise
    ps = float(cfg.photon_scale or 0.0)
    rn = np.float32(cfg.read_noise)
    if ps > 0 and cfg.shot_noise == "gaussian":  # one normal draw with the summed variance
        var = np.maximum(expected, 0) * np.float32(ps) + rn * rn
        image = expected + np.sqrt(var) * rng.standard_normal(shape, dtype=np.float32)
    else:
        if ps > 0:
            image = (rng.poisson(expected / ps) * ps).astype(np.float32)
        else:
            image = expected.astype(np.float32, copy=True)
        if rn > 0:
            image += rn * rng.standard_normal(shape, dtype=np.float32)

    # detector defects, then the gaps (which read 0 whatever lies under them)
    npix = h * w
    n_dead = rng.binomial(npix, cfg.dead_fraction) if cfg.dead_fraction > 0 else 0
    n_hot = rng.binomial(npix, cfg.hot_fraction) if cfg.hot_fraction > 0 else 0
    if n_dead:
        image.ravel()[rng.integers(0, npix, n_dead)] = 0.0
    if n_hot:
        hot_value = cfg.saturation if cfg.saturation is not None else float(image.max()) * 2 + 1.0
        image.ravel()[rng.integers(0, npix, n_hot)] = hot_value
    if cfg.saturation is not None:
        np.minimum(image, np.float32(cfg.saturation), out=image)
    image[gy, :] = 0.0
    image[:, gx] = 0.0

    peaks = np.empty((n, 3), dtype=np.float32)
    peaks[:, :2] = centres
    peaks[:, 2] = intensity
    return image, label, peaks


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def make_frame(rng: np.random.Generator | int | None, cfg: SynthConfig | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic frame of shape ``cfg.shape``.

    Args:
        rng: a NumPy ``Generator`` (advanced in place) or an integer seed.
        cfg: generation parameters (default :class:`SynthConfig()`).

    Returns:
        ``image`` float32 ``[H, W]``, ``label`` uint8 ``[H, W]`` (1 = peak pixel, half-maximum rule) and the
        true peaks float32 ``[n, 3]`` as ``(y, x, integrated_intensity)``.
    """
    cfg = cfg or SynthConfig()
    rng = _as_rng(rng)
    ev = _draw_event(rng, cfg, cfg.shape)
    return _render(rng, cfg, ev, cfg.shape, (0, 0), gaps=True)


def make_panel_stack(rng: np.random.Generator | int | None, cfg: SynthConfig | None = None, panels: int = 16,
                     panel_shape: tuple[int, int] = (352, 384)
                     ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """A multi-panel detector read-out ``(P, H, W)`` (e.g. epix10k2M: 16 panels of 352 x 384).

    The panels are laid out on a ``ceil(sqrt(P))``-column grid separated by ``cfg.gap_width`` px; the beam
    centre, background, water ring and beam stop are drawn once for the assembled detector, so each panel
    sees its own part of them. Panels have no internal gaps (``cfg.panel_grid`` is ignored); each panel draws
    its own number of peaks from ``cfg.n_peaks``. ``cfg.shape`` is ignored.

    Returns:
        ``images`` float32 ``[P, H, W]``, ``labels`` uint8 ``[P, H, W]`` and a list of ``P`` true peak
        arrays float32 ``[n_p, 3]`` in panel coordinates.
    """
    cfg = cfg or SynthConfig()
    rng = _as_rng(rng)
    if panels < 1:
        raise ConfigError(f"make_panel_stack: expected panels >= 1, found {panels}.")
    ph, pw = panel_shape
    cols = math.ceil(math.sqrt(panels))
    rows = math.ceil(panels / cols)
    gap = max(cfg.gap_width, 0)
    assembled = (rows * ph + (rows - 1) * gap, cols * pw + (cols - 1) * gap)
    ev = _draw_event(rng, cfg, assembled)
    images = np.empty((panels, ph, pw), dtype=np.float32)
    labels = np.empty((panels, ph, pw), dtype=np.uint8)
    peaks = []
    for p in range(panels):
        row, col = divmod(p, cols)
        img, lab, pk = _render(rng, cfg, ev, panel_shape, (row * (ph + gap), col * (pw + gap)), gaps=False)
        images[p], labels[p] = img, lab
        peaks.append(pk)
    return images, labels, peaks


# ----------------------------------------------------------------------------------------------- dataset
class SyntheticPeakDataset(torch.utils.data.Dataset):
    """``n`` synthetic frames generated on access from ``(seed, index)``.

    Frame ``i`` depends only on ``seed`` and ``i`` (its generator is seeded with
    ``np.random.SeedSequence([seed, i])``), never on access order, worker or rank, so any sharding of the
    indices sees the same data.

    Items are dicts: ``image`` float32 ``[1, H, W]`` (raw, not normalised), ``label`` int64 ``[H, W]``,
    ``peaks`` float32 ``[n, 3]`` ``(y, x, integrated_intensity)``. Batch them with :func:`collate_peaks`
    (peak counts differ between frames).
    """

    def __init__(self, n: int, cfg: SynthConfig | None = None, seed: int = 0):
        if n < 0:
            raise ConfigError(f"SyntheticPeakDataset: expected n >= 0, found {n}.")
        self.n = int(n)
        self.cfg = cfg or SynthConfig()
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.n

    def generator(self, index: int) -> np.random.Generator:
        """The generator that produces frame ``index``."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, index]))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.n <= index < self.n:
            raise IndexError(f"SyntheticPeakDataset index {index} out of range for {self.n} frames.")
        index %= self.n
        image, label, peaks = make_frame(self.generator(index), self.cfg)
        return {"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label.astype(np.int64)),
                "peaks": torch.from_numpy(peaks)}


def collate_peaks(batch: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack ``image`` and ``label`` into batches; keep ``peaks`` as a list (lengths differ)."""
    return {"image": torch.stack([b["image"] for b in batch]), "label": torch.stack([b["label"] for b in batch]),
            "peaks": [b["peaks"] for b in batch]}
