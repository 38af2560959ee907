"""Streaming peak finding on Ray: source -> batcher -> model actors -> peak-finding tasks -> one CXI writer.

The only vitkit module that imports Ray (``pip install "vitkit[ray]"``).

Stages
    * **source** (read by the driver, in order): files through :func:`~vitkit.apps.peaks.io.open_frames`
      (zarr, HDF5/CXI, ...), vitkit's synthetic generator, or a ``ray.util.queue.Queue`` fed by external
      producers (psana-ray style; each producer ends its part with one ``None`` sentinel, the stream ends after
      ``num_producers`` sentinels).
    * **batcher**: ``batch_size`` frames of one shape are stacked and ``ray.put`` once; the model actor and the
      peak task read the same object (zero copy).
    * **model actors** (``num_actors``, CPU or GPU, optional bf16 weights): :class:`~vitkit.infer.stages.MaskPredictor`,
      i.e. ``load_model`` + ``predict_masks``, so masks equal ``vitkit predict``'s. They return bit-packed
      masks (1 bit per pixel), never logits. At most ``max_batches_per_actor`` batches per actor are queued.
    * **peak tasks** (CPU, ``num_cpus`` each): ``peaks_per_frame`` on the unpacked masks and the raw frames. At
      most ``peaks.workers`` tasks are in flight -- a hard bound kept by the driver, not a scheduling hint.
    * **writer** (one actor, on the driver's node): :class:`~vitkit.infer.cxi.OrderedCXIWriter` writes rows in
      frame-index order whatever the completion order, drops duplicate indices, renames the file into place at
      the end.

Bounds
    At most ``max_frames_in_flight`` frames are between "read from the source" and "written to the CXI"; the
    driver stops reading when the cap is reached, so a queue source fills up and blocks its producers
    (backpressure) and memory stays bounded (frames in the object store, masks, peaks, the reorder buffer).

Faults
    Model actors have Ray ``max_restarts``; Ray's own task retries are off so that the driver sees every failure:
    a batch whose actor died (``ActorDiedError``, ``ActorUnavailableError``, any ``RayActorError``) goes back to
    the front of the queue and is re-run on a live actor (at most ``max_batch_retries`` times). A dead actor gets
    no work until a probe call answers (a restarted process: a new pid); an actor that died more than
    ``max_restarts`` times or is not back within ``restart_timeout_s`` is dropped. Rows are deduplicated by frame
    index in the writer. Everything is counted in the run's summary.

Shutdown
    At the end (or on any error or Ctrl-C) every actor the run created is killed, the writer's temporary file is
    removed unless the run finished, and Ray is shut down only if this run started it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitkit.infer import RayNotInstalledError, StreamError

try:
    import ray
    from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError
    from ray.util.queue import Empty
except ImportError as _e:  # pragma: no cover - exercised by a test that hides ray
    raise RayNotInstalledError(
        "vitkit.infer.ray (streaming inference, `vitkit stream`) needs Ray, which is not installed. Install it "
        "with: pip install \"vitkit[ray]\"") from _e

from vitkit.infer.config import StreamConfig, load_stream_config
from vitkit.infer.stats import StreamStats

__all__ = ["StreamPipeline", "run_stream", "QueueStream", "connect_queue"]

STATS_FILE = "stream_stats.json"
CXI_FILE = "peaks.cxi"


# ------------------------------------------------------------------------------------------- remote parts
class _ModelActor:
    """One model replica (a Ray actor): frames in, compact masks out."""

    def __init__(self, checkpoint: str, device: str, bf16: bool, overlap: float, torch_threads: int,
                 mask_format: str, warmup: bool):
        import torch

        from vitkit.infer.stages import MaskPredictor
        from vitkit.runtime import tune_cpu_allocator

        tune_cpu_allocator()
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        self.predictor = MaskPredictor(checkpoint, device=device, bf16=bf16, overlap=overlap,
                                       torch_threads=torch_threads)
        if warmup:
            self.predictor.warm_up()
        self.fmt = mask_format
        self.batches = 0

    def info(self) -> dict:
        import torch

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "torch_threads": torch.get_num_threads(), "batches": self.batches,
                "num_classes": int(getattr(self.predictor.model, "num_classes", 2))}

    @ray.method(num_returns=2)
    def infer(self, frames: np.ndarray):
        from vitkit.infer.stages import pack_masks

        t = time.perf_counter()
        data = pack_masks(self.predictor(frames), self.fmt)
        self.batches += 1
        return data, {"pid": os.getpid(), "seconds": time.perf_counter() - t, "bytes": int(data.nbytes)}


def _peak_task_fn(frames: np.ndarray, masks: np.ndarray, fmt: str, min_peaks: int, max_peaks: int,
                  min_pixels: int):
    from vitkit.infer.stages import batch_peaks, unpack_masks

    t = time.perf_counter()
    peaks = batch_peaks(frames, unpack_masks(masks, frames.shape[-1], fmt), min_peaks=min_peaks,
                        max_peaks=max_peaks, min_pixels=min_pixels)
    return peaks, {"n_peaks": [len(p) for p in peaks], "bytes": int(sum(p.nbytes for p in peaks)),
                   "seconds": time.perf_counter() - t}


_peak_task = ray.remote(num_returns=2)(_peak_task_fn)


@ray.remote
def _warm_up() -> int:
    """Start a worker for peak tasks ahead of the stream (imports take seconds)."""
    import vitkit.apps.peaks.peakfind  # noqa: F401
    import vitkit.infer.stages  # noqa: F401

    time.sleep(0.2)  # hold the worker so that the next warm-up task starts another one
    return os.getpid()


class _WriterActor:
    """The one CXI writer of a run."""

    def __init__(self, path: str, max_peaks: int, flush_every_s: float):
        from vitkit.infer.cxi import OrderedCXIWriter

        self.w = OrderedCXIWriter(path, max_peaks=max_peaks, flush_every_s=flush_every_s)

    def ready(self) -> bool:
        return True

    def write(self, seqs: list[int], indices: list[int], peaks: list[np.ndarray]) -> dict:
        written, dropped = self.w.add(zip(indices, seqs, peaks))
        return {"written": written, "dropped": dropped, "buffered": self.w.buffered}

    def flush_gap(self) -> dict:
        return {"written": self.w.flush_gap(), "dropped": [], "buffered": self.w.buffered}

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
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError as e:
        raise StreamError(f"source.queue_name: no Ray actor named {name!r} in namespace {namespace!r}; expected "
                          "the queue the producers feed (ray.util.queue.Queue with actor_options name=...). Start "
                          "the producers first or fix source.queue_name / source.queue_namespace.") from e
    q = Queue.__new__(Queue)
    q.actor, q.maxsize = handle, 0
    return q


class QueueStream:
    """Frames from a ``ray.util.queue.Queue`` fed by ``num_producers`` external producers.

    An item is a frame (``[H, W]`` / ``[1, H, W]`` array, tensor or ``ObjectRef`` of one), a dict with ``image``
    and optionally ``index``, or an ``(index, image)`` pair. Items with an index are written at that frame index
    (unique per run, counting from 0 across all producers); items without one are numbered in arrival order (a
    stream must not mix the two). ``None`` is a producer's end-of-stream sentinel.
    """

    def __init__(self, queue, num_producers: int = 1):
        self.queue = queue
        self.num_producers = int(num_producers)
        self.sentinels = 0
        self.arrivals = 0
        self.after_end = 0
        self.indexed: bool | None = None
        self.exhausted = False

    def depth(self) -> int | None:
        try:
            return int(self.queue.qsize())
        except Exception:  # noqa: BLE001 - reporting only
            return None

    def _item(self, item) -> tuple[int, np.ndarray]:
        from vitkit.errors import InputError
        from vitkit.infer.stages import as_frame

        index = None
        if isinstance(item, dict):
            index, img = item.get("index"), item.get("image")
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
        return int(index), as_frame(img)

    def poll(self, n: int, timeout: float = 0.0) -> list[tuple[int, np.ndarray]]:
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


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class _Batch:
    id: int
    seqs: list[int]
    indices: list[int]
    frames: Any  # ObjectRef of float32 [B, H, W]
    shape: tuple[int, int]
    nbytes: int
    attempts: int = 0


@dataclass
class _Slot:
    i: int
    handle: Any
    pid: int | None = None
    node: str | None = None
    state: str = "alive"  # alive | recovering | dead
    epoch: int = 0
    deaths: int = 0
    died_at: float = 0.0
    probe: Any = None
    probe_after: float = 0.0
    inflight: int = 0
    batches_done: int = 0
    pids: list[int] = field(default_factory=list)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class StreamPipeline:
    """One streaming run. ``StreamPipeline(cfg).run()`` returns the summary dict (also written as JSON next to
    the CXI). ``queue`` is a ``ray.util.queue.Queue`` for ``source.kind=queue`` (else ``source.queue_name``)."""

    def __init__(self, cfg: StreamConfig, queue=None, log: Callable[[str], None] | None = _stderr):
        self.cfg = cfg
        self.queue = queue
        self.log = log or (lambda s: None)
        self.stats = StreamStats()
        self.started_ray = False
        self.slots: list[_Slot] = []
        self.writer = None
        self.source = None
        self._closed = False
        # state of the run
        self._seq = 0
        self._batch_id = 0
        self._cur: list[tuple[int, int, np.ndarray]] = []
        self._cur_t0 = 0.0
        self._pending: collections.deque[_Batch] = collections.deque()
        self._model_refs: dict[Any, tuple[_Slot, _Batch, int, Any]] = {}
        self._masks_ready: collections.deque[tuple[_Batch, Any]] = collections.deque()
        self._peak_refs: dict[Any, tuple[_Batch, Any]] = {}
        self._write_refs: dict[Any, _Batch | None] = {}
        self._t_read: dict[int, float] = {}
        self._in_flight = 0
        self._writer_buffered = 0
        self._batches_done = 0
        self._killed: dict | None = None
        self._bytes = {"frames": 0, "masks": 0, "peaks": 0}
        self._shapes: set[tuple[int, int]] = set()
        self._num_classes = 2
        self._logit_bytes = 0
        self._rerun: list[int] = []
        self._rerun_frames = 0
        self._restarts = 0
        self._deaths = 0
        self._startup_s = 0.0
        self._cpu0 = time.process_time()

    # --------------------------------------------------------------------------------------------- setup
    def _open_source(self):
        from vitkit.infer.stages import FileStream, SyntheticStream

        s = self.cfg.source
        if s.kind == "files":
            return FileStream(s.path, key=s.key)
        if s.kind == "synthetic":
            return SyntheticStream(s.num_frames, s.shape, s.seed)
        return None  # queue: needs Ray

    def _init_ray(self) -> None:
        r = self.cfg.ray
        if ray.is_initialized():
            return
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": r.log_to_driver, "namespace": r.namespace}
        if r.address in (None, "", "local"):
            kw.update(address="local", num_cpus=r.num_cpus, num_gpus=r.num_gpus)
        else:
            kw.update(address=r.address)
        ray.init(**kw)
        self.started_ray = True

    def _check_resources(self) -> None:
        m, p = self.cfg.model, self.cfg.peaks
        res = ray.cluster_resources()
        need_cpu = m.num_actors * m.num_cpus + p.num_cpus
        if need_cpu > res.get("CPU", 0) + 1e-9:
            raise StreamError(
                f"the run needs {need_cpu:g} Ray CPUs ({m.num_actors} model actors x model.num_cpus={m.num_cpus:g} "
                f"+ one peak task x peaks.num_cpus={p.num_cpus:g}) but the cluster has {res.get('CPU', 0):g}. Lower "
                "model.num_actors / model.num_cpus / peaks.num_cpus or give Ray more CPUs (ray.num_cpus).")
        need_gpu = m.num_actors * self._actor_gpus()
        if need_gpu > res.get("GPU", 0) + 1e-9:
            raise StreamError(f"the run needs {need_gpu:g} GPUs ({m.num_actors} actors on {m.device}) but the Ray "
                              f"cluster has {res.get('GPU', 0):g}. Use model.device=cpu or fewer actors.")

    def _actor_gpus(self) -> float:
        m = self.cfg.model
        if m.num_gpus is not None:
            return float(m.num_gpus)
        return 1.0 if m.device.startswith("cuda") else 0.0

    def _start(self) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cfg = self.cfg
        m = cfg.model
        ckpt = Path(m.checkpoint)
        if not ckpt.exists():
            raise FileNotFoundError(f"model.checkpoint {m.checkpoint} does not exist: pass a run directory, a .ckpt "
                                    "file or a model directory written by vitkit (as for `vitkit predict`).")
        self.source = self._open_source()  # a missing file fails here, before Ray starts
        self._init_ray()
        if self.source is None:
            q = self.queue
            if q is None:
                if not cfg.source.queue_name:
                    raise StreamError("source.kind=queue needs a queue: pass queue=<ray.util.queue.Queue> to "
                                      "run_stream or set source.queue_name (a named queue actor).")
                q = connect_queue(cfg.source.queue_name, cfg.source.queue_namespace)
            self.source = QueueStream(q, cfg.source.num_producers)
        self._check_resources()
        out = Path(cfg.output.dir)
        out.mkdir(parents=True, exist_ok=True)
        here = ray.get_runtime_context().get_node_id()
        self.writer = ray.remote(_WriterActor).options(
            num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(str((out / CXI_FILE).resolve()), cfg.peaks.max_peaks, cfg.output.flush_every_s)
        actor_cls = ray.remote(_ModelActor).options(num_cpus=m.num_cpus, num_gpus=self._actor_gpus(),
                                                    max_restarts=m.max_restarts, max_task_retries=0)
        ckpt_abs = str(ckpt.resolve())
        self.slots = [_Slot(i, actor_cls.remote(ckpt_abs, m.device, m.bf16, m.overlap, m.torch_threads,
                                                m.mask_format, m.warmup)) for i in range(m.num_actors)]
        infos = [s.handle.info.remote() for s in self.slots]
        warm = [_warm_up.options(num_cpus=cfg.peaks.num_cpus).remote() for _ in range(cfg.peaks.workers)]
        try:
            got = ray.get(infos + [self.writer.ready.remote()] + warm, timeout=cfg.ray.actor_start_timeout_s)
        except GetTimeoutError as e:
            raise StreamError(f"the model actors did not start within ray.actor_start_timeout_s="
                              f"{cfg.ray.actor_start_timeout_s:g} s; the cluster has {ray.available_resources()} "
                              "free. Lower model.num_actors / num_cpus / num_gpus.") from e
        except RayActorError as e:
            raise StreamError(f"a model actor failed to start (loading {m.checkpoint} on {m.device}): {e}") from e
        for s, info in zip(self.slots, got):
            s.pid, s.node = info["pid"], info["node"]
            s.pids.append(s.pid)
            self._num_classes = info["num_classes"]
        self.log(f"[stream] {m.num_actors} model actor(s) ready (pids {[s.pid for s in self.slots]}, "
                 f"{got[0]['torch_threads']} torch thread(s) each), source {cfg.source.kind}, batch {m.batch_size}, "
                 f"cap {cfg.max_frames_in_flight} frames in flight, {cfg.peaks.workers} peak workers")

    # ------------------------------------------------------------------------------------------ stages
    def _room(self) -> int:
        return self.cfg.max_frames_in_flight - self._in_flight

    def _read(self, block: bool) -> int:
        room = self._room()
        if room <= 0 or self.source.exhausted:
            return 0
        want = min(room, self.cfg.model.batch_size - len(self._cur))
        items = self.source.poll(want, timeout=self.cfg.source.poll_s if block else 0.0)
        now = time.perf_counter()
        for index, frame in items:
            if self._cur and frame.shape != self._cur[0][2].shape:
                self._flush_batch()
            if not self._cur:
                self._cur_t0 = now
            self._cur.append((self._seq, index, frame))
            self._t_read[self._seq] = now
            self._seq += 1
            self._in_flight += 1
            self.stats.read += 1
        return len(items)

    def _flush_batch(self) -> None:
        if not self._cur:
            return
        frames = np.stack([f for _, _, f in self._cur])
        b = _Batch(self._batch_id, [s for s, _, _ in self._cur], [i for _, i, _ in self._cur], ray.put(frames),
                   tuple(frames.shape[1:]), int(frames.nbytes))
        self._batch_id += 1
        self._bytes["frames"] += b.nbytes
        self._logit_bytes += self._num_classes * frames.size * 4  # what float32 logits of these frames would be
        self._shapes.add(b.shape)
        self._pending.append(b)
        self._cur = []

    def _maybe_flush_batch(self) -> None:
        if not self._cur:
            return
        full = len(self._cur) >= self.cfg.model.batch_size
        if full or self._room() <= 0 or self.source.exhausted or \
                time.perf_counter() - self._cur_t0 >= self.cfg.source.batch_timeout_s:
            self._flush_batch()

    def _dispatch_model(self) -> None:
        m = self.cfg.model
        while self._pending:
            live = [s for s in self.slots if s.state == "alive" and s.inflight < m.max_batches_per_actor]
            if not live:
                return
            slot = min(live, key=lambda s: (s.inflight, s.i))
            b = self._pending.popleft()
            masks_ref, info_ref = slot.handle.infer.remote(b.frames)
            slot.inflight += 1
            self._model_refs[info_ref] = (slot, b, slot.epoch, masks_ref)
            self.stats.depths(batches_per_actor=slot.inflight)

    def _dispatch_peaks(self) -> None:
        p = self.cfg.peaks
        while self._masks_ready and len(self._peak_refs) < p.workers:
            b, masks_ref = self._masks_ready.popleft()
            peaks_ref, info_ref = _peak_task.options(num_cpus=p.num_cpus).remote(
                b.frames, masks_ref, self.cfg.model.mask_format, p.min_peaks, p.max_peaks, p.min_pixels)
            self._peak_refs[info_ref] = (b, peaks_ref)

    def _probe(self) -> None:
        now = time.perf_counter()
        for s in self.slots:
            if s.state == "recovering" and s.probe is None and now >= s.probe_after:
                s.probe = s.handle.info.remote()

    def _fault_hook(self) -> None:
        f = self.cfg.fault
        if f.kill_actor_after_batches is None or self._killed is not None or \
                self._batches_done < f.kill_actor_after_batches:
            return
        busy = [s for s in self.slots if s.state == "alive" and s.inflight > 0]
        if not busy:
            return
        s = busy[0]
        batches = sorted(b.id for sl, b, _, _ in self._model_refs.values() if sl is s)
        if f.kill_mode == "sigkill":
            if s.node != ray.get_runtime_context().get_node_id():
                raise StreamError("fault.kill_mode=sigkill needs the actor on the driver's node; use ray_kill.")
            os.kill(s.pid, signal.SIGKILL)
        else:
            ray.kill(s.handle, no_restart=False)
        self._killed = {"actor": s.i, "pid": s.pid, "mode": f.kill_mode, "after_batches": self._batches_done,
                        "batches_in_flight": batches}
        self.log(f"[stream] fault injection: killed model actor {s.i} (pid {s.pid}, {f.kill_mode}) with batches "
                 f"{batches} in flight")

    def _maybe_gap_flush(self) -> None:
        """Everything in flight waits in the writer for a frame index that never came: write it out."""
        if self._room() > 0 or self._cur or self._pending or self._model_refs or self._masks_ready or \
                self._peak_refs or self._write_refs or self._in_flight == 0:
            return
        self._write_refs[self.writer.flush_gap.remote()] = None
        self.stats.add("gap_flushes")

    # ------------------------------------------------------------------------------------------ results
    def _on_model(self, ref) -> None:
        slot, b, epoch, masks_ref = self._model_refs.pop(ref)
        slot.inflight -= 1
        try:
            info = ray.get(ref)
        except RayActorError as e:
            self._actor_failed(slot, epoch, e)
            b.attempts += 1
            if b.attempts > self.cfg.model.max_batch_retries:
                raise StreamError(f"batch {b.id} (frames {b.indices[0]}..{b.indices[-1]}) failed "
                                  f"{b.attempts} times on dying actors; giving up (model.max_batch_retries="
                                  f"{self.cfg.model.max_batch_retries}). Last error: {e}") from e
            self._pending.appendleft(b)
            self._rerun.append(b.id)
            self._rerun_frames += len(b.seqs)
            return
        self._batches_done += 1
        slot.batches_done += 1
        if info["pid"] not in slot.pids:
            slot.pids.append(info["pid"])
        self._bytes["masks"] += info["bytes"]
        self.stats.add("model_seconds", info["seconds"])
        self._masks_ready.append((b, masks_ref))

    def _actor_failed(self, slot: _Slot, epoch: int, err: Exception) -> None:
        if slot.state != "alive" or epoch != slot.epoch:
            return  # the same death, reported by another call
        slot.deaths += 1
        self._deaths += 1
        slot.state, slot.died_at, slot.probe, slot.probe_after = "recovering", time.perf_counter(), None, 0.0
        self.log(f"[stream] model actor {slot.i} (pid {slot.pid}) died ({type(err).__name__}); re-running its "
                 "batches elsewhere and waiting for its restart")
        if slot.deaths > self.cfg.model.max_restarts:
            self._drop(slot, f"it died {slot.deaths} times (model.max_restarts={self.cfg.model.max_restarts})")

    def _drop(self, slot: _Slot, why: str) -> None:
        slot.state = "dead"
        self.log(f"[stream] model actor {slot.i} dropped from the pool: {why}")
        if not any(s.state != "dead" for s in self.slots):
            raise StreamError(f"all {len(self.slots)} model actors are gone (last: {why}); cannot go on.")

    def _on_probe(self, slot: _Slot) -> None:
        ref, slot.probe = slot.probe, None
        try:
            info = ray.get(ref)
        except ActorDiedError as e:  # restarts exhausted (a restarting actor is "unavailable")
            self._drop(slot, f"Ray reports it dead for good ({str(e).splitlines()[0][:200]})")
            return
        except RayActorError:
            if time.perf_counter() - slot.died_at > self.cfg.model.restart_timeout_s:
                self._drop(slot, f"not back after model.restart_timeout_s={self.cfg.model.restart_timeout_s:g} s")
            slot.probe_after = time.perf_counter() + 0.2
            return
        slot.state = "alive"
        slot.epoch += 1
        if info["pid"] != slot.pid:
            self._restarts += 1
            self.log(f"[stream] model actor {slot.i} restarted (pid {slot.pid} -> {info['pid']}, "
                     f"{time.perf_counter() - slot.died_at:.1f} s)")
        slot.pid = info["pid"]
        if slot.pid not in slot.pids:
            slot.pids.append(slot.pid)

    def _on_peaks(self, ref) -> None:
        b, peaks_ref = self._peak_refs.pop(ref)
        info = ray.get(ref)  # a failing peak task (bad frame, ...) ends the run with its error
        self._bytes["peaks"] += info["bytes"]
        self.stats.add("peak_seconds", info["seconds"])
        b.frames = None  # release the frames once nothing needs them
        self._write_refs[self.writer.write.remote(b.seqs, b.indices, peaks_ref)] = b

    def _on_write(self, ref) -> None:
        self._write_refs.pop(ref)
        ack = ray.get(ref)
        now = time.perf_counter()
        for seq in ack["written"]:
            self.stats.frame_written(now - self._t_read.pop(seq))
        for seq in ack["dropped"]:
            self._t_read.pop(seq)
            self.stats.dropped += 1
        self._in_flight -= len(ack["written"]) + len(ack["dropped"])
        self._writer_buffered = ack["buffered"]

    # --------------------------------------------------------------------------------------------- loop
    def _depths(self) -> dict[str, Any]:
        m, p = self.cfg.model, self.cfg.peaks
        alive = sum(s.state == "alive" for s in self.slots)
        return {"source": self.source.depth(), "batching": len(self._cur), "to_model": len(self._pending),
                "in_model": f"{len(self._model_refs)}/{alive * m.max_batches_per_actor}",
                "to_peaks": len(self._masks_ready), "in_peaks": f"{len(self._peak_refs)}/{p.workers}",
                "writer_buffer": self._writer_buffered,
                "in_flight": f"{self._in_flight}/{self.cfg.max_frames_in_flight}"}

    def _done(self) -> bool:
        if self._killed is not None and self.cfg.fault.await_restart and \
                self.slots[self._killed["actor"]].state == "recovering":
            return False
        return (self.source.exhausted and not self._cur and not self._pending and not self._model_refs
                and not self._masks_ready and not self._peak_refs and not self._write_refs)

    def _loop(self) -> None:
        self._startup_s = self.stats.start()  # rates and latencies count from here
        last_report = time.perf_counter()
        self._cpu0 = time.process_time()
        every = self.cfg.report_every_s
        while True:
            busy = bool(self._model_refs or self._peak_refs or self._write_refs or self._masks_ready
                        or any(s.probe is not None for s in self.slots))
            n = self._read(block=not busy and not self._pending and not self._cur)
            self._maybe_flush_batch()
            self._dispatch_model()
            self._dispatch_peaks()
            self._probe()
            self._fault_hook()
            self._maybe_gap_flush()
            self.stats.depths(frames_in_flight=self._in_flight, pending_batches=len(self._pending),
                              model_batches=len(self._model_refs), peak_tasks=len(self._peak_refs),
                              writer_buffer=self._writer_buffered)
            if every and time.perf_counter() - last_report >= every:
                self.log(self.stats.report_line(self._depths()))
                last_report = time.perf_counter()
            if self._done():
                return
            refs = list(self._model_refs) + list(self._peak_refs) + list(self._write_refs) + \
                [s.probe for s in self.slots if s.probe is not None]
            if not refs:
                if not n:
                    time.sleep(0.005)  # waiting for the source, a batch timeout or a probe delay
                continue
            can_read = n > 0 and self._room() > 0 and not self.source.exhausted
            timeout = 0.0 if can_read else min(self.cfg.source.poll_s, 0.05)
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=False)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            probes = {s.probe: s for s in self.slots if s.probe is not None}
            for ref in ready:
                if ref in self._model_refs:
                    self._on_model(ref)
                elif ref in self._peak_refs:
                    self._on_peaks(ref)
                elif ref in self._write_refs:
                    self._on_write(ref)
                elif ref in probes:
                    self._on_probe(probes[ref])

    # ------------------------------------------------------------------------------------------- finish
    def _finish(self) -> dict[str, Any]:
        from vitkit.apps.peaks.job import write_json

        w = ray.get(self.writer.close.remote())
        self._closed = True
        out = Path(self.cfg.output.dir)
        s = self.stats.summary()
        frames = max(s["frames_read"], 1)
        logits = self._logit_bytes / frames
        results = (self._bytes["masks"] + self._bytes["peaks"]) / frames
        summary = {
            **s,
            "startup_s": self._startup_s,
            "driver_cpu_s": time.process_time() - self._cpu0,
            "output": w["path"],
            "rows": w["rows"],
            "peaks": w["peaks"],
            "duplicates_dropped": w["duplicates_dropped"],
            "gaps": w["gaps"],
            "late_rows": w["late_rows"],
            "max_reorder_buffer": w["max_reorder_buffer"],
            "max_frames_in_flight": self.cfg.max_frames_in_flight,
            "max_frames_in_flight_seen": self.stats.max_depth.get("frames_in_flight", 0),
            "num_actors": len(self.slots),
            "actors": [{"actor": sl.i, "pids": sl.pids, "deaths": sl.deaths, "state": sl.state,
                        "batches": sl.batches_done} for sl in self.slots],
            "actor_deaths": self._deaths,
            "actor_restarts": self._restarts,
            "rerun_batches": list(self._rerun),
            "rerun_frames": self._rerun_frames,
            "fault_injected": self._killed,
            "batches": self._batch_id,
            "object_store_bytes": {
                **self._bytes,
                "results_per_frame": results,
                "frames_per_frame": self._bytes["frames"] / frames,
                "float32_logits_per_frame": logits,
                "results_vs_logits": results / logits if logits else None,
                "frame_shapes": sorted(list(sh) for sh in self._shapes),
            },
            "ray_started_by_pipeline": self.started_ray,
            "config": dataclasses.asdict(self.cfg),
        }
        write_json(out / STATS_FILE, summary)
        summary["stats_file"] = str(out / STATS_FILE)
        lat = summary["latency_s"]
        self.log(f"[stream] done: {summary['frames_written']} frames, {summary['peaks']} peaks in "
                 f"{summary['elapsed_s']:.1f} s = {summary['frames_per_s']:.2f} frames/s; latency p50 "
                 f"{(lat['p50'] or 0):.3f} s p95 {(lat['p95'] or 0):.3f} s; restarts {self._restarts}, re-run "
                 f"batches {len(self._rerun)}, duplicates dropped {w['duplicates_dropped']}; results "
                 f"{results:.0f} B/frame vs {logits:.0f} B of float32 logits")
        return summary

    def _teardown(self) -> None:
        if self.writer is not None and not self._closed:
            try:
                ray.get(self.writer.abort.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - best effort: the writer may be the thing that failed
                pass
        for s in self.slots:
            try:
                ray.kill(s.handle, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if self.writer is not None:
            try:
                ray.kill(self.writer, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if self.source is not None:
            self.source.close()
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def run(self) -> dict[str, Any]:
        """Run to the end of the stream; returns the summary. Cleans up on success, error and Ctrl-C."""
        try:
            self._start()
            self._loop()
            return self._finish()
        finally:
            self._teardown()


def run_stream(config: StreamConfig | dict | str | os.PathLike = "default", overrides: list[str] | tuple = (),
               queue=None, log: Callable[[str], None] | None = _stderr) -> dict[str, Any]:
    """Run a streaming job; see the module docstring.

    Args:
        config: a :class:`StreamConfig`, a dict, a packaged config name or a YAML path.
        overrides: ``key=value`` overrides (e.g. ``["model.num_actors=2"]``).
        queue: the ``ray.util.queue.Queue`` of a ``source.kind=queue`` run (else ``source.queue_name``).
        log: where progress lines go (default stderr; None: silent).

    Returns:
        The summary: frames, peaks, frames/s, latency percentiles, queue-depth maxima, restarts and re-run
        batches, object-store bytes per frame, the output path (also in ``stream_stats.json``).
    """
    cfg = config if isinstance(config, StreamConfig) and not overrides else load_stream_config(config, overrides)
    return StreamPipeline(cfg, queue=queue, log=log).run()
