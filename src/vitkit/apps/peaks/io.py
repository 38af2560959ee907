"""Reading detector frames (zarr, HDF5/CXI, .npy, PNG, TIFF) and writing peaks (CXI, CSV), stores and overlays.

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
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitkit.atomic import atomic_path
from vitkit.errors import InputError, VitkitError

__all__ = [
    "PeakIOError", "DatasetKeyError", "CorruptFileError", "NaNFrameError", "LabelShapeError",
    "UnsupportedFormatError", "FramesNotFoundError",
    "FrameSource", "ZarrSource", "H5Source", "NpySource", "ImageSource", "ConcatSource",
    "open_frames", "read_frames", "write_zarr", "write_cxi", "read_cxi_peaks", "write_csv", "read_csv_peaks",
    "save_overlay_png", "CXI_DATA", "CXI_RESULT",
]

CXI_DATA = "/entry_1/data_1/data"
CXI_RESULT = "/entry_1/result_1"
_H5_DEFAULT_KEYS = (CXI_DATA, "/images", "/data")
_SUFFIXES = {".zarr": "zarr", ".h5": "hdf5", ".hdf5": "hdf5", ".cxi": "hdf5", ".npy": "npy", ".png": "image",
             ".tif": "image", ".tiff": "image"}


# ------------------------------------------------------------------------------------------------ errors
class PeakIOError(InputError):
    """A frame file cannot be used as it is."""


class DatasetKeyError(PeakIOError):
    """The requested dataset/array is not in the file; ``available`` lists what is."""

    def __init__(self, message: str, available: Sequence[str] = ()):
        super().__init__(message)
        self.available = list(available)


class CorruptFileError(PeakIOError):
    """The file or store is truncated or cannot be decoded."""


class NaNFrameError(PeakIOError):
    """A frame contains NaN or infinite pixels; ``frame`` is its index in the source."""

    def __init__(self, message: str, frame: int):
        super().__init__(message)
        self.frame = frame


class LabelShapeError(PeakIOError):
    """Labels and images have different shapes."""


class UnsupportedFormatError(PeakIOError):
    """The suffix or the array layout is not one that can be read."""


class FramesNotFoundError(VitkitError, FileNotFoundError):
    """No file matches the given path, glob or list."""


# ----------------------------------------------------------------------------------------------- sources
class FrameSource:
    """A lazy, indexable sequence of float32 frames ``[H, W]`` with optional integer labels.

    Subclasses implement ``__len__``, ``_read(i)`` and (if they have labels) ``_read_label(i)``.
    With ``check_finite`` (default) every frame read is checked for NaN/inf (:class:`NaNFrameError`).
    """

    path: str = ""
    has_labels: bool = False
    frame_shape: tuple[int, ...] | None = None
    check_finite: bool = True

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _read_label(self, i: int) -> np.ndarray | None:
        return None

    def describe(self, i: int) -> str:
        """Human-readable location of frame ``i`` (for messages)."""
        return f"frame {i} of {self.path}"

    def _index(self, i: int) -> int:
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"frame index must be an int or a slice, found {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"frame index {i} out of range for {n} frames in {self.path}")
        return int(i) % n

    def __getitem__(self, i: int | slice) -> np.ndarray:
        if isinstance(i, slice):
            idx = range(*i.indices(len(self)))
            if not idx:
                return np.zeros((0, *(self.frame_shape or (0, 0))), dtype=np.float32)
            return np.stack([self[j] for j in idx])
        i = self._index(i)
        raw = np.asarray(self._read(i))
        if np.iscomplexobj(raw):  # a cast would silently drop the imaginary part
            raise UnsupportedFormatError(
                f"{self.describe(i)} has complex dtype {raw.dtype}; expected real pixel values (integer, bool or "
                "float). Store the magnitude (np.abs) or the real part explicitly.")
        frame = raw.astype(np.float32, copy=False)
        if self.check_finite and not np.isfinite(frame).all():
            bad = np.count_nonzero(~np.isfinite(frame))
            raise NaNFrameError(
                f"{self.describe(i)} contains {bad} NaN/inf pixel(s) out of {frame.size}; expected finite "
                "values. Replace them before inference (e.g. np.nan_to_num(frame, nan=0.0), as bad-pixel masks "
                "do) or skip the frame; pass check_finite=False to read it anyway.", frame=i)
        return frame

    def label(self, i: int) -> np.ndarray | None:
        """Label ``[H, W]`` of frame ``i`` in its stored integer dtype, or None without labels."""
        return self._read_label(self._index(i)) if self.has_labels else None

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(frame, label or None)``."""
        return self[i], self.label(i)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        """Release file handles (they are re-opened on the next access)."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, frames={len(self)}, shape={self.frame_shape}, "
                f"labels={self.has_labels})")


def _frames_shape(shape: tuple[int, ...], what: str) -> tuple[int, ...]:
    """``(N, *frame_shape)``: ``(H, W)`` is one frame, ``(N, H, W)`` frames or slabs, ``(N, P, H, W)`` panel
    stacks (psana's layout; read them with a detector geometry, :class:`EventSource`)."""
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) in (3, 4):
        return tuple(shape)
    raise UnsupportedFormatError(
        f"{what}: expected frames (N, H, W), one frame (H, W) or panel stacks (N, P, H, W), found shape "
        f"{tuple(shape)}.")


def _check_label_shape(img_shape, lab_shape, what: str,
                       hint: str = "Re-export the labels, or pass label_key=False to ignore them.") -> None:
    if tuple(img_shape) != tuple(lab_shape):
        raise LabelShapeError(
            f"{what}: labels have shape {tuple(lab_shape)} but images have shape {tuple(img_shape)}; expected "
            f"one label map per frame of the same size. {hint}")


ALL_CHUNKS_ATTR = "vitkit_all_chunks_stored"
"""Attribute :func:`write_zarr` sets on its image array: every chunk was written, so a missing one is a loss."""


class ZarrSource(FrameSource):
    """A PeakNet zarr store: arrays ``images (B, H, W)`` and optionally ``labels (B, H, W)``.

    ``label_key=None`` uses ``labels`` if present; ``False`` ignores labels; a name must exist.

    Missing image chunks: zarr's default writer does not store a chunk equal to the array's fill value (an
    all-zero frame), and reads a missing chunk back as that value, so a missing chunk alone proves nothing. It is
    a truncation (:class:`CorruptFileError` at open) when the store says every chunk was written (the attribute
    ``vitkit_all_chunks_stored`` that :func:`write_zarr` sets) or when the array has no fill value (``null``:
    a missing chunk has no defined content). Otherwise missing chunks read as the fill value, as in zarr.
    """

    def __init__(self, path: str | os.PathLike, key: str | None = None, label_key: str | bool | None = None,
                 check_finite: bool = True):
        self.path = str(path)
        self.key = key or "images"
        self.check_finite = check_finite
        self._pid = None
        self._group = None
        g = self._open()
        names = self._names(g)
        if self.key not in names:
            raise DatasetKeyError(
                f"{self.path}: no array {self.key!r} in this zarr store; it has {names or 'no arrays'}. "
                "Pass key=<name of the image array> (PeakNet stores use 'images').", names)
        img = self._array(self.key)
        self._n, *fshape = _frames_shape(img.shape, f"{self.path}/{self.key}")
        self._squeeze = img.ndim == 2
        self.frame_shape = tuple(fshape)
        # zarr reads a missing chunk as the fill value: a truncated copy would silently yield blank frames. A
        # missing chunk is legitimate only where the writer may have skipped it (see the class docstring).
        try:
            have, want = img.nchunks_initialized, img.nchunks
            all_stored = bool(img.attrs.get(ALL_CHUNKS_ATTR, False)) or img.metadata.fill_value is None
        except Exception:  # noqa: BLE001 - the check is best-effort on exotic stores
            have = want = 0
            all_stored = False
        if have < want and all_stored:
            raise CorruptFileError(
                f"{self.path}/{self.key}: only {have} of {want} chunks are present, so the store is truncated "
                "(an interrupted copy or write); expected every image chunk. Re-copy or re-write the store.")
        if label_key is False:
            self.label_key = None
        elif label_key is None:
            self.label_key = "labels" if "labels" in names else None
        else:
            if label_key not in names:
                raise DatasetKeyError(f"{self.path}: no label array {label_key!r}; the store has {names}.", names)
            self.label_key = str(label_key)
        self.has_labels = self.label_key is not None
        if self.has_labels:
            _check_label_shape(img.shape, self._array(self.label_key).shape, self.path)

    def _open(self):
        import zarr

        if self._group is not None and self._pid == os.getpid():
            return self._group
        if not os.path.exists(self.path):
            raise FramesNotFoundError(f"zarr store {self.path} does not exist.")
        try:
            self._group = zarr.open_group(self.path, mode="r")
        except FileNotFoundError as e:  # also zarr's GroupNotFoundError: a folder without zarr metadata
            raise CorruptFileError(
                f"{self.path}: expected a zarr group (a '.zgroup' or 'zarr.json' file), found none ({e}). The "
                "store is incomplete or is not a zarr store.") from e
        except Exception as e:  # noqa: BLE001 - undecodable metadata
            raise CorruptFileError(f"{self.path}: the zarr metadata cannot be read ({type(e).__name__}: {e}); "
                                   "the store is truncated or corrupt. Re-copy or re-write it.") from e
        self._pid = os.getpid()
        return self._group

    def _names(self, g) -> list[str]:
        try:
            return sorted(g.array_keys())
        except Exception as e:  # noqa: BLE001 - undecodable member metadata
            raise CorruptFileError(f"{self.path}: the metadata of the store's arrays cannot be read "
                                   f"({type(e).__name__}: {e}); the store is corrupt. Re-copy or re-write it.") from e

    def _array(self, key: str):
        try:
            return self._open()[key]
        except KeyError as e:
            names = self._names(self._open())
            raise DatasetKeyError(f"{self.path}: no array {key!r}; it has {names}.", names) from e
        except Exception as e:  # noqa: BLE001
            raise CorruptFileError(f"{self.path}/{key}: the array metadata cannot be read ({type(e).__name__}: "
                                   f"{e}); the store is corrupt. Re-copy or re-write it.") from e

    def _get(self, key: str, i: int) -> np.ndarray:
        arr = self._array(key)
        try:
            return np.asarray(arr[...] if self._squeeze else arr[i])
        except Exception as e:  # noqa: BLE001 - codec errors (truncated/garbled chunks)
            raise CorruptFileError(f"{self.describe(i)}: the {key!r} chunk cannot be decoded ({type(e).__name__}: "
                                   f"{e}); the store is corrupt. Re-copy or re-write it.") from e

    def __len__(self) -> int:
        return self._n

    def _read(self, i: int) -> np.ndarray:
        return self._get(self.key, i)

    def _read_label(self, i: int) -> np.ndarray | None:
        return self._get(self.label_key, i)

    @property
    def metadata(self) -> Any:
        """The store's ``metadata`` attribute (per-frame list or dict written by :func:`write_zarr`), or None."""
        return self._open().attrs.asdict().get("metadata")

    def close(self) -> None:
        self._group = None

    def __getstate__(self):
        return {**self.__dict__, "_group": None, "_pid": None}


class H5Source(FrameSource):
    """Frames from an HDF5/CXI dataset ``(N, H, W)`` or ``(H, W)``.

    ``key=None`` uses the first existing of ``/entry_1/data_1/data``, ``/images``, ``/data``.
    ``label_key=None`` uses a dataset ``labels`` next to the image dataset if there is one; ``False`` ignores
    labels.
    """

    def __init__(self, path: str | os.PathLike, key: str | None = None, label_key: str | bool | None = None,
                 check_finite: bool = True):
        self.path = str(path)
        self.check_finite = check_finite
        self._file = None
        self._pid = None
        f = self._open()
        datasets = self._datasets(f)
        if key is None:
            key = next((k for k in _H5_DEFAULT_KEYS if k.lstrip("/") in datasets), None)
            if key is None:
                raise DatasetKeyError(
                    f"{self.path}: none of the default image datasets {list(_H5_DEFAULT_KEYS)} exists; the file "
                    f"has {self._listing(f, datasets)}. Pass key=<dataset path>.", datasets)
        elif key.lstrip("/") not in datasets:
            raise DatasetKeyError(
                f"{self.path}: no dataset {key!r}; the file has {self._listing(f, datasets)}. Pass "
                "key=<one of these>.", datasets)
        self.key = "/" + key.lstrip("/")
        ds = f[self.key]
        self._n, *fshape = _frames_shape(ds.shape, f"{self.path}:{self.key}")
        self._squeeze = ds.ndim == 2
        self.frame_shape = tuple(fshape)
        if label_key is False:
            self.label_key = None
        elif label_key is None:
            sib = self.key.rsplit("/", 1)[0] + "/labels"
            self.label_key = sib if sib.lstrip("/") in datasets and sib != self.key else None
        else:
            if label_key.lstrip("/") not in datasets:
                raise DatasetKeyError(f"{self.path}: no label dataset {label_key!r}; the file has "
                                      f"{self._listing(f, datasets)}.", datasets)
            self.label_key = "/" + label_key.lstrip("/")
        self.has_labels = self.label_key is not None
        if self.has_labels:
            _check_label_shape(ds.shape, f[self.label_key].shape, f"{self.path}:{self.label_key}")

    def _open(self):
        import h5py

        if self._file is not None and self._pid == os.getpid():
            return self._file
        if not os.path.exists(self.path):
            raise FramesNotFoundError(f"HDF5 file {self.path} does not exist.")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise CorruptFileError(f"{self.path}: expected a readable HDF5 file, but it cannot be opened ({e}); "
                                   "it is truncated (an interrupted write or copy) or not HDF5. Re-copy or "
                                   "re-write it.") from e
        self._pid = os.getpid()
        return self._file

    @staticmethod
    def _datasets(f) -> list[str]:
        import h5py

        out: list[str] = []
        f.visititems(lambda name, obj: out.append(name) if isinstance(obj, h5py.Dataset) else None)
        return out

    @staticmethod
    def _listing(f, names: list[str]) -> str:
        if not names:
            return "no datasets"
        return ", ".join(f"/{n} {f[n].shape}" for n in names[:30]) + (" ..." if len(names) > 30 else "")

    def _get(self, key: str, i: int) -> np.ndarray:
        ds = self._open()[key]
        try:
            return ds[()] if self._squeeze else ds[i]
        except (OSError, RuntimeError) as e:
            raise CorruptFileError(f"{self.describe(i)}: dataset {key} cannot be read ({e}); the file is "
                                   "truncated or corrupt. Re-copy or re-write it.") from e

    def __len__(self) -> int:
        return self._n

    def _read(self, i: int) -> np.ndarray:
        return self._get(self.key, i)

    def _read_label(self, i: int) -> np.ndarray | None:
        return self._get(self.label_key, i)

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}


class NpySource(FrameSource):
    """Frames from a ``.npy`` array ``(N, H, W)`` or ``(H, W)`` (memory-mapped); ``labels``: optional path of a
    ``.npy`` of the same shape."""

    def __init__(self, path: str | os.PathLike, labels: str | os.PathLike | None = None, check_finite: bool = True):
        self.path = str(path)
        self.check_finite = check_finite
        self._arr = self._load(self.path)
        self._n, *fshape = _frames_shape(self._arr.shape, self.path)
        self._squeeze = self._arr.ndim == 2
        self.frame_shape = tuple(fshape)
        self._lab = None
        if labels is not None:
            self._lab = self._load(str(labels))
            _check_label_shape(self._arr.shape, self._lab.shape, str(labels), "Pass the matching labels file.")
        self.has_labels = self._lab is not None

    @staticmethod
    def _load(path: str) -> np.ndarray:
        if not os.path.exists(path):
            raise FramesNotFoundError(f".npy file {path} does not exist.")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise CorruptFileError(f"{path}: expected a .npy array, but it cannot be loaded ({e}); it is "
                                   "truncated or not a .npy file. Re-write it.") from e

    def __len__(self) -> int:
        return self._n

    def _read(self, i: int) -> np.ndarray:
        return np.array(self._arr if self._squeeze else self._arr[i])

    def _read_label(self, i: int) -> np.ndarray | None:
        return np.array(self._lab if self._squeeze else self._lab[i])


class ImageSource(FrameSource):
    """One mono PNG (8/16-bit) or TIFF (any real dtype; a multi-page TIFF gives one frame per page)."""

    def __init__(self, path: str | os.PathLike, check_finite: bool = True):
        self.path = str(path)
        self.check_finite = check_finite
        if not os.path.exists(self.path):
            raise FramesNotFoundError(f"image file {self.path} does not exist.")
        arr = self._load()
        self._arr = arr.reshape(_frames_shape(arr.shape, self.path)) if arr.ndim == 2 else arr
        self._n = self._arr.shape[0]
        self.frame_shape = tuple(self._arr.shape[1:])

    def _load(self) -> np.ndarray:
        suffix = Path(self.path).suffix.lower()
        try:
            if suffix in (".tif", ".tiff"):
                import tifffile

                arr = np.asarray(tifffile.imread(self.path))
            else:
                from PIL import Image

                with Image.open(self.path) as im:
                    im.load()
                    mode = im.mode
                    arr = np.asarray(im)
                if mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F", "1"):
                    raise UnsupportedFormatError(
                        f"{self.path}: expected a single-channel (grayscale) PNG, found mode {mode!r} with shape "
                        f"{arr.shape}. Detector frames are mono; convert it (e.g. PIL .convert('I;16')).")
        except PeakIOError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL/tifffile raise many types for broken files
            raise CorruptFileError(f"{self.path}: the image cannot be decoded ({type(e).__name__}: {e}); it is "
                                   "truncated or not a PNG/TIFF.") from e
        if arr.ndim == 3 and arr.shape[-1] in (3, 4) and suffix != ".png":
            raise UnsupportedFormatError(f"{self.path}: expected a mono TIFF, found an RGB(A) array {arr.shape}.")
        if arr.ndim not in (2, 3) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise UnsupportedFormatError(f"{self.path}: expected a 2-D mono image, found {arr.dtype} {arr.shape}.")
        return arr

    def __len__(self) -> int:
        return self._n

    def _read(self, i: int) -> np.ndarray:
        return self._arr[i]


class ConcatSource(FrameSource):
    """Several sources as one, with a global index (cumulative lengths), e.g. the stores of a CSV list.

    ``has_labels`` is True when every part has labels; ``frame_shape`` is None when the parts differ.
    """

    def __init__(self, sources: Sequence[FrameSource]):
        if not sources:
            raise FramesNotFoundError("ConcatSource: no sources given.")
        self.sources = list(sources)
        self.path = ", ".join(s.path for s in self.sources[:3]) + (" ..." if len(self.sources) > 3 else "")
        self._cum = np.cumsum([0] + [len(s) for s in self.sources])
        self.has_labels = all(s.has_labels for s in self.sources)
        shapes = {s.frame_shape for s in self.sources}
        self.frame_shape = shapes.pop() if len(shapes) == 1 else None
        self.check_finite = False  # the parts check their own frames

    def __len__(self) -> int:
        return int(self._cum[-1])

    def locate(self, i: int) -> tuple[FrameSource, int]:
        """The part holding global frame ``i`` and the index within it."""
        i = self._index(i)
        k = int(np.searchsorted(self._cum, i, side="right")) - 1
        return self.sources[k], i - int(self._cum[k])

    def describe(self, i: int) -> str:
        src, j = self.locate(i)
        return f"{src.describe(j)} (global frame {i})"

    def _read(self, i: int) -> np.ndarray:
        src, j = self.locate(i)
        try:
            return src[j]
        except NaNFrameError as e:
            raise NaNFrameError(f"{e} [global frame {i}]", frame=i) from e

    def _read_label(self, i: int) -> np.ndarray | None:
        src, j = self.locate(i)
        return src.label(j)

    def close(self) -> None:
        for s in self.sources:
            s.close()


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


# ------------------------------------------------------------------------------------------------ writers
def _frames_array(images, what: str) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise InputError(f"{what}: expected frames (N, H, W) or one frame (H, W), found shape {a.shape}.")
    return a


def _jsonable(obj: Any) -> Any:
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"metadata value of type {type(o).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(obj, default=default))
    except TypeError as e:
        raise InputError(f"write_zarr: {e}; expected metadata made of dicts, lists, strings and numbers.") from e


def write_zarr(path: str | os.PathLike, images, labels=None, metadata: dict | Sequence[dict] | None = None,
               zarr_format: int = 2, clevel: int = 3) -> Path:
    """Write a PeakNet zarr store atomically: ``images (B, H, W) float32``, ``labels (B, H, W)``.

    Chunks are ``(1, H, W)``, compressed with Blosc zstd (level ``clevel``, byte shuffle) as PeakNet's dataset
    writer does; ``zarr_format=2`` (default) stays readable by the zarr 2 library PeakNet uses. Labels keep
    their integer dtype (bool becomes uint8). ``metadata`` is stored as the group attribute ``metadata``
    (JSON): a dict, or a list with one dict per frame (PeakNet stores per-event dicts as an object array;
    an attribute avoids the object codec). An existing target is replaced. Every image chunk is stored (also
    all-zero frames) and the image array is marked so (``vitkit_all_chunks_stored``): a chunk lost in a copy is
    then reported at open (:class:`ZarrSource`) instead of read as zeros.

    Returns the path written.
    """
    import numcodecs
    import zarr

    imgs = _frames_array(images, "write_zarr(images)").astype(np.float32, copy=False)
    labs = None
    if labels is not None:
        labs = _frames_array(labels, "write_zarr(labels)")
        _check_label_shape(imgs.shape, labs.shape, "write_zarr",
                           "Pass labels cropped/padded like the images, or labels=None.")
        if labs.dtype == bool:
            labs = labs.astype(np.uint8)
        elif not np.issubdtype(labs.dtype, np.integer):
            raise InputError(f"write_zarr: expected integer or bool labels, found {labs.dtype}; labels are class "
                             "ids (0 background, 1 peak). Round or threshold them first.")
    if metadata is not None:
        if isinstance(metadata, (list, tuple)) and len(metadata) != len(imgs):
            raise InputError(f"write_zarr: {len(metadata)} metadata entries for {len(imgs)} frames; expected one "
                             "per frame (or a single dict for the store).")
        metadata = _jsonable(list(metadata) if isinstance(metadata, tuple) else metadata)
    n, h, w = imgs.shape
    if zarr_format == 2:
        comp: dict[str, Any] = {"compressors": numcodecs.Blosc(cname="zstd", clevel=clevel,
                                                                shuffle=numcodecs.Blosc.SHUFFLE)}
    else:
        comp = {"compressors": zarr.codecs.BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle")}
    with atomic_path(path) as tmp:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format)
        a = g.create_array("images", shape=imgs.shape, chunks=(1, h, w), dtype="float32",
                           config={"write_empty_chunks": True}, **comp)
        a[...] = imgs
        a.attrs[ALL_CHUNKS_ATTR] = True  # after the chunks: a copy that lost chunks is then caught at open
        if labs is not None:
            b = g.create_array("labels", shape=labs.shape, chunks=(1, h, w), dtype=labs.dtype, **comp)
            b[...] = labs
        if metadata is not None:
            g.attrs["metadata"] = metadata
    return Path(path)


def _peak_table(p, what: str) -> np.ndarray:
    from vitkit.apps.peaks.peakfind import as_peak_table

    try:
        return as_peak_table(p)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None


def cxi_peak_rows(p, what: str, max_peaks: int) -> np.ndarray:
    """One frame's peaks (a peak table, or ``[n, 2|3]`` rows ``(y, x[, intensity])``) as a peak table of at
    most ``max_peaks`` rows: more keeps the brightest, in their original order."""
    t = _peak_table(p, what)
    if len(t) > max_peaks:
        t = t[np.sort(np.argsort(-t["intensity"], kind="stable")[:max_peaks])]
    return t


def cxi_result_group(f):
    """Write ``/cxi_version`` into an open h5py file and create the CrystFEL peak-list group."""
    f.create_dataset("cxi_version", data=np.int32(150))
    r = f.require_group(CXI_RESULT)
    r.attrs["coordinates"] = ("slab pixels (y = slow scan, x = fast scan), pixel centres at integers (NumPy); "
                              "indexamajig adds CrystFEL's half pixel itself")
    return r


CXI_PEAK_COLUMNS = (("peakXPosRaw", "slab_fs"), ("peakYPosRaw", "slab_ss"), ("peakTotalIntensity", "intensity"),
                    ("peakNPixels", "npix"), ("peakMaximumValue", "max_value"))


def write_cxi(path: str | os.PathLike, peaks_per_frame: Sequence, frames=None, max_peaks: int = 2048,
              compression: str | None = None, event_ids: Sequence | None = None) -> Path:
    """Write peak lists (and optionally the frames) as a CXI file for CrystFEL/Cheetah, atomically.

    Layout (CrystFEL's ``peak_list = /entry_1/result_1``, ``peak_list_type = cxi``; ``indexamajig
    --peaks=cxi`` with the detector's ``.geom``)::

        /cxi_version                          int32 150
        /entry_1/result_1/nPeaks              int32   [N]
        /entry_1/result_1/peakXPosRaw         float32 [N, max_peaks]  slab fast scan, zero padded
        /entry_1/result_1/peakYPosRaw         float32 [N, max_peaks]  slab slow scan
        /entry_1/result_1/peakTotalIntensity  float32 [N, max_peaks]  integrated intensity
        /entry_1/result_1/peakNPixels         float32 [N, max_peaks]  pixels per peak (0 if unknown)
        /entry_1/result_1/peakMaximumValue    float32 [N, max_peaks]  brightest pixel
        /entry_1/data_1/data                  float32 [N, SS, FS]     only if frames are given, chunks (1, SS, FS)
        /entry_1/event_id                     int64/str [N]           only if event_ids are given

    Args:
        peaks_per_frame: per frame, a peak table (:data:`~vitkit.apps.peaks.peakfind.PEAK_DTYPE`; its
            ``slab_fs`` / ``slab_ss`` are written) or ``[n, 3]`` ``(y, x, intensity)`` slab rows (``[n, 2]``:
            intensity 0).
        frames: optional ``[N, SS, FS]`` slabs or any indexable of ``[SS, FS]`` frames (e.g. a FrameSource).
        max_peaks: width of the peak arrays; a frame with more peaks keeps the ``max_peaks`` brightest (in
            their original order) and ``nPeaks = max_peaks``.
        compression: h5py compression for the frames (``"gzip"`` is readable everywhere; default none).
    """
    import h5py

    if max_peaks < 1:
        raise InputError(f"write_cxi: expected max_peaks >= 1, found {max_peaks}.")
    n = len(peaks_per_frame)
    if frames is not None and len(frames) != n:
        raise InputError(f"write_cxi: {len(frames)} frames but {n} peak lists; expected one peak list per frame.")
    if event_ids is not None and len(event_ids) != n:
        raise InputError(f"write_cxi: {len(event_ids)} event ids but {n} peak lists; expected one per frame.")
    npk = np.zeros(n, dtype=np.int32)
    cols = {name: np.zeros((n, max_peaks), dtype=np.float32) for name, _ in CXI_PEAK_COLUMNS}
    for i, p in enumerate(peaks_per_frame):
        t = cxi_peak_rows(p, f"write_cxi(peaks_per_frame[{i}])", max_peaks)
        npk[i] = len(t)
        for name, field in CXI_PEAK_COLUMNS:
            cols[name][i, :len(t)] = np.nan_to_num(t[field], nan=0.0)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            r = cxi_result_group(f)
            r.create_dataset("nPeaks", data=npk)
            for name, data in cols.items():
                r.create_dataset(name, data=data)
            if event_ids is not None:
                ids = np.asarray(event_ids)
                f["/entry_1"].create_dataset("event_id", data=ids.astype("S") if ids.dtype.kind in "UO" else ids)
            if frames is not None and n:
                first = np.asarray(frames[0], dtype=np.float32)
                if first.ndim != 2:
                    raise InputError(f"write_cxi: expected frames [N, SS, FS], found a frame of shape {first.shape}.")
                h, w = first.shape
                d = f.require_group("/entry_1/data_1").create_dataset(
                    "data", shape=(n, h, w), dtype=np.float32, chunks=(1, h, w), compression=compression)
                for i in range(n):
                    fr = first if i == 0 else np.asarray(frames[i], dtype=np.float32)
                    if fr.shape != (h, w):
                        raise InputError(f"write_cxi: frame {i} has shape {fr.shape}, frame 0 has {(h, w)}; "
                                         "expected equal shapes.")
                    d[i] = fr
    return Path(path)


def read_cxi_peaks(path: str | os.PathLike, result: str = CXI_RESULT) -> list[np.ndarray]:
    """Peak lists ``[n_i, 3]`` float32 ``(y, x, intensity)`` in slab coordinates from a CXI file written by
    :func:`write_cxi` (or Cheetah/psocake)."""
    src = H5Source.__new__(H5Source)  # reuse the open/error handling without requiring a frames dataset
    src.path, src._file, src._pid = str(path), None, None
    f = src._open()
    try:
        names = src._datasets(f)
        need = [f"{result}/{k}".lstrip("/") for k in ("nPeaks", "peakXPosRaw", "peakYPosRaw")]
        missing = [k for k in need if k not in names]
        if missing:
            raise DatasetKeyError(f"{path}: no CXI peak list at {result} (missing {missing}); the file has "
                                  f"{src._listing(f, names)}.", names)
        npk = f[f"{result}/nPeaks"][()]
        xs, ys = f[f"{result}/peakXPosRaw"][()], f[f"{result}/peakYPosRaw"][()]
        key = f"{result}/peakTotalIntensity"
        it = f[key][()] if key.lstrip("/") in names else np.zeros_like(xs)
    finally:
        src.close()
    return [np.stack([ys[i, :k], xs[i, :k], it[i, :k]], axis=1).astype(np.float32) for i, k in enumerate(npk)]


CSV_COLUMNS = ("frame", "panel", "fs", "ss", "slab_fs", "slab_ss", "x_lab", "y_lab", "intensity", "npix",
               "max_value")


def write_csv(path: str | os.PathLike, peaks_per_frame: Iterable) -> Path:
    """Write peaks as CSV, one row per peak, atomically, with the header
    ``frame,panel,fs,ss,slab_fs,slab_ss,x_lab,y_lab,intensity,npix,max_value``: ``fs``/``ss`` panel-local and
    ``slab_fs``/``slab_ss`` slab pixels (NumPy pixel-centre convention), ``x_lab``/``y_lab`` lab-frame
    **metres** (empty without a geometry), as in :data:`~vitkit.apps.peaks.peakfind.PEAK_DTYPE`.

    ``peaks_per_frame`` may be any iterable (e.g. a generator over a long run) of peak tables or ``[n, 3]``
    ``(y, x, intensity)`` rows; frames without peaks have no rows. Floats keep 9 significant digits
    (float32 round trip; lab metres to 1e-9 relative).
    """
    def fmt(v) -> str:
        return "" if v != v else f"{v:.9g}"

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(CSV_COLUMNS)
            for i, p in enumerate(peaks_per_frame):
                for r in _peak_table(p, f"write_csv(peaks_per_frame[{i}])"):
                    wr.writerow([i, int(r["panel"]), fmt(r["fs"]), fmt(r["ss"]), fmt(r["slab_fs"]), fmt(r["slab_ss"]),
                                 fmt(r["x_lab"]), fmt(r["y_lab"]), fmt(r["intensity"]), int(r["npix"]),
                                 fmt(r["max_value"])])
    return Path(path)


def read_csv_peaks(path: str | os.PathLike, n_frames: int | None = None) -> list[np.ndarray]:
    """Peak tables from a :func:`write_csv` file, one per frame; ``n_frames`` pads with empty tables."""
    from vitkit.apps.peaks.peakfind import empty_peaks

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(c.strip() for c in rows[0]) != CSV_COLUMNS:
        raise UnsupportedFormatError(f"{path}: expected the header {','.join(CSV_COLUMNS)}, found "
                                     f"{','.join(rows[0]) if rows else 'an empty file'}.")
    data = np.array([[float(c) if c != "" else np.nan for c in r] for r in rows[1:] if r],
                    dtype=np.float64).reshape(-1, len(CSV_COLUMNS))
    frame = data[:, 0].astype(np.int64)
    n = max(int(frame.max()) + 1 if len(frame) else 0, n_frames or 0)
    out = []
    for i in range(n):
        sel = data[frame == i]
        t = empty_peaks(len(sel))
        for j, name in enumerate(CSV_COLUMNS[1:], start=1):
            t[name] = sel[:, j]
        out.append(t)
    return out


def save_overlay_png(path: str | os.PathLike, frame, peaks, true_peaks=None, radius: float = 6.0,
                     title: str | None = None, max_inches: float = 10.0, dpi: int = 100) -> Path:
    """Save a PNG of ``frame`` (log-scaled: ``log10(1 + max(frame, 0))``, clipped at the 99.9th percentile)
    with red circles at ``peaks`` and, if given, green dashed circles at ``true_peaks``; atomically.

    Uses matplotlib's Agg canvas directly (no pyplot state, no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    img = np.asarray(frame, dtype=np.float32)
    if img.ndim != 2:
        raise InputError(f"save_overlay_png: expected one frame [H, W], found shape {img.shape}.")
    h, w = img.shape
    disp = np.log10(1.0 + np.maximum(np.nan_to_num(img), 0.0))
    vmax = float(np.percentile(disp, 99.9)) or 1.0
    scale = max_inches / max(h, w)
    fig = Figure(figsize=(max(w * scale, 2.0), max(h * scale, 2.0) + (0.3 if title else 0.0)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1 if not title else 1 - 0.3 / fig.get_figheight()))
    ax.imshow(disp, cmap="gray_r", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    for pts, color, style, label in ((true_peaks, "lime", "--", "true"), (peaks, "red", "-", "found")):
        if pts is None:
            continue
        t = _peak_table(pts, f"save_overlay_png({label})")
        circles = [Circle((x, y), radius) for y, x in zip(t["ss"], t["fs"])]
        ax.add_collection(PatchCollection(circles, facecolor="none", edgecolor=color, linestyle=style,
                                          linewidth=0.8))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    if title:
        fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    return Path(path)
