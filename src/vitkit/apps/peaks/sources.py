"""Lazy frame sources: zarr (PeakNet stores), HDF5/CXI, .npy, PNG/TIFF, and their concatenation, with the errors of
reading them. :func:`vitkit.apps.peaks.io.open_frames` picks the source for a path; the formats are tabled in
:mod:`vitkit.apps.peaks.io`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitkit.errors import InputError, VitkitError

CXI_DATA = "/entry_1/data_1/data"
CXI_RESULT = "/entry_1/result_1"
_H5_DEFAULT_KEYS = (CXI_DATA, "/images", "/data")


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


def check_label_shape(img_shape, lab_shape, what: str,
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
        except (NotImplementedError, TypeError, AttributeError) as e:  # a store that cannot list its chunks
            warnings.warn(f"{self.path}/{self.key}: the store cannot list its chunks ({type(e).__name__}: {e}), so "
                          "a truncated copy would not be noticed: missing chunks read as the fill value",
                          UserWarning, stacklevel=2)
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
            check_label_shape(img.shape, self._array(self.label_key).shape, self.path)

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
            check_label_shape(ds.shape, f[self.label_key].shape, f"{self.path}:{self.label_key}")

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
            check_label_shape(self._arr.shape, self._lab.shape, str(labels), "Pass the matching labels file.")
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
