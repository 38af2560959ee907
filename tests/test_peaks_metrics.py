"""Peak matching and metrics on hand-made cases, including the empty-case conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitkit.apps.peaks import match_peaks, peak_metrics, pixel_metrics
from vitkit.errors import InputError


def test_match_simple():
    pred = [[0, 0], [10, 10]]
    true = [[0, 1], [10, 10], [50, 50]]
    tp, fp, fn, d = match_peaks(pred, true, radius=2.0)
    assert (tp, fp, fn) == (2, 0, 1)
    np.testing.assert_allclose(np.sort(d), [0.0, 1.0])


def test_match_is_one_to_one_and_maximal_not_greedy():
    # greedy nearest-first would pair p1-t1 (1.4) and leave p2 unmatched (p2-t2 = 4.9 > 2)
    pred = np.array([[0, 0.0], [0, 3.0]])
    true = np.array([[0, 1.4], [0, -1.9]])
    tp, fp, fn, d = match_peaks(pred, true, radius=2.0)
    assert (tp, fp, fn) == (2, 0, 0)
    np.testing.assert_allclose(np.sort(d), [1.6, 1.9])
    # two predictions on one true peak: one TP, one FP
    tp, fp, fn, d = match_peaks([[5, 5], [5, 5.5]], [[5, 5.2]], radius=1.0)
    assert (tp, fp, fn) == (1, 1, 0)
    np.testing.assert_allclose(d, [0.2])


def test_match_radius_is_inclusive_and_extra_columns_ignored():
    tp, fp, fn, d = match_peaks(np.array([[0, 0, 123.0]]), np.array([[0, 2.0, 7.0]]), radius=2.0)
    assert (tp, fp, fn) == (1, 0, 0)
    tp, fp, fn, d = match_peaks([[0, 0]], [[0, 2.0001]], radius=2.0)
    assert (tp, fp, fn) == (0, 1, 1) and d.size == 0
    tp, *_ = match_peaks(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 2.0]]), radius=1.0)
    assert tp == 1


def test_match_empty():
    assert match_peaks(np.zeros((0, 2)), np.zeros((0, 3)))[:3] == (0, 0, 0)
    assert match_peaks([], [[1, 1]])[:3] == (0, 0, 1)
    assert match_peaks([[1, 1], [2, 2]], [])[:3] == (0, 2, 0)
    with pytest.raises(InputError, match=r"\[n, 2\]"):
        match_peaks(np.zeros((3, 1)), np.zeros((3, 2)))


def test_peak_metrics_pooled_over_frames():
    pred = [np.array([[0, 0, 1.0], [10, 10, 1.0]]), np.zeros((0, 3)), np.array([[5, 5, 1.0]])]
    true = [np.array([[0, 1.0], [10, 10], [50, 50]]), np.array([[3, 3.0]]), np.array([[5, 6.5]])]
    m = peak_metrics(pred, true, radius=2.0)
    # tp 3 (d = 1, 0, 1.5), fp 0, fn 2
    assert (m["tp"], m["fp"], m["fn"], m["n_pred"], m["n_true"]) == (3, 0, 2, 3, 5)
    assert m["peak_precision"] == 1.0
    assert m["peak_recall"] == pytest.approx(0.6)
    assert m["peak_f1"] == pytest.approx(0.75)
    assert m["centroid_rmse_px"] == pytest.approx(math.sqrt((1 + 0 + 2.25) / 3))
    with pytest.raises(InputError, match="one peak list per frame"):
        peak_metrics(pred, true[:2])


def test_peak_metrics_empty_conventions():
    e = np.zeros((0, 3))
    both = peak_metrics([e, e], [e, e])
    assert both["peak_precision"] == both["peak_recall"] == both["peak_f1"] == 1.0
    assert math.isnan(both["centroid_rmse_px"]) and both["n_pred"] == both["n_true"] == 0
    missed = peak_metrics([e], [np.array([[1.0, 1.0]])])
    assert (missed["peak_precision"], missed["peak_recall"], missed["peak_f1"]) == (0.0, 0.0, 0.0)
    spurious = peak_metrics([np.array([[1.0, 1.0]])], [e])
    assert (spurious["peak_precision"], spurious["peak_recall"], spurious["peak_f1"]) == (0.0, 0.0, 0.0)
    none = peak_metrics([np.array([[0.0, 0.0]])], [np.array([[9.0, 9.0]])])
    assert (none["peak_precision"], none["peak_recall"], none["peak_f1"]) == (0.0, 0.0, 0.0)
    assert math.isnan(none["centroid_rmse_px"])
    assert peak_metrics([], [])["peak_f1"] == 1.0


def test_pixel_metrics():
    p = np.zeros((2, 4, 4), dtype=bool)
    t = np.zeros((2, 4, 4), dtype=np.int64)
    p[0, 0, :3] = True  # 3 predicted
    t[0, 0, 1:4] = 1  # 3 true, overlap 2
    m = pixel_metrics(p, t)
    assert m["pixel_iou"] == pytest.approx(2 / 4)
    assert m["pixel_dice"] == pytest.approx(4 / 6)
    assert m["pixel_precision"] == pytest.approx(2 / 3) and m["pixel_recall"] == pytest.approx(2 / 3)
    # same numbers from lists of frames and from tensors
    assert pixel_metrics(list(p), list(t)) == m
    assert pixel_metrics(torch.from_numpy(p), torch.from_numpy(t)) == m
    empty = pixel_metrics(np.zeros((3, 3)), np.zeros((3, 3)))
    assert empty["pixel_iou"] == empty["pixel_dice"] == 1.0
    disjoint = pixel_metrics(np.eye(3), 1 - np.eye(3))
    assert disjoint["pixel_iou"] == disjoint["pixel_dice"] == 0.0
    with pytest.raises(InputError, match="differs"):
        pixel_metrics(np.zeros((3, 3)), np.zeros((3, 4)))
