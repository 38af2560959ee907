"""Writing CrystFEL ``.geom`` files (:func:`write_geom`, atomically) and a readable summary of a detector
(:func:`detector_table`); the reader is :mod:`vitkit.apps.peaks.geom`."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from vitkit.apps.peaks.panels import Detector, GeometryError
from vitkit.atomic import write_text

__all__ = ["detector_table", "format_geom", "write_geom"]

NAME = re.compile(r"[A-Za-z0-9_.:+-]+")  # what a panel, bad-region or group name may hold


def _num(x: float) -> str:
    """Shortest positional decimal that reads back to the same double (no exponent)."""
    x = float(x)
    if not math.isfinite(x):
        raise GeometryError(f"cannot write the non-finite number {x} to a .geom file")
    return np.format_float_positional(x, unique=True, trim="0")


def _vec(v) -> str:
    terms = []
    for c, axis in zip(v, "xyz"):
        if axis == "z" and float(c) == 0.0:
            continue
        s = _num(c)
        terms.append(f"{s if s.startswith('-') else '+' + s}{axis}")
    return " ".join(terms)


def _check_name(name: str, what: str) -> None:
    if not NAME.fullmatch(name or ""):
        raise GeometryError(f"cannot write {what} {name!r} to a .geom file: names are letters, digits and _ . : + - "
                            f"(no spaces, '/', '=' or ';')")


def format_geom(detector: Detector, layout: str = "slab") -> str:
    """The text of a CrystFEL geometry file for ``detector`` (see :func:`write_geom`)."""
    det = detector
    origin = _check_writable(det, layout)
    clen = det.clen
    if clen is None and det.clen_from is None:
        clen = next((p.clen for p in det.panels if p.clen is not None), None)
    resolutions = {p.res for p in det.panels}
    global_res = len(resolutions) == 1  # one res line for all panels, else one per panel
    out = _global_lines(det, layout, clen, next(iter(resolutions)) if global_res else None)
    for p in det.panels:
        out += _panel_lines(det, p, layout, origin, clen, global_res)
    out += _bad_region_lines(det, layout, origin)
    if det.rigid_groups or det.rigid_group_collections:
        out.append("")
    for g, members in det.rigid_groups.items():
        _check_name(g, "rigid group")
        out.append(f"rigid_group_{g} = {','.join(members)}")
    for c, members in det.rigid_group_collections.items():
        _check_name(c, "rigid group collection")
        out.append(f"rigid_group_collection_{c} = {','.join(members)}")
    return "\n".join(out) + "\n"


def _check_writable(det: Detector, layout: str) -> dict[int, int]:
    """Refuse what CrystFEL would reject; returns each stack index's first slab row (``layout="stack"``)."""
    if layout not in ("slab", "stack"):
        raise GeometryError(f"layout must be 'slab' or 'stack', found {layout!r}")
    for p in det.panels:
        _check_name(p.name, "panel name")
        if p.name.startswith(("bad", "group", "rigid_group")):
            raise GeometryError(f"cannot write panel {p.name!r}: CrystFEL reserves names starting with 'bad', "
                                f"'group' and 'rigid_group'")
    if (det.mask_good or det.mask_bad) and det.mask is None and det.mask_file is None:
        raise GeometryError(f"{det._where()}: mask_good/mask_bad are set but no mask location (Detector.mask); "
                            f"CrystFEL rejects such a file")
    if det.mask_file is not None and det.mask is None:
        raise GeometryError(f"{det._where()}: mask_file is set but not the mask location in it (Detector.mask); "
                            f"CrystFEL rejects such a file")
    origin: dict[int, int] = {}
    if layout == "stack":
        missing = [p.name for p in det.panels if p.index is None]
        if missing:
            raise GeometryError(f"{det._where()}: cannot write a stack layout: panels {missing[:4]} have no stack "
                                f"index (Panel.index); write layout='slab' instead")
        for p in det.panels:
            origin[p.index] = min(origin.get(p.index, p.min_ss), p.min_ss)
    return origin


def _global_lines(det: Detector, layout: str, clen: float | None, res: float | None) -> list[str]:
    """The header comments and the detector-wide keys."""
    shape = det.panel_shape
    out = [f"; CrystFEL geometry file written by vitkit ({layout} layout)",
           f"; detector: {det.name or '-'} ({len(det.panels)} panels"
           + (f" of {shape[0]} x {shape[1]} pixels (ss x fs)" if shape else "") + f"), from {det.source or '-'}",
           "; lab frame: x, y in the detector plane, z along the beam; corner_x/y and fs/ss in pixels, res in "
           "pixels per metre", ""]
    if det.photon_energy is not None:
        out.append(f"photon_energy = {_num(det.photon_energy)} ; eV")
    elif det.photon_energy_from is not None:
        out.append(f"photon_energy = {det.photon_energy_from}")
    else:
        out.append("; photon_energy = ? (eV): unknown, CrystFEL needs it")
    if clen is not None:
        out.append(f"clen = {_num(clen)} ; m")
    elif det.clen_from is not None:
        out.append(f"clen = {det.clen_from}")
    else:
        out.append("; clen = ? (m): unknown, CrystFEL needs it")
    if det.adu_per_photon is not None:
        out.append(f"adu_per_photon = {_num(det.adu_per_photon)}")
    if res is not None:
        out.append(f"res = {_num(res)} ; pixels per metre ({1e6 / det.panels[0].res:.6g} um pixels)")
    out.append(f"data = {det.data}")
    for key in ("mask", "mask_file"):
        if getattr(det, key) is not None:
            out.append(f"{key} = {getattr(det, key)}")
    for key in ("mask_good", "mask_bad"):
        if getattr(det, key) is not None:
            out.append(f"{key} = 0x{getattr(det, key):04x}")
    out.append("dim0 = %")
    if layout == "slab":
        out += ["dim1 = ss", "dim2 = fs"]
    return out


def _panel_lines(det: Detector, p, layout: str, origin: dict[int, int], clen: float | None,
                 global_res: bool) -> list[str]:
    n = p.name
    shift = origin.get(p.index, 0) if layout == "stack" else 0
    out = [""]
    if layout == "stack":
        out += [f"{n}/dim1 = {p.index}", f"{n}/dim2 = ss", f"{n}/dim3 = fs"]
    out += [f"{n}/min_fs = {p.min_fs}", f"{n}/max_fs = {p.max_fs}", f"{n}/min_ss = {p.min_ss - shift}",
            f"{n}/max_ss = {p.max_ss - shift}", f"{n}/fs = {_vec(p.fs)}", f"{n}/ss = {_vec(p.ss)}",
            f"{n}/corner_x = {_num(p.corner_x)}", f"{n}/corner_y = {_num(p.corner_y)}"]
    if not global_res:
        out.append(f"{n}/res = {_num(p.res)}")
    if p.clen is not None and clen is None:
        raise GeometryError(f"{det._where()}: panel {n} has its own clen but the detector's is read from the "
                            f"data ({det.clen_from}); CrystFEL >= 0.10 takes one global clen, so this cannot be "
                            f"written")
    coffset = p.coffset + (p.clen - clen if p.clen is not None else 0.0)
    if coffset != 0.0:
        out.append(f"{n}/coffset = {_num(coffset)}")
    if p.adu_per_photon is not None:
        out.append(f"{n}/adu_per_photon = {_num(p.adu_per_photon)}")
    if p.max_adu is not None:
        out.append(f"{n}/max_adu = {_num(p.max_adu)}")
    if p.no_index:
        out.append(f"{n}/no_index = 1")
    return out


def _bad_region_lines(det: Detector, layout: str, origin: dict[int, int]) -> list[str]:
    by_name = {p.name: p for p in det.panels}
    out: list[str] = []
    for b in det.bad_regions:
        name = b.name if b.name.startswith("bad") else f"bad_{b.name}"
        _check_name(name, "bad region")
        out.append("")
        if b.min_fs is not None:
            if b.panel not in by_name:
                raise GeometryError(f"bad region {b.name}: fs/ss ranges need an existing panel, found "
                                    f"panel={b.panel!r}")
            shift = origin.get(by_name[b.panel].index, 0) if layout == "stack" else 0
            out += [f"{name}/min_fs = {b.min_fs}", f"{name}/max_fs = {b.max_fs}",
                    f"{name}/min_ss = {b.min_ss - shift}", f"{name}/max_ss = {b.max_ss - shift}"]
        else:
            out += [f"{name}/min_x = {_num(b.min_x)}", f"{name}/max_x = {_num(b.max_x)}",
                    f"{name}/min_y = {_num(b.min_y)}", f"{name}/max_y = {_num(b.max_y)}"]
        if b.panel is not None:
            out.append(f"{name}/panel = {b.panel}")
    return out


def write_geom(detector: Detector, path: str | os.PathLike, layout: str = "slab") -> Path:
    """Write ``detector`` as a CrystFEL ``.geom`` file, atomically; returns the path.

    ``layout="slab"`` describes data as one ``[SS, FS]`` slab per event (``dim1 = ss``, ``dim2 = fs``);
    ``layout="stack"`` as a psana panel stack ``[P, H, W]`` (per panel ``dim1 = index``, ``dim2 = ss``,
    ``dim3 = fs``, module-relative ``min/max_ss``).
    """
    return write_text(path, format_geom(detector, layout=layout))


# ------------------------------------------------------------------------------------------- summary
def detector_table(detector: Detector) -> str:
    """A human-readable summary: one header line, then one row per panel."""
    det = detector
    shape = det.stack_shape
    head = [f"{det.name or 'detector'} ({det.source or '-'}): {len(det.panels)} panels, slab "
            f"{det.slab_shape[0]} x {det.slab_shape[1]}"
            + (f", stack {shape[0]} x {shape[1]} x {shape[2]}" if shape else ", panels of different shapes")]
    bits = []
    if det.photon_energy is not None:
        bits.append(f"photon energy {det.photon_energy:g} eV ({det.wavelength * 1e10:.4f} A)")
    elif det.photon_energy_from:
        bits.append(f"photon energy from {det.photon_energy_from}")
    if det.clen is not None:
        bits.append(f"clen {det.clen * 1e3:g} mm")
    elif det.clen_from:
        bits.append(f"clen from {det.clen_from}")
    if det.adu_per_photon is not None:
        bits.append(f"{det.adu_per_photon:g} ADU/photon")
    if det.bad_regions:
        bits.append(f"{len(det.bad_regions)} bad regions")
    if det.rigid_groups:
        bits.append(f"{len(det.rigid_groups)} rigid groups")
    if bits:
        head.append(", ".join(bits))
    rows = []
    for p in det.panels:
        clen = p.clen if p.clen is not None else det.clen
        rows.append((p.name, "-" if p.index is None else str(p.index), f"{p.shape[0]}x{p.shape[1]}",
                     f"{p.min_ss}-{p.max_ss}", f"{p.min_fs}-{p.max_fs}", f"{p.corner_x:.2f},{p.corner_y:.2f}",
                     _vec(tuple(round(float(c), 4) + 0.0 for c in p.fs)),
                     _vec(tuple(round(float(c), 4) + 0.0 for c in p.ss)),
                     f"{p.pixel_size * 1e6:.2f}", "-" if clen is None else f"{(clen + p.coffset) * 1e3:.2f}"))
    header = ("panel", "index", "HxW", "slab ss", "slab fs", "corner x,y (px)", "fs", "ss", "pixel um", "z mm")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    table = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header] + rows]
    return "\n".join(head + table)
