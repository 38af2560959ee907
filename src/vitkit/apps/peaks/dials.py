"""DIALS interoperability: vitkit's detector and peak lists as DIALS experiments and strong spots, and stills
indexing with DIALS to measure what a peak list is worth (indexing rate, orientation error).

DIALS (``python3-dials`` on Debian, 3.12) lives in the *system* Python, not in vitkit's environment, so every
DIALS call here runs a small script with that interpreter (``/usr/bin/python3``, or ``$VITKIT_DIALS_PYTHON``)
in a subprocess; data go over JSON and ``.npz`` files in a work directory. :func:`dials_available` says
whether that works and, if not, why.

Frames
    vitkit's geometry is CrystFEL's: lab frame ``(x, y, z)`` with the beam travelling along ``+z`` and hitting
    ``(0, 0)``. dxtbx's default beam travels along ``-z``: the beam model's ``direction`` (JSON;
    ``Beam.get_sample_to_source_direction()``) points *towards the source*, ``s0 = -direction / wavelength``.
    The map used here is the rotation by 180 degrees about ``x``, ``(x, y, z) -> (x, -y, -z)``
    (:data:`CRYSTFEL_TO_DIALS`): a proper rotation, so crystal handedness (and with it the enantiomorph of a
    chiral space group such as P4(3)2(1)2) is kept, the beam becomes dxtbx's ``direction = (0, 0, 1)``, and a
    panel image looks the same in both programs (fast scan to the right, slow scan downwards when viewed from
    the sample). Crystal matrices map as ``A_dials = R A_crystfel``.

Panels
    One dxtbx panel per vitkit panel, in the same order (``panel`` indices agree): origin = lab position (mm)
    of the *corner* of the panel's first pixel, fast / slow axes = unit vectors along CrystFEL's ``fs`` /
    ``ss``, pixel size = their lengths over ``res`` (mm), image size ``(W, H)``, trusted range
    ``(-1, max_adu or 65535)``, type ``SENSOR_PAD``, no parallax correction (thickness 0).

Pixel coordinates
    vitkit reports panel-local NumPy pixel-centre coordinates (pixel ``[i, j]`` has its centre at
    ``(ss, fs) = (i, j)``). DIALS puts ``x = 0`` at the first pixel's outer edge, so the centre of pixel
    ``[i, j]`` is ``xyzobs.px.value = (j + 0.5, i + 0.5, 0.5)`` (checked with ``flex.shoebox.centroid_valid``:
    a spot filling pixels ``x = 11`` and ``12`` equally has its centroid at ``x = 12.0``). A still is one
    image, ``z`` in ``[0, 1)``, centroid ``z = 0.5``.

Images
    DIALS' indexing programs read experiment lists without opening the images (``check_format=False``), so
    each shot gets an ``ImageSet`` naming a placeholder file that is never read or written; one experiment and
    one imageset per shot, identifiers ``vitkit_shot_000000``, ... (the reflection table's
    ``experiment_identifiers`` use the same).

Indexing (:func:`index_stills`)
    Each shot is indexed on its own with DIALS' ``Indexer`` (the stills indexer, as ``dials.ssx_index``
    does: its defaults, the known cell and space group, ``fft1d`` then ``real_space_grid_search``), in the
    system Python, ``nproc`` worker processes. See :data:`DEFAULT_PHIL` for the options changed and why.

    Debian's DIALS 3.12 cannot index stills out of the box: its stills indexer refines every candidate
    lattice and then fits a mosaicity model (``NaveParameters``) with ``xfel.mono_simulation``, whose package
    ``__init__`` imports the compiled ``xfel_mono_sim_ext`` that ``python3-cctbx`` does not ship. Every candidate
    then fails with ``ImportError`` (logged per candidate as "Couldn't refine candidate N, ImportError:
    __import__("xfel_mono_sim_ext")", which ``dials.ssx_index`` silences) and ``dials.index`` /
    ``dials.ssx_index`` report "No suitable indexing solution found" for any input, however good. The
    functions DIALS uses there are pure Python, so the indexing script registers an empty
    ``xfel_mono_sim_ext`` module when (and only when) the import fails; with a complete cctbx nothing is
    changed. ``indexer="sequences"`` (``indexing.stills.indexer=sequences``, no mosaicity model) avoids the
    module altogether; ``dials.ssx_index`` itself cannot use it (its summary needs ``delpsical.rad``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitkit.apps.peaks.detector import Detector
from vitkit.errors import InputError, VitkitError

__all__ = ["DialsError", "dials_available", "dials_python", "CRYSTFEL_TO_DIALS", "crystfel_to_dials",
           "dials_to_crystfel", "dxtbx_panels", "write_experiments", "write_reflections", "read_reflections",
           "predict_stills", "PREDICTION_DTYPE", "index_stills", "indexing_summary", "misorientation_deg",
           "cell_matches", "DEFAULT_PHIL", "experiment_identifier", "peak_columns"]

DIALS_PYTHON_ENV = "VITKIT_DIALS_PYTHON"
CRYSTFEL_TO_DIALS = np.diag([1.0, -1.0, -1.0])
"""Rotation taking CrystFEL lab vectors (beam along +z) to dxtbx lab vectors (beam along -z): ``v_d = R v_c``."""

#: DIALS options used by :func:`index_stills` on top of ``dials.ssx_index``'s defaults (which already set
#: ``indexing.stills.indexer=stills``, ``refinement.reflections.outlier.algorithm=null``, stills weighting,
#: fixed beam and detector). The Sauter & Poon (2010) candidate outlier rejection is switched off: on
#: simulated polychromatic stills (spots at the Bragg angle of their own wavelength within the pulse's
#: bandwidth, which DIALS' monochromatic stills model places up to ~1 px off) it discarded ~60 % of the true
#: spots of every shot and left "No reflections left after removing outliers!" on shots of 10-20 spots
#: (30 shots: 24/30 indexed with it, 29/30 without; median orientation error 0.031 vs 0.019 degrees).
DEFAULT_PHIL: tuple[str, ...] = ("indexing.stills.candidate_outlier_rejection=False",)


class DialsError(VitkitError, RuntimeError):
    """DIALS is not installed where vitkit looks for it, or a DIALS step failed."""


def dials_python() -> str:
    """The interpreter that has DIALS: ``$VITKIT_DIALS_PYTHON`` or ``/usr/bin/python3``."""
    return os.environ.get(DIALS_PYTHON_ENV, "/usr/bin/python3")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


@functools.lru_cache(maxsize=4)
def _probe(python: str) -> tuple[bool, str]:
    code = "import dials, dxtbx, cctbx; from dials.util.version import dials_version; print(dials_version())"
    try:
        r = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=120, env=_clean_env())
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"cannot run {python}: {e}"
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return False, f"{python} cannot import dials/dxtbx/cctbx: {tail}"
    return True, r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "DIALS"


def dials_available() -> tuple[bool, str]:
    """``(True, "DIALS 3.12.1")`` when :func:`dials_python` imports dials, dxtbx and cctbx, else
    ``(False, reason)``. Install on Debian/Ubuntu with ``apt-get install python3-dials``."""
    return _probe(dials_python())


def _require_dials() -> None:
    ok, why = dials_available()
    if not ok:
        raise DialsError(f"DIALS is needed here but {why}. Install it (Debian/Ubuntu: apt-get install python3-dials) "
                         f"or point ${DIALS_PYTHON_ENV} at a Python that imports dials.")


def _run(script: str, args: Sequence[str], what: str, timeout: float | None = None) -> str:
    """Run ``script`` (source text) with the DIALS interpreter; return stdout or raise DialsError."""
    _require_dials()
    # the script goes on the command line (-c), not into a temporary file that a /tmp cleaner could take away
    # while DIALS runs
    r = subprocess.run([dials_python(), "-I", "-c", script, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=_clean_env())
    if r.returncode != 0:
        err = "\n".join(r.stderr.strip().splitlines()[-25:])
        raise DialsError(f"{what} failed in {dials_python()} (exit {r.returncode}):\n{err}")
    return r.stdout


# --------------------------------------------------------------------------------------------- frames
def crystfel_to_dials(v) -> np.ndarray:
    """CrystFEL-lab vectors ``[..., 3]`` (or 3x3 matrices acting on lab vectors from the left, e.g. A*) to
    dxtbx's lab frame."""
    a = np.asarray(v, dtype=np.float64)
    return CRYSTFEL_TO_DIALS @ a if a.shape == (3, 3) else a @ CRYSTFEL_TO_DIALS.T


def dials_to_crystfel(v) -> np.ndarray:
    """Inverse of :func:`crystfel_to_dials` (the rotation is its own inverse)."""
    return crystfel_to_dials(v)


def experiment_identifier(i: int) -> str:
    return f"vitkit_shot_{i:06d}"


def dxtbx_panels(detector: Detector) -> list[dict[str, Any]]:
    """dxtbx panel descriptions (mm, dxtbx lab frame) of a vitkit detector, in panel order."""
    out = []
    for k, p in enumerate(detector.panels):
        fs, ss = np.asarray(p.fs, dtype=np.float64), np.asarray(p.ss, dtype=np.float64)
        nf, ns = np.linalg.norm(fs), np.linalg.norm(ss)
        if nf == 0 or ns == 0:
            raise InputError(f"panel {p.name}: fs/ss vectors must be non-zero, found fs={p.fs}, ss={p.ss}.")
        # lab position of the corner of the first pixel (CrystFEL coordinate (0, 0) = NumPy (-0.5, -0.5))
        origin = detector.lab_xyz(k, -0.5, -0.5) * 1000.0
        h, w = p.shape
        out.append({
            "name": p.name,
            "origin": crystfel_to_dials(origin).tolist(),
            "fast": crystfel_to_dials(fs / nf).tolist(),
            "slow": crystfel_to_dials(ss / ns).tolist(),
            "pixel_size": [nf / p.res * 1000.0, ns / p.res * 1000.0],
            "image_size": [int(w), int(h)],
            "trusted_range": [-1.0, float(p.max_adu) if p.max_adu else 65535.0],
        })
    return out


def _wavelengths_A(detector: Detector, wavelength, n: int) -> list[float]:
    """Per-shot wavelengths in angstrom from ``wavelength`` (metres: one value, one per shot, or None for the
    detector's)."""
    if wavelength is not None and np.ndim(wavelength) == 1:
        if len(wavelength) != n:
            raise InputError(f"wavelength: expected one value or one per shot ({n}), found {len(wavelength)}.")
        return [_wavelength_A(detector, float(w)) for w in wavelength]
    return [_wavelength_A(detector, wavelength)] * n


def _wavelength_A(detector: Detector, wavelength: float | None) -> float:
    """Wavelength in angstrom: ``wavelength`` (metres, as vitkit's Detector.wavelength) or the detector's."""
    wl = detector.wavelength if wavelength is None else float(wavelength)
    if wl is None or not wl > 0:
        raise InputError(f"{detector.name or 'detector'}: no wavelength; pass wavelength= (metres) or set the "
                         f"detector's photon_energy.")
    if wl > 1e-6:  # given in angstrom by mistake? vitkit works in metres
        raise InputError(f"wavelength {wl}: expected metres (e.g. 1.3e-10), found a value > 1e-6.")
    return wl * 1e10


def _crystal_dicts(orientations, space_group: str, n: int) -> list[dict] | None:
    if orientations is None:
        return None
    if len(orientations) != n:
        raise InputError(f"orientations: expected one A* matrix per shot ({n}), found {len(orientations)}.")
    out = []
    for a in orientations:
        a = np.asarray(a, dtype=np.float64)
        if a.shape != (3, 3):
            raise InputError(f"orientations: expected 3x3 reciprocal matrices A* (columns a*, b*, c* in the "
                             f"CrystFEL lab frame, 1/angstrom), found shape {a.shape}.")
        ad = crystfel_to_dials(a)
        real = np.linalg.inv(ad)  # rows: real-space a, b, c
        out.append({"real_a": real[0].tolist(), "real_b": real[1].tolist(), "real_c": real[2].tolist(),
                    "space_group": space_group})
    return out


_EXPT_SCRIPT = textwrap.dedent('''
    import json, sys
    from dxtbx.imageset import ImageSetFactory
    from dxtbx.model import BeamFactory, Crystal, Detector, Experiment, ExperimentList
    from cctbx import sgtbx

    spec = json.load(open(sys.argv[1]))
    beams = {}
    det = Detector()
    for p in spec["panels"]:
        pn = det.add_panel()
        pn.set_name(p["name"])
        pn.set_type("SENSOR_PAD")
        pn.set_image_size(tuple(p["image_size"]))
        pn.set_pixel_size(tuple(p["pixel_size"]))
        pn.set_trusted_range(tuple(p["trusted_range"]))
        pn.set_frame(tuple(p["fast"]), tuple(p["slow"]), tuple(p["origin"]))
    el = ExperimentList()
    for i, (path, ident) in enumerate(zip(spec["images"], spec["identifiers"])):
        wl = spec["wavelengths"][i]
        if wl not in beams:  # shots of one wavelength share one beam model
            beams[wl] = BeamFactory.simple(wl)
        beam = beams[wl]
        iset = ImageSetFactory.make_imageset([path], None, check_format=False)
        iset.set_beam(beam, 0)
        iset.set_detector(det, 0)
        crystal = None
        if spec.get("crystals"):
            c = spec["crystals"][i]
            crystal = Crystal(c["real_a"], c["real_b"], c["real_c"],
                              space_group=sgtbx.space_group_info(c["space_group"]).group())
        el.append(Experiment(imageset=iset, beam=beam, detector=det, crystal=crystal, identifier=ident))
    el.as_file(spec["path"])
''')


def write_experiments(detector: Detector, path, wavelength=None, n_images: int = 1,
                      orientations=None, space_group: str = "P1") -> Path:
    """Write a DIALS experiment list (``.expt``) for ``n_images`` still shots on ``detector``.

    Args:
        detector: vitkit geometry (CrystFEL conventions).
        path: output ``.expt`` file.
        wavelength: metres: one value, or one per shot (e.g. each simulated shot's or a measured per-shot
            spectrum's mean); default the detector's (``photon_energy``).
        n_images: number of shots: one experiment and one (placeholder, never read) image each.
        orientations: optional per-shot crystal reciprocal matrices ``A* = U B`` (columns a*, b*, c*; CrystFEL
            lab frame; 1/angstrom) to store as the experiments' crystals (e.g. the simulator's truth, to
            predict with DIALS).
        space_group: space group of those crystals.

    Built with dxtbx in the DIALS interpreter (so the file is exactly what DIALS writes). Returns ``path``.
    """
    path = Path(path).resolve()
    if n_images < 1:
        raise InputError(f"write_experiments: n_images must be >= 1, found {n_images}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {
        "path": str(path),
        "wavelengths": _wavelengths_A(detector, wavelength, n_images),
        "panels": dxtbx_panels(detector),
        "images": [str(path.parent / f"{path.stem}_{experiment_identifier(i)}.placeholder") for i in range(n_images)],
        "identifiers": [experiment_identifier(i) for i in range(n_images)],
        "crystals": _crystal_dicts(orientations, space_group, n_images),
    }
    with tempfile.TemporaryDirectory(prefix="vitkit_expt_") as td:
        sp = Path(td) / "spec.json"
        sp.write_text(json.dumps(spec))
        _run(_EXPT_SCRIPT, [sp], "writing the experiment list")
    return path


# ------------------------------------------------------------------------------------------ reflections
def peak_columns(peaks) -> dict[str, np.ndarray]:
    """Normalise one shot's peaks to columns ``panel, fs, ss, intensity, npix`` (NumPy pixel-centre coordinates).

    Accepts a structured array with fields ``panel, fs, ss`` (optional ``intensity``, ``npix``, e.g.
    PeakFinder's tables or the simulator's reflections), a dict of such columns, or a plain array ``[n, 3+]``
    of ``(panel, fs, ss[, intensity[, npix]])``.
    """
    if isinstance(peaks, dict) or (isinstance(peaks, np.ndarray) and peaks.dtype.names):
        names = peaks.keys() if isinstance(peaks, dict) else peaks.dtype.names
        missing = {"panel", "fs", "ss"} - set(names)
        if missing:
            raise InputError(f"peaks: missing fields {sorted(missing)}; expected panel, fs, ss[, intensity, npix].")
        cols = {k: np.asarray(peaks[k]) for k in ("panel", "fs", "ss")}
        n = len(cols["fs"])
        cols["intensity"] = np.asarray(peaks["intensity"]) if "intensity" in names else np.full(n, np.nan)
        cols["npix"] = np.asarray(peaks["npix"]) if "npix" in names else np.zeros(n)
    else:
        a = np.asarray(peaks, dtype=np.float64)
        if a.size == 0:
            a = a.reshape(0, 3)
        if a.ndim != 2 or a.shape[1] < 3:
            raise InputError(f"peaks: expected a structured array or [n, 3+] (panel, fs, ss[, intensity[, npix]]), "
                             f"found shape {a.shape}.")
        n = len(a)
        cols = {"panel": a[:, 0], "fs": a[:, 1], "ss": a[:, 2],
                "intensity": a[:, 3] if a.shape[1] > 3 else np.full(n, np.nan),
                "npix": a[:, 4] if a.shape[1] > 4 else np.zeros(n)}
    out = {"panel": cols["panel"].astype(np.int64), "fs": cols["fs"].astype(np.float64),
           "ss": cols["ss"].astype(np.float64), "intensity": cols["intensity"].astype(np.float64),
           "npix": np.asarray(cols["npix"]).astype(np.int64)}
    return out


_REFL_WRITE_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    from dials.array_family import flex

    z = np.load(sys.argv[1])
    meta = json.loads(str(z["meta"]))
    n = len(z["x"])
    t = flex.reflection_table()
    t["id"] = flex.int(z["shot"].astype(np.int32))
    t["imageset_id"] = flex.int(z["shot"].astype(np.int32))
    t["panel"] = flex.size_t(z["panel"].astype(np.uint64))
    t["xyzobs.px.value"] = flex.vec3_double(flex.double(z["x"]), flex.double(z["y"]), flex.double(np.full(n, 0.5)))
    t["xyzobs.px.variance"] = flex.vec3_double(flex.double(z["var_x"]), flex.double(z["var_y"]),
                                               flex.double(np.full(n, 1.0 / 12.0)))
    b = z["bbox"].astype(np.int32)
    t["bbox"] = flex.int6(*[flex.int(np.ascontiguousarray(b[:, i])) for i in range(6)]) if n else flex.int6()
    t["intensity.sum.value"] = flex.double(z["intensity"])
    t["intensity.sum.variance"] = flex.double(z["intensity_var"])
    t["n_signal"] = flex.int(z["npix"].astype(np.int32))
    t.set_flags(flex.bool(n, True), t.flags.strong)
    for i, ident in enumerate(meta["identifiers"]):
        t.experiment_identifiers()[i] = ident
    t.as_file(meta["path"])
''')


def write_reflections(detector: Detector, peaks_per_shot: Sequence, path, variance: float | None = None) -> Path:
    """Write strong spots (``.refl``, msgpack) as ``dials.find_spots`` does, one still image per shot.

    Columns: ``id`` and ``imageset_id`` (= shot index, with ``experiment_identifiers`` matching
    :func:`write_experiments`), ``panel``, ``xyzobs.px.value`` (``fs + 0.5, ss + 0.5, 0.5``),
    ``xyzobs.px.variance``, ``bbox`` (a box of about ``npix`` pixels, at least 3 x 3, around the peak, clipped
    to the panel; ``z`` 0..1), ``intensity.sum.value`` / ``.variance`` (intensity, or 1 when unknown; Poisson
    variance), ``n_signal`` and ``flags`` = strong. No shoeboxes (``dials.find_spots`` drops them too).

    The centroid variance is ``variance`` px^2 when given, else ``1/12 + 1/max(I, 1)`` (a spot of ~1 px^2
    spatial variance measured with ``I`` counts, plus pixelisation, as ``centroid_valid`` estimates it).
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    n_panels = len(detector.panels)
    rows: dict[str, list] = {k: [] for k in ("shot", "panel", "x", "y", "var_x", "var_y", "bbox", "intensity",
                                             "intensity_var", "npix")}
    for i, peaks in enumerate(peaks_per_shot):
        c = peak_columns(peaks)
        n = len(c["fs"])
        if n == 0:
            continue
        if c["panel"].min() < 0 or c["panel"].max() >= n_panels:
            raise InputError(f"shot {i}: panel indices must be in [0, {n_panels}), found "
                             f"[{c['panel'].min()}, {c['panel'].max()}].")
        inten = np.where(np.isfinite(c["intensity"]), c["intensity"], 1.0)
        var = np.full(n, float(variance)) if variance is not None else 1.0 / 12.0 + 1.0 / np.maximum(inten, 1.0)
        npix = np.where(c["npix"] > 0, c["npix"], 9)
        half = np.maximum(np.ceil(np.sqrt(npix) / 2.0), 1).astype(np.int64)
        hw = np.array([detector.panels[p].shape for p in c["panel"]])  # (H, W)
        cx, cy = np.floor(c["fs"] + 0.5).astype(np.int64), np.floor(c["ss"] + 0.5).astype(np.int64)
        x0, x1 = np.clip(cx - half, 0, hw[:, 1] - 1), np.clip(cx + half + 1, 1, hw[:, 1])
        y0, y1 = np.clip(cy - half, 0, hw[:, 0] - 1), np.clip(cy + half + 1, 1, hw[:, 0])
        rows["shot"].append(np.full(n, i))
        rows["panel"].append(c["panel"])
        rows["x"].append(c["fs"] + 0.5)
        rows["y"].append(c["ss"] + 0.5)
        rows["var_x"].append(var)
        rows["var_y"].append(var)
        rows["bbox"].append(np.stack([x0, x1, y0, y1, np.zeros(n, np.int64), np.ones(n, np.int64)], axis=1))
        rows["intensity"].append(inten)
        rows["intensity_var"].append(np.maximum(np.abs(inten), 1.0))
        rows["npix"].append(npix)
    arrays = {k: (np.concatenate(v) if v else np.zeros((0, 6) if k == "bbox" else 0)) for k, v in rows.items()}
    meta = {"path": str(path), "identifiers": [experiment_identifier(i) for i in range(len(peaks_per_shot))]}
    with tempfile.TemporaryDirectory(prefix="vitkit_refl_") as td:
        npz = Path(td) / "peaks.npz"
        np.savez(npz, meta=np.array(json.dumps(meta)), **arrays)
        _run(_REFL_WRITE_SCRIPT, [npz], "writing the reflection table")
    return path


_REFL_READ_SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np
    from dials.array_family import flex

    t = flex.reflection_table.from_file(sys.argv[1])
    out, skipped = {}, []
    for k in t.keys():
        col = t[k]
        if hasattr(col, "as_numpy_array"):
            a = np.asarray(col.as_numpy_array())
        elif k in ("shoebox",):  # no array form: named in skipped_columns, not silently dropped
            skipped.append(k)
            continue
        else:
            a = np.array([tuple(v) if hasattr(v, "__len__") else v for v in col])
        out[k.replace(".", "__")] = a
    out["skipped_columns"] = np.array(skipped, dtype=str)
    out["flags_strong"] = np.asarray(t.get_flags(t.flags.strong).as_numpy_array())
    out["identifiers_keys"] = np.array(list(t.experiment_identifiers().keys()), dtype=np.int64)
    out["identifiers_values"] = np.array(list(t.experiment_identifiers().values()))
    np.savez(sys.argv[2], **out)
''')


def read_reflections(path) -> dict[str, np.ndarray]:
    """Read a ``.refl`` file's plain columns into NumPy arrays (via DIALS): keys are the column names
    (``xyzobs.px.value`` ``[n, 3]``, ``panel``, ``id``, ``bbox`` ``[n, 6]``, ...), plus ``flags_strong`` and
    the ``experiment_identifiers`` map as ``identifiers`` (dict); ``skipped_columns`` names columns with no array
    form (shoeboxes)."""
    with tempfile.TemporaryDirectory(prefix="vitkit_refl_") as td:
        out = Path(td) / "cols.npz"
        _run(_REFL_READ_SCRIPT, [Path(path).resolve(), out], "reading the reflection table")
        z = np.load(out)
        cols = {k.replace("__", "."): z[k] for k in z.files if not k.startswith("identifiers_")}
        cols["identifiers"] = dict(zip(z["identifiers_keys"].tolist(), z["identifiers_values"].tolist()))
    return cols


# ------------------------------------------------------------------------------------------ prediction
_PREDICT_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    from dxtbx.model.experiment_list import ExperimentListFactory
    from dials.array_family import flex
    from dials.algorithms.spot_prediction import StillsReflectionPredictor

    cfg = json.load(open(sys.argv[1]))
    el = ExperimentListFactory.from_json_file(cfg["experiments"], check_format=False)
    z = np.load(cfg["hkl"]) if cfg.get("hkl") else None
    out = {}
    for i, e in enumerate(el):
        pred = StillsReflectionPredictor(e, dmin=cfg["d_min"])
        if z is not None:
            hkl, pan = z[f"hkl{i}"].astype(int), z[f"panel{i}"].astype(int)
            t = flex.reflection_table()
            t["miller_index"] = flex.miller_index([tuple(map(int, r)) for r in hkl])
            t["panel"] = flex.size_t([int(p) for p in pan])
            t["id"] = flex.int(len(hkl), 0)
            t["entering"] = flex.bool(len(hkl), False)
            pred.for_reflection_table(t, e.crystal.get_A())
        else:
            t = pred.for_ub(e.crystal.get_A())
        n = len(t)
        x, y, _ = t["xyzcal.px"].parts() if n else (flex.double(), flex.double(), None)
        out[f"panel{i}"] = np.array(list(t["panel"]), dtype=np.int64) if n else np.zeros(0, np.int64)
        out[f"x{i}"] = np.array(list(x)) if n else np.zeros(0)
        out[f"y{i}"] = np.array(list(y)) if n else np.zeros(0)
        out[f"hkl{i}"] = np.array(list(t["miller_index"]), dtype=np.int64).reshape(-1, 3)
        out[f"delpsi{i}"] = np.array(list(t["delpsical.rad"])) if n else np.zeros(0)
    np.savez(cfg["out"], **out)
''')

PREDICTION_DTYPE = np.dtype([("panel", np.int64), ("fs", np.float64), ("ss", np.float64), ("h", np.int64),
                             ("k", np.int64), ("l", np.int64), ("delpsi", np.float64)])


def predict_stills(detector: Detector, orientations: Sequence, space_group: str = "P1", hkl_per_shot=None,
                   wavelength=None, d_min: float | None = None) -> list[np.ndarray]:
    """Spot positions DIALS predicts (``StillsReflectionPredictor``, in the DIALS interpreter) for crystals
    ``orientations`` (A* per shot, CrystFEL lab frame, 1/angstrom) on ``detector``: the check that both
    programs see the same experiment.

    With ``hkl_per_shot`` (per shot ``(hkl [n, 3], panel [n])``), those reflections are predicted on those
    panels (DIALS rotates each onto the Ewald sphere about ``s0 x q``, the stills model); otherwise every
    reflection DIALS considers in the diffracting condition (down to ``d_min`` angstrom, default the detector's
    corner resolution). Returns per shot a structured array of :data:`PREDICTION_DTYPE` with panel-local NumPy
    pixel-centre coordinates (DIALS' ``xyzcal.px`` - 0.5) and ``delpsi`` (rad).
    """
    n = len(orientations)
    with tempfile.TemporaryDirectory(prefix="vitkit_pred_") as td:
        td = Path(td)
        expt = write_experiments(detector, td / "truth.expt", wavelength=wavelength, n_images=n,
                                 orientations=orientations, space_group=space_group)
        cfg = {"experiments": str(expt), "out": str(td / "pred.npz"), "d_min": d_min, "hkl": None}
        if hkl_per_shot is not None:
            if len(hkl_per_shot) != n:
                raise InputError(f"predict_stills: {len(hkl_per_shot)} hkl lists for {n} orientations.")
            arrays = {}
            for i, (hkl, pan) in enumerate(hkl_per_shot):
                arrays[f"hkl{i}"] = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
                arrays[f"panel{i}"] = np.asarray(pan, dtype=np.int64).reshape(-1)
            np.savez(td / "hkl.npz", **arrays)
            cfg["hkl"] = str(td / "hkl.npz")
        (td / "cfg.json").write_text(json.dumps(cfg))
        _run(_PREDICT_SCRIPT, [td / "cfg.json"], "predicting spots")
        z = np.load(td / "pred.npz")
        out = []
        for i in range(n):
            m = len(z[f"x{i}"])
            a = np.zeros(m, dtype=PREDICTION_DTYPE)
            a["panel"], a["fs"], a["ss"] = z[f"panel{i}"], z[f"x{i}"] - 0.5, z[f"y{i}"] - 0.5
            hkl = z[f"hkl{i}"].reshape(-1, 3)
            a["h"], a["k"], a["l"] = hkl[:, 0], hkl[:, 1], hkl[:, 2]
            a["delpsi"] = z[f"delpsi{i}"]
            out.append(a)
    return out


# --------------------------------------------------------------------------------------------- indexing
_INDEX_SCRIPT = textwrap.dedent('''
    import copy, io, json, logging, sys, types, os

    cfg = json.load(open(sys.argv[1]))
    if cfg["stub_mono_sim"]:
        # Debian's python3-cctbx ships xfel/mono_simulation (pure Python: max_like.minimizer, util.green_curve_area,
        # which DIALS' stills indexer uses in NaveParameters) but not its compiled extension xfel_mono_sim_ext,
        # which the package __init__ imports and none of those functions need. Without it every candidate
        # fails with ImportError and the stills indexer reports "No suitable indexing solution found".
        try:
            import xfel.mono_simulation  # noqa: F401
        except ImportError:
            sys.modules["xfel_mono_sim_ext"] = types.ModuleType("xfel_mono_sim_ext")
            stubbed = True
        else:
            stubbed = False
    else:
        stubbed = False

    from libtbx import phil
    from cctbx import sgtbx
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory
    from dials.array_family import flex
    from dials.algorithms.indexing import DialsIndexError
    from dials.algorithms.indexing.indexer import Indexer
    from dials.command_line.ssx_index import phil_scope
    from dials.util.version import dials_version

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    class Capture(logging.Handler):
        KEEP = ("Couldn't refine candidate", "Cannot convert", "P1 refinement yielded", "RMSD too high",
                "Refinement failed")

        def __init__(self):
            super().__init__(logging.INFO)
            self.messages = []

        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith(self.KEEP):
                self.messages.append(msg.split("\\n")[0][:300])

    def load():
        el = ExperimentListFactory.from_json_file(cfg["experiments"], check_format=False)
        refl = flex.reflection_table.from_file(cfg["reflections"])
        user = phil.parse("\\n".join(cfg["phil"]))
        params = phil_scope.fetch(sources=[user]).extract()
        return el, refl, params

    EL, REFL, PARAMS = load()

    def index_one(i):
        expt = EL[i]
        res = {"shot": i, "indexed": False, "n_strong": 0, "n_indexed": 0, "method": None, "error": None,
               "candidate_errors": []}
        r = REFL.select(REFL["id"] == i)
        res["n_strong"] = len(r)
        if len(r) < cfg["min_spots"]:
            res["error"] = f"{len(r)} spots < min_spots={cfg['min_spots']}"
            return res
        el = ExperimentList([expt])
        r["id"] = flex.int(len(r), 0)
        r["imageset_id"] = flex.int(len(r), 0)
        ids = r.experiment_identifiers()
        for k in list(ids.keys()):
            del ids[k]
        ids[0] = expt.identifier
        r.centroid_px_to_mm(el)
        r.map_centroids_to_reciprocal_space(el)
        cap = Capture()
        loggers = [logging.getLogger(n) for n in ("dials.algorithms.indexing.stills_indexer",
                                                   "dials.algorithms.indexing.indexer")]
        for lg in loggers:
            lg.addHandler(cap)
            lg.setLevel(logging.INFO)
            lg.propagate = False
        stdout = sys.stdout
        sys.stdout = io.StringIO()  # rstbx's outlier detection prints
        try:
            for method in cfg["methods"]:
                params = copy.deepcopy(PARAMS)
                params.indexing.method = method
                try:
                    idxr = Indexer.from_parameters(copy.deepcopy(r), el, params=params)
                    idxr.index()
                except (DialsIndexError, AssertionError, RuntimeError, ValueError, ZeroDivisionError) as e:
                    res["error"] = f"{method}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    continue
                crystal = idxr.refined_experiments[0].crystal
                t = idxr.refined_reflections
                t = t.select(t["id"] == 0)
                res.update(indexed=True, method=method, error=None, n_indexed=len(t),
                           unit_cell=list(crystal.get_unit_cell().parameters()),
                           space_group=crystal.get_space_group().info().symbol_and_number(),
                           A=list(crystal.get_A()))
                if "xyzcal.px" in t and len(t):
                    cx, cy, _ = t["xyzcal.px"].parts()
                    ox, oy, _ = t["xyzobs.px.value"].parts()
                    res["rmsd_x_px"] = flex.mean((cx - ox) ** 2) ** 0.5
                    res["rmsd_y_px"] = flex.mean((cy - oy) ** 2) ** 0.5
                if "delpsical.rad" in t and len(t):
                    res["rmsd_dpsi_deg"] = flex.mean((t["delpsical.rad"] * 57.29577951308232) ** 2) ** 0.5
                break
        except Exception as e:  # anything else: report, keep going with other shots
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            sys.stdout = stdout
            for lg in loggers:
                lg.removeHandler(cap)
        seen = []
        for m in cap.messages:
            if m not in seen:
                seen.append(m)
        res["candidate_errors"] = seen[:10]
        return res

    shots = cfg["shots"] if cfg["shots"] is not None else list(range(len(EL)))
    if cfg["nproc"] > 1 and len(shots) > 1:
        from multiprocessing import Pool
        with Pool(cfg["nproc"]) as pool:
            results = pool.map(index_one, shots, chunksize=1)
    else:
        results = [index_one(i) for i in shots]
    ops = []
    if cfg["space_group"]:
        pg = sgtbx.space_group_info(cfg["space_group"]).group().build_derived_point_group()
        ops = [list(op.r().as_double()) for op in pg.all_ops() if op.r().determinant() == 1]
    json.dump({"dials_version": dials_version(), "mono_sim_stubbed": stubbed, "point_group_rotations": ops,
               "shots": results}, open(cfg["out"], "w"))
''')


def _nearest_rotation(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return r


def misorientation_deg(a_found, a_true, rotations=None) -> float:
    """Smallest rotation angle (degrees) taking the true crystal onto the found one, over the symmetry-equivalent
    settings of the true one.

    ``a_found``, ``a_true``: reciprocal matrices (columns a*, b*, c*) in one lab frame (units cancel).
    ``rotations``: proper rotation parts ``W`` (3x3, fractional coordinates) of the point group; the true
    crystal's settings are ``A_true W^T``. The angle is that of the rotation nearest (polar decomposition) to
    ``A_found (A_true W^T)^-1``, so small cell differences do not count as misorientation.
    """
    af, at = np.asarray(a_found, dtype=np.float64), np.asarray(a_true, dtype=np.float64)
    ws = [np.eye(3)] if not rotations else [np.asarray(w, dtype=np.float64).reshape(3, 3) for w in rotations]
    best = 180.0
    for w in ws:
        m = af @ np.linalg.inv(at @ w.T)
        if np.linalg.det(m) <= 0:
            continue
        r = _nearest_rotation(m)
        ang = float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))
        best = min(best, ang)
    return best


def cell_matches(found, target, length_tol: float = 0.01, angle_tol: float = 1.0) -> bool:
    """Unit cells ``(a, b, c, alpha, beta, gamma)`` agree within ``length_tol`` (relative) and ``angle_tol``
    (degrees)."""
    f, t = np.asarray(found, dtype=np.float64), np.asarray(target, dtype=np.float64)
    return bool(np.all(np.abs(f[:3] - t[:3]) <= length_tol * t[:3]) and np.all(np.abs(f[3:] - t[3:]) <= angle_tol))


def _cell_tuple(cell) -> tuple[float, ...]:
    if isinstance(cell, str):
        cell = [float(v) for v in cell.replace(",", " ").split()]
    elif hasattr(cell, "a") and hasattr(cell, "alpha"):
        cell = [cell.a, cell.b, cell.c, cell.alpha, cell.beta, cell.gamma]
    cell = tuple(float(v) for v in cell)
    if len(cell) != 6:
        raise InputError(f"cell: expected (a, b, c, alpha, beta, gamma) in angstrom and degrees, found {cell}.")
    return cell


def index_stills(detector: Detector, peaks_per_shot: Sequence, cell, space_group: str, workdir,
                 true_orientations: Sequence | None = None, nproc: int = 1, wavelength=None,
                 methods: Sequence[str] = ("fft1d", "real_space_grid_search"), indexer: str = "stills",
                 phil: Sequence[str] = (), min_spots: int = 5, cell_tolerance: tuple[float, float] = (0.01, 1.0),
                 timeout: float | None = None) -> list[dict[str, Any]]:
    """Index each shot's peak list with DIALS (the known cell and space group) and score the solutions.

    Args:
        detector: geometry of the peaks (panel-local NumPy pixel-centre coordinates).
        peaks_per_shot: per shot, peaks as :func:`peak_columns` accepts.
        cell: ``(a, b, c, alpha, beta, gamma)`` (angstrom, degrees) -- or an object with those attributes.
        space_group: e.g. ``"P43212"``.
        workdir: where ``shots.expt``, ``strong.refl`` and ``index_results.json`` are written (kept, so the
            run can be repeated with the DIALS command line).
        true_orientations: optional per-shot A* (CrystFEL lab, columns a*, b*, c*) to measure the
            orientation error.
        nproc: worker processes of the DIALS interpreter.
        wavelength: metres, one value or one per shot (default the detector's).
        methods: DIALS indexing methods tried in order until one succeeds (``dials.ssx_index``'s default).
        indexer: ``"stills"`` (DIALS' stills indexer, as ``dials.ssx_index``; see the module notes) or
            ``"sequences"`` (the rotation-data indexer applied to each still: no Nave mosaicity model).
        phil: extra DIALS parameters (full paths, e.g. ``"indexing.stills.rmsd_min_px=3"``).
        min_spots: shots with fewer spots are not attempted (``dials.ssx_index`` uses 10; 5 here so that weak
            hits count: a known cell needs few spots).
        cell_tolerance: (relative length, degrees) for "indexed with the right cell".

    Returns:
        per shot a dict: ``shot``, ``indexed`` (DIALS accepted a solution), ``correct_cell`` (and its cell
        is ``cell`` within ``cell_tolerance``), ``n_strong``, ``n_indexed``, ``unit_cell``, ``space_group``,
        ``A_dials`` (DIALS' A = UB, 1/angstrom, DIALS lab), ``A_crystfel`` (the same in vitkit's lab frame),
        ``rmsd_px`` (positional, sqrt(x^2 + y^2)), ``rmsd_x_px``, ``rmsd_y_px``, ``rmsd_dpsi_deg``, ``method``,
        ``error`` (why it failed), ``candidate_errors`` (DIALS' reasons for dropping candidates),
        ``dials_version``, ``mono_sim_stubbed`` (the Debian workaround above was needed) and, with the truth,
        ``orientation_error_deg`` (:func:`misorientation_deg` over the point group's rotations).
    """
    if indexer not in ("stills", "sequences"):
        raise InputError(f"index_stills: indexer must be 'stills' or 'sequences', found {indexer!r}.")
    cell = _cell_tuple(cell)
    n = len(peaks_per_shot)
    if true_orientations is not None and len(true_orientations) != n:
        raise InputError(f"index_stills: {len(true_orientations)} true orientations for {n} shots.")
    if n == 0:
        return []
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    expt = write_experiments(detector, work / "shots.expt", wavelength=wavelength, n_images=n)
    refl = write_reflections(detector, peaks_per_shot, work / "strong.refl")
    lines = [f"indexing.known_symmetry.unit_cell={','.join(f'{v:g}' for v in cell)}",
             f"indexing.known_symmetry.space_group={space_group.replace(' ', '')}",
             f"indexing.stills.indexer={indexer}", *DEFAULT_PHIL, *phil]
    cfg = {"experiments": str(expt), "reflections": str(refl), "out": str(work / "index_results.json"),
           "phil": lines, "methods": list(methods), "nproc": int(max(1, nproc)), "min_spots": int(min_spots),
           "shots": None, "space_group": space_group, "stub_mono_sim": indexer == "stills"}
    (work / "index_config.json").write_text(json.dumps(cfg, indent=1))
    _run(_INDEX_SCRIPT, [work / "index_config.json"], "DIALS indexing", timeout=timeout)
    doc = json.loads((work / "index_results.json").read_text())
    rots = doc.get("point_group_rotations") or None
    out = []
    for r in doc["shots"]:
        res = dict(r)
        res["dials_version"] = doc.get("dials_version")
        res["mono_sim_stubbed"] = doc.get("mono_sim_stubbed")
        res["correct_cell"] = bool(r["indexed"] and cell_matches(r["unit_cell"], cell, *cell_tolerance))
        if r["indexed"]:
            a_d = np.asarray(r["A"], dtype=np.float64).reshape(3, 3)
            res["A_dials"] = a_d
            res["A_crystfel"] = dials_to_crystfel(a_d)
            if "rmsd_x_px" in r:
                res["rmsd_px"] = float(np.hypot(r["rmsd_x_px"], r["rmsd_y_px"]))
            if true_orientations is not None:
                res["orientation_error_deg"] = misorientation_deg(
                    a_d, crystfel_to_dials(np.asarray(true_orientations[r["shot"]], dtype=np.float64)), rots)
        res.pop("A", None)
        out.append(res)
    return out


def indexing_summary(results: Sequence[dict], max_orientation_error_deg: float = 1.0) -> dict[str, Any]:
    """Pool :func:`index_stills` results: ``indexing_rate`` (right cell / shots), ``accepted_rate`` (DIALS
    accepted any solution), median / 90th percentile orientation error over shots indexed with the right cell,
    ``correct_orientation_rate`` (right cell and error <= ``max_orientation_error_deg``), median RMSD."""
    n = len(results)
    ok = [r for r in results if r.get("correct_cell")]
    errs = np.array([r["orientation_error_deg"] for r in ok if "orientation_error_deg" in r])
    rmsd = np.array([r["rmsd_px"] for r in ok if "rmsd_px" in r])
    out: dict[str, Any] = {
        "shots": n, "accepted": sum(bool(r.get("indexed")) for r in results), "indexed_right_cell": len(ok),
        "indexing_rate": len(ok) / n if n else float("nan"),
        "accepted_rate": sum(bool(r.get("indexed")) for r in results) / n if n else float("nan"),
        "median_rmsd_px": float(np.median(rmsd)) if rmsd.size else float("nan"),
        "median_n_indexed": float(np.median([r["n_indexed"] for r in ok])) if ok else float("nan"),
    }
    if errs.size:
        out["median_orientation_error_deg"] = float(np.median(errs))
        out["p90_orientation_error_deg"] = float(np.percentile(errs, 90))
        out["correct_orientation_rate"] = float(np.sum(errs <= max_orientation_error_deg) / n) if n else float("nan")
    errors: dict[str, int] = {}
    for r in results:
        if not r.get("correct_cell"):
            key = (r.get("error") or "wrong cell").split(":")[0:2]
            k = ":".join(key)[:120]
            errors[k] = errors.get(k, 0) + 1
    out["failures"] = errors
    return out
