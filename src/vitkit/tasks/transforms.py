"""Image transforms for detector frames: instance normalisation, padding, cropping (PeakNet's polar
centre crop included). All work on tensors [C, H, W] (image) and [H, W] (label) together."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def instance_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-frame ``(x - mean) / (std + eps)`` over (C, H, W) of each frame in [..., C, H, W]."""
    dims = (-3, -2, -1)
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


def robust_normalise(x: torch.Tensor, good: torch.Tensor | None = None, samples: int = 16384,
                     unit: torch.Tensor | float | None = None) -> torch.Tensor:
    """Detector-panel normalisation: ``asinh((x - median) / scale)`` per image over its good pixels.

    ``x`` is ``[..., H, W]`` (each ``[H, W]`` normalised on its own), ``good`` a bool mask of the same shape
    (True = good pixel) or None. ``scale = 1.4826 * MAD`` (the noise sigma for Gaussian noise), floored at
    ``unit`` (one photon in ADU, when the detector says: in photon-counting data with a fraction of a photon
    per pixel the MAD is far below one photon, and single photons would look like peaks; a float or one value
    per image ``[N]`` of the flattened leading axes) or, without it, at ``1e-3 * (1 + |median|)``. Median and
    MAD are estimated on at most ``samples`` good pixels taken on a fixed stride, so one frame costs the same
    whatever its size. Unlike mean/std normalisation, a saturated hot pixel or a bright Bragg peak does not
    change the scale of the rest of the panel, and ``asinh`` keeps noise ~ linear while compressing peaks
    spanning five decades. Bad pixels come out as 0 (the background level), so they carry no signal into the
    model.
    """
    shape = x.shape
    flat = x.reshape(-1, shape[-2] * shape[-1]).float()
    g = None if good is None else good.reshape(flat.shape).to(flat.device, torch.bool)
    step = max(1, flat.shape[1] // samples)
    sub = flat[:, ::step]
    if g is not None:
        sub = torch.where(g[:, ::step], sub, torch.full_like(sub, float("nan")))
    med = torch.nanmedian(sub, dim=1, keepdim=True).values
    med = torch.nan_to_num(med, nan=0.0)  # an image without good pixels
    mad = torch.nanmedian((sub - med).abs(), dim=1, keepdim=True).values
    scale = torch.nan_to_num(1.4826 * mad, nan=1.0)
    if unit is None:
        scale = scale.clamp_min(1e-3 * (1 + med.abs()))
    else:
        scale = torch.maximum(scale, torch.as_tensor(unit, dtype=scale.dtype, device=scale.device).reshape(-1, 1))
    out = torch.asinh((flat - med) / scale)
    if g is not None:
        out = out.masked_fill(~g, 0.0)
    return out.reshape(shape)


def pad_to(x: torch.Tensor, H: int, W: int, style: str = "bottom-right", value: float = 0.0) -> torch.Tensor:
    """Pad the last two axes to at least H x W (``bottom-right`` or ``center``)."""
    h, w = x.shape[-2:]
    ph, pw = max(0, H - h), max(0, W - w)
    if not ph and not pw:
        return x
    if style == "bottom-right":
        pad = (0, pw, 0, ph)
    elif style == "center":
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    else:
        raise ValueError(f"pad style must be 'bottom-right' or 'center', got {style!r}")
    squeeze = x.ndim == 2
    y = F.pad(x[None] if squeeze else x, pad, value=value)
    return y[0] if squeeze else y


def crop_at(x: torch.Tensor, top: int, left: int, H: int, W: int) -> torch.Tensor:
    return x[..., top:top + H, left:left + W]


def random_crop_box(h: int, w: int, H: int, W: int, generator: torch.Generator | None = None) -> tuple[int, int]:
    top = int(torch.randint(0, h - H + 1, (1,), generator=generator)) if h > H else 0
    left = int(torch.randint(0, w - W + 1, (1,), generator=generator)) if w > W else 0
    return top, left


def polar_center_crop_box(h: int, w: int, H: int, W: int, sigma: float = 0.33,
                          generator: torch.Generator | None = None) -> tuple[int, int]:
    """PeakNet's polar centre crop: the crop centre is drawn at a Gaussian radius (``sigma`` times the
    half-diagonal of the frame) and a uniform angle around the frame centre (the beam centre), then
    clamped so the crop stays inside the frame."""
    r = abs(float(torch.randn(1, generator=generator))) * sigma * math.hypot(h / 2, w / 2)
    theta = float(torch.rand(1, generator=generator)) * 2 * math.pi
    cy, cx = h / 2 + r * math.sin(theta), w / 2 + r * math.cos(theta)
    top = int(round(min(max(cy - H / 2, 0), max(h - H, 0))))
    left = int(round(min(max(cx - W / 2, 0), max(w - W, 0))))
    return top, left
