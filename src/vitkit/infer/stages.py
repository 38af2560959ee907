"""The work each pipeline stage does, as plain functions and classes (no Ray): sources, model, masks, peaks.

* :class:`MaskPredictor` -- ``load_model`` + the sliding-window/argmax path of
  :func:`vitkit.apps.peaks.job.predict_masks` (on CPU it *is* ``predict_masks``), so masks equal
  ``vitkit predict``'s bit for bit in fp32.
* :func:`pack_masks` / :func:`unpack_masks` -- compact masks for the object store: 1 bit per pixel
  (``np.packbits`` along rows) or 1 byte (``uint8``); never float logits.
* :func:`batch_peaks` -- the peak tables ``vitkit predict`` extracts from the same masks.
* :class:`FileStream` / :class:`SyntheticStream` -- frame sources read by the pipeline's driver in order,
  ``poll(n)`` at a time. The Ray queue source lives in :mod:`vitkit.infer.ray`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from vitkit.errors import InputError

__all__ = ["MaskPredictor", "pack_masks", "unpack_masks", "batch_peaks", "FileStream", "SyntheticStream",
           "as_frame"]


# ------------------------------------------------------------------------------------------------ model
class MaskPredictor:
    """Peak masks of raw frames with a trained model (what ``vitkit predict`` computes).

    Args:
        checkpoint: run directory, ``.ckpt`` or exported model directory (:func:`~vitkit.apps.peaks.job.load_model`).
        device: ``cpu`` or ``cuda[:N]``.
        bf16: cast the weights to bfloat16 once (:func:`vitkit.layers.precision.cast_for_inference`: norms,
            positions and softmax stay fp32); the masks then differ slightly from fp32 ``vitkit predict``.
        overlap: sliding-window overlap.
        torch_threads: ``torch.set_num_threads`` (None leaves it).
    """

    def __init__(self, checkpoint: str | os.PathLike, device: str = "cpu", bf16: bool = False, overlap: float = 0.25,
                 torch_threads: int | None = None):
        import torch

        from vitkit.apps.peaks.job import load_model

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.device = torch.device(device)
        self.bf16 = bool(bf16)
        self.overlap = float(overlap)
        self.model = load_model(checkpoint).to(self.device).eval()
        if self.bf16:
            from vitkit.layers.precision import cast_for_inference

            cast_for_inference(self.model, torch.bfloat16)

    def warm_up(self) -> None:
        """One forward pass on a blank window (first calls build kernels and caches)."""
        h, w = (int(v) for v in self.model.img_size)
        self(np.zeros((1, h, w), dtype=np.float32))

    def __call__(self, frames) -> np.ndarray:
        """``frames`` float32 ``[B, H, W]`` -> bool masks ``[B, H, W]``."""
        import torch

        from vitkit.apps.peaks.job import predict_masks

        frames = np.asarray(frames, dtype=np.float32)
        with torch.inference_mode():
            masks = [m for _, m in predict_masks(self.model, frames, self.overlap, progress=False, device=self.device)]
        return np.stack(masks) if masks else np.zeros((0, *frames.shape[1:]), dtype=bool)


# ------------------------------------------------------------------------------------------------ masks
def pack_masks(masks: np.ndarray, fmt: str = "packed") -> np.ndarray:
    """Bool ``[B, H, W]`` -> ``uint8 [B, H, ceil(W / 8)]`` (``packed``) or ``uint8 [B, H, W]`` (``uint8``)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise InputError(f"pack_masks: expected masks [B, H, W], found shape {masks.shape}.")
    if fmt == "packed":
        return np.packbits(masks, axis=-1)
    if fmt == "uint8":
        return masks.astype(np.uint8)
    raise InputError(f"pack_masks: expected fmt 'packed' or 'uint8', found {fmt!r}.")


def unpack_masks(data: np.ndarray, width: int, fmt: str = "packed") -> np.ndarray:
    """Inverse of :func:`pack_masks`: bool ``[B, H, width]``."""
    if fmt == "packed":
        return np.unpackbits(np.asarray(data, dtype=np.uint8), axis=-1, count=width).astype(bool)
    return np.asarray(data) != 0


# ------------------------------------------------------------------------------------------------ peaks
def batch_peaks(frames: np.ndarray, masks: np.ndarray, min_peaks: int = 0, max_peaks: int = 2048,
                min_pixels: int = 3) -> list[np.ndarray]:
    """Per frame a peak table, extracted exactly as ``vitkit predict`` (:class:`~vitkit.apps.peaks.finder.PeakFinder`
    without a geometry) extracts it from the same masks: lone pixels are bad pixels, close peaks merged."""
    from vitkit.apps.peaks.finder import MERGE_RADIUS, event_good, event_peaks

    return [event_peaks(None, f[None], m[None], min_pixels, max_peaks, min_peaks, event_good(f[None], None),
                        MERGE_RADIUS) for f, m in zip(np.asarray(frames), np.asarray(masks))]


# ----------------------------------------------------------------------------------------------- sources
def as_frame(item: Any) -> np.ndarray:
    """The raw float32 ``[H, W]`` frame of an item (array, ``[1, H, W]``, tensor or dict with ``image``), as
    ``vitkit predict`` reads it (:func:`vitkit.apps.peaks.job.frame_image`)."""
    from vitkit.apps.peaks.job import frame_image

    img = frame_image(item)
    if img.ndim != 2:
        raise InputError(f"stream source: expected a frame [H, W] (or [1, H, W]), found shape {img.shape}. "
                         "Multi-panel stacks must be assembled (or sent panel by panel) first.")
    return np.ascontiguousarray(img)


class IndexedStream:
    """Frames of an indexable source, read in order by the pipeline's driver."""

    def __init__(self, items):
        self.items = items
        self.next = 0
        self.total = len(items)

    @property
    def exhausted(self) -> bool:
        return self.next >= self.total

    def depth(self) -> int | None:
        return self.total - self.next

    def poll(self, n: int, timeout: float = 0.0) -> list[tuple[int, np.ndarray]]:
        out = []
        while len(out) < n and self.next < self.total:
            out.append((self.next, as_frame(self.items[self.next])))
            self.next += 1
        return out

    def close(self) -> None:
        close = getattr(self.items, "close", None)
        if close is not None:
            close()


class FileStream(IndexedStream):
    """Frames of files (zarr, HDF5/CXI, .npy, PNG, TIFF, globs, CSV lists) via :func:`open_frames`, in order.

    Opening checks that everything exists, so a missing file fails before any actor starts.
    """

    def __init__(self, path, key: str | None = None):
        from vitkit.apps.peaks.io import open_frames

        super().__init__(open_frames(list(path) if isinstance(path, (list, tuple)) else path, key=key,
                                     label_key=False))


class SyntheticStream(IndexedStream):
    """``num_frames`` frames of :class:`~vitkit.apps.peaks.synthetic.SyntheticPeakDataset` (generated on read)."""

    def __init__(self, num_frames: int, shape, seed: int = 0):
        from vitkit.apps.peaks.synthetic import SynthConfig, SyntheticPeakDataset

        super().__init__(SyntheticPeakDataset(int(num_frames), cfg=SynthConfig(shape=tuple(int(s) for s in shape)),
                                              seed=int(seed)))
