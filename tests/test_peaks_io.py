"""Frame readers and peak writers: round trips, specific errors for bad inputs, atomic writes."""

from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from vitkit.apps.peaks import (
    ConcatSource,
    CorruptFileError,
    DatasetKeyError,
    FramesNotFoundError,
    LabelShapeError,
    NaNFrameError,
    UnsupportedFormatError,
    open_frames,
    read_csv_peaks,
    read_cxi_peaks,
    read_frames,
    save_overlay_png,
    write_csv,
    write_cxi,
    write_zarr,
)
from vitkit.apps.peaks import io as pio


@pytest.fixture
def frames():
    rng = np.random.default_rng(0)
    images = rng.gamma(2.0, 3.0, size=(4, 24, 32)).astype(np.float32)
    labels = (rng.random((4, 24, 32)) < 0.05).astype(np.uint8)
    return images, labels


def _entries(d):
    return sorted(os.listdir(d))


# -------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_round_trip(tmp_path, frames, zarr_format):
    images, labels = frames
    meta = [{"identifier": f"mfx_r0001_{i}", "photon_energy_eV": np.float32(9500.0)} for i in range(4)]
    path = write_zarr(tmp_path / "a.0000.zarr", images, labels, metadata=meta, zarr_format=zarr_format)
    g = zarr.open_group(str(path), mode="r")
    assert g["images"].chunks == (1, 24, 32) and g["images"].dtype == np.float32
    assert g["labels"].dtype == np.uint8 and g.metadata.zarr_format == zarr_format
    src = open_frames(path)
    assert len(src) == 4 and src.has_labels and src.frame_shape == (24, 32)
    np.testing.assert_array_equal(src[2], images[2])
    np.testing.assert_array_equal(src.label(-1), labels[3])
    np.testing.assert_array_equal(src[1:3], images[1:3])
    assert src.metadata[1] == {"identifier": "mfx_r0001_1", "photon_energy_eV": 9500.0}
    imgs, labs = read_frames(path)
    np.testing.assert_array_equal(imgs, images)
    np.testing.assert_array_equal(labs, labels)
    # a source survives pickling (DataLoader workers) and re-opens its store
    src2 = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(src2[0], images[0])
    assert _entries(tmp_path) == ["a.0000.zarr"]  # no temporary left behind
    # an all-zero frame is still stored (no false "truncated" alarm)
    z = images.copy()
    z[1] = 0
    np.testing.assert_array_equal(open_frames(write_zarr(tmp_path / "z.zarr", z))[1], z[1])


def test_many_stores_by_glob_and_csv(tmp_path, frames):
    images, labels = frames
    (tmp_path / "data").mkdir()
    for k in range(3):
        write_zarr(tmp_path / "data" / f"run.{k:04d}.zarr", images[k:k + 2], labels[k:k + 2])
    src = open_frames(str(tmp_path / "data" / "*.zarr"))
    assert isinstance(src, ConcatSource) and len(src) == 6 and src.has_labels
    np.testing.assert_array_equal(src[3], images[2])  # store 1, frame 1
    np.testing.assert_array_equal(src.label(4), labels[2])  # store 2, frame 0
    part, j = src.locate(5)
    assert part.path.endswith("run.0002.zarr") and j == 1
    # CSV with a header and relative paths (relative to the CSV's folder)
    (tmp_path / "train.csv").write_text("path\ndata/run.0002.zarr\ndata/run.0000.zarr\n")
    src = open_frames(tmp_path / "train.csv")
    assert len(src) == 4
    np.testing.assert_array_equal(src[0], images[2])
    np.testing.assert_array_equal(src[2], images[0])
    # a header-less CSV, and a list mixing a glob and a path
    (tmp_path / "plain.csv").write_text(f"{tmp_path / 'data' / 'run.0001.zarr'}\n")
    assert len(open_frames(tmp_path / "plain.csv")) == 2
    assert len(open_frames([str(tmp_path / "data" / "run.000[01].zarr"), tmp_path / "plain.csv"])) == 6


def test_hdf5_and_cxi_round_trip(tmp_path, frames):
    images, labels = frames
    peaks = [np.array([[1.5, 2.25, 100.0], [3.0, 4.0, 50.5]]), np.zeros((0, 3)), np.array([[7.0, 8.0, 1.0]]),
             np.array([[9.5, 10.5, 2.0]])]
    path = write_cxi(tmp_path / "r0001.cxi", peaks, frames=images, max_peaks=16)
    with h5py.File(path, "r") as f:
        r = f["entry_1/result_1"]
        assert r["nPeaks"].dtype == np.int32 and list(r["nPeaks"][()]) == [2, 0, 1, 1]
        for k in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity"):
            assert r[k].dtype == np.float32 and r[k].shape == (4, 16)
        np.testing.assert_array_equal(r["peakXPosRaw"][0, :3], [2.25, 4.0, 0.0])  # x = fast scan, zero padded
        np.testing.assert_array_equal(r["peakYPosRaw"][0, :2], [1.5, 3.0])
        np.testing.assert_array_equal(r["peakTotalIntensity"][0, :2], [100.0, 50.5])
        assert f["entry_1/data_1/data"].chunks == (1, 24, 32)
        assert int(f["cxi_version"][()]) == 150
    back = read_cxi_peaks(path)
    for a, b in zip(back, peaks):
        np.testing.assert_allclose(a, b)
    src = open_frames(path)  # default key /entry_1/data_1/data
    assert len(src) == 4 and not src.has_labels
    np.testing.assert_array_equal(src[3], images[3])
    # plain HDF5 with custom keys and sibling labels
    h5 = tmp_path / "x.h5"
    with h5py.File(h5, "w") as f:
        f["/detector/frames"] = images
        f["/detector/labels"] = labels
        f["/single"] = images[0]
    src = open_frames(h5, key="/detector/frames")
    assert src.has_labels
    np.testing.assert_array_equal(src.label(2), labels[2])
    src2 = pickle.loads(pickle.dumps(src))  # handed to a DataLoader worker: re-opens the file
    np.testing.assert_array_equal(src2[1], images[1])
    src.close()
    src2.close()
    assert not open_frames(h5, key="detector/frames", label_key=False).has_labels
    one = open_frames(h5, key="single")
    assert len(one) == 1
    np.testing.assert_array_equal(one[0], images[0])


def test_cxi_keeps_the_brightest_when_over_max_peaks(tmp_path):
    p = np.array([[0, 0, 5.0], [1, 1, 1.0], [2, 2, 9.0], [3, 3, 2.0]])
    back = read_cxi_peaks(write_cxi(tmp_path / "m.cxi", [p, p[:1, :2]], max_peaks=2))
    np.testing.assert_allclose(back[0], [[0, 0, 5.0], [2, 2, 9.0]])
    np.testing.assert_allclose(back[1], [[0, 0, 0.0]])  # [n, 2] input: intensity 0


def test_npy_png_tiff(tmp_path, frames):
    images, labels = frames
    np.save(tmp_path / "stack.npy", images)
    np.save(tmp_path / "one.npy", images[0])
    np.testing.assert_array_equal(open_frames(tmp_path / "stack.npy")[-1], images[-1])
    src = open_frames(tmp_path / "one.npy")
    assert len(src) == 1 and src[0].dtype == np.float32
    np.testing.assert_array_equal(src[0], images[0])
    np.save(tmp_path / "lab.npy", labels)
    src = pio.NpySource(tmp_path / "stack.npy", labels=tmp_path / "lab.npy")
    np.testing.assert_array_equal(src.label(1), labels[1])
    # PNG: 16-bit and 8-bit mono
    u16 = (images[0] * 100).astype(np.uint16)
    Image.fromarray(u16).save(tmp_path / "f16.png")
    Image.fromarray(labels[0] * 255).save(tmp_path / "f8.png")
    np.testing.assert_array_equal(open_frames(tmp_path / "f16.png")[0], u16.astype(np.float32))
    np.testing.assert_array_equal(open_frames(tmp_path / "f8.png")[0], labels[0] * 255.0)
    # TIFF: float32 single frame and a multi-page stack
    tifffile.imwrite(tmp_path / "f.tif", images[1])
    tifffile.imwrite(tmp_path / "s.tiff", images, photometric="minisblack")
    np.testing.assert_array_equal(open_frames(tmp_path / "f.tif")[0], images[1])
    s = open_frames(tmp_path / "s.tiff")
    assert len(s) == 4
    np.testing.assert_array_equal(s[2], images[2])
    # mixing formats of one shape
    imgs, labs = read_frames([tmp_path / "one.npy", tmp_path / "f.tif"])
    np.testing.assert_array_equal(imgs, images[:2])
    assert labs is None


def test_csv_round_trip(tmp_path):
    peaks = [np.array([[1.25, 2.5, 1e5 / 3]], dtype=np.float32), np.zeros((0, 3)), np.array([[3.0, 4.0, 5.0]])]
    path = write_csv(tmp_path / "peaks.csv", (p for p in peaks))  # any iterable
    lines = path.read_text().splitlines()
    assert lines[0] == "frame,panel,fs,ss,slab_fs,slab_ss,x_lab,y_lab,intensity,npix,max_value,snr"
    assert lines[2] == "2,0,4,3,4,3,,,5,0,,"  # plain (y, x, I) rows: panel 0, no geometry -> empty lab columns
    back = read_csv_peaks(path, n_frames=4)
    assert len(back) == 4 and len(back[1]) == 0 and len(back[3]) == 0
    got = back[0][["ss", "fs", "intensity"]][0]
    assert tuple(np.float32(v) for v in got.tolist()) == tuple(peaks[0][0])  # 9 digits: float32 exact
    assert np.isnan(back[0]["x_lab"][0]) and np.isnan(back[0]["snr"][0])
    # a file of an earlier version (no snr column) still reads, snr NaN
    old = tmp_path / "old.csv"
    old.write_text("frame,panel,fs,ss,slab_fs,slab_ss,x_lab,y_lab,intensity,npix,max_value\n0,3,4,5,4,5,,,7,2,6\n")
    (t,) = read_csv_peaks(old)
    assert (t["panel"][0], t["fs"][0], t["intensity"][0], t["npix"][0]) == (3, 4.0, 7.0, 2) and np.isnan(t["snr"][0])


def test_overlay_png(tmp_path, frames):
    images, _ = frames
    path = save_overlay_png(tmp_path / "o.png", images[0], [[3, 4, 1.0]], true_peaks=[[3.2, 4.1, 1.0]], title="t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert _entries(tmp_path) == ["o.png"]


# ------------------------------------------------------------------------------------------------- errors
def test_missing_keys_list_what_exists(tmp_path, frames):
    images, labels = frames
    write_zarr(tmp_path / "a.zarr", images, labels)
    with pytest.raises(DatasetKeyError, match=r"no array 'frames'.*\['images', 'labels'\]") as e:
        open_frames(tmp_path / "a.zarr", key="frames")
    assert e.value.available == ["images", "labels"]
    with pytest.raises(DatasetKeyError, match="no label array 'masks'"):
        open_frames(tmp_path / "a.zarr", label_key="masks")
    with h5py.File(tmp_path / "b.h5", "w") as f:
        f["/entry/raw"] = images
    with pytest.raises(DatasetKeyError, match=r"none of the default image datasets.*/entry/raw \(4, 24, 32\)"):
        open_frames(tmp_path / "b.h5")
    with pytest.raises(DatasetKeyError, match=r"no dataset '/nope'.*/entry/raw"):
        open_frames(tmp_path / "b.h5", key="/nope")
    with h5py.File(tmp_path / "c.cxi", "w") as f:
        f["/x"] = np.zeros(3)
    with pytest.raises(DatasetKeyError, match="no CXI peak list"):
        read_cxi_peaks(tmp_path / "c.cxi")


def test_truncated_or_corrupt_files(tmp_path, frames):
    images, labels = frames
    # HDF5 cut in half
    write_cxi(tmp_path / "t.cxi", [np.zeros((0, 3))] * 4, frames=images)
    data = (tmp_path / "t.cxi").read_bytes()
    (tmp_path / "t.cxi").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        open_frames(tmp_path / "t.cxi")
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(CorruptFileError):
        open_frames(tmp_path / "junk.h5")
    # zarr: a garbled chunk fails on read, naming the frame
    write_zarr(tmp_path / "g.zarr", images, labels)
    (tmp_path / "g.zarr" / "images" / "2.0.0").write_bytes(b"garbage")
    src = open_frames(tmp_path / "g.zarr")
    np.testing.assert_array_equal(src[1], images[1])
    with pytest.raises(CorruptFileError, match="frame 2 of .*g.zarr"):
        src[2]
    # zarr: a missing image chunk (interrupted copy) is caught at open instead of reading zeros
    write_zarr(tmp_path / "m.zarr", images, labels)
    os.remove(tmp_path / "m.zarr" / "images" / "3.0.0")
    with pytest.raises(CorruptFileError, match="only 3 of 4 chunks"):
        open_frames(tmp_path / "m.zarr")
    # zarr: no group metadata / unreadable array metadata
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(CorruptFileError, match="expected a zarr group"):
        open_frames(tmp_path / "empty.zarr")
    write_zarr(tmp_path / "j.zarr", images)
    (tmp_path / "j.zarr" / "images" / ".zarray").write_text("{")
    with pytest.raises(CorruptFileError):
        open_frames(tmp_path / "j.zarr")
    # npy cut short
    np.save(tmp_path / "c.npy", images)
    raw = (tmp_path / "c.npy").read_bytes()
    (tmp_path / "c.npy").write_bytes(raw[:200])
    with pytest.raises(CorruptFileError):
        open_frames(tmp_path / "c.npy")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(CorruptFileError):
        open_frames(tmp_path / "bad.png")


def test_nan_frames_are_named(tmp_path, frames):
    images, labels = frames
    bad = images.copy()
    bad[2, 5, 5] = np.nan
    write_zarr(tmp_path / "a.zarr", images[:2], labels[:2])
    write_zarr(tmp_path / "b.zarr", bad, labels)
    src = open_frames(tmp_path / "b.zarr")
    src[1]
    with pytest.raises(NaNFrameError, match=r"frame 2 of .*b.zarr contains 1 NaN/inf") as e:
        src[2]
    assert e.value.frame == 2
    both = open_frames(str(tmp_path / "*.zarr"))
    with pytest.raises(NaNFrameError, match=r"global frame 4") as e:
        both[4]
    assert e.value.frame == 4
    with pytest.raises(NaNFrameError):
        read_frames(tmp_path / "b.zarr")
    assert np.isnan(open_frames(tmp_path / "b.zarr", check_finite=False)[2]).sum() == 1
    np.save(tmp_path / "n.npy", bad)
    with pytest.raises(NaNFrameError, match="frame 2"):
        open_frames(tmp_path / "n.npy")[2]


def test_label_shape_mismatch(tmp_path, frames):
    images, labels = frames
    with pytest.raises(LabelShapeError, match=r"labels have shape \(4, 24, 31\) but images have shape"):
        write_zarr(tmp_path / "x.zarr", images, labels[..., :31])
    g = zarr.open_group(str(tmp_path / "y.zarr"), mode="w", zarr_format=2)
    g.create_array("images", data=images, chunks=(1, 24, 32))
    g.create_array("labels", data=labels[:3], chunks=(1, 24, 32))
    with pytest.raises(LabelShapeError, match=r"\(3, 24, 32\).*\(4, 24, 32\)"):
        open_frames(tmp_path / "y.zarr")
    assert not open_frames(tmp_path / "y.zarr", label_key=False).has_labels
    with h5py.File(tmp_path / "z.h5", "w") as f:
        f["images"] = images
        f["labels"] = labels[:, :20]
    with pytest.raises(LabelShapeError):
        open_frames(tmp_path / "z.h5")
    np.save(tmp_path / "i.npy", images)
    np.save(tmp_path / "l.npy", labels[:2])
    with pytest.raises(LabelShapeError):
        pio.NpySource(tmp_path / "i.npy", labels=tmp_path / "l.npy")


def test_unsupported_and_missing(tmp_path, frames):
    images, _ = frames
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(UnsupportedFormatError, match=r"unsupported suffix '.jpg'"):
        open_frames(tmp_path / "f.jpg")
    with pytest.raises(FramesNotFoundError, match="no file matches"):
        open_frames(str(tmp_path / "*.zarr"))
    with pytest.raises(FramesNotFoundError):
        open_frames(tmp_path / "missing.h5")
    with pytest.raises(FileNotFoundError):  # a FramesNotFoundError is a FileNotFoundError
        open_frames(tmp_path / "missing.csv")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(UnsupportedFormatError, match="single-channel"):
        open_frames(tmp_path / "rgb.png")
    np.save(tmp_path / "5d.npy", np.zeros((2, 2, 2, 4, 4), np.float32))
    with pytest.raises(UnsupportedFormatError, match=r"panel stacks \(N, P, H, W\)"):
        open_frames(tmp_path / "5d.npy")
    np.save(tmp_path / "small.npy", np.zeros((1, 4, 4), np.float32))
    np.save(tmp_path / "big.npy", np.zeros((1, 5, 5), np.float32))
    with pytest.raises(UnsupportedFormatError, match="different frame shapes"):
        read_frames([tmp_path / "small.npy", tmp_path / "big.npy"])


# ------------------------------------------------------------------------------------------ atomic writes
def test_csv_interrupted_mid_write_keeps_old_file(tmp_path):
    target = tmp_path / "peaks.csv"

    def failing():
        yield np.array([[1.0, 2.0, 3.0]])
        raise RuntimeError("inference crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        write_csv(target, failing())
    assert _entries(tmp_path) == []  # neither target nor temporary
    write_csv(target, [np.array([[1.0, 2.0, 3.0]])])
    old = target.read_bytes()
    with pytest.raises(RuntimeError):
        write_csv(target, failing())
    assert target.read_bytes() == old and _entries(tmp_path) == ["peaks.csv"]


def test_cxi_interrupted_mid_write_keeps_old_file(tmp_path, frames):
    images, _ = frames
    target = tmp_path / "r.cxi"

    class FailingFrames:  # the frame source dies while the frames are being written
        def __len__(self):
            return 4

        def __getitem__(self, i):
            if i == 2:
                raise OSError("lost the detector stream")
            return images[i]

    peaks = [np.zeros((0, 3))] * 4
    with pytest.raises(OSError, match="detector stream"):
        write_cxi(target, peaks, frames=FailingFrames())
    assert _entries(tmp_path) == []
    write_cxi(target, [np.array([[1.0, 1.0, 1.0]])] * 4)
    with pytest.raises(OSError):
        write_cxi(target, peaks, frames=FailingFrames())
    assert _entries(tmp_path) == ["r.cxi"]
    assert [len(p) for p in read_cxi_peaks(target)] == [1, 1, 1, 1]


def test_zarr_interrupted_mid_write_keeps_old_store(tmp_path, frames, monkeypatch):
    images, labels = frames
    target = tmp_path / "s.zarr"
    write_zarr(target, images[:2], labels[:2])
    real = zarr.Group.create_array

    def create_array(self, name, *a, **k):  # the images are written, then the labels fail
        if name == "labels":
            raise OSError("disk full")
        return real(self, name, *a, **k)

    monkeypatch.setattr(zarr.Group, "create_array", create_array)
    with pytest.raises(OSError, match="disk full"):
        write_zarr(target, images, labels)
    monkeypatch.undo()
    assert _entries(tmp_path) == ["s.zarr"]
    src = open_frames(target)
    assert len(src) == 2
    np.testing.assert_array_equal(src[1], images[1])
    # a failure of the final rename itself also leaves the old store in place
    real_replace = os.replace

    def replace(a, b):  # only the move of the finished temporary store onto the target (zarr renames its
        if os.fspath(b) == os.fspath(target) and ".tmp-" in os.fspath(a):  # own chunk files too)
            raise OSError("rename failed")
        return real_replace(a, b)

    monkeypatch.setattr(pio.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        write_zarr(target, images, labels)
    monkeypatch.undo()
    assert _entries(tmp_path) == ["s.zarr"] and len(open_frames(target)) == 2
    # and a successful overwrite replaces it
    write_zarr(target, images, labels)
    assert len(open_frames(target)) == 4 and _entries(tmp_path) == ["s.zarr"]


def test_overlay_and_cxi_rename_failure(tmp_path, frames, monkeypatch):
    images, _ = frames

    def boom(a, b):
        raise OSError("rename failed")

    monkeypatch.setattr(pio.os, "replace", boom)
    with pytest.raises(OSError):
        save_overlay_png(tmp_path / "o.png", images[0], [[1, 1, 1.0]])
    with pytest.raises(OSError):
        write_cxi(tmp_path / "r.cxi", [np.zeros((0, 3))])
    assert _entries(tmp_path) == []
