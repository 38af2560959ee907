"""A ZeroMQ producer of detector events for ``vitkit stream`` (``vitkit stream-producer``): events from files or the
lattice simulator, in the wire formats :class:`~vitkit.apps.peaks.stream.zmq.ZmqStream` reads (:func:`encode_event`),
with backpressure (PUSH) or without (PUB)."""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from vitkit.apps.peaks.stream.zmq import attach_socket, parse_endpoints, print_to_stderr
from vitkit.errors import ConfigError, InputError, VitkitError

__all__ = ["ProducerTimeoutError", "encode_event", "file_events", "produce", "producer_main", "simulated_events"]


class ProducerTimeoutError(VitkitError, TimeoutError):
    """No consumer took a message within ``send_timeout_s``."""


def encode_event(data: np.ndarray, event_id: Any = None, timestamp: float | None = None, fmt: str = "npz",
                 data_key: str = "data", id_key: str = "event_id", timestamp_key: str = "timestamp",
                 compress: bool = False) -> list[bytes]:
    """The message parts of one event (see the module docstring for the formats).

    Args:
        data: the event; sent as it is (any dtype, so tests can also send what a consumer must reject).
        event_id: str or int, omitted when None.
        timestamp: seconds, omitted when None.
        fmt: ``npz`` (one part) or ``raw`` (JSON header + C-order bytes).
        compress: ``npz`` only: ``np.savez_compressed`` (LCLStreamer's ``use_compression``).
    """
    data = np.asarray(data)
    if isinstance(event_id, np.generic):
        event_id = event_id.item()
    if fmt == "npz":
        arrays = {data_key: data}
        if event_id is not None:
            arrays[id_key] = np.asarray(event_id if isinstance(event_id, int) else str(event_id))
        if timestamp is not None:
            arrays[timestamp_key] = np.float64(timestamp)
        buf = io.BytesIO()
        (np.savez_compressed if compress else np.savez)(buf, **arrays)
        return [buf.getvalue()]
    if fmt == "raw":
        header: dict[str, Any] = {"shape": list(data.shape), "dtype": data.dtype.str}
        if event_id is not None:
            header["event_id"] = event_id if isinstance(event_id, int) else str(event_id)
        if timestamp is not None:
            header["timestamp"] = float(timestamp)
        return [json.dumps(header).encode(), np.ascontiguousarray(data).tobytes()]
    raise ConfigError(f"encode_event: unknown format {fmt!r}; expected 'npz' or 'raw'.")


def _as_event(item: Any) -> tuple[Any, np.ndarray, float | None]:
    if isinstance(item, tuple) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None
    return None, item, None


def produce(endpoint: str | list[str], events: Iterable, *, socket: str = "push", bind: bool = True,
            rate_hz: float | None = None, fmt: str = "npz", end_markers: int = 1, hwm: int = 4,
            send_timeout_s: float | None = None,
            data_key: str = "data", id_key: str = "event_id", timestamp_key: str = "timestamp", topic: str = "",
            compress: bool = False, settle_s: float | None = None, linger_s: float = 5.0,
            on_sent: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Send ``events`` to ``endpoint``, then ``end_markers`` empty messages.

    Args:
        endpoint: address to bind (default) or connect (``bind=False``); several, comma-separated or a list,
            are all bound / connected (PUSH round-robins over its peers).
        events: arrays, ``(event_id, array)`` or ``(event_id, array, timestamp)``; without a timestamp the send
            time (``time.time()``) is sent.
        socket: ``push`` (blocks when the consumer is full: backpressure) or ``pub`` (drops at the HWM).
        rate_hz: at most this many events per second on average (a deadline schedule: late sends do not push
            later ones back); None: as fast as the socket takes them.
        fmt: ``npz`` or ``raw`` (:func:`encode_event`).
        end_markers: empty messages sent at the end (one per consumer of a PUSH socket, which round-robins).
        hwm: send high-water mark (messages queued here before ``send`` blocks).
        send_timeout_s: raise :class:`ProducerTimeoutError` when one send waits longer; None: wait forever.
        topic: PUB: sent as the first part of every message (subscribers strip it).
        compress: npz messages with ``np.savez_compressed``.
        settle_s: PUB: pause before the first send and before the end markers (default 0.3 s; PUSH: 0).
            Subscriptions take a moment to reach the publisher, which drops what it sends before then ("slow
            joiner"); and a PUB never blocks: beyond its ``hwm`` it drops messages, so the markers wait for the
            queue to drain. A PUB loses events whenever a subscriber is slower than ``rate_hz``.
        linger_s: how long closing the socket waits for queued messages (the end markers) to leave.
        on_sent: called with the number of events sent after each one (progress, tests).

    Returns:
        ``{"sent": events sent, "seconds": wall time, "blocked_s": time send waited for the consumer
        (backpressure), "end_markers": markers sent, "bytes": bytes sent, "interrupted": Ctrl-C stopped it}``.
        Ctrl-C stops sending events; the end markers still go out.
    """
    kinds = {"push": zmq.PUSH, "pub": zmq.PUB}
    if socket not in kinds:
        raise ConfigError(f"produce: unknown socket kind {socket!r}; expected 'push' (backpressure) or 'pub'.")
    if fmt not in ("npz", "raw"):
        raise ConfigError(f"produce: unknown format {fmt!r}; expected 'npz' or 'raw'.")
    if rate_hz is not None and not rate_hz > 0:
        raise ConfigError(f"produce: rate_hz must be > 0 or None, found {rate_hz}.")
    addresses = parse_endpoints(endpoint)
    where = ", ".join(addresses)
    ctx = zmq.Context()
    sock = ctx.socket(kinds[socket])
    prefix = [topic.encode()] if topic else []
    n = nbytes = markers = 0
    blocked = 0.0
    interrupted = finished = False

    def send(parts: list[bytes], what: str) -> None:
        nonlocal blocked
        if sock.poll(0, zmq.POLLOUT):  # room at once: no backpressure on this one
            sock.send_multipart(parts)
            return
        t0 = time.perf_counter()
        try:
            sock.send_multipart(parts)
        except zmq.Again:
            raise ProducerTimeoutError(
                f"produce: {what} waited more than {send_timeout_s} s at {where} after {n} event(s); is a consumer "
                "running, connected and reading?") from None
        finally:
            blocked += time.perf_counter() - t0

    try:
        sock.setsockopt(zmq.SNDHWM, int(hwm))
        if send_timeout_s is not None:
            sock.setsockopt(zmq.SNDTIMEO, max(0, int(send_timeout_s * 1000)))
        for a in addresses:
            attach_socket(sock, a, bind)
        settle = (0.3 if socket == "pub" else 0.0) if settle_s is None else settle_s
        if settle > 0:
            time.sleep(settle)
        t_start = time.perf_counter()
        try:
            for item in events:
                event_id, data, ts = _as_event(item)
                if rate_hz is not None:
                    delay = t_start + n / rate_hz - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                parts = encode_event(data, event_id, time.time() if ts is None else ts, fmt, data_key, id_key,
                                     timestamp_key, compress)
                send(prefix + parts, f"event {n}")
                n += 1
                nbytes += sum(len(p) for p in parts)
                if on_sent is not None:
                    on_sent(n)
        except KeyboardInterrupt:
            interrupted = True
        if socket == "pub" and settle > 0:
            time.sleep(settle)  # a PUB drops at its HWM instead of blocking: let the queue drain before the markers
        for _ in range(int(end_markers)):
            send(prefix + [b""], "the end marker")
            markers += 1
        seconds = time.perf_counter() - t_start
        finished = True
    finally:
        # after a clean finish, wait up to linger_s for the queued messages (the end markers) to leave
        sock.close(linger=int(linger_s * 1000) if finished else 0)
        ctx.term()
    return {"sent": n, "seconds": seconds, "blocked_s": blocked, "end_markers": markers, "bytes": nbytes,
            "interrupted": interrupted}


def file_events(path: str, key: str | None = None, count: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(event_id, frame)`` of the frames of ``path`` (:func:`~vitkit.apps.peaks.io.open_frames`) in order,
    replayed cyclically until ``count`` events (None: once; 0: forever). Ids are ``<file stem>:<frame>``, with
    ``.rK`` appended on the K-th repeat so that they stay unique. The files are opened before this returns."""
    from vitkit.apps.peaks.io import open_frames

    src = open_frames(path, key=key, label_key=False)
    if len(src) == 0:
        raise InputError(f"stream-producer: {path} holds no frames; expected at least one.")
    total = len(src) if count is None else int(count)

    def gen():
        i = 0
        while total <= 0 or i < total:
            j = i % len(src)
            part, k = src.locate(j) if hasattr(src, "locate") else (src, j)
            rep = i // len(src)
            yield f"{Path(part.path).stem}:{k}" + (f".r{rep}" if rep else ""), src[j]
            i += 1

    return gen()


def simulated_events(detector: str = "epix10k2m", pool: int = 8, seed: int = 0, count: int | None = None,
                     log: Callable[[str], None] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(event_id, float32 [P, H, W])`` cycling over ``pool`` lattice-simulated shots simulated before this
    returns (0.1-1 s per 16-panel shot), until ``count`` events (None: the pool once; 0: forever). Ids are
    ``sim:<seed>:<i>`` with ``i`` the event number."""
    from vitkit.apps.peaks.detector import load_detector
    from vitkit.apps.peaks.lattice import LatticeConfig, simulate_shot  # imports torch: only here

    det = load_detector(detector)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    shots = [simulate_shot(rng, det, LatticeConfig()).images for _ in range(max(1, int(pool)))]
    if log is not None:
        log(f"[stream-producer] simulated {len(shots)} shot(s) {list(shots[0].shape)} on {det.name or detector} in "
            f"{time.perf_counter() - t0:.1f} s")
    total = len(shots) if count is None else int(count)

    def gen():
        i = 0
        while total <= 0 or i < total:
            yield f"sim:{seed}:{i}", shots[i % len(shots)]
            i += 1

    return gen()


def producer_main(argv: list[str] | None = None) -> int:
    """``vitkit stream-producer``: send detector events over ZeroMQ (files replayed, or simulated shots)."""
    p = argparse.ArgumentParser(
        prog="vitkit stream-producer",
        description="Send detector events to a ZeroMQ consumer (vitkit stream with source.kind=zmq): frames of a "
                    "file replayed in a loop, or lattice-simulated shots. Ends with empty end-of-stream messages.")
    p.add_argument("endpoint", metavar="ENDPOINT", help="e.g. tcp://127.0.0.1:5555 (bound unless --connect)")
    p.add_argument("--socket", choices=("push", "pub"), default="push",
                   help="push: blocks when the consumer is full (default); pub: drops at the high-water mark")
    p.add_argument("--connect", action="store_true", help="connect to ENDPOINT instead of binding it")
    p.add_argument("--rate", type=float, default=None, metavar="HZ", help="events per second at most (default: "
                   "as fast as the consumer takes them)")
    p.add_argument("--count", type=int, default=None, metavar="N",
                   help="events to send (default: the file's frames once, or the pool once; 0: until Ctrl-C)")
    p.add_argument("--format", choices=("npz", "raw"), default="npz", dest="fmt")
    p.add_argument("--compress", action="store_true", help="npz: np.savez_compressed")
    p.add_argument("--end-markers", type=int, default=1, metavar="K",
                   help="empty end messages (one per consumer, or per stream with num_producers; default 1)")
    p.add_argument("--hwm", type=int, default=4, help="send high-water mark (default 4)")
    p.add_argument("--send-timeout", type=float, default=None, metavar="S",
                   help="fail when one send waits longer than S seconds (default: wait)")
    p.add_argument("--topic", default="", help="pub: topic part sent before every message")
    p.add_argument("--data-key", default="data")
    p.add_argument("--id-key", default="event_id")
    p.add_argument("--timestamp-key", default="timestamp")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--files", metavar="PATH", help="frames to replay (zarr, HDF5/CXI, .npy, ...; glob or CSV)")
    src.add_argument("--detector", metavar="NAME_OR_GEOM", default="epix10k2m",
                     help="simulate shots on this detector (built-in name, single:HxW or .geom; default epix10k2m)")
    p.add_argument("--key", default=None, help="--files: dataset / array key")
    p.add_argument("--pool", type=int, default=8, help="simulator: distinct shots, sent in a loop (default 8)")
    p.add_argument("--seed", type=int, default=0, help="simulator seed (default 0)")
    args = p.parse_args(argv)

    try:
        if args.files:
            events = file_events(args.files, args.key, args.count)
            what = args.files
        else:
            events = simulated_events(args.detector, args.pool, args.seed, args.count, print_to_stderr)
            what = f"simulated {args.detector}"
        shape: list[int] = []

        def remember(it):
            for ev in it:
                if not shape:
                    shape.extend(np.shape(ev[1]))
                yield ev

        r = produce(args.endpoint, remember(events), socket=args.socket, bind=not args.connect, rate_hz=args.rate,
                    fmt=args.fmt, end_markers=args.end_markers, hwm=args.hwm, send_timeout_s=args.send_timeout,
                    data_key=args.data_key, id_key=args.id_key, timestamp_key=args.timestamp_key, topic=args.topic,
                    compress=args.compress)
    except (VitkitError, OSError) as e:
        print(f"vitkit stream-producer: error: {e}", file=sys.stderr)
        return 2
    rate = r["sent"] / r["seconds"] if r["seconds"] > 0 else math.inf
    print(f"[stream-producer] sent {r['sent']} event(s) {shape} ({what}) as {args.fmt} "
          f"{'to' if args.connect else 'on'} {args.endpoint} in {r['seconds']:.2f} s ({rate:.1f} Hz, "
          f"{r['bytes'] / 1e6:.1f} MB), blocked {r['blocked_s']:.2f} s, {r['end_markers']} end marker(s)"
          + (" (interrupted)" if r["interrupted"] else ""), flush=True)
    return 130 if r["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(producer_main())
