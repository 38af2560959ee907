"""Mask -> peaks: the vectorised find_peaks against a per-component reference loop, filters, logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from vitkit.apps.peaks import find_peaks, label_components, logits_to_mask, peaks_per_frame
from vitkit.errors import InputError


def reference_peaks(mask: np.ndarray, image: np.ndarray, connectivity: int = 8, min_pixels: int = 1) -> np.ndarray:
    """Slow, obvious reference: ndimage.label, then one component at a time with center_of_mass / sum."""
    structure = np.ones((3, 3)) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    lab, n = ndimage.label(mask, structure=structure)
    weights = np.clip(image.astype(np.float64), 0, None)
    out = []
    for i in range(1, n + 1):
        comp = lab == i
        if comp.sum() < min_pixels:
            continue
        if weights[comp].sum() > 0:
            cy, cx = ndimage.center_of_mass(weights, lab, i)
        else:
            cy, cx = ndimage.center_of_mass(comp)
        out.append((cy, cx, float(image[comp].astype(np.float64).sum())))
    return np.array(out, dtype=np.float64).reshape(-1, 3)


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("method", ["sparse", "ndimage", "auto"])
@pytest.mark.parametrize("fill", [0.02, 0.3, 0.7])
def test_matches_reference_on_random_masks(method, connectivity, fill):
    rng = np.random.default_rng(int(fill * 100) + connectivity)
    for shape in [(37, 53), (64, 48)]:
        mask = rng.random(shape) < fill
        image = rng.normal(1.0, 2.0, size=shape).astype(np.float32)  # negative values: clipped weights
        image[rng.random(shape) < 0.2] = -1.0  # some components have zero total weight -> unweighted mean
        ref = reference_peaks(mask, image, connectivity)
        got = find_peaks(mask, image, connectivity=connectivity, method=method)
        assert got.shape == ref.shape and len(ref) > 0
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
        got3 = find_peaks(mask, image, connectivity=connectivity, method=method, min_pixels=3)
        np.testing.assert_allclose(got3, reference_peaks(mask, image, connectivity, min_pixels=3), atol=1e-9)


def test_sparse_and_ndimage_labels_agree_on_edge_touching_components():
    # components that touch every border and wrap-around neighbours (x = W-1 next to x = 0 of the next row)
    mask = np.zeros((6, 7), dtype=bool)
    mask[:, 0] = True
    mask[2, 6] = True  # must not join column 0 of row 3
    mask[5, 3:] = True
    mask[0, 6] = True
    a = label_components(mask, 8, "sparse")
    b = label_components(mask, 8, "ndimage")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a[2] == 4


def test_hand_made_components():
    mask = np.zeros((5, 6), dtype=bool)
    image = np.zeros((5, 6), dtype=np.float32)
    mask[1, 1:3] = True
    image[1, 1:3] = [1.0, 3.0]  # weighted centroid x = (1*1 + 3*2) / 4 = 1.75
    mask[3, 4] = mask[4, 5] = True  # diagonal: one component with 8-connectivity, two with 4
    image[3, 4], image[4, 5] = -2.0, -1.0  # zero weight -> unweighted mean (3.5, 4.5); sum -3
    got = find_peaks(mask, image)
    np.testing.assert_allclose(got, [[1.0, 1.75, 4.0], [3.5, 4.5, -3.0]])
    got4 = find_peaks(mask, image, connectivity=4)
    np.testing.assert_allclose(got4, [[1.0, 1.75, 4.0], [3.0, 4.0, -2.0], [4.0, 5.0, -1.0]])
    np.testing.assert_allclose(find_peaks(mask, image, min_pixels=2), got)
    np.testing.assert_allclose(find_peaks(mask, image, connectivity=4, min_pixels=2), got4[:1])
    # integer masks and images, torch tensors
    np.testing.assert_allclose(find_peaks(torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(image)), got)
    assert find_peaks(np.zeros((4, 4), bool), np.ones((4, 4))).shape == (0, 3)


def test_order_is_raster_order_of_first_pixel():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0, 6] = True  # first in raster order
    mask[1:7, 1] = True  # starts at row 1 ...
    mask[6, 1:5] = True
    mask[2, 4] = True  # ... but this one starts at row 2
    image = np.ones((8, 8))
    ys = find_peaks(mask, image, method="sparse")[:, 0]
    np.testing.assert_allclose(ys, find_peaks(mask, image, method="ndimage")[:, 0])
    np.testing.assert_allclose(find_peaks(mask, image)[:, 2], [1, 9, 1])


def test_peaks_per_frame_filters():
    mask = np.zeros((3, 20, 20), dtype=bool)
    image = np.zeros((3, 20, 20), dtype=np.float32)
    for k, (y, x) in enumerate([(2, 2), (2, 10), (10, 2), (10, 10), (16, 16)]):
        mask[0, y, x] = True
        image[0, y, x] = [5, 1, 4, 2, 3][k]
    mask[1, 5, 5] = True
    image[1, 5, 5] = 7
    out = peaks_per_frame(mask, image, min_peaks=2, max_peaks=3)
    assert len(out) == 3
    # frame 0: 5 peaks > 3 -> the 3 brightest (5, 4, 3) in raster order
    np.testing.assert_allclose(out[0], [[2, 2, 5], [10, 2, 4], [16, 16, 3]])
    assert out[1].shape == (0, 3)  # 1 peak < min_peaks
    assert out[2].shape == (0, 3)  # empty frame
    assert len(peaks_per_frame(mask, image, max_peaks=None)[0]) == 5
    with pytest.raises(InputError, match="differ in length"):
        peaks_per_frame(mask, image[:2])


def test_logits_to_mask():
    l0 = np.zeros((2, 3), dtype=np.float32)
    l1 = np.array([[-1.0, 0.0, 0.5], [2.0, -3.0, 1.1]], dtype=np.float32)
    logits = np.stack([l0, l1])  # [2, H, W]
    np.testing.assert_array_equal(logits_to_mask(logits), [[False, False, True], [True, False, True]])
    # softmax(peak) = sigmoid(l1): >= 0.75 <=> l1 >= log 3 = 1.0986
    np.testing.assert_array_equal(logits_to_mask(logits, threshold=0.75), [[False, False, False], [True, False, True]])
    batch = torch.from_numpy(np.stack([logits, logits[::-1].copy()]))  # [B, 2, H, W]
    m = logits_to_mask(batch)
    assert m.shape == (2, 2, 3)
    np.testing.assert_array_equal(m[1], [[True, False, False], [False, True, False]])
    np.testing.assert_array_equal(logits_to_mask(l1[None], threshold=0.5), l1 >= 0)
    with pytest.raises(InputError, match="C = 1 or 2"):
        logits_to_mask(np.zeros((3, 4, 4)))


def test_bad_inputs():
    with pytest.raises(InputError, match="differs from the mask shape"):
        find_peaks(np.zeros((4, 4), bool), np.zeros((4, 5)))
    with pytest.raises(InputError, match="2-D mask"):
        find_peaks(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)))
    with pytest.raises(InputError, match="connectivity"):
        find_peaks(np.ones((4, 4), bool), np.zeros((4, 4)), connectivity=6)
    with pytest.raises(InputError, match="method"):
        find_peaks(np.ones((4, 4), bool), np.zeros((4, 4)), method="gpu")


# ------------------------------------------------------------------------------------ defects, photometry
def _spot(shape, y, x, photons, sigma):
    """A Gaussian spot integrated over pixels (photons in total)."""
    from scipy.special import erf

    def axis(n, c):
        e = np.arange(n + 1) - 0.5 - c
        return 0.5 * np.diff(erf(e / (np.sqrt(2) * sigma)))

    return photons * np.outer(axis(shape[0], y), axis(shape[1], x))


def test_lone_pixels_flag_hot_clusters_but_never_a_bragg_spot():
    from vitkit.apps.peaks.peakfind import lone_pixels

    img = np.random.default_rng(0).poisson(1.0, (80, 80)).astype(np.float64)
    hot = {"single": [(10, 10)], "pair": [(20, 20), (20, 21)], "diagonal pair": [(30, 30), (31, 31)],
           "2x2": [(40, 40), (40, 41), (41, 40), (41, 41)]}
    for pix in hot.values():
        for y, x in pix:
            img[y, x] = 3000.0 + 500 * (y % 3)
    five = [(60, 10), (60, 11), (60, 12), (61, 10), (61, 11)]  # larger than a hot cluster: not judged lone
    for y, x in five:
        img[y, x] = 3000.0
    img += _spot(img.shape, 50.0, 50.5, 2000.0, 0.5)  # bright, sharp spot between two pixels
    img += _spot(img.shape, 65.0, 65.0, 800.0, 0.5)  # centred on a pixel
    img[70:73, 40:43] = 1e4  # a saturated spot: a plateau
    got = {tuple(p) for p in np.argwhere(lone_pixels(img, unit=1.0))}
    assert got == {p for pix in hot.values() for p in pix}
    # groups of one only (the rule before clusters): the clusters stay
    assert {tuple(p) for p in np.argwhere(lone_pixels(img, unit=1.0, max_group=1))} == {(10, 10)}


def test_local_signal_is_the_background_subtracted_aperture_sum_and_snr_is_in_noise_sigmas():
    from vitkit.apps.peaks.peakfind import measure_components

    shape = (48, 48)
    spot = _spot(shape, 24.0, 23.6, 400.0, 0.7)
    img = 4.0 + spot  # noise-free: level 4 (to 1e-8), no background noise, so noise2 = unit * signal
    mask = spot > 0.5 * spot.max()
    aperture = ndimage.binary_dilation(mask, np.ones((3, 3), dtype=bool))
    c = measure_components(mask, img, good=np.ones(shape, dtype=bool), unit=2.0, snr_radius=5)
    np.testing.assert_allclose(c["signal"], [spot[aperture].sum()], rtol=1e-6)
    np.testing.assert_allclose(c["noise2"], [2.0 * spot[aperture].sum()], rtol=1e-6)
    # a bad pixel in the aperture counts for nothing
    good = np.ones(shape, dtype=bool)
    good[24, 24] = False
    c = measure_components(mask & good, img, good=good, unit=2.0, snr_radius=5)
    aperture = ndimage.binary_dilation(mask & good, np.ones((3, 3), dtype=bool)) & good
    assert len(c["signal"]) == 1 and aperture.sum() < 25
    np.testing.assert_allclose(c["signal"], [spot[aperture].sum()], rtol=1e-6)
    # pure Gaussian noise, no unit: the SNR of a fixed 3x3 component is in noise sigmas, one sigma low (the
    # brightest of 8 line backgrounds is subtracted), and never near a peak's
    rng = np.random.default_rng(1)
    box = np.zeros(shape, dtype=bool)
    box[23:26, 23:26] = True
    snr = []
    for _ in range(300):
        c = measure_components(box, rng.normal(10.0, 3.0, shape), snr_radius=5)
        snr.append(c["signal"][0] / np.sqrt(c["noise2"][0]))
    assert -1.5 < np.mean(snr) < -0.6 and 0.7 < np.std(snr) < 1.2 and max(snr) < 3.0


def test_window_medians_of_many_windows_at_once_equal_numpy_per_window():
    """local_signal's background level and noise of every component at once: windows of many sizes (gathered in
    padded groups), with pixels excluded, equal np.median / MAD window by window."""
    from vitkit.apps.peaks.peakfind import _window_median_mad

    rng = np.random.default_rng(4)
    img = rng.normal(3.0, 2.0, (50, 70))
    use = rng.random(img.shape) > 0.3
    y0, x0 = rng.integers(0, 40, 60), rng.integers(0, 60, 60)
    y1, x1 = np.minimum(y0 + rng.integers(1, 30, 60), 50), np.minimum(x0 + rng.integers(1, 30, 60), 70)
    y1[0], x1[0], use[y0[0]:y1[0], x0[0]:x1[0]] = y0[0] + 2, x0[0] + 2, False  # a window with no usable pixel
    level, sigma, count = _window_median_mad(img, use, y0, y1, x0, x1)
    for i in range(60):
        v = img[y0[i]:y1[i], x0[i]:x1[i]][use[y0[i]:y1[i], x0[i]:x1[i]]]
        assert count[i] == v.size
        if v.size:
            assert level[i] == np.median(v) and sigma[i] == 1.4826 * np.median(np.abs(v - np.median(v)))
    assert count[0] == 0 and level[0] == 0.0


def test_local_signal_falls_back_to_the_panel_background_and_handles_the_border():
    from vitkit.apps.peaks.peakfind import measure_components

    rng = np.random.default_rng(5)
    # a component whose whole window (radius 1) lies within 2 px of it: no local background, the panel's serves
    img = rng.normal(10.0, 1.0, (12, 12))
    mask = np.zeros(img.shape, dtype=bool)
    mask[3:9, 3:9] = True
    img[mask] += 20.0
    c = measure_components(mask, img, snr_radius=1)
    frame = ~ndimage.binary_dilation(mask, np.ones((5, 5), dtype=bool))  # the pixels 3 px clear of it
    level = np.median(img[frame])
    sigma = 1.4826 * np.median(np.abs(img[frame] - level))
    np.testing.assert_allclose(c["signal"], [img[2:10, 2:10].sum() - 64 * level], rtol=1e-12)
    np.testing.assert_allclose(c["noise2"], [64 * sigma ** 2], rtol=1e-12)
    # a spot in the corner: window and aperture clipped to the panel; the window's 9 pixels 3 px clear of it
    img = rng.normal(10.0, 1.0, (12, 12))
    mask = np.zeros(img.shape, dtype=bool)
    mask[0:2, 0:2] = True
    img[0:2, 0:2] += 50.0
    c = measure_components(mask, img, snr_radius=3)
    ring = np.zeros((5, 5), dtype=bool)
    ring[4, :] = ring[:, 4] = True
    assert c["npix"][0] == 4 and ring.sum() == 9
    assert c["signal"][0] <= img[0:3, 0:3].sum() - 9 * np.median(img[0:5, 0:5][ring]) + 1e-9


def test_event_peaks_keep_faint_one_pixel_cores_by_snr_and_drop_noise():
    from vitkit.apps.peaks.finder import event_peaks

    rng = np.random.default_rng(2)
    shape = (1, 64, 64)
    img = rng.poisson(2.0, shape).astype(np.float64)
    img[0] += _spot(shape[1:], 20.0, 20.0, 120.0, 0.6)  # faint: the model's core may be one pixel
    mask = np.zeros(shape, dtype=bool)
    mask[0, 20, 20] = True  # the faint spot's one-pixel core
    mask[0, 45, 45] = True  # a one-pixel "core" on plain background
    mask[0, 30, 40:42] = True  # and a second spot of two components closer than merge_radius...
    mask[0, 30, 43] = True
    img[0] += _spot(shape[1:], 30.0, 41.5, 300.0, 0.8)
    t = event_peaks(None, img, mask, min_snr=None, merge_radius=3.0)
    assert len(t) == 3 and np.all(np.isfinite(t["snr"]))
    t = event_peaks(None, img, mask, min_snr=6.0, merge_radius=3.0)
    assert sorted(zip(np.rint(t["ss"]), np.rint(t["fs"]))) == [(20, 20), (30, 41)]
    assert np.all(t["snr"] >= 6.0)
    # merged components: their signals and variances add
    from vitkit.apps.peaks.finder import merge_close
    from vitkit.apps.peaks.peakfind import measure_components

    parts = measure_components(mask[0], img[0], snr_radius=5)
    pair = np.flatnonzero(parts["y"] == 30)
    assert len(pair) == 2
    merged = merge_close(parts, 3.0)
    j = int(np.flatnonzero(np.rint(merged["y"]) == 30)[0])
    np.testing.assert_allclose([merged["signal"][j], merged["noise2"][j]],
                               [parts["signal"][pair].sum(), parts["noise2"][pair].sum()])


def test_line_level_rejects_a_fluctuation_on_a_streak_but_keeps_spots_on_and_off_it():
    from vitkit.apps.peaks.peakfind import measure_components

    shape = (64, 96)
    rng = np.random.default_rng(3)
    yy = np.arange(shape[0])[:, None]
    streak = 8.0 * np.exp(-0.5 * ((yy - 32.0) / 1.0) ** 2) * np.ones(shape)  # a jet streak along fs
    img = rng.normal(0.0, 1.0, shape) + streak
    img += _spot(shape, 15.0, 20.0, 120.0, 0.7)  # a spot off the streak
    img += _spot(shape, 32.0, 70.0, 120.0, 0.7)  # a spot on it
    mask = np.zeros(shape, dtype=bool)
    mask[31:34, 40:43] = True  # a piece of the streak itself
    mask[14:17, 19:22] = True
    mask[31:34, 69:72] = True
    c = measure_components(mask, img, snr_radius=5)
    snr = c["signal"] / np.sqrt(c["noise2"])
    spot_off, piece, spot_on = np.argsort(c["x"])  # by fs: 20, 41, 70
    piece_above_median = img[30:35, 39:44].sum() - 25 * np.median(img[20:44, 30:54])
    assert piece_above_median / np.sqrt(25) > 10  # against the median around it, the streak looks like a peak...
    assert snr[piece] < 2  # ...but not against the line it lies on
    assert snr[spot_off] > 10 and snr[spot_on] > 10  # and a spot on the streak keeps its own signal
    np.testing.assert_allclose(c["signal"][[spot_off, spot_on]], 120.0, rtol=0.25)
