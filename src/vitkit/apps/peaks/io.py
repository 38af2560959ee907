"""Reading detector frames (zarr, HDF5/CXI, .npy, PNG, TIFF) and writing peaks (CXI, CSV), stores and overlays.

The readers live in :mod:`.sources`, the writers in :mod:`.writers` and :mod:`.cxi`; this module picks a source
for a path (:func:`open_frames`) and gathers them all under one name.

Readers
    :func:`open_frames` turns a path, a glob, a CSV list of paths or a list of any of those into a lazy,
    indexable :class:`FrameSource`: ``len(src)``, ``src[i]`` -> float32 ``[H, W]`` (``src[a:b]`` ->
    ``[n, H, W]``), ``src.label(i)`` -> ``[H, W]`` integer array or None, ``src.has_labels``. Files are opened
    on first access and re-opened in a forked worker, so a source can be handed to DataLoader workers.
    :func:`read_frames` reads everything eagerly into ``(images [N, H, W] float32, labels [N, H, W] | None)``.

    ============ ================================= =================================================
    suffix       layout                            images / labels
    ============ ================================= =================================================
    ``.zarr``    PeakNet store (zarr v2 or v3)     ``images (B, H, W)`` / ``labels (B, H, W)`` (keys
                                                   configurable with ``key`` / ``label_key``)
    ``.h5``,     HDF5 / CXI                        ``key`` (default: the first of
    ``.hdf5``,                                     ``/entry_1/data_1/data``, ``/images``, ``/data``);
    ``.cxi``                                       labels: ``label_key``, else a sibling ``labels``
    ``.npy``     ``(N, H, W)`` or ``(H, W)``       memory-mapped; no labels
    ``.png``,    one frame (multi-page TIFF: one   mono only (8/16-bit PNG, any real TIFF dtype)
    ``.tif(f)``  frame per page)
    ``.csv``     one path per row (a ``path``      relative paths are relative to the CSV's folder
                 column if there is a header)
    ============ ================================= =================================================

    Errors are specific subclasses of :class:`PeakIOError` (itself a ``ValueError``) and say what was
    expected, what was found and what to do: :class:`DatasetKeyError` (lists the datasets that exist),
    :class:`CorruptFileError` (unreadable/truncated HDF5 or zarr, including zarr stores with missing image
    chunks, which zarr would otherwise silently read as zeros), :class:`NaNFrameError` (names the frame),
    :class:`LabelShapeError`, :class:`UnsupportedFormatError`; :class:`FramesNotFoundError` (a
    ``FileNotFoundError``) when nothing matches.

Writers
    :func:`write_zarr`, :func:`write_cxi`, :func:`write_csv` and :func:`save_overlay_png` are atomic: they
    write into a hidden temporary file or folder next to the target and ``os.replace`` it into place only
    after everything was written, so an interrupted run leaves either the old target or nothing, never a
    half-written one (temporary files are removed on errors; a killed process may leave a hidden
    ``.NAME.tmp-HOST-PID-*`` entry behind, never the target, and the next write of ``NAME`` on that host deletes
    it once its process is gone). Every writer goes through :mod:`vitkit.atomic`.

Peak coordinates are ``(y, x)`` in NumPy's pixel-centre convention (the centre of pixel ``[i, j]`` is
``(i, j)``), which is what the CXI ``peakXPosRaw`` (fast scan, x) / ``peakYPosRaw`` (slow scan, y) arrays hold
for Cheetah and CrystFEL (CrystFEL adds the half-pixel shift to its corner convention itself).
"""

from __future__ import annotations

import csv
import glob as globmod
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitkit.apps.peaks.cxi import read_cxi_peaks, write_cxi
from vitkit.apps.peaks.sources import (
    CXI_DATA,
    CXI_RESULT,
    ConcatSource,
    CorruptFileError,
    DatasetKeyError,
    FramesNotFoundError,
    FrameSource,
    H5Source,
    ImageSource,
    LabelShapeError,
    NaNFrameError,
    NpySource,
    PeakIOError,
    UnsupportedFormatError,
    ZarrSource,
)
from vitkit.apps.peaks.writers import read_csv_peaks, save_overlay_png, write_csv, write_zarr

__all__ = [
    "PeakIOError", "DatasetKeyError", "CorruptFileError", "NaNFrameError", "LabelShapeError",
    "UnsupportedFormatError", "FramesNotFoundError",
    "FrameSource", "ZarrSource", "H5Source", "NpySource", "ImageSource", "ConcatSource",
    "open_frames", "read_frames", "write_zarr", "write_cxi", "read_cxi_peaks", "write_csv", "read_csv_peaks",
    "save_overlay_png", "CXI_DATA", "CXI_RESULT",
]

_SUFFIXES = {".zarr": "zarr", ".h5": "hdf5", ".hdf5": "hdf5", ".cxi": "hdf5", ".npy": "npy", ".png": "image",
             ".tif": "image", ".tiff": "image"}


# ---------------------------------------------------------------------------------------------- dispatch
def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _csv_paths(csv_path: Path) -> list[str]:
    base = csv_path.parent
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and r[0].strip() and not r[0].lstrip().startswith("#")]
    if not rows:
        return []
    col = 0
    header = [c.strip().lower() for c in rows[0]]
    if "path" in header:
        col = header.index("path")
        rows = rows[1:]
    out = []
    for r in rows:
        p = Path(r[col].strip()).expanduser()
        out.append(str(p if p.is_absolute() else base / p))
    return out


def _expand(spec) -> list[str]:
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in _expand(s)]
    s = os.fspath(spec)
    if _is_glob(s) and not os.path.exists(s):
        return sorted(globmod.glob(os.path.expanduser(s)))
    if s.lower().endswith(".csv"):
        if not os.path.exists(s):
            raise FramesNotFoundError(f"path list {s} does not exist.")
        return _expand(_csv_paths(Path(s)))
    return [s]


def _kind(path: str) -> str:
    p = Path(path)
    kind = _SUFFIXES.get(p.suffix.lower())
    if kind is None and p.is_dir() and ((p / ".zgroup").exists() or (p / "zarr.json").exists()):
        kind = "zarr"
    if kind is None:
        raise UnsupportedFormatError(
            f"{path}: unsupported suffix {p.suffix!r}; expected one of {sorted(_SUFFIXES)} (or a zarr folder, or a "
            ".csv list of such paths). Convert the file, or open it with a FrameSource subclass.")
    return kind


def _open_one(path: str, key: str | None, label_key: str | bool | None, check_finite: bool) -> FrameSource:
    kind = _kind(path)
    if kind == "zarr":
        return ZarrSource(path, key, label_key, check_finite)
    if kind == "hdf5":
        return H5Source(path, key, label_key, check_finite)
    if kind == "npy":
        return NpySource(path, check_finite=check_finite)
    return ImageSource(path, check_finite=check_finite)


def open_frames(paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike], key: str | None = None,
                label_key: str | bool | None = None, check_finite: bool = True) -> FrameSource:
    """Open frames lazily from a path, a glob, a ``.csv`` list of paths, or a list of any of these.

    Args:
        paths_or_glob: what to open; globs are expanded in sorted order.
        key: image dataset/array name (zarr default ``images``; HDF5 default module docstring).
        label_key: label dataset/array (default: ``labels`` when present); ``False`` ignores labels.
        check_finite: raise :class:`NaNFrameError` when a frame read contains NaN/inf.

    Returns:
        A :class:`FrameSource` (a :class:`ConcatSource` when several files match).
    """
    paths = _expand(paths_or_glob)
    if not paths:
        what = [os.fspath(p) for p in paths_or_glob] if isinstance(paths_or_glob, (list, tuple)) \
            else os.fspath(paths_or_glob)
        raise FramesNotFoundError(f"no file matches {what!r}; expected at least one frame file. Check the path "
                                  "or glob (relative paths are relative to the current directory).")
    for p in paths:
        if not os.path.exists(p):
            raise FramesNotFoundError(f"{p} does not exist (from {paths_or_glob!r}).")
    sources = [_open_one(p, key, label_key, check_finite) for p in paths]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


def read_frames(paths_or_glob, key: str | None = None, label_key: str | bool | None = None,
                check_finite: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Read all frames eagerly: ``(images float32 [N, H, W], labels [N, H, W] or None)``.

    Labels are returned only when every frame has them. All frames must have the same shape.
    """
    src = open_frames(paths_or_glob, key, label_key, check_finite)
    if len(src) and src.frame_shape is None:
        shapes = sorted({s.frame_shape for s in getattr(src, "sources", [src])})
        raise UnsupportedFormatError(f"read_frames: the files have different frame shapes {shapes}; expected one "
                                     "shape to stack them. Use open_frames and read frame by frame.")
    images = src[:] if len(src) else np.zeros((0, 0, 0), dtype=np.float32)
    labels = np.stack([src.label(i) for i in range(len(src))]) if src.has_labels and len(src) else None
    src.close()
    return images, labels
