"""ZeroMQ event source for ``vitkit stream`` (LCLStreamer-style messages) and a test producer.

:class:`ZmqStream` is a source the pipeline's driver polls for events (:class:`~.stages.StreamItem`);
the producer that sends events from files or the lattice simulator (``vitkit stream-producer``) is
:mod:`vitkit.apps.peaks.stream.producer`. Nothing here imports Ray.

Wire formats (detected per message; a SUB socket with a non-empty ``topic`` strips a leading topic part first)
    ================================== ============================================================================
    parts                              meaning
    ================================== ============================================================================
    ``[npz]``                          ``np.savez`` / ``np.savez_compressed`` bytes: the event under ``data_key``,
                                       optional 0-d ``id_key`` (str or int) and ``timestamp_key`` (float). This is
                                       what LCLStreamer's ``NumpyBinarySerializer`` sends; there the keys are the
                                       data-source names (e.g. ``data_key="detector_data"``).
    ``[npy]``                          a single ``np.save`` array (no id, no timestamp).
    ``[header, payload]``              ``header``: UTF-8 JSON ``{"shape": [...], "dtype": "<u2", "event_id": ...,
                                       "timestamp": ...}`` (id and timestamp optional); ``payload``: the raw
                                       C-order bytes (read with ``np.frombuffer``, no copy).
    ``[b""]``                          end of stream from one producer.
    ================================== ============================================================================

    The array must be numeric (integer or float) and becomes float32; ``check(array, where)`` then turns it
    into ``[P, H, W]`` (without a check ``[H, W]`` becomes ``[1, H, W]`` and ``[P, H, W]`` is kept).
    Anything else is *malformed*: counted, logged (at most ``max_logged`` lines) and skipped.

Backpressure
    With PUSH/PULL and ``overflow="block"``, the source reads nothing while the driver has no room. The
    socket's receive high-water mark (``RCVHWM = hwm``, set before connecting) then fills, ZeroMQ stops
    reading the TCP connection, the kernel buffers fill and the sender's ``send`` blocks at its own
    ``SNDHWM``. What is held between the two programs is bounded: ``hwm`` + the sender's ``SNDHWM`` messages
    plus the kernel's TCP buffers (a few MB on Linux, where the *sender's* autotuned send buffer dominates:
    setting a small ``RCVBUF`` here changed nothing measurable -- 50 vs 49 messages of 64 KiB with hwm 2 -- so
    it is left at the system default; a 16-panel epix10k2M event of 8.6 MB exceeds those buffers anyway).
    PUB/SUB cannot hold back a publisher: ZeroMQ drops messages at the high-water mark by design, so use
    PUSH/PULL when no event may be lost. ``overflow="drop_oldest"`` (live monitoring) keeps reading into a
    ring of ``buffer_events`` decoded events and drops the oldest when the driver falls behind.
"""

from __future__ import annotations

import collections
import io
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zmq

from vitkit.apps.peaks.stream.stages import StreamItem
from vitkit.errors import ConfigError, VitkitError

__all__ = ["ZmqStream", "attach_socket", "parse_endpoints", "print_to_stderr"]

_ENDPOINT = re.compile(r"^(tcp|ipc|inproc|pgm|epgm|ws|wss|vmci)://\S+$")
_SOCKETS = {"pull": zmq.PULL, "sub": zmq.SUB}
_OVERFLOW = ("block", "drop_oldest")
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_KEEP_IDS = 100  # malformed / dropped event ids kept for counters()
_DROP_WARN_EVERY_S = 10.0


def print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Malformed(Exception):
    """One message cannot be used; ``event_id`` is set when it could be read."""

    def __init__(self, reason: str, event_id: str | None = None):
        super().__init__(reason)
        self.event_id = event_id


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """A list of checked addresses; a string may hold several separated by commas."""
    if isinstance(endpoints, str):
        items = [e.strip() for e in endpoints.split(",")]
    elif isinstance(endpoints, Sequence) and all(isinstance(e, str) for e in endpoints):
        items = [e.strip() for e in endpoints]
    else:
        raise ConfigError(f"zmq: endpoints must be a string or a list of strings, found {endpoints!r}; expected "
                          "e.g. 'tcp://127.0.0.1:5555'.")
    if not items or not all(items):
        raise ConfigError(f"zmq: no endpoint in {endpoints!r}; expected e.g. 'tcp://127.0.0.1:5555'.")
    for e in items:
        if not _ENDPOINT.match(e):
            raise ConfigError(f"zmq: bad endpoint {e!r}; expected TRANSPORT://ADDRESS, e.g. 'tcp://127.0.0.1:5555' "
                              "(connect), 'tcp://*:5555' (bind) or 'ipc:///tmp/events'.")
    return items


def attach_socket(sock: zmq.Socket, endpoint: str, bind: bool) -> str:
    """Bind or connect ``sock``; returns the address actually used (``tcp://host:*`` binds a free port)."""
    try:
        if bind:
            sock.bind(endpoint)
            return sock.getsockopt_string(zmq.LAST_ENDPOINT)
        sock.connect(endpoint)
        return endpoint
    except zmq.ZMQError as e:
        what = "bind to" if bind else "connect to"
        hint = (" Another process may be bound to it: pick another port, or connect instead of binding."
                if bind and e.errno == zmq.EADDRINUSE else
                " Check the address: tcp needs HOST:PORT (a numeric port; '*' as host only when binding).")
        raise ConfigError(f"zmq: cannot {what} {endpoint!r}: {e.strerror}.{hint}") from e


def _is_scalar(value: Any) -> bool:
    """A 0-d or one-element array (or JSON value) of a number or a string."""
    a = np.asarray(value)
    return a.size == 1 and a.dtype.kind in "iufUS"


def _scalar(value: Any, what: str) -> Any:
    """A Python scalar from a 0-d (or one-element) array or a JSON value."""
    a = np.asarray(value)
    if not _is_scalar(a):
        raise _Malformed(f"{what} must be a scalar (str or number), found {a.dtype} shape {a.shape}")
    v = a.reshape(()).item()
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


# ------------------------------------------------------------------------------------------------ source
class ZmqStream:
    """Events from ZeroMQ sockets (PULL or SUB), decoded to float32 ``[P, H, W]`` and polled by the driver.

    Args:
        endpoints: one address, a comma-separated string or a list (``tcp://host:port``); each is connected to,
            or bound with ``bind=True`` (``tcp://127.0.0.1:*`` binds a free port; see :attr:`endpoints`).
        socket: ``pull`` (PUSH/PULL: backpressure holds) or ``sub`` (PUB/SUB: the publisher drops messages at its
            high-water mark by ZeroMQ's design, so nothing holds it back; events may be lost).
        bind: bind instead of connect (LCLStreamer's ``role: client`` connects to us).
        topic: SUB subscription prefix (``""``: everything). With a topic, the first part of each message is the
            topic and is stripped.
        data_key, id_key, timestamp_key: npz keys of the event array, its id and its timestamp.
        hwm: receive high-water mark (messages queued on this side while the driver reads nothing).
        num_producers: the stream ends after this many end-of-stream messages (``b""``).
        idle_timeout_s: end the stream when no message came for this long, counted from the first :meth:`poll`
            (so a wrong endpoint ends too, but the driver's start-up does not count) and checked only when no
            message is waiting (a driver that stopped reading is not an idle producer); None: wait for the end
            markers forever.
        overflow: ``block`` (read nothing while the driver has no room: the sender blocks) or ``drop_oldest``
            (:meth:`idle` keeps reading into a ring of ``buffer_events`` events and drops the oldest).
        buffer_events: ring size for ``drop_oldest``.
        check: ``check(array, where) -> float32 [P, H, W]`` raising ``VitkitError`` / ``ValueError`` for an event
            the run cannot take (``where`` names the event for the message).
        log: where the source's warnings go (one line each).
        max_logged: malformed messages logged one by one at most; later ones are only counted.
        batched: each message holds a batch along axis 0 (data ``[B, ...]``, ids and timestamps ``[B]`` or
            scalars), as LCLStreamer's ``BatchProcessingPipeline`` sends; every element is one event.

    The driver's contract: :meth:`poll` returns accepted events with consecutive ``index`` from 0 in arrival
    order; :attr:`exhausted` turns True after the end markers (or the idle timeout) once every received event
    was served; :meth:`idle` is called while the driver has no room. Raw float32 payloads are returned without
    a copy when ``check`` does not copy them (views of the received ZeroMQ frame, which they keep alive).
    Decoding (npz parsing, the float32 conversion, ``check``) runs in the caller's thread: about 2 ms for an
    epix10k2M ``uint16`` event, more for compressed npz.
    """

    def __init__(self, endpoints: str | list[str], socket: str = "pull", bind: bool = False, topic: str = "",
                 data_key: str = "data", id_key: str = "event_id", timestamp_key: str = "timestamp",
                 hwm: int = 4, num_producers: int = 1, idle_timeout_s: float | None = None,
                 overflow: str = "block", buffer_events: int = 16,
                 check: Callable[[np.ndarray, str], np.ndarray] | None = None,
                 log: Callable[[str], None] | None = print_to_stderr, max_logged: int = 20, *, batched: bool = False):
        kind = str(socket).lower()
        if kind not in _SOCKETS:
            raise ConfigError(f"zmq: unknown socket kind {socket!r}; expected 'pull' (PUSH/PULL, backpressure) or "
                              "'sub' (PUB/SUB, the publisher drops at its high-water mark).")
        if overflow not in _OVERFLOW:
            raise ConfigError(f"zmq: unknown overflow policy {overflow!r}; expected 'block' (the sender waits) or "
                              "'drop_oldest' (keep reading, drop the oldest waiting events).")
        for name, v in (("hwm", hwm), ("num_producers", num_producers), ("buffer_events", buffer_events)):
            if int(v) < 1:
                raise ConfigError(f"zmq: {name} must be >= 1, found {v}.")
        if idle_timeout_s is not None and not idle_timeout_s > 0:
            raise ConfigError(f"zmq: idle_timeout_s must be > 0 or None (wait forever), found {idle_timeout_s}.")
        addresses = parse_endpoints(endpoints)
        self.socket_kind, self.bind, self.topic = kind, bool(bind), str(topic)
        self.data_key, self.id_key, self.timestamp_key = data_key, id_key, timestamp_key
        self.hwm, self.num_producers = int(hwm), int(num_producers)
        self.idle_timeout_s = None if idle_timeout_s is None else float(idle_timeout_s)
        self.overflow, self.buffer_events, self.batched = overflow, int(buffer_events), bool(batched)
        self.check, self.max_logged = check, int(max_logged)
        self.log = log if log is not None else (lambda line: None)

        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(_SOCKETS[kind])
        self._closed = False
        try:
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.RCVHWM, self.hwm)  # before connecting: it applies to pipes made later
            if kind == "sub":
                self._sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
            self.endpoints = [attach_socket(self._sock, e, self.bind) for e in addresses]
        except BaseException:
            self.close()
            raise

        # decoded events waiting to be served: (data, event_id or None, timestamp); the drop ring in drop_oldest
        self._ready: collections.deque[tuple[np.ndarray, str | None, float]] = collections.deque()
        self._next_index = 0
        self._ended = False
        self._last_msg: float | None = None  # the idle clock starts at the first poll / idle call
        self._last_drop_warn = -math.inf
        self._n = dict(received=0, accepted=0, malformed=0, dropped=0, end_markers=0, after_end=0, bytes=0)
        self._t = dict(receive_s=0.0, wait_s=0.0, decode_s=0.0)
        self._malformed_ids: list[str | None] = []
        self._dropped_ids: list[str | None] = []

    # ------------------------------------------------------------------------------------------ contract
    @property
    def exhausted(self) -> bool:
        """True once the stream ended (end markers or idle timeout) and every received event was served."""
        return self._ended and not self._ready

    def depth(self) -> int | None:
        """Events decoded and held here (the drop ring), for progress lines."""
        return len(self._ready)

    def poll(self, n: int, timeout: float = 0.0) -> list[StreamItem]:
        """Up to ``n`` accepted events, oldest first; waits at most ``timeout`` s for the first when none is ready.

        After the end, a poll still reads the messages already waiting (counted as ``after_end``, not returned).
        """
        out: list[StreamItem] = []
        if self._closed:
            return out
        if self._last_msg is None:
            self._last_msg = time.perf_counter()
        deadline = time.perf_counter() + max(0.0, float(timeout))
        while len(out) < n:
            while self._ready and len(out) < n:
                out.append(self._serve(*self._ready.popleft()))
            if len(out) >= n:
                break
            if self._ended:
                self._drain(self.hwm + self.buffer_events)
                break
            parts = self._recv()
            if parts is not None:
                self._handle(parts)
                continue
            if out or self._idle_expired():
                break
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            if self.idle_timeout_s is not None:
                remaining = min(remaining, self._last_msg + self.idle_timeout_s - time.perf_counter())
            self._wait(remaining)
        if self.overflow == "drop_oldest" and not self._ended:
            self._drain(self.hwm + self.buffer_events)
        return out

    def idle(self) -> None:
        """Called while the driver has no room: ``drop_oldest`` reads on into the ring; ``block`` reads nothing."""
        if self.overflow == "drop_oldest" and not self._closed:
            if self._last_msg is None:
                self._last_msg = time.perf_counter()
            self._drain(self.hwm + self.buffer_events)

    def counters(self) -> dict[str, Any]:
        """Message and event counts, the first malformed / dropped event ids (None: no id) and time spent."""
        return {**self._n, "malformed_ids": list(self._malformed_ids), "dropped_ids": list(self._dropped_ids),
                **self._t}

    def close(self) -> None:
        """Close the socket (linger 0) and its context; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> ZmqStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- receive
    def _recv(self) -> list[zmq.Frame] | None:
        if not self._sock.poll(0, zmq.POLLIN):  # nothing waiting
            return None
        t0 = time.perf_counter()
        parts = self._sock.recv_multipart(copy=False)
        self._t["receive_s"] += time.perf_counter() - t0
        self._last_msg = time.perf_counter()
        self._n["received"] += 1
        self._n["bytes"] += sum(len(p) for p in parts)
        return parts

    def _wait(self, seconds: float) -> None:
        t0 = time.perf_counter()
        self._sock.poll(max(1, math.ceil(seconds * 1000)), zmq.POLLIN)
        self._t["wait_s"] += time.perf_counter() - t0

    def _drain(self, limit: int) -> None:
        """Read up to ``limit`` waiting messages without blocking (drop_oldest, or to count late messages)."""
        for _ in range(limit):
            parts = self._recv()
            if parts is None:
                self._idle_expired()
                return
            self._handle(parts)

    def _idle_expired(self) -> bool:
        """End the stream when nothing came for ``idle_timeout_s`` (called only when the socket is empty)."""
        if self._ended or self.idle_timeout_s is None or self._last_msg is None:
            return self._ended
        quiet = time.perf_counter() - self._last_msg
        if quiet < self.idle_timeout_s:
            return False
        self._ended = True
        got = self._n["end_markers"]
        self.log(f"[stream] zmq: no message for {quiet:.1f} s (idle_timeout_s={self.idle_timeout_s:g}) after "
                 f"{self._n['received']} message(s) and {got}/{self.num_producers} end marker(s); ending the "
                 "stream (a producer may have stopped without its end marker, or the endpoint is wrong).")
        return True

    # -------------------------------------------------------------------------------------------- decode
    def _handle(self, parts: list[zmq.Frame]) -> None:
        if self._ended:
            self._n["after_end"] += 1
            return
        if self.socket_kind == "sub" and self.topic:
            parts = parts[1:]
        if len(parts) == 1 and len(parts[0]) == 0:
            self._n["end_markers"] += 1
            if self._n["end_markers"] >= self.num_producers:
                self._ended = True
            return
        t0 = time.perf_counter()
        try:
            events = self._decode(parts)
        except _Malformed as e:
            self._malformed(str(e), e.event_id)
            return
        finally:
            self._t["decode_s"] += time.perf_counter() - t0
        for ev in events:
            self._push(ev)

    def _push(self, ev: tuple[np.ndarray, str | None, float]) -> None:
        if self.overflow == "drop_oldest" and len(self._ready) >= self.buffer_events:
            _, eid, _ = self._ready.popleft()
            self._n["dropped"] += 1
            if len(self._dropped_ids) < _KEEP_IDS:
                self._dropped_ids.append(eid)
            now = time.perf_counter()
            if now - self._last_drop_warn >= _DROP_WARN_EVERY_S:
                self._last_drop_warn = now
                self.log(f"[stream] zmq: the pipeline is behind the stream; dropping the oldest waiting events "
                         f"(overflow=drop_oldest, ring of {self.buffer_events}): {self._n['dropped']} dropped so far "
                         f"(next report in >= {_DROP_WARN_EVERY_S:g} s).")
        self._ready.append(ev)

    def _serve(self, data: np.ndarray, event_id: str | None, timestamp: float) -> StreamItem:
        i = self._next_index
        self._next_index += 1
        self._n["accepted"] += 1
        return StreamItem(i, data, str(i) if event_id is None else event_id, timestamp)

    def _malformed(self, reason: str, event_id: str | None) -> None:
        k = self._n["malformed"]
        self._n["malformed"] += 1
        if len(self._malformed_ids) < _KEEP_IDS:
            self._malformed_ids.append(event_id)
        if k < self.max_logged:
            who = f"event id {event_id!r}" if event_id is not None else "no event id"
            self.log(f"[stream] zmq: malformed message #{self._n['received'] - 1} ({who}): {reason}; skipped")
        elif k == self.max_logged:
            self.log(f"[stream] zmq: more than {self.max_logged} malformed messages; further ones are only counted "
                     "(counters()['malformed']).")

    def _decode(self, parts: list[zmq.Frame]) -> list[tuple[np.ndarray, str | None, float]]:
        if len(parts) == 1:
            data, eid, ts = self._decode_npz(parts[0].buffer)
        elif len(parts) == 2:
            data, eid, ts = self._decode_raw(parts[0].bytes, parts[1].buffer)
        else:
            raise _Malformed(f"{len(parts)} message parts; expected 1 (npz) or 2 (JSON header, raw payload)"
                             + (" after the topic" if self.socket_kind == "sub" and self.topic else ""))
        if not self.batched:
            eid = self._id(eid)
            return [self._event(data, eid, self._timestamp(ts, eid))]
        return self._split(data, eid, ts)

    def _decode_npz(self, buf: memoryview) -> tuple[np.ndarray, Any, Any]:
        head = bytes(buf[:6])
        if head.startswith(_NPY_MAGIC):
            try:
                return np.load(io.BytesIO(buf), allow_pickle=False), None, None
            except Exception as e:  # noqa: BLE001 - network input: any parse failure is a malformed message
                raise _Malformed(f"unreadable .npy ({type(e).__name__}: {e})") from None
        if not head.startswith(_ZIP_MAGIC):
            raise _Malformed(f"not an .npz ({len(buf)} bytes starting {head!r}); expected np.savez bytes, a "
                             "[JSON header, raw payload] pair or an empty end marker")
        try:
            with np.load(io.BytesIO(buf), allow_pickle=False) as z:
                keys = list(z.files)
                eid = z[self.id_key] if self.id_key in keys else None
                ts = z[self.timestamp_key] if self.timestamp_key in keys else None
                if self.data_key not in keys:
                    raise _Malformed(f"no {self.data_key!r} array in the npz (it holds {keys}); set data_key",
                                     self._id_or_none(eid))
                data = z[self.data_key]
        except _Malformed:
            raise
        except Exception as e:  # noqa: BLE001 - network input: any parse failure is a malformed message
            raise _Malformed(f"unreadable .npz ({type(e).__name__}: {e})") from None
        return data, eid, ts

    def _decode_raw(self, header: bytes, payload: memoryview) -> tuple[np.ndarray, Any, Any]:
        try:
            h = json.loads(header.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise _Malformed(f"two parts but the first is not a JSON header ({e}; starts {header[:40]!r})") from None
        if not isinstance(h, dict):
            raise _Malformed(f"the JSON header is a {type(h).__name__}; expected an object with 'shape' and 'dtype'")
        eid = h.get("event_id")
        where_id = self._id_or_none(eid)
        try:
            shape = tuple(int(s) for s in h["shape"])
            dtype = np.dtype(h["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise _Malformed(f"bad JSON header {h!r} ({type(e).__name__}: {e}); expected 'shape' (list of ints) and "
                             "'dtype' (e.g. '<u2')", where_id) from None
        if any(s < 0 for s in shape) or dtype.itemsize == 0 or dtype.hasobject:
            raise _Malformed(f"bad JSON header: shape {list(shape)}, dtype {dtype}", where_id)
        expected = math.prod(shape) * dtype.itemsize
        if expected != len(payload):
            raise _Malformed(f"header says shape {list(shape)} {dtype} = {expected} bytes, the payload has "
                             f"{len(payload)}", where_id)
        return np.frombuffer(payload, dtype=dtype).reshape(shape), eid, h.get("timestamp")

    def _split(self, data: np.ndarray, eid: Any, ts: Any) -> list[tuple[np.ndarray, str | None, float]]:
        """Events of a batched message; ids / timestamps are per element ``[B]`` or one for all."""
        if data.ndim < 1 or len(data) == 0:
            raise _Malformed(f"batched message: data has shape {data.shape}; expected [B, ...] with B >= 1")
        b = len(data)
        ids = [None] * b if eid is None else list(np.asarray(eid).reshape(-1))
        tss = [None] * b if ts is None else list(np.asarray(ts).reshape(-1))
        if len(ids) == 1:
            ids = ids * b
        if len(tss) == 1:
            tss = tss * b
        if len(ids) != b or len(tss) != b:
            raise _Malformed(f"batched message: {b} events but {len(ids)} ids and {len(tss)} timestamps")
        out = []
        for k in range(b):
            try:
                eid_k = self._id(ids[k])
                out.append(self._event(data[k], eid_k, self._timestamp(tss[k], eid_k)))
            except _Malformed as e:  # one bad element does not spoil its batch
                self._malformed(f"batch element {k}: {e}", e.event_id)
        return out

    def _id(self, eid: Any) -> str | None:
        return None if eid is None else str(_scalar(eid, f"event id ({self.id_key!r})"))

    def _id_or_none(self, eid: Any) -> str | None:
        """The event id for naming a malformed message: None when there is none or it is not a scalar."""
        return self._id(eid) if eid is not None and _is_scalar(eid) else None

    def _timestamp(self, ts: Any, eid: str | None) -> float:
        if ts is None:
            return math.nan
        try:
            return float(_scalar(ts, f"timestamp ({self.timestamp_key!r})"))
        except _Malformed as e:
            raise _Malformed(str(e), eid) from None
        except (TypeError, ValueError):
            raise _Malformed(f"timestamp {ts!r} is not a number", eid) from None

    def _event(self, data: np.ndarray, eid: str | None, ts: float) -> tuple[np.ndarray, str | None, float]:
        if data.dtype.kind not in "iuf":
            raise _Malformed(f"data has dtype {data.dtype}; expected integer or float", eid)
        where = f"event {eid!r}" if eid is not None else f"message #{self._n['received'] - 1}"
        if self.check is not None:
            try:
                ev = self.check(data.astype(np.float32, copy=False), where)
            except (VitkitError, ValueError) as e:
                raise _Malformed(str(e), eid) from None
        elif data.ndim in (2, 3) and min(data.shape) > 0:
            ev = data.astype(np.float32, copy=False)
            ev = ev[None] if ev.ndim == 2 else ev
        else:
            raise _Malformed(f"data has shape {data.shape}; expected [H, W] or [P, H, W]", eid)
        return ev, eid, ts
