"""CrystFEL geometry files (``.geom``): a strict reader and a writer for :class:`~.detector.Detector`.

Why not a maintained parser: ``cfelpyutils.geometry.load_crystfel_geometry`` (CFEL's reference reader) reports no
line numbers, silently ignores unknown panel keys, reads ``no_index = 0`` as true, checks neither overlapping
panels nor parallel fs/ss vectors, and its 2.2.0 wheel installs a top-level ``tests`` package; ``extra_geom``
only reads files of the detectors it has classes for. vitkit therefore reads ``.geom`` itself, following
CrystFEL's own parser (``libcrystfel/src/datatemplate.c``, CrystFEL >= 0.10) and ``man crystfel_geometry``,
and tests against cfelpyutils where it is installed.

Reading (:func:`read_geom`, :func:`parse_geom`)
    * ``key = value`` lines; ``;`` starts a comment anywhere, a line starting with ``#`` is a comment too.
    * Pixel ranges are integers (CrystFEL reads them with ``atof``: integral decimals like ``1029.0`` pass).
    * Every error names the line: ``FILE:LINE: what is wrong, what was expected``. Malformed values, bad vectors,
      missing ``min_fs``/``max_fs``/``min_ss``/``max_ss``/``fs``/``ss``/``corner_x``/``corner_y``/``res``,
      ``max < min``, parallel fs/ss, overlapping panels, bad regions outside their panel and unknown group
      members are always errors. Unknown keys are errors with ``strict=True`` and :class:`GeometryWarning`\\ s
      (the line is ignored) with ``strict=False``; so are a key set twice for one panel and global values after
      the last panel (CrystFEL rejects those: they apply to no panel).
    * Global values of panel keys (``res``, ``coffset``, ``adu_per_photon``, ``dimN``, ``data``, ``mask`` ...)
      are defaults for the panels *first mentioned after them* (CrystFEL's rule); a panel's own line wins.
    * Detector-wide values: ``photon_energy`` (``eV`` by default, or ``keV``), ``wavelength`` (unit ``m`` or
      ``A`` required, as in CrystFEL; converted to ``photon_energy``), ``clen`` (``m`` by default, or ``mm``).
      ``clen`` / ``photon_energy`` given as a location in the data files (``clen = /LCLS/detector_1/EncoderValue``)
      leave ``Detector.clen`` / ``photon_energy`` None and keep the location in ``Detector.clen_from`` /
      ``photon_energy_from`` (vitkit does not read per-event values from data files). A per-panel ``clen`` (older
      CrystFEL) becomes ``Panel.clen``. ``adu_per_photon`` / ``adu_per_eV`` before the first panel become
      ``Detector.adu_per_photon`` (``adu_per_eV`` is multiplied by the photon energy), later or per-panel ones
      ``Panel.adu_per_photon``.
    * ``data``, ``mask`` (``mask0_data``), ``mask_file`` (``mask0_file``), ``mask_good`` (``mask0_goodbits``) and
      ``mask_bad`` (``mask0_badbits``; hex ``0x...`` or decimal) must be the same for every panel. A file without
      ``data`` reads ``/data/data`` (CrystFEL's default).
    * Accepted and ignored (see :data:`IGNORED_KEYS`): ``bandwidth``, ``peak_list``, ``peak_list_type``,
      ``peak_info_location``, ``badrow_direction``, ``rail_direction``, ``clen_for_centering``, silently; with a
      :class:`GeometryWarning` because they change which pixels are used or where they are:
      ``detector_shift_x/y``, ``flag_lessthan/morethan/equal``, ``mask_edge_pixels``, ``saturation_map(_file)``,
      ``mask1..7_*``, ``photon_energy_scale``, ``electron_voltage``.
    * Groups: ``rigid_group_NAME = p0,p1`` -> ``Detector.rigid_groups``, ``rigid_group_collection_NAME = q0,q1``
      -> ``rigid_group_collections``; CrystFEL >= 0.10's ``group_NAME = ...`` hierarchy is read the same way
      (a group of panels is a rigid group, a group of groups a collection, so collections may also list
      collections); ``NAME/rigid_group = q0`` adds a panel to a group.
    * Bad regions ``badNAME/...``: ``min_fs .. max_ss`` (inclusive, data coordinates, ``badNAME/panel`` required
      unless there is one panel) or ``min_x .. max_y`` (lab pixels); not both.
    * Data layout: panels are in the order of their first line. A *slab* file (no panel has a fixed ``dimN``
      index, e.g. ``dim0 = %``, ``dim1 = ss``, ``dim2 = fs``) keeps ``min/max_fs/ss`` as slab coordinates;
      ``Panel.index`` is the panel's position when all panels share one shape (the stack ``to_panels`` builds),
      else None. A *stack* file (every panel has one fixed index, extra-geom style: ``dim0 = %``, ``p0/dim1 = 0``,
      ``p0/dim2 = ss``, ``p0/dim3 = fs``) gives ``Panel.index`` from it; its ``min/max_ss`` count within the
      indexed module, and vitkit re-derives slab positions by stacking the modules along the slow-scan axis in
      index order (module ``i`` starts at row ``i * H`` when all modules are ``H`` rows high, else right after the
      previous one), so ``Detector.to_panels`` / ``slab_shape`` work for both. Overlaps are checked in the file's
      own coordinates (per module in stack files). Only one fixed index per panel is supported.
    * ``read_geom`` names the detector after the file (``name`` = file stem) and sets ``source`` to the path.

Writing (:func:`write_geom`, :func:`format_geom`)
    Global lines (photon energy, ``clen``, ``adu_per_photon``, ``res`` when all panels share it, ``data``, mask),
    then one block per panel, bad regions, rigid groups and collections. Floats are written positionally with the
    fewest digits that read back to the same double (no exponents: CrystFEL's vector parser rejects them).
    ``layout="slab"`` (default): ``dim0 = %``, ``dim1 = ss``, ``dim2 = fs`` and slab coordinates. ``layout="stack"``:
    per panel ``NAME/dim1 = index``, ``NAME/dim2 = ss``, ``NAME/dim3 = fs`` with ``min/max_ss`` relative to the
    panel's module (every panel needs an ``index``). CrystFEL >= 0.10 rejects a per-panel ``clen``: a panel's own
    ``clen`` is written as an extra ``coffset`` relative to the global ``clen``. Bad region names that do not
    start with ``bad`` are written with ``bad_`` in front. ``read_geom(write_geom(d)) == d`` for every built-in
    layout in both layouts (apart from ``name`` and ``source``).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitkit.apps.peaks.geom_writer import NAME, detector_table, format_geom, write_geom
from vitkit.apps.peaks.panels import _HC_EV_M, BadRegion, Detector, GeometryError, Panel

__all__ = ["read_geom", "parse_geom", "write_geom", "format_geom", "detector_table", "GeometryWarning",
           "IGNORED_KEYS", "IGNORED_KEYS_WARN"]


class GeometryWarning(UserWarning):
    """A ``.geom`` line that vitkit accepts but does not use (with ``strict=False``: one it does not know)."""


IGNORED_KEYS = frozenset({"bandwidth", "peak_list", "peak_list_type", "peak_info_location", "badrow_direction",
                          "rail_direction", "clen_for_centering", "photon_energy_bandwidth"})
"""keys accepted and ignored silently (they do not change pixel positions, energies or which pixels are good)"""
IGNORED_KEYS_WARN = frozenset({"detector_shift_x", "detector_shift_y", "flag_lessthan", "flag_morethan",
                               "flag_equal", "mask_edge_pixels", "saturation_map", "saturation_map_file",
                               "photon_energy_scale", "electron_voltage"})
"""keys accepted and ignored with a :class:`GeometryWarning` (so are ``mask1..7_data/file/goodbits/badbits``)"""

_MASK_N = re.compile(r"mask([0-7])_(data|file|goodbits|badbits)")
_MASK0 = {"data": "mask", "file": "mask_file", "goodbits": "mask_good", "badbits": "mask_bad"}
_DIM = re.compile(r"dim(\d+)")
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_VEC_TERM = re.compile(r"([+-]?)((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)?([xyz])")
_RANGE_KEYS = ("min_fs", "max_fs", "min_ss", "max_ss")
_DETECTOR_WIDE = ("data", "mask", "mask_file", "mask_good", "mask_bad")


class _BadValue(ValueError):
    """A value that does not parse; the parser adds the file and line."""


# ------------------------------------------------------------------------------------------- values
def _int(v: str) -> int:
    if not _INT.fullmatch(v):
        raise _BadValue(f"expected an integer, found {v!r}")
    return int(v)


def _float(v: str) -> float:
    if not _FLOAT.fullmatch(v):
        raise _BadValue(f"expected a number, found {v!r}")
    return float(v)


def _pixel(v: str) -> int:
    """A pixel index; CrystFEL reads these with atof, so integral decimals such as ``1029.0`` are accepted too."""
    if _FLOAT.fullmatch(v) and not _INT.fullmatch(v):
        f = float(v)
        if not (math.isfinite(f) and f == int(f)):
            raise _BadValue(f"expected an integer, found {v!r}")
        v = str(int(f))
    x = _int(v)
    if x < 0:
        raise _BadValue(f"expected a pixel index >= 0, found {v!r}")
    return x


def _positive(v: str) -> float:
    x = _float(v)
    if not (x > 0 and math.isfinite(x)):
        raise _BadValue(f"expected a positive number, found {v!r}")
    return x


def _bool(v: str) -> bool:
    s = v.lower()
    if s in ("1", "true", "yes"):
        return True
    if s in ("0", "false", "no"):
        return False
    raise _BadValue(f"expected 1/0 or true/false, found {v!r}")


def _bits(v: str) -> int:
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", v):
        return int(v, 16)
    if re.fullmatch(r"[0-9]+", v):
        return int(v)
    raise _BadValue(f"expected bits as hex (0x0001) or a non-negative decimal integer, found {v!r}")


def _vector(v: str) -> tuple[float, float, float]:
    """``+1.0x +0.0y``, ``-0.0021x +0.9999y +0.0z``, ``x``, ``-y`` -> (x, y, z); absent components are 0."""
    s = re.sub(r"\s+", "", v)
    out = {"x": 0.0, "y": 0.0, "z": 0.0}
    seen, pos = set(), 0
    for m in _VEC_TERM.finditer(s):
        if m.start() != pos or (pos > 0 and not m.group(1)):
            break
        sign, num, axis = m.groups()
        if axis in seen:
            raise _BadValue(f"bad vector {v!r}: component {axis} given twice")
        seen.add(axis)
        out[axis] = (-1.0 if sign == "-" else 1.0) * (float(num) if num else 1.0)
        pos = m.end()
    if not s or pos != len(s):
        raise _BadValue(f"bad vector {v!r}: expected terms like '+1.0x -0.0021y +0.0z' (a signed number, then "
                        f"x, y or z)")
    vec = (out["x"], out["y"], out["z"])
    if not all(map(math.isfinite, vec)) or not any(vec):
        raise _BadValue(f"bad vector {v!r}: must be finite and non-zero")
    return vec


def _dim(v: str):
    if v in ("%", "ss", "fs"):
        return v
    if re.fullmatch(r"[0-9]+", v):
        return int(v)
    raise _BadValue(f"expected '%', 'ss', 'fs' or a fixed index >= 0, found {v!r}")


def _number_and_unit(v: str) -> tuple[str, str | None]:
    parts = v.split()
    if len(parts) == 1:
        return parts[0], None
    if len(parts) == 2:
        return parts[0], parts[1]
    raise _BadValue(f"expected a value and an optional unit, found {v!r}")


def _length(v: str) -> tuple[str, Any]:
    """``clen``: ``('m', metres)`` or ``('from', location)``."""
    num, unit = _number_and_unit(v)
    if unit not in (None, "m", "mm"):
        raise _BadValue(f"expected a length unit 'm' or 'mm', found {unit!r}")
    if _FLOAT.fullmatch(num):
        x = float(num) * (1e-3 if unit == "mm" else 1.0)
        if not math.isfinite(x):
            raise _BadValue(f"expected a finite length, found {v!r}")
        return "m", x
    if num.startswith("/"):
        return "from", v
    raise _BadValue(f"expected a length in m (or 'VALUE mm'), or a location in the data such as "
                    f"/LCLS/detector_1/EncoderValue, found {v!r}")


def _energy(v: str) -> tuple[str, Any]:
    """``photon_energy``: ``('eV', value)`` or ``('from', location)``."""
    num, unit = _number_and_unit(v)
    if unit not in (None, "eV", "keV"):
        raise _BadValue(f"expected a photon energy unit 'eV' or 'keV', found {unit!r}")
    if _FLOAT.fullmatch(num):
        x = float(num) * (1e3 if unit == "keV" else 1.0)
        if not (x > 0 and math.isfinite(x)):
            raise _BadValue(f"expected a positive photon energy, found {v!r}")
        return "eV", x
    if num.startswith("/"):
        return "from", v
    raise _BadValue(f"expected a photon energy in eV (or 'VALUE keV') or a location in the data, found {v!r}")


def _wavelength(v: str) -> tuple[str, Any]:
    num, unit = _number_and_unit(v)
    if unit not in ("m", "A"):
        raise _BadValue(f"wavelength needs a unit, 'm' or 'A' (as in CrystFEL), e.g. 'wavelength = 1.3 A'; "
                        f"found {v!r}")
    if _FLOAT.fullmatch(num):
        lam = float(num) * (1e-10 if unit == "A" else 1.0)
        if not (lam > 0 and math.isfinite(lam)):
            raise _BadValue(f"expected a positive wavelength, found {v!r}")
        return "eV", _HC_EV_M / lam
    if num.startswith("/"):
        return "from-wavelength", v
    raise _BadValue(f"expected a wavelength ('1.3 A', '1.3e-10 m') or a location in the data, found {v!r}")


def _adu(unit: str):
    def conv(v: str) -> tuple[str, float]:
        x = _float(v)
        if not math.isfinite(x):
            raise _BadValue(f"expected a finite number, found {v!r}")
        return unit, x
    return conv


def _text(v: str) -> str:
    return v


_PANEL_KEYS = {
    "min_fs": _pixel, "max_fs": _pixel, "min_ss": _pixel, "max_ss": _pixel,
    "fs": _vector, "ss": _vector, "corner_x": _float, "corner_y": _float,
    "res": _positive, "clen": _length, "coffset": _float, "max_adu": _float, "no_index": _bool,
    "adu_per_photon": _adu("photon"), "adu_per_eV": _adu("eV"),
    "data": _text, "mask": _text, "mask_file": _text, "mask_good": _bits, "mask_bad": _bits,
}
_BAD_KEYS = {"min_fs": _pixel, "max_fs": _pixel, "min_ss": _pixel, "max_ss": _pixel,
             "min_x": _float, "max_x": _float, "min_y": _float, "max_y": _float, "panel": _text}


# --------------------------------------------------------------------------------------------- parser
@dataclass
class _Item:
    value: Any
    line: int
    is_global: bool = False


@dataclass
class _PanelDraft:
    name: str
    line: int
    keys: dict[str, _Item]
    dims: dict[int, _Item]
    own: set[str] = field(default_factory=set)


@dataclass
class _BadDraft:
    name: str
    line: int
    keys: dict[str, _Item] = field(default_factory=dict)
    kind: str | None = None


class _Parser:
    def __init__(self, source: str, strict: bool):
        self.src, self.strict = source, strict
        self.panels: dict[str, _PanelDraft] = {}
        self.bad: dict[str, _BadDraft] = {}
        self.defaults: dict[str, _Item] = {}
        self.default_dims: dict[int, _Item] = {}
        self.unused_default: int | None = None
        self.pre_panel_adu: _Item | None = None
        self.energy: _Item | None = None
        self.clen: _Item | None = None
        self.groups: dict[str, _Item] = {}  # name -> ([members], line)
        self.collections: dict[str, _Item] = {}
        self.hierarchy: dict[str, _Item] = {}  # group_NAME lines
        self.panel_groups: list[tuple[str, str, int]] = []  # NAME/rigid_group = g

    # ---------------------------------------------------------------------------------- messages
    def error(self, line: int | None, msg: str) -> GeometryError:
        return GeometryError(f"{self.src}:{line}: {msg}" if line else f"{self.src}: {msg}")

    def warn(self, line: int, msg: str) -> None:
        warnings.warn(f"{self.src}:{line}: {msg}", GeometryWarning, stacklevel=4)

    def strict_or_warn(self, line: int, msg: str) -> None:
        if self.strict:
            raise self.error(line, msg + " (strict mode; read with strict=False to warn and ignore it)")
        self.warn(line, msg + "; ignored")

    def convert(self, conv, value: str, key: str, line: int):
        try:
            return conv(value)
        except _BadValue as e:
            raise self.error(line, f"{key} = {value}: {e}") from None

    # -------------------------------------------------------------------------------------- lines
    def feed(self, text: str) -> None:
        for n, raw in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
            line = raw.split(";", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            key, eq, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not key:
                self.strict_or_warn(n, f"expected 'key = value', found {raw.strip()!r}")
                continue
            if re.search(r"\s", key):
                raise self.error(n, f"malformed key {key!r}: keys are 'name' or 'panel/name' without spaces")
            if not value:
                raise self.error(n, f"{key} has no value")
            if "/" in key:
                owner, _, sub = key.partition("/")
                if not owner or not sub or "/" in sub:
                    raise self.error(n, f"malformed key {key!r}: expected 'PANEL/key' or 'badREGION/key'")
                if owner.startswith("bad"):
                    self.bad_key(owner, sub, value, n)
                elif owner.startswith(("group", "rigid_group")):
                    raise self.error(n, f"{owner!r}: panel names must not start with 'group' or 'rigid_group' "
                                        f"(reserved by CrystFEL)")
                else:
                    self.panel_key(owner, sub, value, n)
            else:
                self.global_key(key, value, n)

    def ignored(self, key: str, n: int) -> bool:
        m = _MASK_N.fullmatch(key)
        if key in IGNORED_KEYS:
            return True
        if key in IGNORED_KEYS_WARN or (m and m.group(1) != "0"):
            self.warn(n, f"{key!r} is accepted but not used by vitkit")
            return True
        return False

    def normalise(self, key: str) -> str:
        m = _MASK_N.fullmatch(key)
        return _MASK0[m.group(2)] if m and m.group(1) == "0" else key

    def panel_key(self, name: str, key: str, value: str, n: int) -> None:
        p = self.panels.get(name)
        if p is None:
            p = self.panels[name] = _PanelDraft(name, n, dict(self.defaults), dict(self.default_dims))
            self.unused_default = None
        key = self.normalise(key)
        if self.ignored(key, n):
            return
        if key == "rigid_group":
            self.panel_groups.append((value, name, n))
            return
        dm = _DIM.fullmatch(key)
        if dm:
            d = int(dm.group(1))
            self.check_twice(p, key, n)
            p.dims[d] = _Item(self.convert(_dim, value, key, n), n)
            return
        if key not in _PANEL_KEYS:
            self.strict_or_warn(n, f"unknown panel key {name}/{key}")
            return
        self.check_twice(p, "adu" if key.startswith("adu_per") else key, n)
        item = _Item(self.convert(_PANEL_KEYS[key], value, f"{name}/{key}", n), n)
        p.keys["adu" if key.startswith("adu_per") else key] = item

    def check_twice(self, p: _PanelDraft, key: str, n: int) -> None:
        if key in p.own:
            first = p.dims[int(key[3:])] if _DIM.fullmatch(key) else p.keys[key]
            self.strict_or_warn(n, f"{p.name}/{key} is set again (first on line {first.line})")
        p.own.add(key)

    def global_key(self, key: str, value: str, n: int) -> None:
        key = self.normalise(key)
        if key.startswith("rigid_group_collection_"):
            self.group_line(self.collections, key[len("rigid_group_collection_"):], key, value, n)
        elif key.startswith("rigid_group_"):
            self.group_line(self.groups, key[len("rigid_group_"):], key, value, n)
        elif key.startswith("group_"):
            self.group_line(self.hierarchy, key[len("group_"):], key, value, n)
        elif key in ("photon_energy", "wavelength"):
            item = _Item(self.convert(_energy if key == "photon_energy" else _wavelength, value, key, n), n)
            if item.value[0] == "from-wavelength":
                self.warn(n, f"wavelength = {value}: a wavelength read from the data files is not supported; "
                             f"photon_energy stays unset")
                return
            if self.energy is not None and self.energy.value != item.value:
                raise self.error(n, f"{key} = {value}: the beam energy was already set on line {self.energy.line} "
                                    f"(give photon_energy or wavelength once)")
            self.energy = item
        elif key == "clen":
            item = _Item(self.convert(_length, value, key, n), n)
            if self.clen is not None and self.clen.value != item.value:
                raise self.error(n, f"clen = {value}: the camera length was already set on line {self.clen.line} "
                                    f"(CrystFEL takes one global clen)")
            self.clen = item
        elif self.ignored(key, n):
            return
        elif _DIM.fullmatch(key):
            self.default_dims[int(key[3:])] = _Item(self.convert(_dim, value, key, n), n, True)
            self.unused_default = n if self.panels else None
        elif key in _PANEL_KEYS:
            k = "adu" if key.startswith("adu_per") else key
            self.defaults[k] = _Item(self.convert(_PANEL_KEYS[key], value, key, n), n, True)
            self.unused_default = n if self.panels else None
            if k == "adu" and not self.panels:
                self.pre_panel_adu = self.defaults[k]
        else:
            self.strict_or_warn(n, f"unknown key {key!r}")

    def group_line(self, table: dict, name: str, key: str, value: str, n: int) -> None:
        members = [m.strip() for m in value.split(",")]
        if not name or not NAME.fullmatch(name):
            raise self.error(n, f"{key}: a group needs a name, e.g. rigid_group_q0 = p0,p1")
        if not all(members):
            raise self.error(n, f"{key} = {value}: expected comma-separated names without empty entries")
        dup = sorted({m for m in members if members.count(m) > 1})
        if dup:
            raise self.error(n, f"{key} = {value}: {dup} listed more than once")
        if name in table:
            raise self.error(n, f"{key} is defined again (first on line {table[name].line})")
        table[name] = _Item(members, n)

    def bad_key(self, name: str, key: str, value: str, n: int) -> None:
        b = self.bad.setdefault(name, _BadDraft(name, n))
        if key not in _BAD_KEYS:
            self.strict_or_warn(n, f"unknown bad-region key {name}/{key} (expected min_fs, max_fs, min_ss, max_ss "
                                   f"and panel, or min_x, max_x, min_y, max_y)")
            return
        if key != "panel":
            kind = "xy" if key.endswith(("_x", "_y")) else "fsss"
            if b.kind is not None and b.kind != kind:
                raise self.error(n, f"{name}/{key}: a bad region is either min/max_fs/ss (with panel) or "
                                    f"min/max_x/y, not both (CrystFEL: 'You can't mix x/y and fs/ss')")
            b.kind = kind
        if key in b.keys:
            self.strict_or_warn(n, f"{name}/{key} is set again (first on line {b.keys[key].line})")
        b.keys[key] = _Item(self.convert(_BAD_KEYS[key], value, f"{name}/{key}", n), n)

    # --------------------------------------------------------------------------------- assembling
    def build(self) -> Detector:
        if not self.panels:
            raise self.error(None, "no panels: expected lines like 'p0/min_fs = 0' (CrystFEL: 'No panel "
                                   "descriptions in geometry file')")
        if self.unused_default is not None:
            self.strict_or_warn(self.unused_default, "this global value comes after the last panel and applies to "
                                                     "no panel (global values apply to panels defined after them)")
        first_line = min(p.line for p in self.panels.values())
        photon_energy = self.energy.value[1] if self.energy and self.energy.value[0] == "eV" else None
        energy_from = self.energy.value[1] if self.energy and self.energy.value[0] == "from" else None
        det_adu = self.pre_panel_adu  # a global adu line before the first panel is the detector's

        def adu_per_photon(item: _Item) -> float | None:
            unit, x = item.value
            if unit == "photon":
                return x
            if photon_energy is None:
                self.warn(item.line, "adu_per_eV needs a numeric photon_energy to become adu_per_photon; left unset")
                return None
            return x * photon_energy

        drafts = list(self.panels.values())
        dims = [self.dim_structure(p) for p in drafts]
        fixed = [next((v for v in d if isinstance(v, int)), None) for d in dims]
        stacked = [f is not None for f in fixed]
        if any(stacked) and not all(stacked):
            p = drafts[stacked.index(not stacked[0])]
            raise self.error(p.line, f"panel {p.name}: some panels have a fixed index dimension (dimN = number, a "
                                     f"panel stack) and some do not; give every panel its index or none")
        panels: list[Panel] = []
        for p, idx in zip(drafts, fixed):
            panels.append(self.panel(p, idx, det_adu, adu_per_photon))
        self.check_overlaps(drafts, panels)
        if all(stacked):
            panels, offsets = self.stack_to_slab(panels)
        else:
            offsets = None
            if len({q.shape for q in panels}) == 1:
                panels = [q.replace(index=k) for k, q in enumerate(panels)]
        wide = self.detector_wide(drafts)
        clen = self.clen.value[1] if self.clen and self.clen.value[0] == "m" else None
        clen_from = self.clen.value[1] if self.clen and self.clen.value[0] == "from" else None
        names = [q.name for q in panels]
        groups, collections = self.all_groups(names)
        if wide["mask"] is None and wide["mask_file"] is None and (wide["mask_good"] or wide["mask_bad"]):
            self.warn(first_line, "mask_good/mask_bad are set but no mask location (mask = /path): CrystFEL rejects "
                                  "this")
        return Detector(
            panels=panels, photon_energy=photon_energy, clen=clen,
            adu_per_photon=adu_per_photon(det_adu) if det_adu is not None else None,
            data=wide["data"] if wide["data"] is not None else "/data/data", mask_file=wide["mask_file"],
            mask=wide["mask"], mask_good=wide["mask_good"], mask_bad=wide["mask_bad"],
            bad_regions=self.bad_regions(panels, drafts, offsets), rigid_groups=groups,
            rigid_group_collections=collections, source=self.src, clen_from=clen_from,
            photon_energy_from=energy_from)

    def dim_structure(self, p: _PanelDraft) -> list:
        if not p.dims:
            return ["ss", "fs"]  # CrystFEL's default: dim0 = ss, dim1 = fs
        top = max(p.dims)
        missing = [d for d in range(top + 1) if d not in p.dims]
        if missing:
            raise self.error(p.line, f"panel {p.name}: dim{missing[0]} is not defined (dimensions up to dim{top} "
                                     f"are used)")
        vals = [p.dims[d].value for d in range(top + 1)]
        line = max(p.dims[d].line for d in range(top + 1))
        if vals.count("ss") != 1 or vals.count("fs") != 1 or vals.index("ss") > vals.index("fs"):
            raise self.error(line, f"panel {p.name}: dimensions {vals} need exactly one 'ss' and one 'fs', 'ss' "
                                   f"before 'fs'")
        if vals.count("%") > 1:
            raise self.error(line, f"panel {p.name}: dimensions {vals} have more than one event placeholder '%'")
        if sum(isinstance(v, int) for v in vals) > 1:
            raise self.error(line, f"panel {p.name}: dimensions {vals} fix more than one index; vitkit supports "
                                   f"one panel-stack index (dim1 = N)")
        return vals

    def panel(self, p: _PanelDraft, index: int | None, det_adu: _Item | None, adu_per_photon) -> Panel:
        k = p.keys
        for key in _RANGE_KEYS + ("fs", "ss", "corner_x", "corner_y", "res"):
            if key not in k:
                raise self.error(p.line, f"panel {p.name} has no {key} (every panel needs min_fs, max_fs, min_ss, "
                                         f"max_ss, fs, ss, corner_x, corner_y and res, its own or a global one "
                                         f"before it)")
        for lo, hi in (("min_fs", "max_fs"), ("min_ss", "max_ss")):
            if k[hi].value < k[lo].value:
                raise self.error(k[hi].line, f"panel {p.name}: {hi} = {k[hi].value} is below {lo} = {k[lo].value} "
                                             f"(line {k[lo].line}); ranges are inclusive")
        fs, ss = np.array(k["fs"].value), np.array(k["ss"].value)
        scale = float(np.linalg.norm(fs) * np.linalg.norm(ss))
        line = max(k["fs"].line, k["ss"].line)
        if np.linalg.norm(np.cross(fs, ss)) <= 1e-9 * scale:
            raise self.error(line, f"panel {p.name}: fs {tuple(fs)} and ss {tuple(ss)} are parallel")
        if abs(fs[0] * ss[1] - fs[1] * ss[0]) <= 1e-9 * scale:
            raise self.error(line, f"panel {p.name}: fs {tuple(fs)} and ss {tuple(ss)} do not span the detector "
                                   f"plane (their x/y parts are parallel: the panel is edge-on to the beam)")
        clen = None
        if "clen" in k:
            if k["clen"].value[0] != "m":
                raise self.error(k["clen"].line, f"panel {p.name}: a per-panel clen must be a number (a location in "
                                                 f"the data is supported for the global clen only)")
            clen = k["clen"].value[1]
        adu = k.get("adu")
        return Panel(name=p.name, min_fs=k["min_fs"].value, max_fs=k["max_fs"].value, min_ss=k["min_ss"].value,
                     max_ss=k["max_ss"].value, fs=tuple(float(x) for x in fs), ss=tuple(float(x) for x in ss),
                     corner_x=k["corner_x"].value, corner_y=k["corner_y"].value, res=k["res"].value, clen=clen,
                     coffset=k["coffset"].value if "coffset" in k else 0.0,
                     adu_per_photon=None if adu is None or adu is det_adu else adu_per_photon(adu),
                     max_adu=k["max_adu"].value if "max_adu" in k else None, index=index,
                     no_index=k["no_index"].value if "no_index" in k else False)

    def check_overlaps(self, drafts: list[_PanelDraft], panels: list[Panel]) -> None:
        for j in range(len(panels)):
            b = panels[j]
            for i in range(j):
                a = panels[i]
                if a.index != b.index:
                    continue
                if (a.min_fs <= b.max_fs and b.min_fs <= a.max_fs and a.min_ss <= b.max_ss
                        and b.min_ss <= a.max_ss):
                    where = "the data array" if b.index is None else f"module {b.index} of the stack"
                    raise self.error(drafts[j].line, f"panel {b.name} (fs {b.min_fs}..{b.max_fs}, ss {b.min_ss}.."
                                                     f"{b.max_ss}) overlaps panel {a.name} (line {drafts[i].line}; "
                                                     f"fs {a.min_fs}..{a.max_fs}, ss {a.min_ss}..{a.max_ss}) in "
                                                     f"{where}; ranges are inclusive")

    @staticmethod
    def stack_to_slab(panels: list[Panel]) -> tuple[list[Panel], dict[int, int]]:
        heights: dict[int, int] = {}
        for q in panels:
            heights[q.index] = max(heights.get(q.index, 0), q.max_ss + 1)
        if len(set(heights.values())) == 1:
            h = next(iter(heights.values()))
            offsets = {i: i * h for i in heights}
        else:
            offsets, start = {}, 0
            for i in sorted(heights):
                offsets[i], start = start, start + heights[i]
        out = [q.replace(min_ss=q.min_ss + offsets[q.index], max_ss=q.max_ss + offsets[q.index]) for q in panels]
        return out, offsets

    def detector_wide(self, drafts: list[_PanelDraft]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in _DETECTOR_WIDE:
            first = drafts[0].keys.get(key)
            for p in drafts[1:]:
                item = p.keys.get(key)
                if (item is None) != (first is None) or (item is not None and item.value != first.value):
                    line = item.line if item is not None else p.line
                    a = "unset" if first is None else f"{first.value!r} (line {first.line})"
                    b = "unset" if item is None else repr(item.value)
                    raise self.error(line, f"panel {p.name}: {key} is {b} but {a} for panel {drafts[0].name}; vitkit "
                                           f"needs one {key} for all panels")
            out[key] = None if first is None else first.value
        return out

    def all_groups(self, names: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        panel_set = set(names)
        groups = {g: list(it.value) for g, it in self.groups.items()}
        lines = {g: it.line for g, it in self.groups.items()}
        for g, name, n in self.panel_groups:  # NAME/rigid_group = g
            groups.setdefault(g, [])
            lines.setdefault(g, n)
            if name not in groups[g]:
                groups[g].append(name)
        collections = {c: list(it.value) for c, it in self.collections.items()}
        clines = {c: it.line for c, it in self.collections.items()}
        for g, it in self.hierarchy.items():  # CrystFEL >= 0.10: group_NAME = panels or groups
            if all(m in panel_set for m in it.value):
                table, tlines = groups, lines
            elif all(m in self.hierarchy for m in it.value):
                table, tlines = collections, clines
            else:
                bad = [m for m in it.value if m not in panel_set and m not in self.hierarchy]
                raise self.error(it.line, f"group_{g}: {bad or it.value} are not panels or groups (a group lists "
                                          f"either panels or other groups)")
            if g in table:
                raise self.error(it.line, f"group_{g} is defined twice (also line {tlines[g]})")
            table[g], tlines[g] = list(it.value), it.line
        for g, members in groups.items():
            unknown = [m for m in members if m not in panel_set]
            if unknown:
                raise self.error(lines[g], f"rigid group {g}: no panel named {unknown[0]!r} (panels: "
                                           f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
        for c, members in collections.items():  # of rigid groups (or, in a group_ hierarchy, of collections)
            unknown = [m for m in members if m not in groups and m not in collections]
            if unknown:
                raise self.error(clines[c], f"rigid group collection {c}: no rigid group named {unknown[0]!r} "
                                            f"(groups: {', '.join(list(groups)[:8]) or 'none'}"
                                            f"{', ...' if len(groups) > 8 else ''})")
        return groups, collections

    def bad_regions(self, panels: list[Panel], drafts: list[_PanelDraft], offsets) -> list[BadRegion]:
        by_name = {q.name: q for q in panels}
        out = []
        for b in self.bad.values():
            k = b.keys
            if b.kind is None:
                raise self.error(b.line, f"bad region {b.name} has no coordinate ranges (min_fs/max_fs/min_ss/"
                                         f"max_ss with panel, or min_x/max_x/min_y/max_y)")
            need = _RANGE_KEYS if b.kind == "fsss" else ("min_x", "max_x", "min_y", "max_y")
            for key in need:
                if key not in k:
                    raise self.error(b.line, f"bad region {b.name} has no {key} (needs {', '.join(need)})")
            for lo, hi in zip(need[::2], need[1::2]):
                if k[hi].value < k[lo].value:
                    raise self.error(k[hi].line, f"bad region {b.name}: {hi} = {k[hi].value} is below {lo} = "
                                                 f"{k[lo].value}")
            panel = k["panel"].value if "panel" in k else None
            if panel is not None and panel not in by_name:
                raise self.error(k["panel"].line, f"bad region {b.name}: no panel named {panel!r}")
            if b.kind == "xy":
                out.append(BadRegion(name=b.name, panel=panel, min_x=k["min_x"].value, max_x=k["max_x"].value,
                                     min_y=k["min_y"].value, max_y=k["max_y"].value))
                continue
            if panel is None:
                if len(panels) != 1:
                    raise self.error(b.line, f"bad region {b.name}: give {b.name}/panel (fs/ss ranges are per panel)")
                panel = panels[0].name
                self.warn(b.line, f"bad region {b.name}: assuming {b.name}/panel = {panel} (the only panel)")
            q = by_name[panel]
            shift = offsets[q.index] if offsets is not None else 0
            lo_ss, hi_ss = k["min_ss"].value + shift, k["max_ss"].value + shift
            if (k["min_fs"].value < q.min_fs or k["max_fs"].value > q.max_fs or lo_ss < q.min_ss
                    or hi_ss > q.max_ss):
                raise self.error(b.line, f"bad region {b.name} (fs {k['min_fs'].value}..{k['max_fs'].value}, ss "
                                         f"{k['min_ss'].value}..{k['max_ss'].value}) is outside panel {panel}")
            out.append(BadRegion(name=b.name, panel=panel, min_fs=k["min_fs"].value, max_fs=k["max_fs"].value,
                                 min_ss=lo_ss, max_ss=hi_ss))
        return out


def parse_geom(text: str, source: str = "<string>", strict: bool = True) -> Detector:
    """A :class:`Detector` from the text of a CrystFEL geometry file; errors name ``source:LINE``."""
    p = _Parser(str(source), strict)
    p.feed(text)
    return p.build()


def read_geom(path: str | os.PathLike, strict: bool = True) -> Detector:
    """Read a CrystFEL ``.geom`` file (see the module docstring for what is read and checked).

    Raises :class:`GeometryError` (naming ``path:LINE``) for malformed or inconsistent files; with
    ``strict=False`` unknown keys only warn (:class:`GeometryWarning`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"geometry file {str(path)!r} not found" + (" (it is a folder)" if path.is_dir()
                                                                             else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GeometryError(f"{path}: not a text file ({e.reason} at byte {e.start}); expected a CrystFEL .geom "
                            f"file") from None
    det = parse_geom(text, source=str(path), strict=strict)
    det.name = path.stem
    return det
