"""CXI peak lists for CrystFEL and Cheetah: the layout, the whole-run writer (:func:`write_cxi`), its reader
(:func:`read_cxi_peaks`) and the streaming writer (:class:`OrderedCXIWriter`). Files are written atomically
(:mod:`vitkit.atomic`).

:class:`OrderedCXIWriter` takes peak lists in any order and writes rows in frame-index order: it holds early
arrivals in a reorder buffer and appends the longest run of consecutive frame indices to resizable HDF5 datasets
as soon as it is complete. A frame index that was already written (or is already waiting) is dropped and counted as
a duplicate, so a re-run batch or a producer sending a frame twice never duplicates a row. The file is written
under a hidden temporary name next to the target and renamed onto it by :meth:`~OrderedCXIWriter.close`;
:meth:`~OrderedCXIWriter.abort` removes it. Its layout is :func:`write_cxi`'s plus ``/entry_1/result_1/frameIndex``
(int64): the source index (arrival order) of each row, ``/entry_1/event_id`` (str: the producer's event id) and
``/entry_1/timestamp`` (float64 seconds, NaN when the producer sent none).

Gaps: if a frame index never arrives (a producer dropped an event), the consecutive run cannot grow. The
pipeline calls :meth:`~OrderedCXIWriter.flush_gap` when everything in flight sits in the reorder buffer: the
buffered rows are written in index order and the missing indices are recorded as skipped; one that turns up
later is appended at the end (counted as ``late``) rather than lost.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

from vitkit.apps.peaks.sources import CXI_RESULT, DatasetKeyError, H5Source
from vitkit.apps.peaks.writers import peak_table
from vitkit.atomic import atomic_path, commit, discard, temp_path
from vitkit.errors import InputError

__all__ = ["CXI_PEAK_COLUMNS", "OrderedCXIWriter", "cxi_peak_rows", "cxi_result_group", "read_cxi_peaks",
           "write_cxi"]


def cxi_peak_rows(p, what: str, max_peaks: int) -> np.ndarray:
    """One frame's peaks (a peak table, or ``[n, 2|3]`` rows ``(y, x[, intensity])``) as a peak table of at
    most ``max_peaks`` rows: more keeps the brightest, in their original order."""
    t = peak_table(p, what)
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


_F32_MAX = float(np.finfo(np.float32).max)  # an infinite SNR (noise-free data) is stored as the largest float32
CXI_PEAK_COLUMNS = (("peakXPosRaw", "slab_fs"), ("peakYPosRaw", "slab_ss"), ("peakTotalIntensity", "intensity"),
                    ("peakNPixels", "npix"), ("peakMaximumValue", "max_value"), ("peakSNR", "snr"))


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
        /entry_1/result_1/peakSNR             float32 [N, max_peaks]  photometric SNR (0 if unknown)
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
            cols[name][i, :len(t)] = np.nan_to_num(t[field], nan=0.0, posinf=_F32_MAX, neginf=-_F32_MAX)
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


class OrderedCXIWriter:
    """Write peak lists to ``path`` in frame-index order; see the module docstring.

    Args:
        path: the CXI file to create (replaced if it exists, at :meth:`close`).
        max_peaks: width of the peak arrays (CrystFEL's ``max_num_peak``).
        start_index: the first frame index of the run.
        chunk_rows: HDF5 chunk height of the row datasets.
        flush_every_s: ``h5py.File.flush`` period while streaming.
    """

    def __init__(self, path: str | os.PathLike, max_peaks: int = 2048, start_index: int = 0, chunk_rows: int = 64,
                 flush_every_s: float = 5.0):
        import h5py

        if max_peaks < 1:
            raise InputError(f"OrderedCXIWriter: expected max_peaks >= 1, found {max_peaks}.")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path)  # also deletes the temporaries a killed run left next to path
        self.max_peaks = int(max_peaks)
        self.next_index = int(start_index)
        self.flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self._buf: dict[int, tuple[Hashable, np.ndarray, str, float]] = {}
        self._skipped: list[tuple[int, int]] = []  # [lo, hi) ranges given up by flush_gap
        self._late: set[int] = set()
        self.rows = 0
        self.peaks = 0
        self.duplicates = 0
        self.late = 0
        self.gaps = 0
        self.max_buffered = 0
        self._f = h5py.File(self.tmp, "w")
        try:
            r = cxi_result_group(self._f)
            c = max(1, int(chunk_rows))
            self._d = {
                "nPeaks": r.create_dataset("nPeaks", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(c * 16,)),
                "frameIndex": r.create_dataset("frameIndex", shape=(0,), maxshape=(None,), dtype=np.int64,
                                               chunks=(c * 16,)),
                "event_id": self._f["/entry_1"].create_dataset("event_id", shape=(0,), maxshape=(None,),
                                                               dtype=h5py.string_dtype(), chunks=(c * 16,)),
                "timestamp": self._f["/entry_1"].create_dataset("timestamp", shape=(0,), maxshape=(None,),
                                                                dtype=np.float64, chunks=(c * 16,)),
            }
            for name in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity"):
                self._d[name] = r.create_dataset(name, shape=(0, self.max_peaks), maxshape=(None, self.max_peaks),
                                                 dtype=np.float32, chunks=(c, self.max_peaks))
        except BaseException:
            self.abort()
            raise

    # ------------------------------------------------------------------------------------------- state
    @property
    def buffered(self) -> int:
        """Rows waiting in the reorder buffer."""
        return len(self._buf)

    def _was_skipped(self, i: int) -> bool:
        return any(lo <= i < hi for lo, hi in self._skipped)

    # ------------------------------------------------------------------------------------------- write
    def _append(self, items: list[tuple[int, Hashable, np.ndarray, str, float]]) -> None:
        if not items:
            return
        k = len(items)
        n0 = self.rows
        npk = np.zeros(k, dtype=np.int32)
        idx = np.zeros(k, dtype=np.int64)
        arr = np.zeros((3, k, self.max_peaks), dtype=np.float32)  # y, x, intensity
        for j, (i, _, a, _, _) in enumerate(items):
            m = len(a)
            npk[j], idx[j] = m, i
            arr[:, j, :m] = a["slab_ss"], a["slab_fs"], a["intensity"]
        for d in self._d.values():
            d.resize(n0 + k, axis=0)
        self._d["nPeaks"][n0:] = npk
        self._d["frameIndex"][n0:] = idx
        self._d["event_id"][n0:] = [eid for _, _, _, eid, _ in items]
        self._d["timestamp"][n0:] = [ts for _, _, _, _, ts in items]
        self._d["peakYPosRaw"][n0:] = arr[0]
        self._d["peakXPosRaw"][n0:] = arr[1]
        self._d["peakTotalIntensity"][n0:] = arr[2]
        self.rows += k
        self.peaks += int(npk.sum())
        now = time.monotonic()
        if now - self._last_flush >= self.flush_every_s:
            self._f.flush()
            self._last_flush = now

    def add(self, items) -> tuple[list, list]:
        """Add ``(index, key, peaks[, event_id, timestamp])`` tuples; ``key`` is any label the caller wants back;
        the event id defaults to ``str(index)``, the timestamp to NaN.

        Returns ``(written, dropped)``: the keys whose rows went to the file in this call (in row order) and the
        keys dropped as duplicates. Rows still in the reorder buffer are in neither list yet.
        """
        dropped, late = [], []
        for index, key, peaks, *meta in items:
            i = int(index)
            a = cxi_peak_rows(peaks, "OrderedCXIWriter", self.max_peaks)
            eid = str(meta[0]) if meta and meta[0] is not None else str(i)
            ts = float(meta[1]) if len(meta) > 1 and meta[1] is not None else float("nan")
            if i in self._buf:
                self.duplicates += 1
                dropped.append(key)
            elif i >= self.next_index:
                self._buf[i] = (key, a, eid, ts)
            elif self._was_skipped(i) and i not in self._late:
                self._late.add(i)
                self.late += 1
                late.append((i, key, a, eid, ts))
            else:
                self.duplicates += 1
                dropped.append(key)
        self.max_buffered = max(self.max_buffered, len(self._buf))
        run = []
        while self.next_index in self._buf:
            run.append((self.next_index, *self._buf.pop(self.next_index)))
            self.next_index += 1
        out = late + run
        self._append(out)
        return [row[1] for row in out], dropped

    def flush_gap(self) -> list:
        """Write every buffered row in index order, giving up on the missing indices below them."""
        if not self._buf:
            return []
        order = sorted(self._buf)
        prev = self.next_index
        for i in order:
            if i > prev:
                self._skipped.append((prev, i))
                self.gaps += 1
            prev = i + 1
        items = [(i, *self._buf.pop(i)) for i in order]
        self.next_index = order[-1] + 1
        self._append(items)
        return [row[1] for row in items]

    def close(self) -> Path:
        """Write what is buffered (in index order), then move the file onto ``path``. Returns the path."""
        self.flush_gap()
        self._f.flush()
        self._f.close()
        return commit(self.tmp, self.path)

    def abort(self) -> None:
        """Close and delete the temporary file; the target is left as it was."""
        if getattr(self, "_f", None) is not None:
            self._f.close()  # closing a closed h5py file is a no-op
        discard(self.tmp)

    def summary(self) -> dict:
        return {"rows": self.rows, "peaks": self.peaks, "duplicates_dropped": self.duplicates, "gaps": self.gaps,
                "late_rows": self.late, "max_reorder_buffer": self.max_buffered, "buffered": self.buffered}
