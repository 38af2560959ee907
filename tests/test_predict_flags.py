"""Every `vitkit predict` flag does what its help says, observed in the outputs (not just the exit code).

The model is the short run of conftest.py's ``learned_run`` (simulated 128 x 128 frames; it really finds peaks, so
the filters have peaks to act on). The CLI runs in this process through its entry point (``cli_here``). Inputs are
three fresh simulated frames, as plain frames and, for the detector flags, as a two-panel detector (two 64 x 128
panels stacked along the slow-scan axis, described by a CrystFEL .geom written here).

Flags and what is asserted: ``--out`` (where everything goes; default ``./predictions``), ``--overlays`` (number of
PNGs), ``--write-frames`` (frames stored in the CXI), ``--key`` (which HDF5 dataset is read), ``--threshold`` and
``--min-pixels`` and ``--min-snr`` (the library's PeakFinder with the same values; stricter values keep fewer
peaks; ``--min-snr 0`` no SNR test), ``--min-peaks``
/ ``--max-peaks`` (per-event filters, brightest kept), ``--overlap`` (windows run through the model),
``--geometry`` (panels, slab and lab coordinates, detector.geom written), ``--mask`` / ``--mask-key`` /
``--mask-good`` / ``--mask-bad`` (no peak on a bad pixel, CrystFEL's bit rules vs psana's non-zero = good),
``--dials`` (refused without a geometry), ``--sparse`` (the run's sparse-token model), ``--bf16`` (the masks
come from a bfloat16 model; the library's peaks with that model). `vitkit predict` has no device or batch-size flag.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from test_peaks_job import cli_here

N, H, W = 3, 128, 128  # three frames of the training size


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: this tiny model's ops gain nothing from a second, and on cores shared with other
    processes a second thread waiting at every op's barrier made each prediction ~20x slower (measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Frames as .npy ([N, H, W] and as two-panel stacks [N, 2, 64, 128]), a two-panel .geom, and the library's
    reference PeakFinder for the run."""
    from vitkit.apps.peaks.detector import Detector, Panel
    from vitkit.apps.peaks.geom import write_geom
    from vitkit.apps.peaks.synthetic import SynthConfig, SyntheticPeakDataset

    d = tmp_path_factory.mktemp("predict_flags")
    ds = SyntheticPeakDataset(N, cfg=SynthConfig(shape=(H, W)), seed=99)
    frames = np.stack([ds[i]["image"][0].numpy() for i in range(N)])
    np.save(d / "frames.npy", frames)
    np.save(d / "stack.npy", frames.reshape(N, 2, H // 2, W))
    panels = [Panel(name=f"p{k}", min_fs=0, max_fs=W - 1, min_ss=k * H // 2, max_ss=(k + 1) * H // 2 - 1,
                    corner_x=-W / 2 + 0.5, corner_y=-H / 2 + k * (H // 2 + 6.0), res=10000.0, index=k)
              for k in range(2)]
    det = Detector(panels, photon_energy=9500.0, clen=0.1, name="two_panels")
    write_geom(det, d / "two.geom")
    return {"dir": d, "frames": frames, "detector": det}


def predict(capsys, run, *args):
    res = cli_here(capsys, "predict", str(run), *args)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def csv_tables(out, n=N):
    from vitkit.apps.peaks.io import read_csv_peaks

    return read_csv_peaks(out / "peaks.csv", n_frames=n)


def library(run, events, **kw) -> list:
    """The library's answer: ``PeakFinder.from_run(run, **kw)`` called event by event, as the CLI does."""
    from vitkit.apps.peaks.finder import PeakFinder

    f = PeakFinder.from_run(run, **kw)
    return [f(e[None] if kw.get("geometry") is None else e)[0] for e in events]


def same_peaks(a, b) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) and np.allclose(x["fs"], y["fs"], atol=1e-4)
                                    and np.allclose(x["ss"], y["ss"], atol=1e-4) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------- outputs
def test_out_and_its_default(learned_run, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "here"
    res = predict(capsys, learned_run, str(data["dir"] / "frames.npy"), "--out", str(out), "--overlays", "0")
    assert res.stdout.strip().splitlines()[-1] == str(out)
    assert {p.name for p in out.iterdir()} == {"peaks.cxi", "peaks.csv"}  # no geometry: no detector.geom
    monkeypatch.chdir(tmp_path)
    predict(capsys, learned_run, str(data["dir"] / "frames.npy"), "--overlays", "0")
    assert (tmp_path / "predictions" / "peaks.cxi").exists() and (tmp_path / "predictions" / "peaks.csv").exists()
    assert same_peaks(csv_tables(out), csv_tables(tmp_path / "predictions"))
    # the library's PeakFinder with the CLI's defaults finds the same peaks
    assert same_peaks(csv_tables(out), library(learned_run, data["frames"]))


def test_overlays_number_of_pngs(learned_run, data, tmp_path, capsys):
    for n, want in (("0", 0), ("2", 2), (None, N)):  # default 4: one per frame up to 4
        out = tmp_path / f"o{n}"
        predict(capsys, learned_run, str(data["dir"] / "frames.npy"), "--out", str(out),
                *(("--overlays", n) if n is not None else ()))
        assert sorted(p.name for p in out.glob("*.png")) == [f"overlay_{i:04d}.png" for i in range(want)]


def test_write_frames_stores_the_frames_in_the_cxi(learned_run, data, tmp_path, capsys):
    predict(capsys, learned_run, str(data["dir"] / "frames.npy"), "--out", str(tmp_path / "a"), "--overlays", "0")
    predict(capsys, learned_run, str(data["dir"] / "frames.npy"), "--out", str(tmp_path / "b"), "--overlays", "0",
            "--write-frames")
    with h5py.File(tmp_path / "a" / "peaks.cxi", "r") as f:
        assert "entry_1/data_1/data" not in f
    with h5py.File(tmp_path / "b" / "peaks.cxi", "r") as f:
        np.testing.assert_array_equal(f["entry_1/data_1/data"][()], data["frames"])


def test_key_selects_the_hdf5_dataset(learned_run, data, tmp_path, capsys):
    """The default dataset holds blank frames (a decoy), the real ones sit under /scan/frames."""
    path = tmp_path / "run.h5"
    with h5py.File(path, "w") as f:
        f["/entry_1/data_1/data"] = np.zeros_like(data["frames"])
        f["/scan/frames"] = data["frames"]
    predict(capsys, learned_run, str(path), "--out", str(tmp_path / "default"), "--overlays", "0")
    assert sum(len(t) for t in csv_tables(tmp_path / "default")) == 0
    predict(capsys, learned_run, str(path), "--key", "/scan/frames", "--out", str(tmp_path / "k"), "--overlays", "0")
    predict(capsys, learned_run, str(data["dir"] / "frames.npy"), "--out", str(tmp_path / "npy"), "--overlays", "0")
    got = csv_tables(tmp_path / "k")
    assert sum(len(t) for t in got) > 0 and same_peaks(got, csv_tables(tmp_path / "npy"))
    res = cli_here(capsys, "predict", str(learned_run), str(path), "--key", "/nowhere", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "/nowhere" in res.stderr and "scan/frames" in res.stderr


# ----------------------------------------------------------------------------------------- peak filters
def test_threshold(learned_run, data, tmp_path, capsys):
    counts = {}
    for t in ("0.3", "0.95"):
        out = tmp_path / t
        predict(capsys, learned_run, str(data["dir"] / "frames.npy"), "--out", str(out), "--overlays", "0",
                "--threshold", t)
        got = csv_tables(out)
        assert same_peaks(got, library(learned_run, data["frames"], threshold=float(t)))
        counts[t] = sum(len(x) for x in got)
    assert counts["0.95"] < counts["0.3"], counts  # a stricter peak share keeps fewer peaks


def test_min_pixels(learned_run, data, tmp_path, capsys):
    predict(capsys, learned_run, str(data["dir"] / "frames.npy"), "--out", str(tmp_path / "d"), "--overlays", "0")
    predict(capsys, learned_run, str(data["dir"] / "frames.npy"), "--out", str(tmp_path / "m"), "--overlays", "0",
            "--min-pixels", "8")
    base, big = np.concatenate(csv_tables(tmp_path / "d")), np.concatenate(csv_tables(tmp_path / "m"))
    assert (base["npix"] < 8).any() and len(big) > 0  # the flag has peaks to remove and peaks to keep
    assert (big["npix"] >= 8).all() and len(big) < len(base)
    assert same_peaks(csv_tables(tmp_path / "m"), library(learned_run, data["frames"], min_pixels=8))


def test_min_snr(learned_run, data, tmp_path, capsys):
    frames = str(data["dir"] / "frames.npy")
    tables = {}
    for s in ("0", "5.5", "30"):
        predict(capsys, learned_run, frames, "--out", str(tmp_path / s), "--overlays", "0", "--min-snr", s)
        tables[s] = np.concatenate(csv_tables(tmp_path / s))
    assert same_peaks(csv_tables(tmp_path / "30"), library(learned_run, data["frames"], min_snr=30.0))
    assert same_peaks(csv_tables(tmp_path / "0"), library(learned_run, data["frames"], min_snr=None))
    assert same_peaks(csv_tables(tmp_path / "5.5"), library(learned_run, data["frames"]))  # the default
    assert (tables["30"]["snr"] >= 30).all() and (tables["5.5"]["snr"] >= 5.5).all()
    assert len(tables["30"]) < len(tables["5.5"]) <= len(tables["0"]) and len(tables["30"]) > 0
    assert np.isfinite(tables["0"]["snr"]).all()


def test_min_and_max_peaks(learned_run, data, tmp_path, capsys):
    frames = str(data["dir"] / "frames.npy")
    predict(capsys, learned_run, frames, "--out", str(tmp_path / "d"), "--overlays", "0")
    base = csv_tables(tmp_path / "d")
    counts = [len(t) for t in base]
    assert min(counts) < max(counts), counts  # frames differ, so --min-peaks can split them
    predict(capsys, learned_run, frames, "--out", str(tmp_path / "min"), "--overlays", "0",
            "--min-peaks", str(max(counts)))
    kept = csv_tables(tmp_path / "min")
    for b, k, c in zip(base, kept, counts):  # frames below the minimum report none, the others all their peaks
        assert len(k) == (c if c >= max(counts) else 0) and (len(k) == 0 or same_peaks([k], [b]))
    predict(capsys, learned_run, frames, "--out", str(tmp_path / "max"), "--overlays", "0", "--max-peaks", "3")
    capped = csv_tables(tmp_path / "max")
    for b, k in zip(base, capped):  # the three brightest, in their original order
        brightest = np.sort(np.argsort(-b["intensity"], kind="stable")[:3])
        assert same_peaks([k], [b[brightest]])
    with h5py.File(tmp_path / "max" / "peaks.cxi", "r") as f:
        assert f["entry_1/result_1/peakXPosRaw"].shape == (N, 3)  # the CXI peak arrays are max-peaks wide


def test_overlap_sets_the_sliding_windows(learned_run, data, tmp_path, capsys, monkeypatch):
    """128 px sides, 32 px windows (the run's crop): ``ceil((128 - 32) / (32 * (1 - overlap))) + 1`` windows per
    side, so overlap 0 tiles each frame with 4 x 4 windows and 0.5 with 7 x 7."""
    import vitkit

    seen = []
    forward = vitkit.EoMT.forward

    def spy(self, x, *args, **kwargs):
        seen.append(x.shape[0])
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(vitkit.EoMT, "forward", spy)
    windows = {}
    for ov in ("0", "0.5"):
        seen.clear()
        predict(capsys, learned_run, str(data["dir"] / "frames.npy"), "--out", str(tmp_path / ov), "--overlays", "0",
                "--overlap", ov, "--dense")  # every window (the sparse path skips those without a kept token)
        windows[ov] = sum(seen)
    assert windows == {"0": N * 4 * 4, "0.5": N * 7 * 7}


# ----------------------------------------------------------------------------------- detector and masks
def test_geometry_gives_panels_slab_and_lab_coordinates(learned_run, data, tmp_path, capsys):
    from vitkit.apps.peaks.geom import read_geom

    det = read_geom(data["dir"] / "two.geom")  # the geometry as the CLI reads it
    stack = str(data["dir"] / "stack.npy")
    res = cli_here(capsys, "predict", str(learned_run), stack, "--out", str(tmp_path / "no"))
    assert res.returncode == 2 and "--geometry" in res.stderr  # panel stacks need a geometry (the run has none)
    out = tmp_path / "geo"
    predict(capsys, learned_run, stack, "--geometry", str(data["dir"] / "two.geom"), "--out", str(out),
            "--overlays", "1")
    tables = csv_tables(out)
    both = np.concatenate(tables)
    assert set(np.unique(both["panel"])) == {0, 1}
    np.testing.assert_allclose(both["slab_ss"], both["ss"] + 64 * both["panel"], atol=1e-4)
    np.testing.assert_allclose(both["slab_fs"], both["fs"], atol=1e-4)
    for k in (0, 1):
        sel = both[both["panel"] == k]
        xyz = det.lab_xyz(k, sel["fs"], sel["ss"])
        np.testing.assert_allclose(sel["x_lab"], xyz[:, 0], rtol=1e-6)
        np.testing.assert_allclose(sel["y_lab"], xyz[:, 1], rtol=1e-6)
    assert np.isfinite(both["x_lab"]).all()
    assert read_geom(out / "detector.geom").stack_shape == (2, 64, 128)
    assert same_peaks(tables, library(learned_run, np.load(data["dir"] / "stack.npy"),
                                      geometry=str(data["dir"] / "two.geom")))
    # a built-in layout by name: single frames on a 128 x 128 panel get lab coordinates too
    predict(capsys, learned_run, str(data["dir"] / "frames.npy"), "--geometry", "single:128x128", "--out",
            str(tmp_path / "single"), "--overlays", "0")
    single = np.concatenate(csv_tables(tmp_path / "single"))
    assert len(single) and np.isfinite(single["x_lab"]).all() and (single["panel"] == 0).all()


def _in(good: np.ndarray, t) -> np.ndarray:
    return good[t["panel"].astype(int), np.rint(t["ss"]).astype(int), np.rint(t["fs"]).astype(int)]


def test_mask_and_mask_key(learned_run, data, tmp_path, capsys):
    """psana convention (non-zero = good), as a panel stack or a slab, read from .npy or an HDF5 dataset."""
    geom, stack = str(data["dir"] / "two.geom"), str(data["dir"] / "stack.npy")
    predict(capsys, learned_run, stack, "--geometry", geom, "--out", str(tmp_path / "all"), "--overlays", "0")
    base = np.concatenate(csv_tables(tmp_path / "all"))
    good = np.ones((2, 64, 128), dtype=np.uint8)
    good[1] = 0  # panel 1 masked whole
    good[0, 16:48, 32:96] = 0  # and a block of panel 0
    assert (~_in(good.astype(bool), base)).sum() >= 3  # without the mask, peaks are found there
    np.save(tmp_path / "mask.npy", good)
    np.save(tmp_path / "slab_mask.npy", good.reshape(128, 128))
    with h5py.File(tmp_path / "mask.h5", "w") as f:
        f["/all_good"] = np.ones_like(good)
        f["/real"] = good
    for i, args in enumerate((("--mask", str(tmp_path / "mask.npy")), ("--mask", str(tmp_path / "slab_mask.npy")),
                              ("--mask", str(tmp_path / "mask.h5"), "--mask-key", "/real"))):
        out = tmp_path / f"m{i}"
        predict(capsys, learned_run, stack, "--geometry", geom, "--out", str(out), "--overlays", "0", *args)
        got = np.concatenate(csv_tables(out))
        assert len(got) > 0 and _in(good.astype(bool), got).all(), args
    predict(capsys, learned_run, stack, "--geometry", geom, "--out", str(tmp_path / "key_all"), "--overlays", "0",
            "--mask", str(tmp_path / "mask.h5"), "--mask-key", "/all_good")
    assert (np.concatenate(csv_tables(tmp_path / "key_all"))["panel"] == 1).any()  # --mask-key chose the dataset
    res = cli_here(capsys, "predict", str(learned_run), str(data["dir"] / "frames.npy"), "--mask",
                   str(tmp_path / "mask.npy"), "--out", str(tmp_path / "nogeo"))
    assert res.returncode == 2 and "needs a detector geometry" in res.stderr


def test_mask_good_and_mask_bad_bits(learned_run, data, tmp_path, capsys):
    """A CrystFEL-style integer mask: 0 on most pixels, bit 0x1 on panel 0, bit 0x4 on the left half of panel 1.
    psana's rule (no bits given): non-zero = good. ``--mask-good B``: good where all bits B are set.
    ``--mask-bad B``: bad where any bit of B is set."""
    geom, stack = str(data["dir"] / "two.geom"), str(data["dir"] / "stack.npy")
    m = np.zeros((2, 64, 128), dtype=np.uint16)
    m[0] |= 0x1
    m[1, :, :64] |= 0x4
    np.save(tmp_path / "bits.npy", m)
    panel1_left = np.zeros((2, 64, 128), dtype=bool)
    panel1_left[1, :, :64] = True
    rules = {  # flags: good pixels
        (): m != 0,
        ("--mask-good", "0x1"): (m & 0x1) != 0,
        ("--mask-bad", "0x1"): (m & 0x1) == 0,
        ("--mask-bad", "0x5"): (m & 0x5) == 0,
    }
    found = {}
    for flags, good in rules.items():
        out = tmp_path / ("psana" if not flags else flags[0][2:] + flags[1])
        predict(capsys, learned_run, stack, "--geometry", geom, "--mask", str(tmp_path / "bits.npy"), "--out",
                str(out), "--overlays", "0", *flags)
        got = np.concatenate(csv_tables(out))
        assert len(got) > 0 and _in(good, got).all(), flags
        found[flags] = got
    # the rules differ where they should: psana keeps the left half of panel 1, --mask-good 0x1 does not
    assert _in(panel1_left, found[()]).any() and not _in(panel1_left, found[("--mask-good", "0x1")]).any()
    assert (found[("--mask-bad", "0x1")]["panel"] == 1).all() and _in(panel1_left, found[("--mask-bad", "0x1")]).any()
    assert not _in(panel1_left, found[("--mask-bad", "0x5")]).any()


def test_sparse_predicts_with_the_runs_sparse_model(learned_run, data, tmp_path, capsys):
    """`vitkit train` fitted the run's sparse threshold (sparse.json) and fine-tuned its sparse model
    (sparse_model/); --sparse predicts with both: the library's sparse finder's peaks, most of the dense peaks, from
    a fraction of the tokens."""
    import json

    from vitkit.apps.peaks.finder import PeakFinder
    from vitkit.apps.peaks.metrics import match_peaks

    stats = json.loads((learned_run / "sparse.json").read_text())
    assert stats["recall"] >= 0.99 and 0 < stats["kept_fraction"] < 1 and stats["fine_tune"]["steps"] == 40
    assert (learned_run / "sparse_model" / "model.safetensors").exists()
    frames = str(data["dir"] / "frames.npy")
    predict(capsys, learned_run, frames, "--out", str(tmp_path / "d"), "--overlays", "0", "--dense")
    res = predict(capsys, learned_run, frames, "--out", str(tmp_path / "s"), "--overlays", "0", "--sparse")
    assert "model: sparse-token model (asked for: --sparse" in res.stdout
    dense, sparse = csv_tables(tmp_path / "d"), csv_tables(tmp_path / "s")
    assert same_peaks(sparse, library(learned_run, data["frames"], sparse=True))
    assert same_peaks(dense, library(learned_run, data["frames"], sparse=False))
    found = sum(match_peaks(np.c_[s["ss"], s["fs"]], np.c_[d["ss"], d["fs"]], 1.0)[0] for d, s in zip(dense, sparse))
    n = sum(len(d) for d in dense)
    assert n > 20 and found >= 0.9 * n, (found, n)
    f = PeakFinder.from_run(learned_run, sparse=True)
    f(data["frames"][:1])
    assert 0 < f.kept_tokens[0] < f.kept_tokens[1]
    # `vitkit train` evaluated the sparse model beside the dense one; `vitkit evaluate --sparse` says the same
    metrics = json.loads((learned_run / "metrics.json").read_text())
    reported = metrics["sparse"] if metrics["model"] == "dense" else \
        {k: v for k, v in metrics.items() if k not in ("dense", "model", "num_frames")}
    assert 0 < reported["peak_f1"] <= 1 and 0 < reported["kept_token_fraction"] < 1
    res = cli_here(capsys, "evaluate", str(learned_run), "--sparse", "--out", str(tmp_path / "ev"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {k: got[k] for k in reported} == pytest.approx(reported) and got["model"] == "sparse"


def test_without_a_flag_the_run_decides_dense_or_sparse(learned_run, data, tmp_path, capsys):
    """`vitkit train` compared the two models on its held-out shots and wrote the verdict into sparse.json; without
    --sparse or --dense, `vitkit predict` runs the model it chose and says which and why."""
    import json

    metrics = json.loads((learned_run / "metrics.json").read_text())
    held = json.loads((learned_run / "sparse.json").read_text())["held_out"]
    assert held["max_f1_drop"] == 0.01 and held["default"] is (held["sparse_peak_f1"] >= held["dense_peak_f1"] - 0.01)
    # the run directory's predictions and scores are the default model's, the other's scores beside them
    chosen, other = ("sparse", "dense") if held["default"] else ("dense", "sparse")
    assert metrics["model"] == chosen and held["frames"] == metrics["num_frames"]
    assert {"peak_f1", "pixel_iou", "centroid_rmse_px"} <= set(metrics[other])
    assert held[f"{chosen}_peak_f1"] == metrics["peak_f1"] and held[f"{other}_peak_f1"] == metrics[other]["peak_f1"]
    frames = str(data["dir"] / "frames.npy")
    flag = "--sparse" if held["default"] else "--dense"
    res = predict(capsys, learned_run, frames, "--out", str(tmp_path / "a"), "--overlays", "0")
    assert f"held-out peak F1 {held['sparse_peak_f1']:.4f} vs dense {held['dense_peak_f1']:.4f}" in res.stdout
    predict(capsys, learned_run, frames, "--out", str(tmp_path / "f"), "--overlays", "0", flag)
    assert same_peaks(csv_tables(tmp_path / "a"), csv_tables(tmp_path / "f"))
    # the other verdict, written by hand: the default follows it
    stats = learned_run / "sparse.json"
    saved = stats.read_text()
    try:
        stats.write_text(json.dumps({**json.loads(saved), "held_out": {**held, "default": not held["default"]}}))
        res = predict(capsys, learned_run, frames, "--out", str(tmp_path / "b"), "--overlays", "0")
        assert ("sparse-token model (held-out" in res.stdout) is (not held["default"])
        other_flag = "--dense" if held["default"] else "--sparse"
        predict(capsys, learned_run, frames, "--out", str(tmp_path / "o"), "--overlays", "0", other_flag)
        assert same_peaks(csv_tables(tmp_path / "b"), csv_tables(tmp_path / "o"))
    finally:
        stats.write_text(saved)
    with pytest.raises(SystemExit) as exit_:
        cli_here(capsys, "predict", str(learned_run), frames, "--sparse", "--dense")
    assert exit_.value.code == 2 and "--dense: not allowed with argument --sparse" in capsys.readouterr().err


def test_bf16_predicts_with_a_bfloat16_model(learned_run, data, tmp_path, capsys, monkeypatch):
    import torch

    from vitkit.apps.peaks.finder import PeakFinder
    from vitkit.apps.peaks.metrics import match_peaks
    from vitkit.layers.precision import cast_for_inference

    frames = str(data["dir"] / "frames.npy")
    predict(capsys, learned_run, frames, "--out", str(tmp_path / "d"), "--overlays", "0")
    seen = []
    masks = PeakFinder._masks
    monkeypatch.setattr(PeakFinder, "_masks", lambda self, *a: seen.append(self.model.q.weight.dtype)
                        or masks(self, *a))
    predict(capsys, learned_run, frames, "--out", str(tmp_path / "b"), "--overlays", "0", "--bf16")
    assert seen and set(seen) == {torch.bfloat16}
    f = PeakFinder.from_run(learned_run)
    cast_for_inference(f.model, torch.bfloat16)
    half = csv_tables(tmp_path / "b")
    assert same_peaks(half, [f(e[None])[0] for e in data["frames"]])
    dense = csv_tables(tmp_path / "d")
    found = sum(match_peaks(np.c_[h["ss"], h["fs"]], np.c_[d["ss"], d["fs"]], 1.0)[0] for d, h in zip(dense, half))
    n = sum(len(d) for d in dense)
    assert n > 20 and found >= 0.9 * n, (found, n)


def test_dials_needs_a_geometry(learned_run, data, tmp_path, capsys):
    res = cli_here(capsys, "predict", str(learned_run), str(data["dir"] / "frames.npy"), "--dials", "--out",
                   str(tmp_path / "d"), "--overlays", "0")
    assert res.returncode == 2 and "--dials needs a detector geometry" in res.stderr
    assert not (tmp_path / "d" / "strong.refl").exists()


def test_every_predict_flag_is_tested_here():
    """A flag added to `vitkit predict` fails this until a test above exercises it."""
    import argparse
    from pathlib import Path

    from vitkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = {o for a in sub.choices["predict"]._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    source = Path(__file__).read_text().split("def test_every_predict_flag_is_tested_here")[0]
    assert len(flags) >= 15 and not sorted(f for f in flags if f'"{f}"' not in source)
