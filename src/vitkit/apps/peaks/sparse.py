"""Sparse-token inference for peak frames: which tokens to compute, their threshold, and the model that runs on them.

Bragg peaks cover well under 1 % of a panel, yet a dense EoMT runs every block and the full-resolution mask
decoder on every patch of every window. :meth:`vitkit.EoMT.forward_sparse` computes only the patch tokens it is
told to keep, each with the other kept tokens of its window as context, and decodes each kept token's tile on its
own. Three pieces make that a peak finder:

* **Which tokens** (:func:`spot_evidence`): a parameter-free local contrast of the normalised panel, the 3 x 3
  mean minus the 15 x 15 mean around each pixel, computed once per panel. A token is kept when the contrast
  anywhere in its patch or a 1-pixel border exceeds a threshold. Bright compact spots pass; flat background,
  the slow water ring and the noise mostly do not.
* **The threshold** (:func:`fit_threshold`): the highest that keeps ``recall`` of the tokens in which the dense
  finder itself puts a peak pixel, on calibration shots (no labels needed: a run's own events serve).
* **A model trained as it runs** (:func:`fine_tune_sparse`): the dense model, fine-tuned through the sparse path
  with the kept tokens only and the loss on their pixels only. A densely trained model needs every token's
  context: on the same kept tokens it loses F1 0.011; fine-tuned, 0.0035.

``vitkit train`` does all three after training (``sparse.json``, ``sparse_model/``) and ``vitkit predict
--sparse`` uses them. Measured (``benchmarks/sparse_tokens.py``, ``benchmarks/RESULTS.md``): on the main job's 24
held-out epix10k2M shots it keeps 0.08 of the tokens and finds peaks 4.3x faster than the dense finder end to end, at
F1 0.957 against 0.961.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitkit.errors import ConfigError
from vitkit.tasks.postprocess import token_evidence, token_keep

__all__ = ["spot_evidence", "fit_threshold", "fine_tune_sparse", "window_masks"]

SPOT, BACKGROUND = 3, 15  # box sides (px) of the spot mean and of the background mean


def spot_evidence(x: torch.Tensor) -> torch.Tensor:
    """Local contrast ``[N, 1, H, W]`` of normalised panels ``x`` ``[N, 1, H, W]`` (bad pixels 0): the 3 x 3 mean
    minus the 15 x 15 mean around each pixel (means over the pixels inside the panel)."""
    return _box_mean(x, SPOT) - _box_mean(x, BACKGROUND)


def _box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over the ``k x k`` box around each pixel of ``x`` ``[..., H, W]``, the box clipped to the image (as
    ``avg_pool2d(..., count_include_pad=False)``), from running sums along each axis: a few reads per pixel,
    whatever ``k`` (a direct 15 x 15 pool is ~30x slower on a CPU)."""
    r = k // 2
    out = x
    for dim in (-2, -1):
        L = x.shape[dim]
        pad = (0, 0, r + 1, r) if dim == -2 else (r + 1, r)
        c = F.pad(out, pad).cumsum(dim)
        out = c.narrow(dim, k, L) - c.narrow(dim, 0, L)
    H, W = x.shape[-2:]

    def count(n: int) -> torch.Tensor:
        i = torch.arange(n, device=x.device)
        return (torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1).to(x.dtype)

    return out / (count(H)[:, None] * count(W))


def _panel_tokens(finder, shots) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch token of every panel of ``shots``: the evidence :func:`token_keep` reads (max over the patch and
    its 1-pixel border) and whether the dense finder puts a peak pixel in it. Flat ``[n]`` each."""
    p = finder.model.encoder.patch_size
    evidence, positive = [], []
    for i in range(len(shots)):
        item = shots[i]
        ev = np.asarray(item["image"], dtype=np.float32)
        ev = finder._events(ev[:, 0] if ev.ndim == 4 else ev)
        good = item.get("good")
        g = finder._good(ev, None if good is None else np.asarray(good, dtype=bool).reshape(ev.shape))
        x = finder.model_input(ev, g)
        evidence.append(token_evidence(F.pad(spot_evidence(x), (1, 1, 1, 1), value=float("-inf")), p).flatten())
        h, w = x.shape[-2:]
        gh, gw = -(-h // p), -(-w // p)
        m = torch.from_numpy(finder._masks(ev, g)).reshape(-1, 1, h, w).float()
        positive.append(F.max_pool2d(F.pad(m, (0, gw * p - w, 0, gh * p - h)), p).flatten() > 0)
    return torch.cat(evidence), torch.cat(positive)


@torch.no_grad()
def fit_threshold(finder, shots, recall: float = 0.995) -> dict[str, Any]:
    """The :func:`spot_evidence` threshold that keeps ``recall`` of the peak tokens of ``shots``.

    Args:
        finder: a dense :class:`~vitkit.apps.peaks.finder.PeakFinder` (its normalisation and masks define the
            peak tokens: those where it finds a peak pixel).
        shots: whole shots (items with ``image`` ``[P, 1, H, W]`` or ``[P, H, W]`` and ``good``; e.g.
            :class:`~vitkit.apps.peaks.lattice.LatticeStillsDataset` with ``panels_per_item=None``), outside every
            split that is evaluated.
        recall: share of the peak tokens whose evidence must exceed the threshold.

    Returns ``{"threshold", "recall", "kept_fraction", "positive_fraction", "tokens"}`` on those shots.
    """
    if not 0 < recall <= 1:
        raise ConfigError(f"fit_threshold: recall must be in (0, 1], got {recall}")
    if finder.sparse:
        raise ConfigError("fit_threshold needs a dense PeakFinder (sparse=False): its masks are the targets")
    evidence, positive = _panel_tokens(finder, shots)
    if not positive.any():
        raise ConfigError(f"fit_threshold: the dense finder finds no peak in the {len(shots)} calibration shots; "
                          f"give shots with peaks")
    scores = torch.sort(evidence[positive]).values
    k = min(len(scores) - 1, int(np.floor((1 - recall) * len(scores))))  # tokens below scores[k] are given up
    thr = float(scores[k]) - 1e-6
    return {"threshold": thr, "recall": float((scores > thr).float().mean()),
            "kept_fraction": float((evidence > thr).float().mean()),
            "positive_fraction": float(positive.float().mean()), "tokens": int(evidence.numel())}


def window_masks(model, tiles: torch.Tensor, where: torch.Tensor, shape: tuple[int, int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Place :meth:`~vitkit.EoMT.forward_sparse`'s tiles on their windows: mask logits ``[B, Q, H, W]`` (0 where no
    token was computed) and the computed pixels ``[B, H, W]`` bool, for windows of ``shape`` ``(B, H, W)``."""
    B, H, W = shape
    p, s = model.encoder.patch_size, tiles.shape[-1]
    if s != p:
        tiles = F.interpolate(tiles, size=(p, p), mode="bilinear", align_corners=False)
    gh, gw = -(-H // p), -(-W // p)
    grid = tiles.new_zeros(B, gh, gw, tiles.shape[1], p, p)
    grid = grid.index_put((where[:, 0], where[:, 1], where[:, 2]), tiles)
    masks = grid.permute(0, 3, 1, 4, 2, 5).reshape(B, -1, gh * p, gw * p)[..., :H, :W]
    computed = torch.zeros(B, gh, gw, dtype=torch.bool, device=tiles.device)
    computed[where[:, 0], where[:, 1], where[:, 2]] = True
    computed = computed.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, :H, :W]
    return masks, computed


def fine_tune_sparse(model, loader, threshold: float, steps: int = 800, lr: float = 5e-4,
                     weight_decay: float = 0.05, loss: dict[str, Any] | None = None, log_every: int = 50
                     ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of ``model`` (a trained EoMT, masked attention annealed away) fine-tuned through the sparse path.

    Each training crop (batches of ``loader``: ``image`` ``[B, 1, h, w]`` normalised, ``label``, ``valid``) keeps
    the tokens :func:`token_keep` gives its :func:`spot_evidence` at ``threshold`` (no surroundings: the crop's
    border counts as no evidence), runs :meth:`~vitkit.EoMT.forward_sparse` and is scored by the training loss
    (:class:`~vitkit.tasks.loss.MaskClassificationLoss` with ``loss``'s settings) on the pixels of its kept
    tokens only (the others are never predicted). AdamW from ``lr`` down a cosine to 0 over ``steps`` batches
    (the loader is cycled). Returns ``(model, {"steps", "seconds", "loss_first", "loss_last", "kept_fraction"})``.
    """
    from vitkit.tasks.loss import MaskClassificationLoss
    from vitkit.tasks.train.module import semantic_targets

    if steps < 1:
        raise ConfigError(f"fine_tune_sparse: steps must be positive, got {steps}")
    tuned = copy.deepcopy(model).train()
    criterion = MaskClassificationLoss(tuned.num_classes, **(loss or {}))
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    dev = tuned.q.weight.device
    p = tuned.encoder.patch_size
    losses, kept, total, t0, step = [], 0, 0, time.perf_counter(), 0
    while step < steps:
        for batch in loader:
            x, label = batch["image"].to(dev), batch["label"].to(dev)
            valid = batch.get("valid")
            with torch.no_grad():
                keep = token_keep(F.pad(spot_evidence(x), (1, 1, 1, 1), value=float("-inf")), p, threshold)
            kept, total = kept + int(keep.sum()), total + keep.numel()
            tiles, classes, where = tuned.forward_sparse(x, keep)
            masks, computed = window_masks(tuned, tiles, where, (x.shape[0], *x.shape[-2:]))
            valid = computed if valid is None else computed & valid.to(dev)
            value, _ = criterion([masks], [classes], semantic_targets(label, tuned.num_classes, valid))
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            sched.step()
            losses.append(float(value.detach()))
            step += 1
            if log_every and (step % log_every == 0 or step == steps):
                print(f"sparse fine-tune step {step}/{steps}: loss {np.mean(losses[-log_every:]):.4f}", flush=True)
            if step == steps:
                break
    tuned.eval()
    return tuned, {"steps": steps, "seconds": time.perf_counter() - t0, "loss_first": float(np.mean(losses[:20])),
                   "loss_last": float(np.mean(losses[-20:])), "kept_fraction": kept / max(total, 1)}
