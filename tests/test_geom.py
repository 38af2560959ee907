"""CrystFEL geometry files: reading (strict, line-numbered errors), writing, round trips, the ``detector`` CLI,
drawing, and lab-frame assembly of the built-in layouts."""

from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np
import pytest

from vitkit.apps.peaks.detector import (
    BadRegion,
    Detector,
    GeometryError,
    Panel,
    builtin_detector,
    load_detector,
    photon_energy_to_wavelength,
)
from vitkit.apps.peaks.geom import GeometryWarning, format_geom, parse_geom, read_geom, write_geom

BUILTINS = ["epix10k2m", "jungfrau4m", "cspad", "single", "single:512x1024"]


def _strip(det: Detector) -> Detector:
    return dataclasses.replace(det, source=None, name=None)


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("layout", ["slab", "stack"])
@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_round_trip(tmp_path, name, layout):
    det = builtin_detector(name)
    path = write_geom(det, tmp_path / "det.geom", layout=layout)
    back = read_geom(path)
    assert back.source == str(path) and back.name == "det"
    for f in dataclasses.fields(Detector):
        if f.name not in ("source", "name"):
            assert getattr(back, f.name) == getattr(det, f.name), f.name
    assert _strip(back) == _strip(det)
    assert back.slab_shape == det.slab_shape and back.stack_shape == det.stack_shape
    # the text is a fixed point: writing what was read gives the same file
    assert format_geom(read_geom(write_geom(back, tmp_path / "again.geom", layout=layout)), layout) \
        == format_geom(dataclasses.replace(back, name="again", source=str(tmp_path / "again.geom")), layout)
    text = path.read_text()
    assert not re.search(r"[0-9][eE][+-]?[0-9]", text)  # no exponents (CrystFEL's vector parser rejects them)
    if layout == "stack":
        assert f"{det.panels[-1].name}/dim1 = {len(det.panels) - 1}" in text
        assert "\ndim1 = ss" not in text
    else:
        assert "\ndim1 = ss\ndim2 = fs\n" in text


def test_round_trip_keeps_optional_fields(tmp_path):
    base = builtin_detector("single:64x128")
    p = base.panels[0].replace(coffset=0.0015, adu_per_photon=2.5, max_adu=16000.0, no_index=True,
                               fs=(-0.0021, 0.9999, 0.0), ss=(-0.9999, -0.0021, 0.001), res=1.0 / 3e-5)
    det = base.replace(panels=[p], mask="/entry_1/data_1/mask", mask_file="mask.h5", mask_good=0x1, mask_bad=0xFE,
                       bad_regions=[BadRegion("badedge", panel="p0", min_fs=0, max_fs=127, min_ss=0, max_ss=1),
                                    BadRegion("badstop", min_x=-3.25, max_x=3.25, min_y=-1e-3, max_y=2.0)],
                       rigid_groups={"all": ["p0"]}, photon_energy=12398.419843320026 / 1.1)
    for layout in ("slab", "stack"):
        back = read_geom(write_geom(det, tmp_path / f"{layout}.geom", layout=layout))
        assert _strip(back) == _strip(det)


def test_data_locations_round_trip(tmp_path):
    det = builtin_detector("single:64x64").replace(clen=None, clen_from="/LCLS/detector_1/EncoderValue mm",
                                                   photon_energy=None, photon_energy_from="/LCLS/photon_energy_eV")
    back = read_geom(write_geom(det, tmp_path / "d.geom"))
    assert back.clen is None and back.clen_from == "/LCLS/detector_1/EncoderValue mm"
    assert back.photon_energy is None and back.photon_energy_from == "/LCLS/photon_energy_eV"
    assert _strip(back) == _strip(det)


def test_per_panel_clen_is_written_as_coffset(tmp_path):
    det = builtin_detector("single:64x64")
    det.panels[0] = det.panels[0].replace(clen=0.125, coffset=0.001)
    text = format_geom(det)
    assert "p0/clen" not in text  # CrystFEL >= 0.10 rejects a per-panel clen
    assert float(re.search(r"p0/coffset = (\S+)", text).group(1)) == pytest.approx(0.026, abs=1e-15)
    back = read_geom(write_geom(det, tmp_path / "d.geom"))
    np.testing.assert_allclose(back.pixel_xyz(0), det.pixel_xyz(0), rtol=0, atol=1e-15)


def test_writer_rejects_what_crystfel_would_reject():
    det = builtin_detector("single:64x64")
    with pytest.raises(GeometryError, match="no stack index"):
        format_geom(det.replace(panels=[det.panels[0].replace(index=None)]), layout="stack")
    with pytest.raises(GeometryError, match="mask_good/mask_bad"):
        format_geom(det.replace(mask_bad=1))
    with pytest.raises(GeometryError, match="reserves"):
        format_geom(det.replace(panels=[det.panels[0].replace(name="bad0")]))
    with pytest.raises(GeometryError, match="layout"):
        format_geom(det, layout="tiles")


# ---------------------------------------------------------------------------------- a realistic file
REALISTIC = """\
; Hand-written CrystFEL geometry: two quadrants of two CSPAD-like 2x1 sections
; (written for vitkit's tests; values are plausible, not a metrology)
# a hash comment line

wavelength = 1.3 A              ; instead of photon_energy
clen = 95.5 mm
adu_per_eV = 0.0042             ; -> adu_per_photon = 0.0042 * photon energy
res = 9097.525473071324         ; 109.92 um
data = /entry_1/data_1/data
mask = /entry_1/data_1/mask
mask_file = /reg/d/psdm/cxi/mask.h5
mask_good = 0x0000
mask_bad = 0x00ff
dim0 = %
dim1 = ss
dim2 = fs
bandwidth = 1.0e-3              ; accepted, not used
peak_list = /entry_1/result_1

q0a0/min_fs = 0
q0a0/max_fs = 387
q0a0/min_ss = 0
q0a0/max_ss = 184
q0a0/fs = -0.0021x +0.9999y
q0a0/ss = -0.9999x -0.0021y
q0a0/corner_x = 443.819
q0a0/corner_y = -49.4362
q0a0/no_index = 0

coffset = 0.00125               ; a default for the panels defined below, not for q0a0
res = 10000

q0a1/min_fs = 0
q0a1/max_fs = 387
q0a1/min_ss = 185
q0a1/max_ss = 369
q0a1/fs = x
q0a1/ss = -y
q0a1/corner_x = 10.5
q0a1/corner_y = -250

q1a0/min_fs = 0
q1a0/max_fs = 387
q1a0/min_ss = 370
q1a0/max_ss = 554
q1a0/fs = +1.0x +0.0y +0.0z
q1a0/ss = +0.0x +1.0y
q1a0/corner_x = -420.25
q1a0/corner_y = 15
q1a0/res = 9097.525473071324
q1a0/adu_per_photon = 2.5
q1a0/max_adu = 15000
q1a0/no_index = true

q1a1/max_ss = 739               ; keys of a panel may come in any order
q1a1/min_ss = 555
q1a1/min_fs = 0
q1a1/max_fs = 387
q1a1/fs = -1.0x
q1a1/ss = -1.0y
q1a1/corner_x = -30
q1a1/corner_y = -200
q1a1/coffset = -0.0005

badq0edge/min_fs = 0
badq0edge/max_fs = 387
badq0edge/min_ss = 0
badq0edge/max_ss = 3
badq0edge/panel = q0a0

badbeamstop/min_x = -20.5
badbeamstop/max_x = 20.5
badbeamstop/min_y = -10
badbeamstop/max_y = 10

rigid_group_q0 = q0a0,q0a1
rigid_group_q1 = q1a0, q1a1
rigid_group_collection_quadrants = q0,q1
"""


def test_realistic_file(tmp_path):
    path = tmp_path / "cspad-2quads.geom"
    path.write_text(REALISTIC)
    det = read_geom(path)
    energy = 1.239841984e-6 / 1.3e-10
    assert det.name == "cspad-2quads" and det.source == str(path)
    assert det.photon_energy == pytest.approx(energy, rel=1e-12)
    assert photon_energy_to_wavelength(det.photon_energy) == pytest.approx(1.3e-10, rel=1e-12)
    assert det.clen == pytest.approx(0.0955, rel=1e-15)
    assert det.adu_per_photon == pytest.approx(0.0042 * energy, rel=1e-12)
    assert (det.data, det.mask, det.mask_file) == ("/entry_1/data_1/data", "/entry_1/data_1/mask",
                                                   "/reg/d/psdm/cxi/mask.h5")
    assert (det.mask_good, det.mask_bad) == (0, 255)
    assert det.panel_names == ["q0a0", "q0a1", "q1a0", "q1a1"]
    a, b, c, d = det.panels
    assert a.fs == (-0.0021, 0.9999, 0.0) and a.ss == (-0.9999, -0.0021, 0.0)
    assert (a.corner_x, a.corner_y) == (443.819, -49.4362)
    assert a.res == 9097.525473071324 and a.coffset == 0.0 and a.no_index is False  # before the defaults
    assert b.res == 10000.0 and b.coffset == 0.00125  # the global defaults above it
    assert b.fs == (1.0, 0.0, 0.0) and b.ss == (0.0, -1.0, 0.0)
    assert c.res == 9097.525473071324 and c.coffset == 0.00125 and c.adu_per_photon == 2.5
    assert c.max_adu == 15000.0 and c.no_index is True
    assert d.fs == (-1.0, 0.0, 0.0) and d.ss == (0.0, -1.0, 0.0) and d.coffset == -0.0005 and d.res == 10000.0
    assert a.adu_per_photon is None and d.adu_per_photon is None  # the detector's
    assert [(p.min_ss, p.max_ss, p.min_fs, p.max_fs) for p in det.panels] == [
        (0, 184, 0, 387), (185, 369, 0, 387), (370, 554, 0, 387), (555, 739, 0, 387)]
    assert [p.index for p in det.panels] == [0, 1, 2, 3]  # one shape: stack order = order in the file
    assert det.slab_shape == (740, 388) and det.stack_shape == (4, 185, 388)
    assert det.bad_regions == [
        BadRegion("badq0edge", panel="q0a0", min_fs=0, max_fs=387, min_ss=0, max_ss=3),
        BadRegion("badbeamstop", min_x=-20.5, max_x=20.5, min_y=-10.0, max_y=10.0)]
    assert det.rigid_groups == {"q0": ["q0a0", "q0a1"], "q1": ["q1a0", "q1a1"]}
    assert det.rigid_group_collections == {"quadrants": ["q0", "q1"]}
    # lab frame of a tilted panel: corner + (fs + 1/2) fs_vec + (ss + 1/2) ss_vec, in metres
    xyz = det.lab_xyz("q0a0", 10, 20)
    want = (np.array([443.819, -49.4362, 0.0]) + 10.5 * np.array(a.fs) + 20.5 * np.array(a.ss)) / a.res
    np.testing.assert_allclose(xyz[:2], want[:2], rtol=1e-14)
    assert xyz[2] == pytest.approx(0.0955)
    # written and read back: the same detector
    back = read_geom(write_geom(det, tmp_path / "back.geom"))
    assert _strip(back) == _strip(det)


def test_group_hierarchy_and_legacy_rigid_group():
    text = _base() + ["group_top = all", "group_ab = a,b", "group_all = ab", "a/rigid_group = old"]
    det = parse_geom("\n".join(text))
    assert det.rigid_groups == {"old": ["a"], "ab": ["a", "b"]}
    assert det.rigid_group_collections == {"all": ["ab"], "top": ["all"]}  # CrystFEL >= 0.10 nests groups


def test_units_and_locations():
    text = "\n".join(_base()).replace("photon_energy = 9500", "photon_energy = 9.5 keV").replace(
        "clen = 0.1", "clen = /LCLS/detector_1/EncoderValue")
    det = parse_geom(text)
    assert det.photon_energy == 9500.0
    assert det.clen is None and det.clen_from == "/LCLS/detector_1/EncoderValue"
    with pytest.raises(GeometryError, match="no camera length"):
        det.pixel_xyz(0)  # clen is read per event from the data: vitkit needs it set
    assert det.replace(clen=0.12).pixel_xyz(0)[0, 0, 2] == pytest.approx(0.12)


def test_stack_file_extra_geom_style():
    """extra-geom writes panel stacks with every dim per panel; ASICs of one module share its index."""
    lines = ["photon_energy = 9000", "clen = 0.2", "res = 5000", "dim0 = %", ""]
    for m in range(2):
        for a in range(2):
            n = f"m{m}a{a}"
            lines += [f"{n}/dim1 = {m}", f"{n}/dim2 = ss", f"{n}/dim3 = fs", f"{n}/min_fs = 0", f"{n}/max_fs = 31",
                      f"{n}/min_ss = {16 * a}", f"{n}/max_ss = {16 * a + 15}", f"{n}/fs = +1x", f"{n}/ss = +1y",
                      f"{n}/corner_x = {40 * m}", f"{n}/corner_y = {18 * a}", ""]
    lines += ["badm1a1x/min_fs = 3", "badm1a1x/max_fs = 4", "badm1a1x/min_ss = 20", "badm1a1x/max_ss = 21",
              "badm1a1x/panel = m1a1"]
    det = parse_geom("\n".join(lines))
    assert [p.index for p in det.panels] == [0, 0, 1, 1]
    # module-relative ss ranges, re-derived as a slab of modules stacked along ss in index order
    assert [(p.min_ss, p.max_ss) for p in det.panels] == [(0, 15), (16, 31), (32, 47), (48, 63)]
    assert det.slab_shape == (64, 32)
    assert det.bad_regions[0] == BadRegion("badm1a1x", panel="m1a1", min_fs=3, max_fs=4, min_ss=52, max_ss=53)
    slab = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    np.testing.assert_array_equal(det.to_slab(det.to_panels(slab)[0]), slab)
    # the same layout written back as a stack: module-relative again
    text = format_geom(det, layout="stack")
    assert "m1a1/dim1 = 1\n" in text and "m1a1/min_ss = 16\n" in text and "badm1a1x/min_ss = 20\n" in text
    assert _strip(parse_geom(text)) == _strip(det)
    # panels of different modules may share slab rows; panels of one module may not
    bad = "\n".join(lines).replace("m1a1/min_ss = 16", "m1a1/min_ss = 15")
    with pytest.raises(GeometryError, match="overlaps panel m1a0 .* in module 1 of the stack"):
        parse_geom(bad)


# ------------------------------------------------------------------------------------------ malformed
def _base() -> list[str]:
    return [
        "photon_energy = 9500",  # 1
        "clen = 0.1",  # 2
        "res = 10000",  # 3
        "dim0 = %",  # 4
        "dim1 = ss",  # 5
        "dim2 = fs",  # 6
        "",  # 7
        "a/min_fs = 0",  # 8
        "a/max_fs = 63",  # 9
        "a/min_ss = 0",  # 10
        "a/max_ss = 31",  # 11
        "a/fs = +1.0x +0.0y",  # 12
        "a/ss = +0.0x +1.0y",  # 13
        "a/corner_x = -64",  # 14
        "a/corner_y = -16",  # 15
        "",  # 16
        "b/min_fs = 0",  # 17
        "b/max_fs = 63",  # 18
        "b/min_ss = 32",  # 19
        "b/max_ss = 63",  # 20
        "b/fs = +1.0x +0.0y",  # 21
        "b/ss = +0.0x +1.0y",  # 22
        "b/corner_x = 2",  # 23
        "b/corner_y = -16",  # 24
    ]


def _edit(line: int, text: str) -> list[str]:
    lines = _base()
    if line > len(lines):
        lines += [""] * (line - len(lines))
    lines[line - 1] = text
    return lines


MALFORMED = [
    # (line to replace, new text, line the error names, message part)
    pytest.param(18, "; b/max_fs removed", 17, "panel b has no max_fs", id="missing-max_fs"),
    pytest.param(10, "; a/min_ss removed", 8, "panel a has no min_ss", id="missing-min_ss"),
    pytest.param(19, "b/min_ss = 31", 17, "panel b .* overlaps panel a \\(line 8", id="overlap"),
    pytest.param(16, "a/colour = blue", 16, "unknown panel key a/colour", id="unknown-panel-key"),
    pytest.param(7, "frobnicate = 3", 7, "unknown key 'frobnicate'", id="unknown-global-key"),
    pytest.param(12, "a/fs = banana", 12, "a/fs = banana: bad vector", id="banana-vector"),
    pytest.param(14, "a/corner_x = banana", 14, "expected a number, found 'banana'", id="banana-number"),
    pytest.param(9, "a/max_fs = 63.5", 9, "expected an integer", id="float-index"),
    pytest.param(22, "b/ss = +0.0x +1.0q", 22, "bad vector", id="bad-axis"),
    pytest.param(22, "b/ss = 1.0x 2.0y", 22, "bad vector", id="unsigned-second-term"),
    pytest.param(22, "b/ss = +1.0x +1.0x", 22, "given twice", id="repeated-axis"),
    pytest.param(22, "b/ss = +0.0x +0.0y", 22, "non-zero", id="zero-vector"),
    pytest.param(22, "b/ss = +2.0x +0.0y", 22, "parallel", id="parallel-fs-ss"),
    pytest.param(20, "b/max_ss = 30", 20, "max_ss = 30 is below min_ss = 32", id="max-below-min"),
    pytest.param(3, "res = 0", 3, "expected a positive number", id="zero-res"),
    pytest.param(16, "a/max_fs = 62", 16, "set again \\(first on line 9\\)", id="key-twice"),
    pytest.param(25, "coffset = 0.1", 25, "applies to no panel", id="trailing-global"),
    pytest.param(25, "rigid_group_g = a,c", 25, "no panel named 'c'", id="unknown-group-member"),
    pytest.param(25, "rigid_group_collection_all = g", 25, "no rigid group named 'g'", id="unknown-collection-member"),
    pytest.param(2, "clen = 0.1 furlongs", 2, "length unit", id="bad-unit"),
    pytest.param(1, "wavelength = 1.3", 1, "needs a unit", id="wavelength-without-unit"),
    pytest.param(16, "a/min_fs", 16, "expected 'key = value'", id="no-equals"),
    pytest.param(16, "group0/min_fs = 0", 16, "must not start with 'group'", id="reserved-name"),
    pytest.param(25, "badx/min_fs = 0", 25, "give badx/panel", id="bad-region-without-panel"),
    pytest.param(6, "dim2 = ss", 6, "exactly one 'ss' and one 'fs'", id="bad-dims"),
]


@pytest.mark.parametrize("line,text,err_line,message", MALFORMED)
def test_malformed_names_the_line(tmp_path, line, text, err_line, message):
    lines = _edit(line, text)
    if text.startswith("badx/"):
        lines += ["badx/max_fs = 1", "badx/min_ss = 0", "badx/max_ss = 1"]
    path = tmp_path / "broken.geom"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(GeometryError, match=message) as e:
        read_geom(path)
    assert f"{path}:{err_line}: " in str(e.value)


def test_more_malformed_bad_regions():
    mixed = _base() + ["badx/min_fs = 0", "badx/min_x = 1"]
    with pytest.raises(GeometryError, match="<string>:26: .*not both"):
        parse_geom("\n".join(mixed))
    outside = _base() + ["badx/min_fs = 0", "badx/max_fs = 64", "badx/min_ss = 0", "badx/max_ss = 1",
                         "badx/panel = a"]
    with pytest.raises(GeometryError, match="<string>:25: bad region badx .* is outside panel a"):
        parse_geom("\n".join(outside))
    with pytest.raises(GeometryError, match="mine.geom: no panels"):
        parse_geom("clen = 0.1\n", source="mine.geom")


def test_non_strict_warns_and_ignores(tmp_path):
    path = tmp_path / "lenient.geom"
    path.write_text("\n".join(_edit(16, "a/colour = blue") + ["frobnicate = 1"]) + "\n")
    with pytest.raises(GeometryError):
        read_geom(path)
    with pytest.warns(GeometryWarning) as rec:
        det = read_geom(path, strict=False)
    messages = [str(w.message) for w in rec]
    assert any(f"{path}:16: unknown panel key a/colour" in m for m in messages)
    assert any(f"{path}:25: unknown key 'frobnicate'" in m for m in messages)
    assert det.panel_names == ["a", "b"]
    # malformed values stay errors in non-strict mode
    path.write_text("\n".join(_edit(12, "a/fs = banana")) + "\n")
    with pytest.raises(GeometryError, match=":12: "):
        read_geom(path, strict=False)


def test_ignored_keys():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_geom("\n".join(["bandwidth = 1e-3", "peak_list_type = cxi"] + _base()))
    with pytest.warns(GeometryWarning, match="<string>:1: 'detector_shift_x' is accepted but not used"):
        parse_geom("\n".join(["detector_shift_x = /LCLS/shift mm"] + _base()))


def test_missing_file_and_load_detector(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.geom"):
        read_geom(tmp_path / "nothere.geom")
    path = tmp_path / "two.geom"
    path.write_text("\n".join(_base()) + "\n")
    det = load_detector(str(path))
    assert det.panel_names == ["a", "b"] and det.name == "two"


# --------------------------------------------------------------------------- an independent reader
@pytest.mark.parametrize("name", ["epix10k2m", "cspad"])
def test_pixel_maps_match_cfelpyutils(tmp_path, name):
    """cfelpyutils (CFEL's reference reader) reads our file; its pixel maps equal Detector.pixel_xyz.

    Conventions: cfelpyutils' maps (``compute_pix_maps``) give ``corner + fs * fs_vec + ss * ss_vec`` at integer
    ``fs, ss``, i.e. the *corner* of each pixel, in pixels, stored as float32. ``Detector.pixel_xyz`` gives the
    pixel *centre* (``fs + 1/2, ss + 1/2``) in metres. So we compare ``pixel_xyz * res`` with the cfelpyutils
    value plus half a pixel along fs and ss: within 1e-6 pixel when computed in float64 from the values
    cfelpyutils parsed, within float32 rounding (1e-4 pixel at ~800 pixels) for its float32 maps.
    """
    geometry = pytest.importorskip("cfelpyutils.geometry")
    det = builtin_detector(name)
    path = write_geom(det, tmp_path / f"{name}.geom")
    geo = geometry.load_crystfel_geometry(str(path))
    cd = geo.detector
    assert list(cd["panels"]) == det.panel_names
    assert geo.beam["photon_energy"] == det.photon_energy
    maps = geometry.compute_pix_maps(cd)
    assert maps.x.shape == det.slab_shape
    for k, p in enumerate(det.panels):
        cp = cd["panels"][p.name]
        assert (cp["orig_min_fs"], cp["orig_max_fs"], cp["orig_min_ss"], cp["orig_max_ss"]) == \
               (p.min_fs, p.max_fs, p.min_ss, p.max_ss)
        assert cp["res"] == p.res and cp["clen"] == det.clen
        ours = det.pixel_xyz(k) * p.res  # pixel centres, lab pixels
        h, w = p.shape
        ss, fs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
        half_x, half_y = 0.5 * (cp["fsx"] + cp["ssx"]), 0.5 * (cp["fsy"] + cp["ssy"])
        x64 = cp["cnx"] + fs * cp["fsx"] + ss * cp["ssx"] + half_x  # corner convention + half pixel
        y64 = cp["cny"] + fs * cp["fsy"] + ss * cp["ssy"] + half_y
        np.testing.assert_allclose(ours[..., 0], x64, rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours[..., 1], y64, rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours[..., 0], maps.x[p.slab_slice] + half_x, rtol=0, atol=1e-4)
        np.testing.assert_allclose(ours[..., 1], maps.y[p.slab_slice] + half_y, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ assembly, layouts
@pytest.mark.parametrize("name", ["epix10k2m", "jungfrau4m", "cspad", "single:512x1024"])
def test_assemble_places_every_panel(name):
    det = builtin_detector(name)
    stack = np.stack([np.full(p.shape, k + 1.0, dtype=np.float32) for k, p in enumerate(det.panels)])
    img, (x0, y0, step) = det.assemble(stack)
    values, counts = np.unique(img[np.isfinite(img)], return_counts=True)
    assert list(values) == [k + 1.0 for k in range(len(det.panels))]
    h, w = det.panel_shape
    np.testing.assert_allclose(counts, h * w, rtol=0.03)  # nearest-pixel rendering; no panel hides another
    # the beam centre of each panel maps back to the lab origin
    for k in range(len(det.panels)):
        fs, ss = det.beam_center(k)
        np.testing.assert_allclose(det.lab_xyz(k, fs, ss)[:2], 0.0, atol=1e-12)


@pytest.mark.parametrize("name", ["epix10k2m", "cspad", "single:64x96"])
def test_to_panels_and_to_slab_are_inverse(name):
    det = builtin_detector(name)
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(2, *det.stack_shape)).astype(np.float32)
    slab = det.to_slab(stack)
    assert slab.shape == (2, *det.slab_shape)
    np.testing.assert_array_equal(det.to_panels(slab), stack)
    np.testing.assert_array_equal(det.to_slab(det.to_panels(slab)), slab)
    np.testing.assert_array_equal(det.to_panels(stack[0])[0], stack[0])


# ------------------------------------------------------------------------------------- drawing and CLI
def test_draw_detector_with_image_and_peaks(tmp_path):
    from PIL import Image

    from vitkit.apps.peaks.draw import draw_detector
    from vitkit.errors import InputError

    det = builtin_detector("epix10k2m")
    image = np.random.default_rng(0).gamma(1.0, 5.0, size=det.stack_shape).astype(np.float32)
    peaks = np.stack([det.lab_xyz(k, 100, 50) for k in range(len(det.panels))])  # [n, 3] metres
    out = draw_detector(det, tmp_path / "lab.png", image=image, peaks=peaks)
    with Image.open(out) as im:
        assert im.format == "PNG" and min(im.size) >= 400
    draw_detector(det, tmp_path / "xy.png", peaks=peaks[:, :2].tolist())
    with pytest.raises(InputError, match="peaks"):
        draw_detector(det, tmp_path / "bad.png", peaks=np.zeros((3, 4)))


def test_cli_detector(tmp_path, capsys):
    from PIL import Image

    from vitkit.cli import main

    png = tmp_path / "d.png"
    assert main(["detector", "cspad", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "cspad" in out and "q3a7" in out and "185x388" in out and str(png) in out
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and min(im.size) >= 400
    assert png.stat().st_size > 20_000

    geom = tmp_path / "cspad.geom"
    assert main(["detector", "cspad", "--write-geom", str(geom), "--layout", "stack"]) == 0
    assert _strip(read_geom(geom)) == _strip(builtin_detector("cspad"))
    capsys.readouterr()
    assert main(["detector", str(geom)]) == 0
    assert "32 panels" in capsys.readouterr().out

    assert main(["detector", "nosuchdetector"]) == 2
    err = capsys.readouterr().err
    assert "vitkit detector: error: unknown detector 'nosuchdetector'" in err and "epix10k2m" in err
    broken = tmp_path / "broken.geom"
    broken.write_text("\n".join(_edit(12, "a/fs = banana")) + "\n")
    assert main(["detector", str(broken)]) == 2
    assert f"{broken}:12: " in capsys.readouterr().err


def test_panel_dataclass_defaults_are_what_the_writer_omits():
    """Fields the writer leaves out when they have their default must read back as that default."""
    p = Panel("p", 0, 9, 0, 9)
    assert (p.coffset, p.adu_per_photon, p.max_adu, p.no_index, p.clen) == (0.0, None, None, False, None)
