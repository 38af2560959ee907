"""Sparse-token inference for peak frames: fit EoMT's per-token scorer and its threshold.

Bragg peaks cover well under 1 % of a panel, yet a dense EoMT runs every block and the full-resolution mask
decoder on every patch of every window. :meth:`vitkit.EoMT.forward_sparse` stops most of that after the first
``block`` blocks: a linear scorer on the patch tokens there decides which tokens may hold a peak; only those
(and their 8 neighbours) go on, and windows with none stop there.

The scorer is fitted after training, on the trained model, frozen (logistic regression on the tokens of the
calibration shots' windows, tiled exactly as :class:`~vitkit.apps.peaks.finder.PeakFinder` tiles them). A token is
positive when the dense finder itself puts a peak pixel in its patch (``targets="model"``: the sparse path learns
to keep what the dense model would report, and calibration needs no labels, so a run's own events serve) or when
a labelled peak pixel lies in it (``targets="truth"``). Its threshold is the highest that keeps ``recall`` of the
positive tokens of a held-back part of those windows after the 8-neighbour growth: peaks the scorer drops are
peaks the finder cannot report, so recall, not accuracy, sets it.

Measured (benchmarks/RESULTS.md, ``benchmarks/sparse_tokens.py``): on the main job's model the scorer keeps ~40 %
of the tokens for 99.5 % recall, F1 within 0.001-0.003 of dense, 1.2-1.4x faster end to end.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitkit.errors import ConfigError
from vitkit.tasks.postprocess import windows_of

__all__ = ["fit_token_scorer"]


@torch.no_grad()
def _features(finder, shots, batch_size: int, targets: str
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Scorer inputs (patch tokens after the scorer's block) ``[n, gh * gw, D]`` and token targets ``[n, gh * gw]``
    (a peak pixel of the dense finder's masks, or of the items' labels, in the patch) of every window of every
    panel of ``shots``."""
    model = finder.model
    wh, ww = model.img_size
    feats, positive, grid = [], [], None
    for i in range(len(shots)):
        item = shots[i]
        ev = np.asarray(item["image"], dtype=np.float32)
        ev = ev[:, 0] if ev.ndim == 4 else ev
        ev = finder._events(ev)
        good = item.get("good")
        g = finder._good(ev, None if good is None else np.asarray(good, dtype=bool).reshape(ev.shape))
        x = finder.model_input(ev, g)
        lab = finder._masks(ev, g) if targets == "model" else np.asarray(item["label"]) > 0
        lab = torch.as_tensor(lab).reshape(-1, 1, *x.shape[-2:]).float()
        ph, pw = max(0, wh - x.shape[-2]), max(0, ww - x.shape[-1])
        if ph or pw:
            x, lab = F.pad(x, (0, pw, 0, ph)), F.pad(lab, (0, pw, 0, ph))
        boxes = windows_of(x, (wh, ww), finder.overlap)
        for s in range(0, len(boxes), batch_size):
            chunk = boxes[s:s + batch_size]
            win = torch.stack([x[b, :, y:y + wh, xx:xx + ww] for b, y, xx in chunk])
            tokens, grid, _ = model.token_features(win)
            feats.append(tokens[:, model.encoder.num_prefix_tokens:].float().cpu())
            tl = torch.stack([lab[b, :, y:y + wh, xx:xx + ww] for b, y, xx in chunk])
            p = model.encoder.patch_size
            tl = F.pad(tl, (0, grid[1] * p - ww, 0, grid[0] * p - wh))
            positive.append(F.max_pool2d(tl, p).flatten(1) > 0)
    return torch.cat(feats), torch.cat(positive), grid


def _grown(keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``keep`` ``[n, gh * gw]`` with the 8 neighbours of every kept token (the growth forward_sparse applies)."""
    return F.max_pool2d(keep.view(-1, 1, *grid).float(), 3, stride=1, padding=1).flatten(1) > 0


def _grown_recall(keep: torch.Tensor, target: torch.Tensor, grid: tuple[int, int]) -> float:
    """Share of positive tokens kept after the 8-neighbour growth forward_sparse applies."""
    grown = _grown(keep, grid)
    pos = int(target.sum())
    return 1.0 if pos == 0 else float((grown & target).sum()) / pos


def fit_token_scorer(finder, shots, block: int = 0, recall: float = 0.995, targets: str = "model",
                     steps: int = 300, lr: float = 0.05, holdout: float = 0.3, batch_size: int = 64,
                     seed: int = 0) -> dict[str, Any]:
    """Give ``finder.model`` (an EoMT, trained) a token scorer read after ``block`` blocks and fit it.

    Args:
        finder: a dense :class:`~vitkit.apps.peaks.finder.PeakFinder` (its normalisation, mask rules and
            window overlap are what the scorer sees).
        shots: whole labelled shots (items with ``image`` ``[P, 1, H, W]`` or ``[P, H, W]``, ``label``, ``good``;
            e.g. :class:`~vitkit.apps.peaks.lattice.LatticeStillsDataset` with ``panels_per_item=None``) from
            outside every split that is evaluated.
        block: the scorer reads the tokens after this many blocks (at most the blocks before the queries join).
        recall: share of positive tokens of the held-back windows the threshold keeps (after growth).
        targets: which tokens are positive: ``"model"``, those where the dense finder itself finds peak pixels
            (the sparse path is fitted to keep what the dense model would report, and the shots need no labels:
            a run's own unlabelled events serve); ``"truth"``, those with a labelled peak pixel (``label``).
        steps, lr: full-batch Adam on the class-balanced logistic loss.
        holdout: share of the windows (whole panels' windows, last ones) held back to set the threshold.

    Returns ``{"block", "threshold", "recall", "kept_fraction", "positive_fraction", "windows"}`` on the held-back
    windows (kept fraction after growth). The model keeps the fitted scorer (saved by ``save_pretrained``).
    """
    model = finder.model
    if not 0 < recall <= 1 or not 0 < holdout < 1:
        raise ConfigError(f"fit_token_scorer: recall must be in (0, 1] and holdout in (0, 1), got {recall}, {holdout}")
    if targets not in ("model", "truth"):
        raise ConfigError(f"fit_token_scorer: targets must be 'model' or 'truth', got {targets!r}")
    if finder.sparse:
        raise ConfigError("fit_token_scorer needs a dense PeakFinder (sparse=False): its masks are the targets")
    previous = None if model.token_scorer is None else model.token_scorer_block
    if previous != block:
        model.add_token_scorer(block)
    model.eval()
    feats, target, grid = _features(finder, shots, batch_size, targets)
    n = feats.shape[0]
    cut = max(1, min(n - 1, int(round(n * (1 - holdout)))))
    if not target[:cut].any() or not target[cut:].any():
        if previous is None:  # leave the model as it came: no untrained scorer
            model.remove_token_scorer()
        raise ConfigError(f"fit_token_scorer: the calibration shots have no peak tokens in the fitting or the "
                          f"held-back windows ({int(target.sum())} of {target.numel()}); give more shots")
    lin = model.token_scorer[1]
    norm = model.token_scorer[0]
    x = norm(feats[:cut].reshape(-1, feats.shape[-1]))
    y = target[:cut].reshape(-1).float()
    pos_weight = (y.numel() - y.sum()) / y.sum()
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(1, x.shape[1]).normal_(0, 0.01, generator=g).requires_grad_()
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits((x @ w.T)[:, 0] + b, y, pos_weight=pos_weight)
            loss.backward()
            opt.step()
    with torch.no_grad():
        lin.weight.copy_(w.to(lin.weight.dtype))
        lin.bias.copy_(b.to(lin.bias.dtype))
        scores = model.token_scorer(feats[cut:].to(lin.weight.device, lin.weight.dtype)).squeeze(-1).float().cpu()
    tgt = target[cut:]
    # the highest threshold whose grown recall reaches the goal: bisect over the positive tokens' scores
    cand = torch.sort(scores[tgt]).values
    lo, hi = 0, len(cand) - 1  # threshold just below cand[i] keeps every positive scored >= cand[i]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _grown_recall(scores >= cand[mid], tgt, grid) >= recall:
            lo = mid
        else:
            hi = mid - 1
    thr = float(cand[lo]) - 1e-6
    model.token_threshold.fill_(thr)
    keep = scores > thr
    grown = _grown(keep, grid)
    return {"block": block, "threshold": thr, "recall": _grown_recall(keep, tgt, grid),
            "kept_fraction": float(grown.float().mean()), "positive_fraction": float(tgt.float().mean()),
            "windows": int(n - cut)}
