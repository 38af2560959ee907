"""Lattice-stills simulator: Bragg geometry checked independently, absences, determinism, labels, physics trends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from vitkit.apps.peaks.detector import builtin_detector
from vitkit.apps.peaks.lattice import (
    LatticeConfig,
    LatticeStillsDataset,
    _reflection_table,
    allowed_reflections,
    collate_lattice,
    normalize_space_group,
    simulate_shot,
)
from vitkit.errors import ConfigError

EPIX = builtin_detector("epix10k2m")
TRICLINIC = (40.0, 50.0, 60.0, 80.0, 95.0, 105.0)


# ------------------------------------------------------------------------------ independent crystallography
def metric_d(cell, hkl) -> np.ndarray:
    """d spacings from the reciprocal metric tensor G* = inv(G) of the direct cell."""
    a, b, c = cell[:3]
    ca, cb, cg = (math.cos(math.radians(x)) for x in cell[3:])
    g = np.array([[a * a, a * b * cg, a * c * cb], [a * b * cg, b * b, b * c * ca], [a * c * cb, b * c * ca, c * c]])
    gs = np.linalg.inv(g)
    h = np.asarray(hkl, dtype=np.float64)
    return 1.0 / np.sqrt(np.einsum("ni,ij,nj->n", h, gs, h))


def reciprocal_by_cross_products(cell) -> np.ndarray:
    """Columns a*, b*, c* = (b x c, c x a, a x b) / V of the direct vectors (a along x, b in the x-y plane)."""
    a, b, c = cell[:3]
    al, be, ga = (math.radians(x) for x in cell[3:])
    av = np.array([a, 0.0, 0.0])
    bv = np.array([b * math.cos(ga), b * math.sin(ga), 0.0])
    cx = c * math.cos(be)
    cy = c * (math.cos(al) - math.cos(be) * math.cos(ga)) / math.sin(ga)
    cv = np.array([cx, cy, math.sqrt(c * c - cx * cx - cy * cy)])
    vol = av @ np.cross(bv, cv)
    return np.stack([np.cross(bv, cv), np.cross(cv, av), np.cross(av, bv)], axis=1) / vol


def observed_angles(det, refl):
    """2 theta, azimuth and distance of each reported spot centre, through Detector.lab_xyz (CrystFEL route)."""
    xyz = np.stack([det.lab_xyz(int(p), f, s) for p, f, s in zip(refl["panel"], refl["fs"], refl["ss"])])
    tt = np.arctan2(np.hypot(xyz[:, 0], xyz[:, 1]), xyz[:, 2])
    return tt, np.arctan2(xyz[:, 1], xyz[:, 0]), np.linalg.norm(xyz, axis=1), np.hypot(xyz[:, 0], xyz[:, 1])


def exact_cfg(**kw) -> LatticeConfig:
    base = dict(bandwidth=(0.0, 0.0), divergence=0.0, mosaicity=(0.0, 0.0), streaky_fraction=0.0,
                domain_size=(600.0, 600.0), energy_jitter=0.0)
    base.update(kw)
    return LatticeConfig.noiseless(**base)


# ------------------------------------------------------------------------------------------- (1) geometry
@pytest.mark.parametrize("cell,group,seed", [(TRICLINIC, "P1", 3), ((79.1, 79.1, 37.9, 90, 90, 90), "P43212", 11)])
def test_spot_positions_match_braggs_law(cell, group, seed):
    cfg = exact_cfg(cell=cell, space_group=group, d_min=2.0)
    shot = simulate_shot(seed, EPIX, cfg)
    r = shot.reflections
    assert len(r) > 50
    hkl = np.stack([r["h"], r["k"], r["l"]], axis=1)
    d = metric_d(cell, hkl)
    np.testing.assert_allclose(r["d"], d, rtol=1e-9)
    assert d.min() >= 2.0 - 1e-9
    # the orientation the shot reports, with B built by cross products
    np.testing.assert_allclose(shot.a_star, shot.orientation @ reciprocal_by_cross_products(cell), atol=1e-12)
    np.testing.assert_allclose(shot.orientation @ shot.orientation.T, np.eye(3), atol=1e-12)
    s = hkl @ (shot.orientation @ reciprocal_by_cross_products(cell)).T
    lam = shot.wavelength * 1e10
    tt_bragg = 2 * np.arcsin(lam / (2 * d))  # lambda = 2 d sin(theta)
    phi_s = np.arctan2(s[:, 1], s[:, 0])  # k_out and s share their transverse part
    tt, phi, dist, rxy = observed_angles(EPIX, r)
    res = EPIX.panels[0].res
    radial_px = np.abs(tt - tt_bragg) * dist / np.cos(tt) * res  # flat panels facing the beam: dr = L / cos(2t) d2t
    dphi = np.angle(np.exp(1j * (phi - phi_s)))
    tangential_px = np.abs(dphi) * rxy * res
    assert radial_px.max() <= 0.5 and tangential_px.max() <= 0.5
    assert radial_px.max() < 1e-6 and tangential_px.max() < 1e-6  # exact: no bandwidth, no mosaic
    # Detector.two_theta: Bragg's angle lies within the 2 theta range of the 3 x 3 pixels around each spot
    for k in np.unique(r["panel"]):
        tmap = EPIX.two_theta(int(k))
        on = r["panel"] == k
        i, j = np.rint(r["ss"][on]).astype(int), np.rint(r["fs"][on]).astype(int)
        h, w = tmap.shape
        pad = np.pad(tmap, 1, mode="edge")
        win = np.stack([pad[i + 1 + di, j + 1 + dj] for di in (-1, 0, 1) for dj in (-1, 0, 1)])
        assert np.all((tt_bragg[on] >= win.min(0) - 1e-9) & (tt_bragg[on] <= win.max(0) + 1e-9))
    # the excited reflections sit on the Ewald sphere within the domain-size width
    k0 = 1 / lam
    dist_ewald = np.linalg.norm(s + np.array([0, 0, k0]), axis=1) - k0
    assert np.abs(dist_ewald).max() < 5 * 0.9 / (2.3548 * 600.0)


def test_spots_with_bandwidth_stay_in_the_band():
    bw = 4e-3
    cfg = exact_cfg(bandwidth=(bw, bw), domain_size=(1e7, 1e7), d_min=2.0)
    shot = simulate_shot(5, EPIX, cfg)
    r = shot.reflections
    assert len(r) > 100
    lam = shot.wavelength * 1e10
    tt, _, dist, _ = observed_angles(EPIX, r)
    sig = bw / 2.3548
    eps_max = math.sqrt(2 * math.log(1 / cfg.min_partiality)) * sig * 1.01
    tol = 0.5 / (dist * EPIX.panels[0].res) * np.cos(tt)  # 0.5 px in 2 theta
    lo = 2 * np.arcsin(lam * (1 - eps_max) / (2 * r["d"]))
    hi = 2 * np.arcsin(lam * (1 + eps_max) / (2 * r["d"]))
    assert np.all((tt >= lo - tol) & (tt <= hi + tol))
    # the spread is real: spots use wavelengths across the band, each at its exact Bragg wavelength
    lam_obs = 2 * r["d"] * np.sin(tt / 2)
    assert np.std(lam_obs / lam - 1) > 0.3 * sig
    hkl = np.stack([r["h"], r["k"], r["l"]], axis=1).astype(float)
    s = hkl @ (shot.orientation @ reciprocal_by_cross_products(cfg.cell)).T
    lam_ewald = -2 * s[:, 2] / np.einsum("ni,ni->n", s, s)  # |s + z / lam|^2 = 1 / lam^2
    radial_px = np.abs(2 * np.arcsin(lam_ewald / (2 * r["d"])) - tt) * dist / np.cos(tt) * EPIX.panels[0].res
    assert radial_px.max() < 0.5


# --------------------------------------------------------------------------------------------- (2) absences
def test_systematic_absences_p43212_and_centring():
    cell = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)
    for spelling in ("P43212", "P 43 21 2", "P4(3)2(1)2", "p4_32_12"):
        assert normalize_space_group(spelling) == "P43212"
    hkl = allowed_reflections(cell, "P4(3)2(1)2", 2.0)
    h, k, l = hkl.T  # noqa: E741
    axis_l = (h == 0) & (k == 0)
    axis_h = (k == 0) & (l == 0)
    axis_k = (h == 0) & (l == 0)
    assert not np.any(axis_l & (l % 4 != 0))
    assert not np.any(axis_h & (h % 2 != 0)) and not np.any(axis_k & (k % 2 != 0))
    present = {tuple(x) for x in hkl.tolist()}
    for ref in [(0, 0, 4), (0, 0, 8), (0, 0, -12), (2, 0, 0), (0, 4, 0), (1, 1, 0), (1, 2, 3), (-3, 1, 2)]:
        assert ref in present
    for ref in [(0, 0, 2), (0, 0, 6), (1, 0, 0), (0, 3, 0), (0, 0, 0)]:
        assert ref not in present
    p1 = allowed_reflections(cell, "P1", 2.0)
    assert len(p1) > len(hkl) and (0, 0, 1) in {tuple(x) for x in p1.tolist()}
    i_hkl = allowed_reflections(cell[:3] + (90.0, 90.0, 90.0), "I222", 3.0)
    assert np.all(i_hkl.sum(1) % 2 == 0)
    c_hkl = allowed_reflections((60.0, 40.0, 50.0, 90.0, 110.0, 90.0), "C2", 3.0)
    assert np.all((c_hkl[:, 0] + c_hkl[:, 1]) % 2 == 0)
    o_hkl = allowed_reflections((40.0, 50.0, 60.0, 90.0, 90.0, 90.0), "P212121", 3.0)
    for ax in range(3):
        others = [i for i in range(3) if i != ax]
        on = (o_hkl[:, others[0]] == 0) & (o_hkl[:, others[1]] == 0)
        assert on.any() and np.all(o_hkl[on, ax] % 2 == 0)
    # the simulator's predictions obey them too
    shot = simulate_shot(2, EPIX, exact_cfg(domain_size=(300.0, 300.0)))
    r = shot.reflections
    assert not np.any((r["h"] == 0) & (r["k"] == 0) & (r["l"] % 4 != 0))


# ------------------------------------------------------------------------------ (3) determinism and subsets
def test_deterministic_and_panel_subsets_are_consistent():
    full = simulate_shot(np.random.default_rng(21), EPIX)
    again = simulate_shot(np.random.default_rng(21), EPIX)
    np.testing.assert_array_equal(full.images, again.images)
    np.testing.assert_array_equal(full.reflections, again.reflections)
    other = simulate_shot(np.random.default_rng(22), EPIX)
    assert not np.array_equal(full.images, other.images)
    assert full.images.dtype == np.float32 and full.labels.dtype == np.uint8 and full.good.dtype == bool
    assert full.images.shape == full.labels.shape == full.good.shape == (16, 352, 384)
    sub = simulate_shot(np.random.default_rng(21), EPIX, panels=[5, 2])
    assert sub.images.shape == (2, 352, 384) and list(sub.panels) == [5, 2]
    for pos, k in enumerate((5, 2)):
        np.testing.assert_array_equal(sub.images[pos], full.images[k])
        np.testing.assert_array_equal(sub.labels[pos], full.labels[k])
        np.testing.assert_array_equal(sub.good[pos], full.good[k])
        np.testing.assert_array_equal(sub.peaks[pos], full.peaks[k])
        np.testing.assert_array_equal(np.sort(sub.reflections[sub.reflections["panel"] == k], order=["h", "k", "l"]),
                                      np.sort(full.reflections[full.reflections["panel"] == k], order=["h", "k", "l"]))
    assert set(sub.reflections["panel"].tolist()) <= {2, 5}
    per_shot = LatticeConfig(structure_seed=None)  # Wilson draws per shot: still independent of the subset
    full = simulate_shot(8, EPIX, per_shot)
    sub = simulate_shot(8, EPIX, per_shot, panels=[9])
    np.testing.assert_array_equal(sub.images[0], full.images[9])
    on9 = full.reflections[full.reflections["panel"] == 9]
    np.testing.assert_array_equal(sub.reflections["photons"], on9["photons"])


def test_dataset_items_depend_on_seed_and_index_only():
    ds = LatticeStillsDataset(6, EPIX, seed=4)
    a, b = ds[3], LatticeStillsDataset(6, EPIX, seed=4)[3]
    for key in ("image", "label", "good", "peaks"):
        assert torch.equal(a[key], b[key])
    assert a["panel"] == b["panel"] and isinstance(a["panel"], int)
    assert a["image"].shape == (1, 352, 384) and a["image"].dtype == torch.float32
    assert a["label"].shape == (352, 384) and a["label"].dtype == torch.int64
    assert a["good"].dtype == torch.bool and a["peaks"].ndim == 2 and a["peaks"].shape[1] == 3
    assert not torch.equal(ds[2]["image"], a["image"])
    batch = collate_lattice([ds[0], ds[1]])
    assert batch["image"].shape == (2, 1, 352, 384) and batch["panel"].shape == (2,) and len(batch["peaks"]) == 2
    multi = LatticeStillsDataset(2, EPIX, seed=4, panels_per_item=3)[0]
    assert multi["image"].shape == (3, 1, 352, 384) and multi["panel"].shape == (3,) and len(multi["peaks"]) == 3
    with pytest.raises(IndexError):
        ds[6]


# ------------------------------------------------------------------------------------------- (4) labels
def test_labels_avoid_bad_pixels_and_match_visible_reflections():
    cfg = LatticeConfig(hot_fraction=2e-3, hot_saturated_fraction=1.0, hot_unmasked_fraction=1.0,
                        dead_fraction=2e-3, max_adu=1e7, intensity_scale=(300.0, 3000.0))
    n_vis = n_merged = 0
    for seed in (1, 7):  # an ordinary and a streaky (mosaic) shot
        shot = simulate_shot(seed, EPIX, cfg)
        hot = shot.images == np.float32(1e7)
        inner = np.zeros_like(hot)
        inner[:, 1:-1, 1:-1] = True
        assert hot.any() and shot.good[hot & inner].mean() > 0.99  # hot pixels missing from the mask (bar the
        # few that are also dead, which the mask has)...
        assert not shot.labels[hot].any()  # ...still never carry a label
        assert not shot.labels[~shot.good].any()
        assert not shot.good[:, 0, :].any() and not shot.good[:, :, -1].any()  # panel edges masked
        vis = shot.visible
        n_vis += len(vis)
        for pos, k in enumerate(shot.panels):
            v = vis[vis["panel"] == k]
            i, j = np.rint(v["ss"]).astype(int), np.rint(v["fs"]).astype(int)
            assert shot.labels[pos][i, j].all()  # a label under every visible reflection
            comp, n = ndimage.label(shot.labels[pos], structure=np.ones((3, 3)))
            assert set(range(1, n + 1)) <= set(comp[i, j].tolist())  # a visible reflection in every component
            pk = shot.peaks[pos]
            assert len(pk) == (v["peak"].max() + 1 if len(v) else 0)
            n_merged += len(v) - len(pk)
            if len(pk) > 1:
                d = np.hypot(pk[:, None, 0] - pk[None, :, 0], pk[:, None, 1] - pk[None, :, 1])
                assert d[np.triu_indices(len(pk), 1)].min() >= cfg.min_separation * 0.5
            np.testing.assert_allclose(pk[:, 2].sum(), v["photons"].sum(), rtol=1e-5)
        assert len(vis) < len(shot.reflections)  # weak reflections exist and are not labelled
    assert n_vis > 100


# ---------------------------------------------------------------------------------- (5) Wilson fall-off
def test_intensities_fall_with_resolution():
    cfg = LatticeConfig.noiseless(wilson_b=(30.0, 30.0), intensity_scale=(2000.0, 2000.0))
    low, high, full_low, full_high = [], [], [], []
    for seed in range(3):
        r = simulate_shot(seed, EPIX, cfg, panels=list(range(0, 16, 2))).reflections
        v = r[r["visible"]]
        low += v["photons"][v["d"] > 4.0].tolist()
        high += v["photons"][v["d"] < 2.5].tolist()
        full_low += r["intensity"][r["d"] > 4.0].tolist()
        full_high += r["intensity"][r["d"] < 2.5].tolist()
    assert len(low) > 10 and len(high) > 10
    assert np.mean(low) > 3 * np.mean(high)
    # Wilson: <I(d)> = scale exp(-B / (2 d^2)); between d ~ 5 and ~ 2.2 A that is a factor of > 10
    assert np.mean(full_low) > 10 * np.mean(full_high)


def test_wilson_draws_are_equal_for_symmetry_mates():
    cell = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)
    hkl, _, x, _ = _reflection_table(cell, "P43212", 4.0, 0)
    value = {tuple(h): v for h, v in zip(hkl.tolist(), x)}
    for (h, k, l), v in list(value.items())[:400]:  # noqa: E741
        for mate in [(-h, -k, -l), (-k, h, l), (k, h, -l), (h, -k, -l), (-h, -k, l)]:  # Friedel and 4/mmm
            assert value[mate] == v
    assert len(set(x.tolist())) > len(x) / 20  # yet many distinct intensities (16 mates per general hkl)
    h1 = _reflection_table((40.0, 50.0, 60.0, 80.0, 95.0, 105.0), "P1", 4.0, 1)
    v1 = {tuple(h): v for h, v in zip(h1[0].tolist(), h1[2])}
    assert all(v1[(-h, -k, -l)] == v for (h, k, l), v in v1.items())  # noqa: E741
    assert v1[(1, 2, 3)] != v1[(3, 2, 1)]


# -------------------------------------------------------------------------------------------- (6) water
def test_water_ring_is_where_water_scatters():
    cfg = LatticeConfig(water_amplitude=(3.0, 3.0), water_ring_d=(3.15, 3.15), intensity_scale=(1e-3, 1e-3),
                        air_amplitude=(0.3, 0.3), background=(0.1, 0.1), hot_fraction=0.0)  # means: no hot pixels
    shot = simulate_shot(0, EPIX, cfg)
    lam = shot.wavelength * 1e10
    half = 0.09 / 2
    checked = {"inner": 0, "outer": 0}
    for pos, k in enumerate(shot.panels):
        s = 2 * np.sin(EPIX.two_theta(int(k)) / 2) / lam  # 1/d of each pixel
        dev = s - 1 / 3.15
        good = shot.good[pos]
        ring = good & (np.abs(dev) < 0.4 * half)
        if ring.sum() < 300:
            continue
        img = shot.images[pos]  # one panel: one gain and pedestal
        for side, band in (("inner", good & (dev < -2.0 * half)), ("outer", good & (dev > 2.0 * half))):
            if band.sum() >= 300:
                assert img[ring].mean() > 1.5 * img[band].mean(), (k, side)
                checked[side] += 1
    assert min(checked.values()) >= 2, checked


def test_jet_streak_is_a_line_through_the_beam_and_never_a_peak():
    """A jet streak at azimuth 30 deg: pixels within 1 px of the lab line through the beam read brighter than
    pixels 6-20 px beside it at the same scattering angle, on every panel the line crosses; no label sits there
    unless a reflection does; without the streak (jet_fraction=0) the same pixels show no excess."""
    kw = dict(water_amplitude=(0.01, 0.01), air_amplitude=(0.01, 0.01), background=(0.05, 0.05),
              intensity_scale=(1e-3, 1e-3), hot_fraction=0.0, dead_fraction=0.0, jet_amplitude=(20.0, 20.0),
              jet_width=(1.0, 1.0), jet_azimuth=30.0, jet_azimuth_jitter=0.0)
    on = simulate_shot(5, EPIX, LatticeConfig(jet_fraction=1.0, **kw))
    off = simulate_shot(5, EPIX, LatticeConfig(jet_fraction=0.0, **kw))
    assert on.params["jet_amplitude"] == 20.0 and off.params["jet_amplitude"] == 0.0
    phi = math.radians(30.0)
    crossed = 0
    for pos, k in enumerate(on.panels):
        xyz = EPIX.pixel_xyz(int(k))
        d_px = np.abs(xyz[..., 0] * math.sin(phi) - xyz[..., 1] * math.cos(phi)) * EPIX.panels[int(k)].res
        r_px = np.hypot(xyz[..., 0], xyz[..., 1]) * EPIX.panels[int(k)].res
        inner = on.good[pos] & (r_px < 600)
        near, beside = (d_px < 1.0) & inner, (d_px > 6) & (d_px < 20) & inner
        if near.sum() < 40:
            continue
        crossed += 1
        assert on.images[pos][near].mean() > 3.0 * on.images[pos][beside].mean() + 1.0, k
        assert abs(off.images[pos][near].mean() - off.images[pos][beside].mean()) < 0.3, k
        assert on.labels[pos][near].sum() == 0
    assert crossed >= 2


def test_hot_clusters_are_adjacent_and_masked_together():
    """With every hot defect a cluster, bad pixels come in 4-connected groups of 2-4 (single pixels only where a
    cluster was clipped at the border or two defects touch), each group wholly masked or wholly missed, and they
    read hot; the fixed defect map (defect_seed) is the same in every shot."""
    cfg = LatticeConfig(hot_fraction=2e-4, hot_cluster_fraction=1.0, hot_unmasked_fraction=0.5, dead_fraction=0.0,
                        defect_seed=3, edge_width=0, intensity_scale=(1e-3, 1e-3), jet_fraction=0.0)
    a, b = simulate_shot(1, EPIX, cfg, panels=[0, 1]), simulate_shot(2, EPIX, cfg, panels=[0, 1])
    np.testing.assert_array_equal(a.good, b.good)
    sizes, mixed = [], 0
    for pos in range(2):
        hot = a.images[pos] > 0.2 * 0.3 * 1e4 - 1  # hot levels: >= 0.3 x 0.2 x max_adu
        comp, n = ndimage.label(hot)
        for i in range(1, n + 1):
            pix = comp == i
            sizes.append(int(pix.sum()))
            masked = ~a.good[pos][pix]
            mixed += int(masked.any() and not masked.all())
    sizes = np.array(sizes)
    assert len(sizes) >= 20 and mixed == 0
    assert ((sizes >= 2) & (sizes <= 4)).mean() > 0.9, np.bincount(sizes)
    assert 0.3 < np.mean([(~a.good[pos] & (a.images[pos] > 1000)).sum() / max((a.images[pos] > 1000).sum(), 1)
                          for pos in range(2)]) < 0.7


# ------------------------------------------------------------------------------------------- (7) config
def test_config_validation_errors():
    with pytest.raises(ConfigError, match="P43212"):
        LatticeConfig(space_group="P6122")
    with pytest.raises(ConfigError, match="tetragonal"):
        LatticeConfig(cell=(79.1, 70.0, 37.9, 90, 90, 90))
    with pytest.raises(ConfigError, match="orthorhombic"):
        LatticeConfig(cell=(40, 50, 60, 90, 95, 90), space_group="P212121")
    with pytest.raises(ConfigError, match="cell"):
        LatticeConfig(cell=(10, 10, 10, 10, 10, 170), space_group="P1")
    with pytest.raises(ConfigError, match="d_min"):
        LatticeConfig(d_min=0.0)
    with pytest.raises(ConfigError, match="mosaicity"):
        LatticeConfig(mosaicity=(0.5, 0.1))
    with pytest.raises(ConfigError, match="psf"):
        LatticeConfig(psf=(0.0, 1.0))
    with pytest.raises(ConfigError, match="hot_unmasked_fraction"):
        LatticeConfig(hot_unmasked_fraction=1.5)
    with pytest.raises(ConfigError, match="shot_noise"):
        LatticeConfig(shot_noise="exact")
    with pytest.raises(ConfigError, match="oversample"):
        LatticeConfig(oversample=0)
    with pytest.raises(ConfigError, match="jet_fraction"):
        LatticeConfig(jet_fraction=2.0)
    with pytest.raises(ConfigError, match="jet_width"):
        LatticeConfig(jet_width=(0.0, 1.0))
    with pytest.raises(ConfigError, match="hot_cluster_fraction"):
        LatticeConfig(hot_cluster_fraction=-0.1)
    with pytest.raises(ConfigError, match="photon energy"):
        simulate_shot(0, EPIX.replace(photon_energy=None))
    with pytest.raises(ConfigError, match="panels"):
        simulate_shot(0, EPIX, panels=[16])
    with pytest.raises(ConfigError, match="panels_per_item"):
        LatticeStillsDataset(4, EPIX, panels_per_item=17)
    assert LatticeConfig(space_group="P 21 21 21", cell=(40, 50, 60, 90, 90, 90)).replace(d_min=3.0).d_min == 3.0


def test_hard_negative_crops_are_centred_on_bright_background():
    """negative_bias=1: every training crop holds the one bright valid non-peak blob in its middle half (the crop
    centre is jittered within it); negative_bias=0 with uniform crops mostly misses it."""
    from vitkit.apps.peaks.datamodule import CropDataset

    img = np.random.default_rng(0).normal(0, 1, (352, 384)).astype(np.float32)
    img[200:202, 300:302] = 5000.0  # an unmasked hot cluster: bright, valid, label 0
    item = {"image": img, "label": np.zeros((352, 384), dtype=np.int64), "good": np.ones((352, 384), bool),
            "peaks": np.zeros((0, 3), np.float32)}
    source = [item] * 64

    def hits(bias):
        ds = CropDataset(source, (64, 64), sigma=0.33, seed=1, uniform=True, negative_bias=bias)
        return sum(bool((ds[i]["image"][0] > 5).any()) for i in range(64))

    assert hits(1.0) == 64
    assert hits(0.0) < 16
