"""Peak-level and pixel-level metrics for Bragg-peak finding.

Peak matching is one-to-one within a radius: among all assignments of predicted to true peaks that only pair
peaks at most ``radius`` px apart (inclusive), the one with the most pairs is chosen and, among those, the
one with the smallest total distance (``scipy.optimize.linear_sum_assignment`` on the distance matrix with
out-of-radius pairs given a cost larger than any possible sum of in-radius distances).

Counts are pooled over frames (micro-average): precision = TP / n_pred, recall = TP / n_true.

Empty cases (decided here and tested):

* nothing predicted and nothing true: precision = recall = F1 = 1.0 (perfect agreement);
* nothing predicted but true peaks exist: precision = 0.0, recall = 0.0, F1 = 0.0 -- a finder that never
  answers is not "precise";
* predictions but no true peaks: precision = 0.0, recall = 0.0, F1 = 0.0;
* F1 = 2PR / (P + R), and 0.0 when P + R = 0;
* ``centroid_rmse_px`` is NaN when there are no matched pairs;
* pixel IoU and Dice are 1.0 when both masks are empty everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from vitkit.errors import InputError

__all__ = ["match_peaks", "peak_metrics", "pixel_metrics"]


def _xy(points, name: str) -> np.ndarray:
    if hasattr(points, "detach"):
        points = points.detach().cpu().numpy()
    p = np.asarray(points, dtype=np.float64)
    if p.size == 0:
        return np.zeros((0, 2))
    if p.ndim != 2 or p.shape[1] < 2:
        raise InputError(f"{name}: expected peaks [n, 2] or [n, 3] as (y, x[, intensity]), found shape {p.shape}.")
    return p[:, :2]


def match_peaks(pred, true, radius: float = 2.0, ignore=None) -> tuple[int, int, int, np.ndarray]:
    """One-to-one matching of predicted to true peak positions within ``radius`` px (inclusive).

    Args:
        pred: ``[n, 2+]`` predicted ``(y, x, ...)`` (extra columns ignored).
        true: ``[m, 2+]`` true ``(y, x, ...)``.
        radius: largest distance of a matched pair.

        ignore: optional ``[k, 2+]`` positions of "don't care" peaks (real but too weak to be required, like
            PASCAL VOC's *difficult* objects): a prediction left unmatched within ``radius`` of one is neither a
            true nor a false positive.

    Returns:
        ``(tp, fp, fn, distances)`` with ``distances`` float64 ``[tp]`` the distances of the matched pairs.
    """
    tp, fp, fn, d, unmatched = _match(pred, true, radius)
    if ignore is not None and fp:
        q = _xy(ignore, "match_peaks(ignore)")
        if len(q):
            near = cKDTree(q).query(unmatched, distance_upper_bound=radius)[0] <= radius
            fp -= int(near.sum())
    return tp, fp, fn, d


def _match(pred, true, radius: float) -> tuple[int, int, int, np.ndarray, np.ndarray]:
    """:func:`match_peaks` without ignore regions; also returns the unmatched predictions ``[fp, 2]``."""
    p, t = _xy(pred, "match_peaks(pred)"), _xy(true, "match_peaks(true)")
    if radius < 0:
        raise InputError(f"match_peaks: expected radius >= 0, found {radius}.")
    if len(p) == 0 or len(t) == 0:
        return 0, len(p), len(t), np.zeros(0), p
    # candidate pairs within the radius (sparse), then a dense assignment on the involved rows/columns only
    pairs = cKDTree(p).sparse_distance_matrix(cKDTree(t), radius, output_type="ndarray")
    if len(pairs) == 0:
        return 0, len(p), len(t), np.zeros(0), p
    rows, ri = np.unique(pairs["i"], return_inverse=True)
    cols, ci = np.unique(pairs["j"], return_inverse=True)
    big = radius * (min(len(rows), len(cols)) + 1) + 1.0  # > any sum of in-radius distances
    cost = np.full((len(rows), len(cols)), big)
    cost[ri, ci] = pairs["v"]
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] <= radius
    d = cost[r, c][ok]
    tp = int(ok.sum())
    matched = np.zeros(len(p), dtype=bool)
    matched[rows[r[ok]]] = True
    return tp, len(p) - tp, len(t) - tp, d, p[~matched]


def _ratio(num: int, den: int, other: int) -> float:
    """num / den, or the empty-case convention: 1.0 if both sides are empty, else 0.0."""
    if den > 0:
        return num / den
    return 1.0 if other == 0 else 0.0


def peak_metrics(pred_list: Sequence, true_list: Sequence, radius: float = 2.0,
                 ignore_list: Sequence | None = None) -> dict[str, float]:
    """Peak precision / recall / F1 and centroid RMSE pooled over frames.

    Args:
        pred_list: per frame, predicted peaks ``[n_i, 2+]`` (``(y, x[, intensity])``).
        true_list: per frame, true peaks ``[m_i, 2+]``; same number of frames.
        radius: matching radius in px (see :func:`match_peaks`).
        ignore_list: per frame, "don't care" peaks ``[k_i, 2+]`` (see :func:`match_peaks`), or None.

    Returns:
        dict with ``peak_precision``, ``peak_recall``, ``peak_f1``, ``centroid_rmse_px`` (over matched pairs;
        NaN if none), ``n_pred``, ``n_true``, ``tp``, ``fp``, ``fn`` (module docstring for empty cases).
    """
    if len(pred_list) != len(true_list):
        raise InputError(f"peak_metrics: {len(pred_list)} predicted frames but {len(true_list)} true frames; "
                         "pass one peak list per frame on both sides (empty arrays for frames without peaks).")
    tp = fp = fn = 0
    d2 = []
    for i, (p, t) in enumerate(zip(pred_list, true_list)):
        a, b, c, d = match_peaks(p, t, radius, None if ignore_list is None else ignore_list[i])
        tp, fp, fn = tp + a, fp + b, fn + c
        d2.append(d ** 2)
    n_pred, n_true = tp + fp, tp + fn
    prec = _ratio(tp, n_pred, n_true)
    rec = _ratio(tp, n_true, n_pred)
    f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    d2 = np.concatenate(d2) if d2 else np.zeros(0)
    rmse = float(np.sqrt(d2.mean())) if d2.size else float("nan")
    return {"peak_precision": float(prec), "peak_recall": float(rec), "peak_f1": float(f1),
            "centroid_rmse_px": rmse, "n_pred": int(n_pred), "n_true": int(n_true),
            "tp": int(tp), "fp": int(fp), "fn": int(fn)}


def pixel_metrics(pred_masks, true_masks) -> dict[str, float]:
    """Pixel IoU and Dice of the peak class, pooled over all pixels of all frames.

    Args:
        pred_masks, true_masks: arrays (or tensors, or sequences of ``[H, W]`` arrays) of equal shapes;
            non-zero = peak.

    Returns:
        dict with ``pixel_iou`` = |P & T| / |P | T| and ``pixel_dice`` = 2|P & T| / (|P| + |T|) (both 1.0 when
        P and T are empty), plus ``pixel_precision`` and ``pixel_recall`` (same empty-case rules as peaks).
    """
    def arr(m):
        if hasattr(m, "detach"):
            return m.detach().cpu().numpy()
        if isinstance(m, (list, tuple)):
            return [arr(x) for x in m]
        return np.asarray(m)

    p, t = arr(pred_masks), arr(true_masks)
    if isinstance(p, list) or isinstance(t, list):
        if not (isinstance(p, list) and isinstance(t, list)) or len(p) != len(t):
            raise InputError("pixel_metrics: expected two sequences of masks of the same length.")
        pairs = list(zip(p, t))
    else:
        pairs = [(p, t)]
    inter = n_p = n_t = 0
    for a, b in pairs:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise InputError(f"pixel_metrics: predicted mask shape {a.shape} differs from true mask shape "
                             f"{b.shape}.")
        a, b = a != 0, b != 0
        inter += int(np.count_nonzero(a & b))
        n_p += int(np.count_nonzero(a))
        n_t += int(np.count_nonzero(b))
    union = n_p + n_t - inter
    iou = inter / union if union else 1.0
    dice = 2 * inter / (n_p + n_t) if n_p + n_t else 1.0
    return {"pixel_iou": float(iou), "pixel_dice": float(dice),
            "pixel_precision": float(_ratio(inter, n_p, n_t)), "pixel_recall": float(_ratio(inter, n_t, n_p))}
