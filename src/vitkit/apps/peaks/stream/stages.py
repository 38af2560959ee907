"""The work each pipeline stage does, as plain functions and classes (no Ray): events, sources, masks.

* :class:`StreamItem` -- one event as a source hands it to the driver: arrival index, ``[P, H, W]`` float32,
  the producer's event id and timestamp.
* :class:`EventCheck` -- a received array as the event the detector expects (stack or slab layout, NaN only on
  bad pixels), or an error naming the event and the shapes.
* :func:`actor_finder` -- the model actors' :class:`~vitkit.apps.peaks.finder.PeakFinder`: the run's finder
  (detector, mask, filters) with the trained model, so masks and peaks equal ``vitkit predict``'s in fp32.
* :func:`pack_masks` / :func:`unpack_masks` -- compact masks for the object store: 1 bit per pixel
  (``np.packbits`` along rows) or 1 byte (``uint8``); never float logits.
* :class:`FileStream` / :class:`SyntheticStream` -- event sources read by the pipeline's driver in order,
  ``poll(n)`` at a time. The Ray queue source lives in :mod:`vitkit.apps.peaks.stream.ray`, the socket source in
  :mod:`vitkit.apps.peaks.stream.zmq`.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from vitkit.errors import InputError

__all__ = ["StreamItem", "EventCheck", "actor_finder", "pack_masks", "unpack_masks", "raw_array", "FileStream",
           "SyntheticStream"]


class StreamItem(NamedTuple):
    """One event as a source hands it to the pipeline's driver."""

    index: int
    """Arrival order in this run (0, 1, ...; consecutive over the accepted events): the CXI row order."""
    data: np.ndarray
    """The event, float32 ``[P, H, W]`` (a single-panel frame is ``[1, H, W]``)."""
    event_id: str
    """The producer's event id (``str(index)`` when it sent none)."""
    timestamp: float
    """The producer's timestamp (seconds), NaN when it sent none."""


# ------------------------------------------------------------------------------------------------ events
class EventCheck:
    """``check(array, where) -> float32 [P, H, W]``: one received event in the layout the run's detector takes.

    With a detector, the array is a panel stack ``[P, H, W]`` or a slab ``[SS, FS]`` of it
    (:meth:`~vitkit.apps.peaks.detector.Detector.to_panels`); without one, ``[H, W]`` is one panel and
    ``[P, H, W]`` is ``P`` panels. Non-finite pixels are allowed on bad pixels (``good`` False; they become 0)
    and raise :class:`~vitkit.apps.peaks.io.NaNFrameError` anywhere else. ``where`` names the event in errors.
    """

    def __init__(self, detector=None, good: np.ndarray | None = None):
        self.detector, self.good = detector, good

    def __call__(self, a, where: str = "event") -> np.ndarray:
        from vitkit.apps.peaks.detector import DetectorShapeError
        from vitkit.apps.peaks.io import NaNFrameError

        a = np.asarray(a)
        if a.dtype.kind not in "iuf":
            raise InputError(f"{where}: expected a numeric detector array (integer or float), found dtype {a.dtype}.")
        if self.detector is not None:
            ev = self.detector.to_panels(a, where)
            if len(ev) != 1:
                raise DetectorShapeError(f"{where}: shape {a.shape} holds {len(ev)} events; expected one event "
                                         f"{list(self.detector.stack_shape)} or one slab "
                                         f"{list(self.detector.slab_shape)}.")
            ev = ev[0]
        elif a.ndim in (2, 3) and min(a.shape) > 0:
            ev = a[None] if a.ndim == 2 else a
        else:
            raise InputError(f"{where}: expected an event [H, W] or [P, H, W], found shape {a.shape}.")
        ev = np.ascontiguousarray(ev, dtype=np.float32)
        bad = ~np.isfinite(ev)
        if bad.any():
            unmasked = bad if self.good is None else bad & self.good
            if unmasked.any():
                raise NaNFrameError(f"{where} has {int(unmasked.sum())} NaN/inf pixel(s) on good pixels (of "
                                    f"{ev.size}, shape {ev.shape}); expected finite values. Mask them "
                                    "(detector.mask) or replace them.")
            ev = np.where(bad, np.float32(0), ev)
        return ev


# ------------------------------------------------------------------------------------------------ model
def actor_finder(template, checkpoint: str | os.PathLike, device: str = "cpu", bf16: bool = False,
                 torch_threads: int | None = None):
    """The run's :class:`~vitkit.apps.peaks.finder.PeakFinder` ``template`` (detector, mask, filters; no model)
    with the trained model of ``checkpoint`` on ``device``.

    ``bf16``: the weights in bfloat16 (:func:`~vitkit.apps.peaks.finder.load_model`, as ``vitkit predict
    --bf16``).
    """
    import torch

    from vitkit.apps.peaks.finder import load_model

    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    return template.with_model(load_model(checkpoint, bf16), device)


# ------------------------------------------------------------------------------------------------ masks
def pack_masks(masks: np.ndarray, fmt: str = "packed") -> np.ndarray:
    """Bool ``[..., H, W]`` -> ``uint8 [..., H, ceil(W / 8)]`` (``packed``) or ``uint8 [..., H, W]`` (``uint8``)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim < 2:
        raise InputError(f"pack_masks: expected masks [..., H, W], found shape {masks.shape}.")
    if fmt == "packed":
        return np.packbits(masks, axis=-1)
    if fmt == "uint8":
        return masks.astype(np.uint8)
    raise InputError(f"pack_masks: expected fmt 'packed' or 'uint8', found {fmt!r}.")


def unpack_masks(data: np.ndarray, width: int, fmt: str = "packed") -> np.ndarray:
    """Inverse of :func:`pack_masks`: bool ``[..., H, width]``."""
    if fmt == "packed":
        return np.unpackbits(np.asarray(data, dtype=np.uint8), axis=-1, count=width).astype(bool)
    return np.asarray(data) != 0


# ----------------------------------------------------------------------------------------------- sources
class IndexedStream:
    """Events of an indexable source, read in order by the pipeline's driver."""

    def __init__(self, items, to_event, describe=str):
        self.items, self.to_event, self.describe = items, to_event, describe
        self.next = 0
        self.total = len(items)

    @property
    def exhausted(self) -> bool:
        return self.next >= self.total

    def depth(self) -> int | None:
        return self.total - self.next

    def poll(self, n: int, timeout: float = 0.0) -> list[StreamItem]:
        out = []
        while len(out) < n and self.next < self.total:
            i = self.next
            out.append(StreamItem(i, self.to_event(self.items[i], self.describe(i)), self.describe(i), float("nan")))
            self.next += 1
        return out

    def close(self) -> None:
        close = getattr(self.items, "close", None)
        if close is not None:
            close()


class FileStream(IndexedStream):
    """Events of files (zarr, HDF5/CXI, .npy, globs, CSV lists) via :func:`open_frames`, in order; with a detector
    as :class:`~vitkit.apps.peaks.finder.EventSource` reads them (``vitkit predict``'s checks). Event ids are
    ``file[i]``. Opening checks that everything exists, so a missing file fails before any actor starts."""

    def __init__(self, path, key: str | None = None, detector=None, good: np.ndarray | None = None):
        from vitkit.apps.peaks.finder import EventSource
        from vitkit.apps.peaks.io import open_frames

        frames = open_frames(list(path) if isinstance(path, (list, tuple)) else path, key=key, label_key=False)
        if detector is not None:
            events = EventSource(frames, detector, good)
            super().__init__(events, lambda ev, where: ev, events.describe)
        else:
            check = EventCheck(None, good)
            super().__init__(frames, lambda item, where: check(raw_array(item), where), frames.describe)


class SyntheticStream(IndexedStream):
    """``num_frames`` simulated events, generated on read: single-panel frames of ``shape`` from
    :class:`~vitkit.apps.peaks.synthetic.SyntheticPeakDataset`, or with a ``detector`` whole lattice stills
    ``[P, H, W]`` from :class:`~vitkit.apps.peaks.lattice.LatticeStillsDataset`."""

    def __init__(self, num_frames: int, shape=(128, 128), seed: int = 0, detector=None):
        check = EventCheck(detector)
        if detector is not None:
            from vitkit.apps.peaks.lattice import LatticeStillsDataset

            items = LatticeStillsDataset(int(num_frames), detector, seed=int(seed), panels_per_item=None)
        else:
            from vitkit.apps.peaks.synthetic import SynthConfig, SyntheticPeakDataset

            items = SyntheticPeakDataset(int(num_frames), cfg=SynthConfig(shape=tuple(int(s) for s in shape)),
                                         seed=int(seed))
        super().__init__(items, lambda item, where: check(raw_array(item), where), lambda i: f"synthetic:{seed}:{i}")


def raw_array(item: Any) -> np.ndarray:
    """The raw array of a source item (array, tensor, dict with ``image``; ``[P, 1, H, W]`` loses its channel)."""
    from vitkit.apps.peaks.job import event_of

    return event_of(item)
