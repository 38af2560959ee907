"""Streaming peak finding on Ray: source -> batcher -> model actors -> peak-finding tasks -> one CXI writer.

The only vitkit module that imports Ray (``pip install "vitkit[ray]"``).

Stages
    * **source** (read by the driver, in order): files through :func:`~vitkit.apps.peaks.io.open_frames`
      (zarr, HDF5/CXI, ...), vitkit's simulators, ZeroMQ sockets (:class:`~vitkit.apps.peaks.stream.zmq.ZmqStream`:
      LCLStreamer-style ``.npz`` messages; malformed ones are counted and skipped), or a
      ``ray.util.queue.Queue`` fed by external producers (psana-ray style; each producer ends its part with one
      ``None`` sentinel, the stream ends after ``num_producers`` sentinels). Every event is checked against the
      run's detector (:class:`~vitkit.apps.peaks.stream.stages.EventCheck`): a panel stack ``[P, H, W]`` or a slab.
    * **batcher**: ``batch_size`` events of one shape are stacked and ``ray.put`` once; the model actor and the
      peak actor read the same object (zero copy).
    * **model actors** (``num_actors``, CPU or GPU, optional bf16 weights): the run's
      :class:`~vitkit.apps.peaks.finder.PeakFinder` with the model (:func:`~.stages.actor_finder`):
      the panels of all events of a batch go through the model together, so masks equal ``vitkit predict``'s.
      They return bit-packed masks (1 bit per pixel), never logits. At most ``max_batches_per_actor`` batches
      per actor are queued.
    * **peak actors** (``peaks.workers`` of them, CPU, ``num_cpus`` each): :meth:`PeakFinder.peaks` (the same
      finder without its model) on the unpacked masks and the raw events: one peak table per event (panel,
      panel/slab/lab coordinates, ...). One call in flight per actor -- a hard bound kept by the driver. They
      are long-lived actors, not tasks: Ray kills idle task workers after a second and a new one spends seconds
      importing vitkit, which stalled the whole pipeline (41 vs 148 events/s in the soak benchmark).
    * **writer** (one actor, on the driver's node): :class:`~vitkit.apps.peaks.cxi.OrderedCXIWriter` writes rows in
      index (arrival) order whatever the completion order, with each event's id and timestamp, drops duplicate
      indices, renames the file into place at the end; the run's ``detector.geom`` goes beside it.

Bounds
    At most ``max_frames_in_flight`` events are between "read from the source" and "written to the CXI"; the
    driver stops reading when the cap is reached, so a queue source fills up and blocks its producers, and a
    ZeroMQ PULL socket fills to its high-water mark and blocks the sender (backpressure); memory stays bounded
    (events in the object store, masks, peaks, the reorder buffer). With ``source.overflow=drop_oldest`` the
    socket is read on and the oldest waiting events are dropped instead (counted, warned).

Timing
    Every stage's busy time is counted (receive, decode, batch, model, peak extraction, write; the driver's
    waits on the source apart); the progress line and ``stream_stats.json`` show each stage's utilisation and
    :func:`~vitkit.apps.peaks.stream.stats.limiting_stage` names the stage that limits throughput.

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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitkit.apps.peaks.stream.errors import RayNotInstalledError, StreamError

try:
    import ray
    from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayError
except ImportError as _e:  # pragma: no cover - exercised by a test that hides ray
    raise RayNotInstalledError(
        "vitkit.apps.peaks.stream.ray (streaming inference, `vitkit stream`) needs Ray, which is not installed. "
        "Install it with: pip install \"vitkit[ray]\"") from _e

from vitkit.apps.peaks.stream.config import StreamConfig, load_stream_config
from vitkit.apps.peaks.stream.remote import ModelActor, PeakActor, QueueStream, WriterActor, connect_queue
from vitkit.apps.peaks.stream.stats import StreamStats

__all__ = ["StreamPipeline", "run_stream", "QueueStream", "connect_queue"]

STATS_FILE = "stream_stats.json"
CXI_FILE = "peaks.cxi"


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class _Batch:
    id: int
    seqs: list[int]
    indices: list[int]
    frames: Any  # ObjectRef of float32 [B, P, H, W]
    shape: tuple[int, ...]
    nbytes: int
    event_ids: list[str] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
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


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory (``VmHWM``) of a process on this node, in MiB; None where /proc cannot tell."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():  # another node, or the process is gone
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return None


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
        self._cur: list[tuple[int, Any]] = []  # (seq, StreamItem)
        self._cur_t0 = 0.0
        self._pending: collections.deque[_Batch] = collections.deque()
        self._model_refs: dict[Any, tuple[_Slot, _Batch, int, Any]] = {}
        self._masks_ready: collections.deque[tuple[_Batch, Any]] = collections.deque()
        self._peak_refs: dict[Any, tuple[_Batch, Any]] = {}
        self._write_refs: dict[Any, _Batch | None] = {}
        self._t_read: dict[int, float] = {}
        self._in_flight = 0
        self._writer_buffered = 0
        self.batches_done = 0  # batches the model actors returned
        self.summary_extra: dict[str, Any] = {}  # merged into the run's summary (extension points)
        self._bytes = {"frames": 0, "masks": 0, "peaks": 0}
        self._shapes: set[tuple[int, ...]] = set()
        self.detector = None
        self.finder = None  # the run's PeakFinder without its model (peak actors); ObjectRef in _finder_ref
        self._finder_ref = None
        self._writer_pid = None
        self._peak_pids: list[int] = []
        self.peak_actors: list = []
        self._peak_busy: list[bool] = []
        self._busy = {"read": 0.0, "batch": 0.0, "model": 0.0, "peaks": 0.0, "write": 0.0}
        self._num_classes = 2
        self._logit_bytes = 0
        self._rerun: list[int] = []
        self._rerun_frames = 0
        self._restarts = 0
        self._deaths = 0
        self._startup_s = 0.0
        self._cpu0 = time.process_time()

    # --------------------------------------------------------------------------------------------- setup
    def _open_finder(self) -> None:
        """The run's detector, good-pixel mask and model-less PeakFinder (what every stage shares)."""
        from vitkit.apps.peaks.detector import load_detector
        from vitkit.apps.peaks.finder import PeakFinder, choose_sparse, read_mask, run_geometry, sparse_of_run
        from vitkit.apps.peaks.stream.stages import EventCheck

        d, p, s = self.cfg.detector, self.cfg.peaks, self.cfg.source
        geometry = d.geometry
        if geometry is None and s.kind == "synthetic" and s.detector:
            geometry = s.detector
        if geometry is None:
            geometry = run_geometry(self.cfg.model.checkpoint)
        self.detector = None if geometry is None else load_detector(geometry)
        good = None
        if d.mask is not None:
            if self.detector is None:
                raise StreamError("detector.mask needs a geometry (detector.geometry=<.geom or built-in name>) to "
                                  "know which pixels the mask covers.")
            good = read_mask(d.mask, self.detector, d.mask_key)
        # the model the actors load: the run's, or its sparse-token model with the threshold it was fitted with
        m = self.cfg.model
        self.model_path, threshold = m.checkpoint, None
        sparse, self.model_choice = choose_sparse(m.checkpoint, m.sparse, m.device)
        if sparse:
            self.model_path, threshold = sparse_of_run(m.checkpoint)
        self.finder = PeakFinder(None, self.detector, good, overlap=self.cfg.model.overlap, min_pixels=p.min_pixels,
                                 min_peaks=p.min_peaks, max_peaks=p.max_peaks, threshold=p.threshold,
                                 min_snr=p.min_snr, sparse_threshold=threshold)
        self.check = EventCheck(self.detector, self.finder.good)

    def _open_source(self):
        from vitkit.apps.peaks.stream.stages import FileStream, SyntheticStream

        s = self.cfg.source
        if s.kind == "files":
            return FileStream(s.path, key=s.key, detector=self.detector, good=self.finder.good)
        if s.kind == "synthetic":
            return SyntheticStream(s.num_frames, s.shape, s.seed, detector=self.detector if s.detector else None)
        if s.kind == "zmq":
            from vitkit.apps.peaks.stream.zmq import ZmqStream

            return ZmqStream(s.endpoints, socket=s.socket, bind=s.bind, topic=s.topic, data_key=s.data_key,
                             id_key=s.id_key, timestamp_key=s.timestamp_key, hwm=s.hwm,
                             num_producers=s.num_producers, idle_timeout_s=s.idle_timeout_s, overflow=s.overflow,
                             buffer_events=s.buffer_events, check=self.check, log=self.log, batched=s.batched)
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
        need_cpu = m.num_actors * m.num_cpus + p.workers * p.num_cpus
        if need_cpu > res.get("CPU", 0) + 1e-9:
            raise StreamError(
                f"the run needs {need_cpu:g} Ray CPUs ({m.num_actors} model actors x model.num_cpus={m.num_cpus:g} "
                f"+ {p.workers} peak actors x peaks.num_cpus={p.num_cpus:g}) but the cluster has "
                f"{res.get('CPU', 0):g}. Lower model.num_actors / model.num_cpus / peaks.workers / peaks.num_cpus or "
                "give Ray more CPUs (ray.num_cpus).")
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
        self._open_finder()  # a bad geometry or mask fails here, before Ray starts
        self.source = self._open_source()  # so does a missing file
        self._init_ray()
        if self.source is None:
            q = self.queue
            if q is None:
                if not cfg.source.queue_name:
                    raise StreamError("source.kind=queue needs a queue: pass queue=<ray.util.queue.Queue> to "
                                      "run_stream or set source.queue_name (a named queue actor).")
                q = connect_queue(cfg.source.queue_name, cfg.source.queue_namespace)
            self.source = QueueStream(q, cfg.source.num_producers, self.check)
        self._check_resources()
        out = Path(cfg.output.dir)
        out.mkdir(parents=True, exist_ok=True)
        here = ray.get_runtime_context().get_node_id()
        self.writer = ray.remote(WriterActor).options(
            num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(str((out / CXI_FILE).resolve()), cfg.peaks.max_peaks, cfg.output.flush_every_s)
        actor_cls = ray.remote(ModelActor).options(num_cpus=m.num_cpus, num_gpus=self._actor_gpus(),
                                                    max_restarts=m.max_restarts, max_task_retries=0)
        ckpt_abs = str(Path(self.model_path).resolve())
        self._finder_ref = ray.put(self.finder)
        self.slots = [_Slot(i, actor_cls.remote(ckpt_abs, self._finder_ref, m.device, m.bf16, m.torch_threads,
                                                m.mask_format, m.warmup)) for i in range(m.num_actors)]
        infos = [s.handle.info.remote() for s in self.slots]
        self.peak_actors = [ray.remote(PeakActor).options(num_cpus=cfg.peaks.num_cpus, max_restarts=0).remote(
            self._finder_ref) for _ in range(cfg.peaks.workers)]
        self._peak_busy = [False] * len(self.peak_actors)
        try:
            got = ray.get(infos + [self.writer.ready.remote()] + [a.ready.remote() for a in self.peak_actors],
                          timeout=cfg.ray.actor_start_timeout_s)
        except GetTimeoutError as e:
            raise StreamError(f"the model actors did not start within ray.actor_start_timeout_s="
                              f"{cfg.ray.actor_start_timeout_s:g} s; the cluster has {ray.available_resources()} "
                              "free. Lower model.num_actors / num_cpus / num_gpus.") from e
        except RayActorError as e:
            raise StreamError(f"a model actor failed to start (loading {m.checkpoint} on {m.device}): {e}") from e
        self._writer_pid = got[len(self.slots)]
        self._peak_pids = sorted(set(got[len(self.slots) + 1:]))
        for s, info in zip(self.slots, got):
            s.pid, s.node = info["pid"], info["node"]
            s.pids.append(s.pid)
            self._num_classes = info["num_classes"]
        det = "panels as they come" if self.detector is None else \
            f"{len(self.detector)} panels of {self.detector.stack_shape[1]} x {self.detector.stack_shape[2]}"
        self.log(f"[stream] model: {self.model_choice}")
        self.log(f"[stream] {m.num_actors} model actor(s) ready (pids {[s.pid for s in self.slots]}, "
                 f"{got[0]['torch_threads']} torch thread(s) each), source {cfg.source.kind}, detector {det}, "
                 f"batch {m.batch_size}, cap {cfg.max_frames_in_flight} events in flight, {cfg.peaks.workers} peak "
                 "workers")

    # ------------------------------------------------------------------------------------------ stages
    def _room(self) -> int:
        return self.cfg.max_frames_in_flight - self._in_flight

    def _read(self, block: bool) -> int:
        room = self._room()
        if self.source.exhausted:
            return 0
        if room <= 0:
            idle = getattr(self.source, "idle", None)
            if idle is not None:  # drop_oldest sockets read on while the pipeline is full
                idle()
            return 0
        want = min(room, self.cfg.model.batch_size - len(self._cur))
        t = time.perf_counter()
        items = self.source.poll(want, timeout=self.cfg.source.poll_s if block else 0.0)
        now = time.perf_counter()
        self._busy["read"] += now - t
        for item in items:
            if self._cur and item.data.shape != self._cur[0][1].data.shape:
                self._flush_batch()
            if not self._cur:
                self._cur_t0 = now
            self._cur.append((self._seq, item))
            self._t_read[self._seq] = now
            self._seq += 1
            self._in_flight += 1
            self.stats.read += 1
        return len(items)

    def _flush_batch(self) -> None:
        if not self._cur:
            return
        t = time.perf_counter()
        frames = np.stack([it.data for _, it in self._cur])
        b = _Batch(self._batch_id, [s for s, _ in self._cur], [it.index for _, it in self._cur], ray.put(frames),
                   tuple(frames.shape[1:]), int(frames.nbytes), [it.event_id for _, it in self._cur],
                   [it.timestamp for _, it in self._cur])
        self._busy["batch"] += time.perf_counter() - t
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
        while self._masks_ready and not all(self._peak_busy):
            k = self._peak_busy.index(False)
            b, masks_ref = self._masks_ready.popleft()
            peaks_ref, info_ref = self.peak_actors[k].peaks.remote(b.frames, masks_ref, self.cfg.model.mask_format)
            self._peak_busy[k] = True
            self._peak_refs[info_ref] = (b, peaks_ref, k)

    def _probe(self) -> None:
        now = time.perf_counter()
        for s in self.slots:
            if s.state == "recovering" and s.probe is None and now >= s.probe_after:
                s.probe = s.handle.info.remote()

    # ---------------------------------------------------------------------------------- extension points
    def on_loop(self) -> None:
        """Called once per loop iteration, after the work was dispatched: a subclass may act on the running
        pipeline here (the tests kill a model actor to check recovery). Does nothing."""

    def may_finish(self) -> bool:
        """Whether the run may end once everything is written; a subclass may hold it open (e.g. until a killed
        actor is back). True."""
        return True

    def batches_in_flight(self, slot: _Slot) -> list[int]:
        """Ids of the batches a model actor holds (queued or running)."""
        return sorted(b.id for sl, b, _, _ in self._model_refs.values() if sl is slot)

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
        self.batches_done += 1
        slot.batches_done += 1
        if info["pid"] not in slot.pids:
            slot.pids.append(info["pid"])
        self._bytes["masks"] += info["bytes"]
        self._busy["model"] += info["seconds"]
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
        b, peaks_ref, k = self._peak_refs.pop(ref)
        self._peak_busy[k] = False
        info = ray.get(ref)  # a failing peak call (bad frame, a dead peak actor) ends the run with its error
        self._bytes["peaks"] += info["bytes"]
        self._busy["peaks"] += info["seconds"]
        b.frames = None  # release the frames once nothing needs them
        self._write_refs[self.writer.write.remote(b.seqs, b.indices, peaks_ref, b.event_ids, b.timestamps)] = b

    def _on_write(self, ref) -> None:
        self._write_refs.pop(ref)
        ack = ray.get(ref)
        self._busy["write"] += ack["seconds"]
        now = time.perf_counter()
        for seq in ack["written"]:
            self.stats.frame_written(now - self._t_read.pop(seq))
        for seq in ack["dropped"]:
            self._t_read.pop(seq)
            self.stats.dropped += 1
        self._in_flight -= len(ack["written"]) + len(ack["dropped"])
        self._writer_buffered = ack["buffered"]

    # ---------------------------------------------------------------------------------------- accounting
    def _source_counters(self) -> dict[str, Any]:
        counters = getattr(self.source, "counters", None)
        return counters() if counters is not None else {}

    def _stages(self) -> tuple[dict[str, dict], dict[str, Any]]:
        """Per-stage utilisation and the limiting stage (:mod:`vitkit.apps.peaks.stream.stats`)."""
        from vitkit.apps.peaks.stream.stats import limiting_stage, stage_utilisation

        c = self._source_counters()
        elapsed = time.perf_counter() - self.stats.t0
        if "receive_s" in c:  # a socket: receive and decode apart from the waits for the producer
            busy = {"receive": c["receive_s"], "decode": c["decode_s"]}
        else:
            busy = {"read": self._busy["read"]}
        busy["batch"] = self._busy["batch"]
        busy["driver"] = sum(busy.values())  # the stages above share the driver's one thread
        busy.update(model=self._busy["model"], peaks=self._busy["peaks"], write=self._busy["write"])
        alive = sum(s.state != "dead" for s in self.slots) or 1
        stages = stage_utilisation(elapsed, busy, {"model": alive, "peaks": self.cfg.peaks.workers})
        return stages, limiting_stage(stages, c.get("wait_s"), elapsed)

    def _report_extra(self) -> str:
        stages, _ = self._stages()
        c = self._source_counters()
        busy = " ".join(f"{k} {100 * v['utilisation']:.0f}%" for k, v in stages.items())
        out = f"busy: {busy}"
        if c:
            out += f"; dropped {c.get('dropped', 0)}, malformed {c.get('malformed', 0)}"
        return out

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
        if not self.may_finish():
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
            self.on_loop()
            self._maybe_gap_flush()
            self.stats.depths(frames_in_flight=self._in_flight, pending_batches=len(self._pending),
                              model_batches=len(self._model_refs), peak_calls=len(self._peak_refs),
                              writer_buffer=self._writer_buffered)
            if every and time.perf_counter() - last_report >= every:
                self.log(self.stats.report_line(self._depths(), self._report_extra()))
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
        from vitkit.atomic import write_json

        here = ray.get_runtime_context().get_node_id()
        rss = {"driver": peak_rss_mb(os.getpid()), "writer": peak_rss_mb(self._writer_pid),
               "model_actors": [peak_rss_mb(sl.pid) if sl.node == here else None for sl in self.slots],
               "peak_workers": [peak_rss_mb(p) for p in self._peak_pids]}
        w = ray.get(self.writer.close.remote())
        self._closed = True
        out = Path(self.cfg.output.dir)
        if self.detector is not None:  # what maps the CXI's slab coordinates to the lab
            from vitkit.apps.peaks.geom import write_geom

            write_geom(self.detector, out / "detector.geom")
        summary = self._summary(w, rss)
        write_json(out / STATS_FILE, summary)
        summary["stats_file"] = str(out / STATS_FILE)
        self._log_done(summary, w)
        return summary

    def _summary(self, w: dict[str, Any], rss: dict[str, Any]) -> dict[str, Any]:
        """The run's summary (``stream_stats.json``) from the writer's ``w`` and the processes' peak memory."""
        stages, limit = self._stages()
        c = self._source_counters()
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
            "events_dropped": int(c.get("dropped", 0)),
            "messages_malformed": int(c.get("malformed", 0)),
            "source": c,
            "stages": stages,
            "limiting_stage": limit,
            "peak_rss_mib": rss,
            "max_frames_in_flight": self.cfg.max_frames_in_flight,
            "max_frames_in_flight_seen": self.stats.max_depth.get("frames_in_flight", 0),
            "model": "sparse" if self.finder.sparse else "dense",
            "num_actors": len(self.slots),
            "actors": [{"actor": sl.i, "pids": sl.pids, "deaths": sl.deaths, "state": sl.state,
                        "batches": sl.batches_done} for sl in self.slots],
            "actor_deaths": self._deaths,
            "actor_restarts": self._restarts,
            "rerun_batches": list(self._rerun),
            "rerun_frames": self._rerun_frames,
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
            **self.summary_extra,
        }
        return summary

    def _log_done(self, summary: dict[str, Any], w: dict[str, Any]) -> None:
        frames = max(summary["frames_read"], 1)
        logits = self._logit_bytes / frames
        results = (self._bytes["masks"] + self._bytes["peaks"]) / frames
        limit = summary["limiting_stage"]
        lat = summary["latency_s"]
        self.log(f"[stream] done: {summary['frames_written']} frames, {summary['peaks']} peaks in "
                 f"{summary['elapsed_s']:.1f} s = {summary['frames_per_s']:.2f} frames/s; latency p50 "
                 f"{(lat['p50'] or 0):.3f} s p95 {(lat['p95'] or 0):.3f} s; restarts {self._restarts}, re-run "
                 f"batches {len(self._rerun)}, duplicates dropped {w['duplicates_dropped']}; results "
                 f"{results:.0f} B/frame vs {logits:.0f} B of float32 logits; events dropped "
                 f"{summary['events_dropped']}, malformed messages {summary['messages_malformed']}; limiting stage: "
                 f"{limit['stage']}")

    def _teardown(self) -> None:
        # Clean-up after success, an error or Ctrl-C. A Ray error here is not reported: the run's own error (or
        # its summary) is what the caller needs, and a writer or actor that already died is the usual cause.
        if self.writer is not None and not self._closed:
            try:
                ray.get(self.writer.abort.remote(), timeout=30)  # deletes the writer's temporary CXI file
            except RayError:
                self.log("[stream] the CXI writer could not remove its temporary file (it had died)")
        for h in [s.handle for s in self.slots] + self.peak_actors + ([self.writer] if self.writer else []):
            try:
                ray.kill(h, no_restart=True)
            except RayError:  # already gone
                continue
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
