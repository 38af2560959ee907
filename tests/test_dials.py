"""vitkit <-> DIALS: experiment geometry, strong-spot tables, predictions, stills indexing of simulated shots; and
the peakfinder8 baseline wrapper (benchmarks/pf8.py).

DIALS lives in the system Python (``/usr/bin/python3``, Debian's ``python3-dials``); these tests skip when it
cannot import dials. The peakfinder8 tests skip without psana's wheel (``pip install --no-deps psana``).
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy as np
import pytest

from helpers import load_benchmark
from vitkit.apps.peaks import dials as vd
from vitkit.apps.peaks.detector import builtin_detector

DIALS_OK, DIALS_WHY = vd.dials_available()
needs_dials = pytest.mark.skipif(not DIALS_OK, reason=f"DIALS not available: {DIALS_WHY}")

try:
    from vitkit.apps.peaks.lattice import LatticeConfig, simulate_shot
except ImportError as e:  # the lattice simulator is a separate module
    LatticeConfig = simulate_shot = None
    _SIM_WHY = str(e)
else:
    _SIM_WHY = ""
needs_sim = pytest.mark.skipif(simulate_shot is None, reason=f"lattice simulator missing: {_SIM_WHY}")


def _dials_json(code: str, *args) -> object:
    """Run ``code`` (which prints one JSON document) in the DIALS interpreter."""
    r = subprocess.run([vd.dials_python(), "-I", "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _truth_peaks(shot) -> np.ndarray:
    """The simulator's true (visible, merged) peaks of a shot as ``[n, 4]`` ``(panel, fs, ss, photons)``."""
    rows = [np.stack([np.full(len(pk), shot.panels[k]), pk[:, 1], pk[:, 0], pk[:, 2]], axis=1)
            for k, pk in enumerate(shot.peaks)]
    return np.concatenate(rows) if rows else np.zeros((0, 4))


# ------------------------------------------------------------------------------------------- pure numpy
def test_frame_transform_is_a_proper_rotation():
    r = vd.CRYSTFEL_TO_DIALS
    assert np.allclose(r @ r.T, np.eye(3)) and np.isclose(np.linalg.det(r), 1.0)
    assert np.allclose(vd.crystfel_to_dials([0, 0, 1.0]), [0, 0, -1.0])  # beam +z -> dxtbx's s0 along -z
    a = np.random.default_rng(0).normal(size=(3, 3))
    assert np.allclose(vd.dials_to_crystfel(vd.crystfel_to_dials(a)), a)


@needs_sim
def test_misorientation_uses_symmetry_and_ignores_scale():
    from vitkit.apps.peaks.lattice import random_rotation, reciprocal_basis

    b = reciprocal_basis((79.1, 79.1, 37.9, 90, 90, 90))
    u = random_rotation(np.random.default_rng(3))
    a_true = u @ b
    four = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])  # 4-fold about c: an equivalent setting of P43212
    rot = np.array([[np.cos(0.01), -np.sin(0.01), 0], [np.sin(0.01), np.cos(0.01), 0], [0, 0, 1]])
    found = rot @ a_true @ four.T * 1.003  # rotated by 0.573 deg, re-indexed, cell 0.3 % off
    assert vd.misorientation_deg(found, a_true, [np.eye(3)]) > 45
    assert vd.misorientation_deg(found, a_true, [np.eye(3), four, four @ four, four.T]) == pytest.approx(
        np.degrees(0.01), abs=1e-6)
    assert vd.cell_matches((79.5, 79.5, 38.1, 90, 90, 90.5), (79.1, 79.1, 37.9, 90, 90, 90))
    assert not vd.cell_matches((80.5, 80.5, 37.9, 90, 90, 90), (79.1, 79.1, 37.9, 90, 90, 90))


# ---------------------------------------------------------------------------------------------- DIALS
@needs_dials
@pytest.mark.parametrize("name", ["epix10k2m", "jungfrau4m"])
def test_experiment_geometry_matches_vitkit(tmp_path, name):
    det = builtin_detector(name)
    if name == "epix10k2m":  # a tilted, offset panel too: the transform must carry z components
        det.panels[3] = det.panels[3].replace(fs=(0.9998, 0.0, 0.02), coffset=0.0004)
    expt = vd.write_experiments(det, tmp_path / "det.expt", n_images=2)
    rng = np.random.default_rng(1)
    pts = []
    for k, p in enumerate(det.panels):
        h, w = p.shape
        for fs, ss in [(0.0, 0.0), (w - 1.0, h - 1.0), *rng.uniform((0, 0), (w - 1, h - 1), (3, 2))]:
            pts.append((k, float(fs), float(ss)))
    got = _dials_json('''
        import json, sys
        from dxtbx.model.experiment_list import ExperimentListFactory
        el = ExperimentListFactory.from_json_file(sys.argv[1], check_format=False)
        pts = json.loads(sys.argv[2])
        d = el[1].detector
        b = el[1].beam
        out = {"xyz": [list(d[k].get_pixel_lab_coord((fs + 0.5, ss + 0.5))) for k, fs, ss in pts],
               "direction": list(b.get_sample_to_source_direction()), "s0": list(b.get_s0()),
               "wavelength": b.get_wavelength(),
               "n": len(el), "n_panels": len(d), "image_size": list(d[0].get_image_size()),
               "ids": [e.identifier for e in el]}
        print(json.dumps(out))
    ''', expt, json.dumps(pts))
    want = np.array([vd.crystfel_to_dials(det.lab_xyz(k, fs, ss) * 1000.0) for k, fs, ss in pts])
    assert np.abs(np.array(got["xyz"]) - want).max() < 1e-6  # mm
    assert got["n"] == 2 and got["n_panels"] == len(det.panels)
    assert got["image_size"] == [det.panels[0].shape[1], det.panels[0].shape[0]]
    assert got["wavelength"] == pytest.approx(det.wavelength * 1e10, rel=1e-12)
    assert np.allclose(got["direction"], [0, 0, 1]) and np.allclose(got["s0"], [0, 0, -1e-10 / det.wavelength])
    assert got["ids"] == [vd.experiment_identifier(0), vd.experiment_identifier(1)]


@needs_dials
def test_reflection_table_round_trip(tmp_path):
    det = builtin_detector("epix10k2m")
    shot0 = np.array([[0, 10.25, 20.5, 500.0], [15, 383.0, 351.0, 2.0], [7, 0.0, 0.0, 80.0]])
    shot2 = np.zeros(3, dtype=[("panel", "i4"), ("fs", "f8"), ("ss", "f8"), ("intensity", "f8"), ("npix", "i4")])
    shot2["panel"], shot2["fs"], shot2["ss"], shot2["intensity"], shot2["npix"] = [1, 2, 3], [5, 6, 7.5], [8, 9, 1], \
        [10, 20, 30], [4, 12, 30]
    peaks = [shot0, np.zeros((0, 3)), shot2]
    path = vd.write_reflections(det, peaks, tmp_path / "strong.refl")
    cols = vd.read_reflections(path)
    for c in ("xyzobs.px.value", "xyzobs.px.variance", "panel", "id", "imageset_id", "bbox", "intensity.sum.value",
              "intensity.sum.variance", "flags", "n_signal"):
        assert c in cols, c
    assert cols["flags_strong"].all()
    assert cols["id"].tolist() == [0, 0, 0, 2, 2, 2] and cols["imageset_id"].tolist() == cols["id"].tolist()
    xyz = cols["xyzobs.px.value"]
    want_fs = np.concatenate([shot0[:, 1], shot2["fs"]])
    want_ss = np.concatenate([shot0[:, 2], shot2["ss"]])
    assert np.allclose(xyz[:, 0], want_fs + 0.5) and np.allclose(xyz[:, 1], want_ss + 0.5)
    assert np.allclose(xyz[:, 2], 0.5)
    assert cols["panel"].tolist() == [0, 15, 7, 1, 2, 3]
    assert np.allclose(cols["intensity.sum.value"], [500, 2, 80, 10, 20, 30])
    bbox = cols["bbox"]
    assert (bbox[:, 0] <= np.floor(xyz[:, 0])).all() and (bbox[:, 1] > np.floor(xyz[:, 0])).all()
    assert (bbox[:, 2] <= np.floor(xyz[:, 1])).all() and (bbox[:, 3] > np.floor(xyz[:, 1])).all()
    assert (bbox[:, 1] <= 384).all() and (bbox[:, 3] <= 352).all() and (bbox[:, 4:] == [0, 1]).all()
    assert (cols["xyzobs.px.variance"][:, :2] > 0).all()
    assert cols["identifiers"] == {i: vd.experiment_identifier(i) for i in range(3)}


@needs_dials
@needs_sim
def test_dials_predicts_the_simulated_spots():
    """A monochromatic beam (bandwidth 0) puts every simulated spot at the Bragg angle of the shot's wavelength in
    the azimuth of its scattering vector -- DIALS' stills model. Then DIALS' predictions from the true crystal must
    land on the simulator's spots: frames, origins, axes, wavelength and A* all agree."""
    det = builtin_detector("epix10k2m")
    cfg = LatticeConfig.noiseless(bandwidth=(0.0, 0.0))
    shots = [simulate_shot(np.random.default_rng(s), det, cfg) for s in (11, 12)]
    hkl = [(np.stack([s.reflections[c] for c in "hkl"], axis=1), s.reflections["panel"]) for s in shots]
    pred = vd.predict_stills(det, [s.a_star for s in shots], cfg.space_group, hkl_per_shot=hkl,
                             wavelength=[s.wavelength for s in shots])
    for s, p in zip(shots, pred):
        assert len(p) == len(s.reflections) > 50
        assert (p["h"] == s.reflections["h"]).all()
        err = np.hypot(p["fs"] - s.reflections["fs"], p["ss"] - s.reflections["ss"])
        assert err.max() < 1e-3, err.max()


@needs_dials
@needs_sim
def test_true_spots_of_simulated_shots_index_with_the_right_cell(tmp_path):
    """The acceptance item: the simulator's true peaks of a few epix10k2M stills index with DIALS (stills
    indexer, known cell and space group) with the right cell and the right orientation."""
    det = builtin_detector("epix10k2m")
    cfg = LatticeConfig()
    rng = np.random.default_rng(2024)
    shots = []
    while len(shots) < 3:
        s = simulate_shot(rng, det, cfg)
        if sum(len(pk) for pk in s.peaks) >= 15:  # a hit
            shots.append(s)
    res = vd.index_stills(det, [_truth_peaks(s) for s in shots], cfg.cell, cfg.space_group, tmp_path / "idx",
                          true_orientations=[s.a_star for s in shots], wavelength=[s.wavelength for s in shots],
                          nproc=2)
    for r in res:
        assert r["indexed"] and r["correct_cell"], r
        assert r["orientation_error_deg"] < 0.5, r
        assert r["n_indexed"] >= 0.5 * r["n_strong"], r
        assert r["rmsd_px"] < 1.5, r
    summary = vd.indexing_summary(res)
    assert summary["indexing_rate"] == 1.0 and summary["correct_orientation_rate"] == 1.0
    assert (tmp_path / "idx" / "shots.expt").exists() and (tmp_path / "idx" / "strong.refl").exists()


@needs_dials
@needs_sim
def test_sequences_indexer_needs_no_workaround(tmp_path):
    """``indexer="sequences"`` (DIALS' rotation-data indexer on each still) never touches xfel.mono_simulation."""
    det = builtin_detector("epix10k2m")
    cfg = LatticeConfig()
    shot = simulate_shot(np.random.default_rng(7), det, cfg)  # 158 true peaks
    res = vd.index_stills(det, [_truth_peaks(shot)], cfg.cell, cfg.space_group, tmp_path, indexer="sequences",
                          true_orientations=[shot.a_star], wavelength=[shot.wavelength], methods=("fft1d",))
    assert res[0]["correct_cell"] and res[0]["orientation_error_deg"] < 0.2, res[0]
    assert res[0]["mono_sim_stubbed"] is False


def test_index_stills_rejects_bad_arguments(tmp_path):
    det = builtin_detector("epix10k2m")
    with pytest.raises(ValueError, match="indexer"):
        vd.index_stills(det, [np.zeros((0, 3))], (79, 79, 38, 90, 90, 90), "P43212", tmp_path, indexer="magic")
    with pytest.raises(ValueError, match="cell"):
        vd.index_stills(det, [np.zeros((0, 3))], (79, 79, 38), "P43212", tmp_path)
    with pytest.raises(ValueError, match="metres"):
        vd._wavelength_A(det, 1.3)


# ---------------------------------------------------------------------------------------- peakfinder8
try:
    pf8 = load_benchmark("pf8")
except Exception as e:  # noqa: BLE001 - the benchmark module itself is broken or a dependency is missing
    pf8, PF8_OK, PF8_WHY = None, False, f"benchmarks/pf8.py cannot be imported: {type(e).__name__}: {e}"
else:
    PF8_OK, PF8_WHY = pf8.pf8_available()
needs_pf8 = pytest.mark.skipif(not PF8_OK, reason=f"peakfinder8 not available: {PF8_WHY}")


@needs_pf8
def test_pf8_single_pixel_is_reported_at_its_numpy_index():
    det = builtin_detector("epix10k2m")
    rng = np.random.default_rng(0)
    ev = rng.normal(0.0, 1.0, det.stack_shape).astype(np.float32)
    ev[9, 100, 200] = 500.0
    t = pf8.pf8_find(det, ev, None, pf8.Pf8Params(adc_threshold=50, minimum_snr=6, min_pixel_count=1))
    assert len(t) == 1
    assert t["panel"][0] == 9
    assert (t["ss"][0], t["fs"][0]) == (pytest.approx(100.0, abs=1e-3), pytest.approx(200.0, abs=1e-3))
    assert t["slab_ss"][0] == pytest.approx(9 * 352 + 100.0, abs=1e-3)


@needs_pf8
def test_pf8_finds_an_isolated_gaussian_spot():
    det = builtin_detector("epix10k2m")
    rng = np.random.default_rng(1)
    ev = rng.normal(2.0, 1.0, det.stack_shape).astype(np.float32)  # flat background with read noise
    good = np.ones(det.stack_shape, dtype=bool)
    spots = [(5, 123.3, 87.6, 1.1, 3000.0), (12, 40.8, 300.45, 1.5, 8000.0)]  # panel, ss, fs, sigma, photons
    yy, xx = np.mgrid[0:352, 0:384]
    for k, ss, fs, sig, n in spots:
        g = np.exp(-((yy - ss) ** 2 + (xx - fs) ** 2) / (2 * sig * sig))
        ev[k] += (n * g / g.sum()).astype(np.float32)
    good[5, 0:10, 0:10] = False  # a masked corner changes nothing here
    t = pf8.pf8_find(det, ev, good, pf8.Pf8Params(adc_threshold=20, minimum_snr=5, min_pixel_count=2))
    assert len(t) == 2
    t = np.sort(t, order="panel")
    for row, (k, ss, fs, _, n) in zip(t, spots):
        assert row["panel"] == k
        assert abs(row["ss"] - ss) < 0.2 and abs(row["fs"] - fs) < 0.2, (row, ss, fs)
        assert 0.6 * n < row["intensity"] < 1.1 * n
    xyz = det.lab_xyz(int(t["panel"][0]), t["fs"][0], t["ss"][0])
    assert (t["x_lab"][0], t["y_lab"][0]) == (pytest.approx(xyz[0]), pytest.approx(xyz[1]))


@needs_pf8
@needs_sim
def test_pf8_tuning_improves_f1_on_simulated_shots():
    det = builtin_detector("epix10k2m")
    rng = np.random.default_rng(5)
    cfg = LatticeConfig(hot_cluster_fraction=0.0, jet_fraction=0.0)  # the grid tunes no min_pixel_count
    shots = [simulate_shot(rng, det, cfg) for _ in range(2)]
    truth = [_truth_peaks(s)[:, :3] for s in shots]
    grid = {"adc_threshold": (5.0, 400.0), "minimum_snr": (4.0,)}
    best, trials = pf8.tune_pf8(shots, truth, grid, detector=det)
    assert len(trials) == 2 and best.adc_threshold == 5.0
    assert trials[0]["peak_f1"] > trials[1]["peak_f1"] and trials[0]["peak_f1"] > 0.5
