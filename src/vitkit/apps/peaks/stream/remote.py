"""The remote parts of a streaming run (Ray actors) and its Ray queue source; the pipeline that drives them is
:mod:`vitkit.apps.peaks.stream.ray`, which imports this module once it found Ray installed."""

from __future__ import annotations

import os
import time

import numpy as np
import ray
from ray.exceptions import RayError
from ray.util.queue import Empty

from vitkit.apps.peaks.stream.errors import StreamError

__all__ = ["ModelActor", "PeakActor", "QueueStream", "WriterActor", "connect_queue"]


# ------------------------------------------------------------------------------------------- remote parts
class ModelActor:
    """One model replica (a Ray actor): events ``[B, P, H, W]`` in, compact masks out."""

    def __init__(self, checkpoint: str, template, device: str, bf16: bool, torch_threads: int, mask_format: str,
                 warmup: bool):
        import torch

        from vitkit.apps.peaks.stream.stages import actor_finder
        from vitkit.runtime import tune_cpu_allocator

        tune_cpu_allocator()
        if torch.get_num_interop_threads() != 1:  # a fresh actor process: no parallel work has run yet
            torch.set_num_interop_threads(1)
        self.finder = actor_finder(template, checkpoint, device=device, bf16=bf16, torch_threads=torch_threads)
        if warmup:  # one window through the model: the first call builds kernels and caches
            h, w = (int(v) for v in self.finder.model.img_size)
            with torch.inference_mode():
                self.finder.model(torch.zeros(1, 1, h, w, device=self.finder.device,
                                              dtype=next(self.finder.model.parameters()).dtype))
        self.fmt = mask_format
        self.batches = 0

    def info(self) -> dict:
        import torch

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "torch_threads": torch.get_num_threads(), "batches": self.batches,
                "num_classes": int(getattr(self.finder.model, "num_classes", 2))}

    @ray.method(num_returns=2)
    def infer(self, events: np.ndarray):
        from vitkit.apps.peaks.stream.stages import pack_masks

        t = time.perf_counter()
        data = pack_masks(self.finder.masks(events), self.fmt)
        self.batches += 1
        return data, {"pid": os.getpid(), "seconds": time.perf_counter() - t, "bytes": int(data.nbytes)}


class PeakActor:
    """One peak extractor (a Ray actor): the run's model-less PeakFinder on masks and raw events."""

    def __init__(self, finder):
        self.finder = finder

    def ready(self) -> int:
        return os.getpid()

    @ray.method(num_returns=2)
    def peaks(self, events: np.ndarray, masks: np.ndarray, fmt: str):
        from vitkit.apps.peaks.stream.stages import unpack_masks

        t = time.perf_counter()
        peaks = self.finder.peaks(events, unpack_masks(masks, events.shape[-1], fmt))
        return peaks, {"n_peaks": [len(p) for p in peaks], "bytes": int(sum(p.nbytes for p in peaks)),
                       "seconds": time.perf_counter() - t}


class WriterActor:
    """The one CXI writer of a run."""

    def __init__(self, path: str, max_peaks: int, flush_every_s: float):
        from vitkit.apps.peaks.cxi import OrderedCXIWriter

        self.w = OrderedCXIWriter(path, max_peaks=max_peaks, flush_every_s=flush_every_s)

    def ready(self) -> int:
        return os.getpid()

    def write(self, seqs: list[int], indices: list[int], peaks: list[np.ndarray], event_ids: list[str],
              timestamps: list[float]) -> dict:
        t = time.perf_counter()
        written, dropped = self.w.add(zip(indices, seqs, peaks, event_ids, timestamps))
        return {"written": written, "dropped": dropped, "buffered": self.w.buffered,
                "seconds": time.perf_counter() - t}

    def flush_gap(self) -> dict:
        t = time.perf_counter()
        return {"written": self.w.flush_gap(), "dropped": [], "buffered": self.w.buffered,
                "seconds": time.perf_counter() - t}

    def close(self) -> dict:
        path = self.w.close()
        return {"path": str(path), **self.w.summary()}

    def abort(self) -> None:
        self.w.abort()


# ------------------------------------------------------------------------------------------------ queue
def connect_queue(name: str, namespace: str | None = None):
    """A ``ray.util.queue.Queue`` object for the queue actor named ``name`` (created by a producer, e.g.
    ``Queue(maxsize, actor_options={"name": name, "lifetime": "detached"})``)."""
    from ray.util.queue import Queue

    try:
        ray.get_actor(name, namespace=namespace)  # the producers' queue must exist: never create an empty one
    except ValueError as e:
        raise StreamError(f"source.queue_name: no Ray actor named {name!r} in namespace {namespace!r}; expected "
                          "the queue the producers feed (ray.util.queue.Queue with actor_options name=...). Start "
                          "the producers first or fix source.queue_name / source.queue_namespace.") from e
    # Queue has no public way to wrap an actor handle; its constructor with get_if_exists attaches to the named actor
    return Queue(actor_options={"name": name, "namespace": namespace, "get_if_exists": True})


class QueueStream:
    """Events from a ``ray.util.queue.Queue`` fed by ``num_producers`` external producers.

    An item is an event (array, tensor or ``ObjectRef`` of one: ``[H, W]``, ``[P, H, W]`` or the detector's
    slab), a dict with ``image`` and optionally ``index``, ``event_id``, ``timestamp``, or an ``(index, image)``
    pair. Items with an index are written at that index (unique per run, counting from 0 across all producers);
    items without one are numbered in arrival order (a stream must not mix the two). ``None`` is a producer's
    end-of-stream sentinel. ``check`` (:class:`~.stages.EventCheck`) turns each into ``[P, H, W]``;
    a bad item ends the run with its error.
    """

    def __init__(self, queue, num_producers: int = 1, check=None):
        from vitkit.apps.peaks.stream.stages import EventCheck

        self.queue = queue
        self.check = check or EventCheck()
        self.num_producers = int(num_producers)
        self.sentinels = 0
        self.arrivals = 0
        self.after_end = 0
        self.indexed: bool | None = None
        self.exhausted = False

    def depth(self) -> int | None:
        try:
            return int(self.queue.qsize())
        except RayError:  # the queue actor is gone: a depth to report no longer exists
            return None

    def _item(self, item):
        from vitkit.apps.peaks.stream.stages import StreamItem, raw_array
        from vitkit.errors import InputError

        index, eid, ts = None, None, None
        if isinstance(item, dict):
            index, img, eid, ts = item.get("index"), item.get("image"), item.get("event_id"), item.get("timestamp")
            if img is None:
                raise InputError(f"queue source: a dict item needs an 'image', found keys {sorted(item)}.")
        elif isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise InputError(f"queue source: expected an (index, image) pair, found a {type(item).__name__} of "
                                 f"length {len(item)}. Send frames, dicts {{'index', 'image'}} or pairs.")
            index, img = item
        else:
            img = item
        if isinstance(img, ray.ObjectRef):
            img = ray.get(img)
        has = index is not None
        if self.indexed is None:
            self.indexed = has
        elif self.indexed != has:
            raise InputError("queue source: some items carry a frame index and some do not; expected all or none "
                             "(frames without an index are numbered in arrival order).")
        if not has:
            index = self.arrivals
        self.arrivals += 1
        where = f"queue item {index}" + (f" (event {eid})" if eid is not None else "")
        return StreamItem(int(index), self.check(raw_array(img), where), str(index if eid is None else eid),
                          float("nan") if ts is None else float(ts))

    def poll(self, n: int, timeout: float = 0.0) -> list:
        if self.exhausted or n <= 0:
            return []
        got: list = []
        size = self.queue.qsize()
        if size > 0:
            try:
                got = self.queue.get_nowait_batch(min(size, n))
            except Empty:
                got = []
        elif timeout > 0:
            try:
                got = [self.queue.get(block=True, timeout=timeout)]
            except Empty:
                got = []
        out = []
        for item in got:
            if self.exhausted:
                self.after_end += 1
            elif item is None:
                self.sentinels += 1
                self.exhausted = self.sentinels >= self.num_producers
            else:
                out.append(self._item(item))
        return out

    def close(self) -> None:
        pass
