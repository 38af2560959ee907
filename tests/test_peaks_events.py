"""Multi-panel events end to end through PeakFinder: layouts (psana stacks, CrystFEL slabs), bad-pixel masks,
coordinates (panel, slab, lab), CXI/CSV output, and bad input.

A stand-in segmenter whose peak score is the normalised pixel value itself makes the pipeline's plumbing
exact: every bright blob is "predicted", so what comes out is decided by the masks, the panel bookkeeping and
the coordinate maps alone. The learned model is exercised by test_peaks_job.py.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from vitkit.apps.peaks.detector import DetectorShapeError, builtin_detector
from vitkit.apps.peaks.finder import EventSource, PeakFinder, read_mask
from vitkit.apps.peaks.io import FramesNotFoundError, NaNFrameError, open_frames, read_csv_peaks
from vitkit.apps.peaks.job import predict


class Threshold(nn.Module):
    """Peak where the normalised input exceeds 3 (asinh units: ~10 noise sigmas)."""

    img_size = (64, 64)

    def forward(self, x):
        classes = torch.tensor([[[10.0, -10.0, -10.0], [-10.0, 10.0, -10.0]]]).expand(x.shape[0], 2, 3)
        score = (x[:, :1] - 3.0) * 20.0
        return [torch.cat([-score, score], 1)], [classes]  # query 0: background, query 1: peak


# (panel, ss, fs) of 3x3 spots; the last one sits on a bad pixel
SPOTS = [(0, 20.0, 30.0), (5, 100.0, 200.0), (15, 340.0, 10.0), (9, 176.0, 192.0), (3, 50.0, 50.0)]
BAD = (3, 50, 50)


@pytest.fixture(scope="module")
def det():
    return builtin_detector("epix10k2m")


@pytest.fixture(scope="module")
def events(det):
    rng = np.random.default_rng(0)
    ev = rng.normal(10.0, 1.0, size=(4, *det.stack_shape)).astype(np.float32)
    for e in range(4):
        for p, ss, fs in SPOTS[: 2 + e]:  # event e carries the first 2 + e spots
            ev[e, p, int(ss) - 1:int(ss) + 2, int(fs) - 1:int(fs) + 2] += 500.0
    good = np.ones(det.stack_shape, dtype=bool)
    good[BAD] = False
    good[7, :, :3] = False  # a masked column block
    return ev, good


def test_stack_and_slab_give_the_same_peaks_in_field_coordinates(det, events, tmp_path):
    ev, good = events
    finder = PeakFinder(Threshold(), det, good=good)
    tables = finder(ev)
    assert len(tables) == 4
    for e, t in enumerate(tables):
        want = {(p, ss, fs) for p, ss, fs in SPOTS[: 2 + e] if (p, int(ss), int(fs)) != BAD}
        got = {(int(r["panel"]), round(float(r["ss"]), 1), round(float(r["fs"]), 1)) for r in t}  # noise: < 0.05 px
        assert got == want
        for r in t:
            p = det.panels[r["panel"]]
            assert r["slab_ss"] == r["ss"] + p.min_ss and r["slab_fs"] == r["fs"] + p.min_fs
            assert r["slab_ss"] == r["ss"] + 352 * r["panel"]  # psana order stacked along slow scan
            xyz = det.lab_xyz(int(r["panel"]), r["fs"], r["ss"])
            assert (r["x_lab"], r["y_lab"]) == (xyz[0], xyz[1])
            assert r["npix"] == 9
    slabs = det.to_slab(ev)
    assert slabs.shape == (4, 16 * 352, 384)
    for a, b in zip(tables, PeakFinder(Threshold(), det, good=det.to_slab(good))(slabs)):
        np.testing.assert_array_equal(a, b)


def test_masked_pixels_never_carry_or_feed_a_peak(det, events):
    ev, good = events
    e = ev[3].copy()
    e[3, 49:52, 49:52] += 1e4  # the blob around the bad pixel is bright; the bad pixel itself even more
    e[BAD] = 1e7
    e[7, 100:103, 0:3] += 800  # entirely inside the masked block
    t = PeakFinder(Threshold(), det, good=good)(e)[0]
    on_bad = t[(t["panel"] == 3)]
    assert len(on_bad) == 0  # its centroid would be the bad pixel: not reported
    e[3, 49:52, 52] += 2e4  # a column beside it: the centroid moves off the bad pixel, the peak is reported
    t = PeakFinder(Threshold(), det, good=good)(e)[0]
    on_bad = t[(t["panel"] == 3)]
    assert len(on_bad) == 1 and on_bad["npix"][0] == 11
    # the bad pixel's 1e7 is in neither the intensity nor the centroid
    assert on_bad["intensity"][0] < 11 * 3e4 and 50.5 < on_bad["fs"][0] < 52
    assert not (t["panel"] == 7).any()


def test_predict_writes_cxi_in_slab_coordinates_csv_and_geometry(det, events, tmp_path):
    from vitkit.apps.peaks.geom import read_geom

    ev, good = events
    with h5py.File(tmp_path / "run.h5", "w") as f:
        f.create_dataset("/entry_1/data_1/data", data=ev)  # [4, 16, 352, 384]
    np.save(tmp_path / "mask.npy", det.to_slab(good).astype(np.uint8))  # a slab mask, 1 = good
    frames = open_frames(tmp_path / "run.h5")
    mask = read_mask(tmp_path / "mask.npy", det)
    np.testing.assert_array_equal(mask, good)
    finder = PeakFinder(Threshold(), det, good=mask)
    res = predict(finder, EventSource(frames, det, finder.good), tmp_path / "out", overlays=1, progress=False)
    with h5py.File(tmp_path / "out" / "peaks.cxi", "r") as f:
        r = f["/entry_1/result_1"]
        n = r["nPeaks"][()]
        assert list(n) == [2, 3, 4, 4]  # event e has 2 + e spots; the fifth sits on a bad pixel
        for e, t in enumerate(res["peaks"]):
            np.testing.assert_allclose(r["peakXPosRaw"][e, :n[e]], t["slab_fs"], rtol=1e-6)
            np.testing.assert_allclose(r["peakYPosRaw"][e, :n[e]], t["slab_ss"], rtol=1e-6)
            assert not r["peakXPosRaw"][e, n[e]:].any()
    back = read_csv_peaks(tmp_path / "out" / "peaks.csv", n_frames=4)
    for a, b in zip(back, res["peaks"]):
        np.testing.assert_array_equal(a["panel"], b["panel"])
        np.testing.assert_allclose(a["x_lab"], b["x_lab"], rtol=1e-8)
    geom = read_geom(tmp_path / "out" / "detector.geom")
    assert [p.name for p in geom.panels] == [p.name for p in det.panels]
    assert (tmp_path / "out" / "overlay_0000.png").stat().st_size > 10_000


def test_mask_conventions(det, tmp_path):
    good = np.ones(det.stack_shape, dtype=bool)
    good[2, 10, 11] = False
    bits = np.where(good, 0, 0x4).astype(np.uint16)  # CrystFEL style: a bad bit set
    bits[4, 0, 0] = 0x1  # an unrelated bit on a good pixel
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f.create_dataset("/data/data", data=bits)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.h5", det, bad_bits=0x4), good)
    with pytest.raises(DetectorShapeError, match=r"mask .*m2\.npy.*\(8, 352, 384\)"):
        np.save(tmp_path / "m2.npy", np.ones((8, 352, 384), np.uint8))
        read_mask(tmp_path / "m2.npy", det)


def test_bad_input_is_named(det, events, tmp_path):
    ev, good = events
    np.save(tmp_path / "eight.npy", ev[:, :8])
    with pytest.raises(DetectorShapeError, match=r"eight\.npy.*\(8, 352, 384\).*16, 352, 384"):
        EventSource(open_frames(tmp_path / "eight.npy"), det)
    nan = ev[:2].copy()
    nan[1, 4, 7, 7] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    src = EventSource(open_frames(tmp_path / "nan.npy"), det, good)
    src[0]
    with pytest.raises(NaNFrameError, match=r"frame 1 of .*nan\.npy has 1 NaN/inf pixel"):
        src[1]
    nan[1, 4, 7, 7] = 0
    nan[1, BAD[0], BAD[1], BAD[2]] = np.nan  # on a bad pixel: allowed (psana writes NaN there)
    np.save(tmp_path / "nan_masked.npy", nan)
    assert np.isfinite(EventSource(open_frames(tmp_path / "nan_masked.npy"), det, good)[1]).all()
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_dataset("/entry_1/data_1/data", shape=(0, 16, 352, 384), dtype=np.float32)
    with pytest.raises(FramesNotFoundError, match=r"empty\.h5: the file holds no frames"):
        EventSource(open_frames(tmp_path / "empty.h5"), det)
    finder = PeakFinder(Threshold(), det)
    with pytest.raises(DetectorShapeError, match=r"\(8, 352, 384\)"):
        finder(ev[0, :8])
    out = tmp_path / "never"
    with pytest.raises(NaNFrameError):
        predict(finder, EventSource(open_frames(tmp_path / "nan.npy"), det), out, progress=False)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
