"""Synthetic diffraction frames: determinism, the half-maximum label rule, truth vs. recovered peaks, gaps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitkit.apps.peaks import (
    SynthConfig,
    SyntheticPeakDataset,
    collate_peaks,
    find_peaks,
    make_frame,
    make_panel_stack,
    match_peaks,
)
from vitkit.apps.peaks.synthetic import _gap_lines
from vitkit.errors import ConfigError

HALF_MAX_AREA = math.pi * 2 * math.log(2)  # x sigma^2


def test_same_seed_same_frame_and_different_seed_differs():
    a = make_frame(np.random.default_rng(7))
    b = make_frame(np.random.default_rng(7))
    c = make_frame(np.random.default_rng(8))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert a[0].dtype == np.float32 and a[1].dtype == np.uint8 and a[2].dtype == np.float32
    assert a[0].shape == a[1].shape == (256, 256) and a[2].shape[1] == 3


def test_dataset_is_a_function_of_seed_and_index_only():
    cfg = SynthConfig(shape=(64, 96), n_peaks=(3, 6))
    ds = SyntheticPeakDataset(8, cfg, seed=3)
    forward = [ds[i] for i in range(8)]
    backward = [SyntheticPeakDataset(8, cfg, seed=3)[i] for i in reversed(range(8))][::-1]
    for f, b in zip(forward, backward):
        for k in ("image", "label", "peaks"):
            assert torch.equal(f[k], b[k])
    assert not torch.equal(forward[0]["image"], forward[1]["image"])  # different index -> different frame
    assert not torch.equal(forward[0]["image"], SyntheticPeakDataset(8, cfg, seed=4)[0]["image"])
    assert torch.equal(ds[-1]["image"], forward[7]["image"])
    item = forward[0]
    assert item["image"].shape == (1, 64, 96) and item["image"].dtype == torch.float32
    assert item["label"].shape == (64, 96) and item["label"].dtype == torch.int64
    assert item["peaks"].ndim == 2 and item["peaks"].shape[1] == 3
    batch = collate_peaks(forward[:3])
    assert batch["image"].shape == (3, 1, 64, 96) and batch["label"].shape == (3, 64, 96)
    assert len(batch["peaks"]) == 3
    with pytest.raises(IndexError):
        ds[8]
    # two workers (each generating its own share of the indices) see exactly the same frames
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_peaks)
    for k, b in enumerate(loader):
        for j in range(2):
            assert torch.equal(b["image"][j], forward[2 * k + j]["image"])
            assert torch.equal(b["peaks"][j], forward[2 * k + j]["peaks"])


@pytest.mark.parametrize("pv_fraction", [0.0, 1.0])
def test_label_is_half_maximum_of_isolated_peak(pv_fraction):
    sigma = 3.0
    cfg = SynthConfig.noiseless(shape=(64, 64), n_peaks=(1, 1), sigma=(sigma, sigma),
                                pseudo_voigt_fraction=pv_fraction, eta=(0.5, 0.5))
    areas = []
    for seed in range(12):  # different sub-pixel centres
        img, lab, peaks = make_frame(seed, cfg)
        assert len(peaks) == 1
        # the label is exactly the set of pixels at >= half of the (sampled) maximum of the profile
        np.testing.assert_array_equal(lab.astype(bool), img >= 0.5 * img.max())
        areas.append(int(lab.sum()))
        # the noise-free frame sums to the integrated intensity
        assert img.sum(dtype=np.float64) == pytest.approx(peaks[0, 2], rel=1e-5)
    # pi * 2 ln 2 * sigma^2 = 39.2 px for sigma = 3 (same for pseudo-Voigt: both parts share the FWHM)
    assert np.mean(areas) == pytest.approx(HALF_MAX_AREA * sigma ** 2, rel=0.06)
    assert min(areas) >= 33 and max(areas) <= 46


def test_find_peaks_recovers_the_true_peaks_on_a_noiseless_frame():
    cfg = SynthConfig.noiseless(shape=(192, 256), n_peaks=(30, 30))
    img, lab, true = make_frame(11, cfg)
    assert len(true) == 30
    # full support of every peak: centroids and integrated intensities
    found = find_peaks(img > 0, img)
    assert len(found) == len(true)
    tp, fp, fn, _ = match_peaks(found, true, radius=0.5)
    assert (tp, fp, fn) == (30, 0, 0)
    order = np.argsort(true[:, 0] * 10_000 + true[:, 1])
    f_order = np.argsort(found[:, 0] * 10_000 + found[:, 1])
    err = np.linalg.norm(found[f_order, :2] - true[order, :2], axis=1)
    assert err.max() < 0.1
    rel = np.abs(found[f_order, 2] - true[order, 2]) / true[order, 2]
    assert rel.max() < 0.02
    # half-maximum label (what PeakNet predicts): same peaks, but the few-pixel masks are not symmetric about
    # the sub-pixel centre, so the weighted centroid is biased by up to ~1/4 px for the narrowest peaks
    found_half = find_peaks(lab, img)
    tp, fp, fn, d = match_peaks(found_half, true, radius=0.5)
    assert (tp, fp, fn) == (30, 0, 0)
    assert d.max() < 0.3 and np.sqrt(np.mean(d ** 2)) < 0.15


def test_gaps_beamstop_and_defects():
    cfg = SynthConfig(shape=(256, 320), n_peaks=(40, 40), dead_fraction=1e-3, hot_fraction=1e-3)
    img, lab, peaks = make_frame(5, cfg)
    gy, gx = _gap_lines(256, 2, 4), _gap_lines(320, 2, 4)
    np.testing.assert_array_equal(gy, [126, 127, 128, 129])
    np.testing.assert_array_equal(gx, [158, 159, 160, 161])
    assert (img[gy] == 0).all() and (img[:, gx] == 0).all()
    assert lab[gy].sum() == 0 and lab[:, gx].sum() == 0
    # no peak centre within its support radius (>= 2 px) of a gap
    dy = np.abs(peaks[:, :1] - gy[None]).min(axis=1)
    dx = np.abs(peaks[:, 1:2] - gx[None]).min(axis=1)
    assert min(dy.min(), dx.min()) >= 2.0
    # every labelled component is one true peak (no peak split by a gap, none merged)
    assert len(find_peaks(lab, img)) == len(peaks)
    # hot pixels sit at saturation, dead pixels at 0 (outside the gaps)
    assert (img == 65535.0).sum() == pytest.approx(1e-3 * img.size, rel=0.35)
    inner = np.delete(np.delete(img, gy, axis=0), gx, axis=1)
    assert (inner == 0).sum() == pytest.approx(1e-3 * inner.size, rel=0.35)
    assert img.max() <= 65535.0
    # intensities lie in the configured log-uniform range
    assert peaks[:, 2].min() >= 100 and peaks[:, 2].max() <= 1e5


def test_noise_model():
    flat = SynthConfig.noiseless(shape=(128, 128), n_peaks=(0, 0), background=(20.0, 20.0), photon_scale=4.0)
    img, lab, peaks = make_frame(0, flat)
    assert len(peaks) == 0 and lab.sum() == 0
    assert np.all(img % 4 == 0)  # Poisson counts times 4 units per photon
    # a constant expected value (no modulation) far from the beam: variance = scale * mean
    cfg = flat.replace(photon_scale=1.0)
    img, _, _ = make_frame(1, cfg)
    corner = img[:24, :24]
    expected = 20.0 * (1 + np.exp(-np.hypot(*np.meshgrid(np.arange(24) - 63.5, np.arange(24) - 63.5)) / 16.0))
    assert np.mean(corner - expected) == pytest.approx(0.0, abs=0.5)
    assert np.var(corner - expected) == pytest.approx(expected.mean(), rel=0.15)
    g = make_frame(1, cfg.replace(shot_noise="gaussian"))[0]
    assert not np.all(g == np.round(g))


def test_panel_stack():
    cfg = SynthConfig(n_peaks=(5, 10))
    imgs, labs, peaks = make_panel_stack(np.random.default_rng(2), cfg, panels=16, panel_shape=(352, 384))
    assert imgs.shape == labs.shape == (16, 352, 384) and imgs.dtype == np.float32 and labs.dtype == np.uint8
    assert len(peaks) == 16 and all(5 <= len(p) <= 10 for p in peaks)
    imgs2, _, peaks2 = make_panel_stack(2, cfg, panels=16)
    np.testing.assert_array_equal(imgs, imgs2)
    for p, q in zip(peaks, peaks2):
        np.testing.assert_array_equal(p, q)
    for p, lab, img in zip(peaks, labs, imgs):
        assert len(find_peaks(lab, img)) == len(p)
    # the beam stop of the assembled 4 x 4 detector shadows the corners of the four central panels only
    centre = [5, 6, 9, 10]
    others = [i for i in range(16) if i not in centre]
    assert np.median(imgs[others].mean(axis=(1, 2))) > 1.0


def test_bad_config():
    with pytest.raises(ConfigError, match="n_peaks"):
        SynthConfig(n_peaks=(5, 2))
    with pytest.raises(ConfigError, match="sigma"):
        SynthConfig(sigma=(0.0, 1.0))
    with pytest.raises(ConfigError, match="shape"):
        SynthConfig(shape=(8, 300))
