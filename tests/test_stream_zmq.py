"""ZeroMQ source and producer of ``vitkit stream`` (vitkit.apps.peaks.stream.zmq) over real loopback sockets, without
Ray.

Every wait has a deadline, sockets close with linger 0 and producer threads are joined with timeouts, so a
broken source fails the test instead of hanging it.
"""

from __future__ import annotations

import io
import json
import math
import socket as pysocket
import threading
import time

import numpy as np
import pytest
import zmq

from vitkit.apps.peaks.stream.producer import encode_event, produce, producer_main
from vitkit.apps.peaks.stream.zmq import ZmqStream
from vitkit.errors import ConfigError, InputError

DEADLINE_S = 10.0


# ------------------------------------------------------------------------------------------------ helpers
def free_endpoint() -> str:
    with pysocket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class Lines(list):
    """A ``log`` that keeps its lines."""

    def __call__(self, line: str) -> None:
        self.append(line)


@pytest.fixture
def streams():
    """Make ZmqStreams that are closed at teardown whatever happens."""
    made: list[ZmqStream] = []

    def make(*args, **kw) -> ZmqStream:
        kw.setdefault("log", Lines())
        s = ZmqStream(*args, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


class Producer(threading.Thread):
    """:func:`produce` in a thread; ``result`` / ``error`` after :meth:`finish`."""

    def __init__(self, endpoint, events, **kw):
        super().__init__(daemon=True)
        kw.setdefault("send_timeout_s", DEADLINE_S)
        self.args, self.kw = (endpoint, events), kw
        self.result, self.error = None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = produce(*self.args, **self.kw)
        except Exception as e:  # noqa: BLE001 - re-raised in the test thread by finish()
            self.error = e

    def finish(self, timeout: float = DEADLINE_S) -> dict:
        self.join(timeout)
        assert not self.is_alive(), f"producer still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result


def collect(stream: ZmqStream, limit: int = 10_000, deadline_s: float = DEADLINE_S) -> list:
    """Poll until the stream is exhausted (or ``limit`` events); fails at the deadline."""
    out: list = []
    t_end = time.monotonic() + deadline_s
    while not stream.exhausted and len(out) < limit:
        assert time.monotonic() < t_end, f"stream not exhausted after {deadline_s} s ({len(out)} events)"
        out += stream.poll(limit - len(out), timeout=0.1)
    return out


def raw_push(endpoint: str, messages: list[list[bytes]]) -> None:
    """Send hand-made messages from a PUSH socket that connects to ``endpoint`` (the consumer binds)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDTIMEO, int(DEADLINE_S * 1000))
    sock.connect(endpoint)
    try:
        for parts in messages:
            sock.send_multipart(parts)
    finally:
        sock.close(linger=int(DEADLINE_S * 1000))  # deliver what is queued
        ctx.term()


def make_events() -> list[tuple[str, np.ndarray, float]]:
    rng = np.random.default_rng(0)
    return [
        ("run7:0", rng.integers(-3000, 3000, (8, 12)).astype(np.int16), 1000.25),
        ("run7:1", rng.integers(0, 60000, (2, 8, 12)).astype(np.uint16), 1000.5),
        ("run7:2", rng.normal(size=(3, 5, 7)).astype(np.float32), 1000.75),
        ("run7:3", rng.normal(size=(6, 4)).astype(np.float64), 1001.0),
    ]


# ------------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("fmt, compress", [("npz", False), ("npz", True), ("raw", False)])
def test_round_trip(streams, fmt, compress):
    ep = free_endpoint()
    st = streams(ep)  # connects; the producer binds (the default)
    sent = make_events()
    prod = Producer(ep, sent + [np.arange(20, dtype=np.int16).reshape(4, 5)], fmt=fmt, compress=compress)
    got = collect(st)
    r = prod.finish()
    assert r["sent"] == 5 and r["end_markers"] == 1
    assert st.exhausted
    assert [g.index for g in got] == [0, 1, 2, 3, 4]
    for g, (eid, a, ts) in zip(got, sent):
        assert g.event_id == eid and g.timestamp == ts
        assert g.data.dtype == np.float32
        assert g.data.shape == (a.shape if a.ndim == 3 else (1, *a.shape))
        np.testing.assert_array_equal(g.data, a.astype(np.float32).reshape(g.data.shape))
    last = got[4]  # sent without an id: the id is the index; produce stamps the send time
    assert last.event_id == "4" and abs(last.timestamp - time.time()) < 60
    np.testing.assert_array_equal(last.data[0], np.arange(20).reshape(4, 5))
    c = st.counters()
    assert (c["received"], c["accepted"], c["malformed"], c["end_markers"]) == (6, 5, 0, 1)
    if not compress:
        assert c["bytes"] >= sum(a.nbytes for _, a, _ in sent)
    assert c["receive_s"] >= 0 and c["decode_s"] > 0 and st.depth() == 0
    assert st.poll(5) == [] and st.exhausted


def test_two_producers_need_two_end_markers(streams):
    st = streams("tcp://127.0.0.1:*", bind=True, num_producers=2)
    ep = st.endpoints[0]
    assert ep.startswith("tcp://127.0.0.1:") and not ep.endswith("*")
    a = np.ones((4, 4), np.float32)
    Producer(ep, [(f"A{i}", a * i) for i in range(3)], bind=False).finish()
    got = []
    t_end = time.monotonic() + DEADLINE_S
    while st.counters()["end_markers"] < 1:
        assert time.monotonic() < t_end
        got += st.poll(10, timeout=0.1)
    assert [g.event_id for g in got] == ["A0", "A1", "A2"]
    assert not st.exhausted  # one producer of two finished
    assert st.poll(10, timeout=0.2) == [] and not st.exhausted
    Producer(ep, [(f"B{i}", a * i) for i in range(3)], bind=False).finish()
    got += collect(st)
    assert [g.event_id for g in got] == ["A0", "A1", "A2", "B0", "B1", "B2"]
    assert [g.index for g in got] == list(range(6))
    assert st.exhausted and st.counters()["end_markers"] == 2


def test_sub_with_topic_strips_the_topic_part(streams):
    ep = free_endpoint()
    st = streams(ep, socket="sub", topic="epix")
    sent = make_events()
    # raw over PUB with a topic: three parts [topic, header, payload]; the end marker is [topic, b""]
    prod = Producer(ep, sent, socket="pub", fmt="raw", topic="epix", settle_s=0.5, hwm=100)
    got = collect(st)
    prod.finish()
    assert [g.event_id for g in got] == [e for e, _, _ in sent]
    for g, (_, a, ts) in zip(got, sent):
        np.testing.assert_array_equal(g.data.reshape(a.shape), a.astype(np.float32))
        assert g.timestamp == ts
    assert st.counters()["malformed"] == 0 and st.counters()["end_markers"] == 1


# ------------------------------------------------------------------------------------------------ malformed
def needs_2x8x8(a: np.ndarray, where: str) -> np.ndarray:
    if a.shape != (2, 8, 8):
        raise InputError(f"{where}: data has shape {a.shape}, expected [2, 8, 8]")
    return a.astype(np.float32)


def test_malformed_messages_are_counted_logged_and_skipped(streams):
    st = streams("tcp://127.0.0.1:*", bind=True, check=needs_2x8x8)
    good = [np.full((2, 8, 8), k, np.uint16) for k in range(3)]
    buf = io.BytesIO()
    np.savez(buf, image=good[0], event_id=np.array("bad-key"))
    header = json.dumps({"shape": [2, 8, 8], "dtype": "<u2", "event_id": "bad-size"}).encode()
    raw_push(st.endpoints[0], [
        encode_event(good[0], "g0"),
        [b"hello, not an npz"],  # garbage, no id
        [b"{not json", b"1234"],  # bad JSON header, no id
        [header, b"\0" * 10],  # header/payload size mismatch
        encode_event(np.ones((2, 8, 8), np.complex64), "bad-complex"),
        encode_event(good[1], "g1", fmt="raw"),
        [buf.getvalue()],  # no 'data' key
        encode_event(np.ones((3, 4), np.float32), "bad-shape"),  # rejected by the check
        [b"a", b"b", b"c"],  # three parts
        encode_event(np.ones((2, 8, 8), bool), "bad-bool"),
        encode_event(good[2], "g2"),
        [b""],  # end of stream
        encode_event(good[0], "late"),  # after the end: counted, ignored
    ])
    got = collect(st)
    assert [(g.index, g.event_id) for g in got] == [(0, "g0"), (1, "g1"), (2, "g2")]
    for g, a in zip(got, good):
        np.testing.assert_array_equal(g.data, a.astype(np.float32))
    t_end = time.monotonic() + DEADLINE_S
    while st.counters()["after_end"] < 1:  # a poll after the end still reads (and counts) late messages
        assert time.monotonic() < t_end
        assert st.poll(5) == []
        time.sleep(0.01)
    c = st.counters()
    ids = [None, None, "bad-size", "bad-complex", "bad-key", "bad-shape", None, "bad-bool"]
    assert c["malformed"] == 8 and c["malformed_ids"] == ids
    assert (c["received"], c["accepted"], c["end_markers"], c["after_end"]) == (13, 3, 1, 1)
    log = st.log
    assert len(log) == 8 and all(line.startswith("[stream] zmq: malformed message") for line in log)
    assert all(line.endswith("; skipped") for line in log)
    for eid in ids:
        if eid is not None:
            assert sum(f"(event id {eid!r})" in line for line in log) == 1, eid
    by_id = {eid: line for eid, line in zip(ids, log)}
    assert "not an .npz" in log[0] and "JSON header" in log[1]
    assert "256 bytes, the payload has 10" in by_id["bad-size"]  # [2, 8, 8] <u2
    assert "complex64" in by_id["bad-complex"] and "bool" in by_id["bad-bool"]
    assert "no 'data' array" in by_id["bad-key"] and "['image', 'event_id']" in by_id["bad-key"]
    assert "(3, 4)" in by_id["bad-shape"] and "[2, 8, 8]" in by_id["bad-shape"]
    assert "3 message parts" in log[6]


def test_malformed_logging_is_capped(streams):
    st = streams("tcp://127.0.0.1:*", bind=True, max_logged=2)
    raw_push(st.endpoints[0], [[b"junk%d" % i] for i in range(5)] + [[b""]])
    assert collect(st) == []
    assert st.counters()["malformed"] == 5 and st.counters()["malformed_ids"] == [None] * 5
    assert len(st.log) == 3 and "further ones are only counted" in st.log[2]


def test_batched_messages_lclstreamer_style(streams):
    """LCLStreamer's BatchProcessingPipeline + NumpyBinarySerializer: one npz per batch, keys = source names."""
    st = streams("tcp://127.0.0.1:*", bind=True, data_key="detector_data", batched=True)
    batch = np.arange(3 * 2 * 4 * 4, dtype=np.uint16).reshape(3, 2, 4, 4)
    buf = io.BytesIO()
    np.savez_compressed(buf, detector_data=batch, timestamp=np.array([1.0, 2.0, 3.0]))
    raw_push(st.endpoints[0], [[buf.getvalue()], [b""]])
    got = collect(st)
    assert [(g.index, g.event_id, g.timestamp) for g in got] == [(0, "0", 1.0), (1, "1", 2.0), (2, "2", 3.0)]
    for g, a in zip(got, batch):
        np.testing.assert_array_equal(g.data, a.astype(np.float32))
    assert st.counters()["received"] == 2 and st.counters()["accepted"] == 3


# ------------------------------------------------------------------------------------------------ flow control
def test_block_backpressure_holds_the_sender(streams):
    """hwm 2 both sides, 64 KiB events, a consumer that reads nothing for 1 s: the sender stalls after a few
    dozen sends (the HWMs plus the kernel's TCP buffers: 48-49 on the machine this was written on) and loses
    nothing. Each ``idle()`` call must not read in block mode."""
    st = streams("tcp://127.0.0.1:*", bind=True, hwm=2)
    n = 200
    events = ((f"e{i}", np.full((128, 256), i, np.int16)) for i in range(n))  # 64 KiB each
    progress: list[int] = [0]
    prod = Producer(st.endpoints[0], events, bind=False, hwm=2, fmt="raw", on_sent=lambda k: progress.append(k))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.5:
        st.idle()  # the driver has no room
        time.sleep(0.01)
    at_half = progress[-1]
    while time.monotonic() - t0 < 1.0:
        st.idle()
        time.sleep(0.01)
    stalled = progress[-1]
    print(f"backpressure: {stalled} of {n} 64 KiB sends went through before the sender blocked (hwm 2)")
    assert st.counters()["received"] == 0 and st.depth() == 0
    assert 4 <= stalled <= 120, stalled  # bounded well below n
    assert stalled == at_half  # stalled, not merely slow
    got = collect(st)
    r = prod.finish()
    assert r["sent"] == n and r["blocked_s"] > 0.4
    assert [g.event_id for g in got] == [f"e{i}" for i in range(n)]
    assert [g.index for g in got] == list(range(n))
    assert all(g.data[0, 0, 0] == i for i, g in enumerate(got))
    c = st.counters()
    assert (c["accepted"], c["dropped"], c["malformed"]) == (n, 0, 0)
    assert c["bytes"] >= n * 65536


def test_drop_oldest_keeps_the_newest(streams):
    st = streams("tcp://127.0.0.1:*", bind=True, overflow="drop_oldest", buffer_events=4, hwm=2)
    n = 50
    prod = Producer(st.endpoints[0], [(f"e{i}", np.full((8, 8), i, np.float32)) for i in range(n)], bind=False)
    t_end = time.monotonic() + DEADLINE_S
    while st.counters()["end_markers"] < 1:  # the driver has no room: it only calls idle()
        assert time.monotonic() < t_end
        st.idle()
        assert st.depth() <= 4
        time.sleep(0.001)
    prod.finish()
    assert not st.exhausted  # ended, but the ring still holds events
    got = collect(st)
    c = st.counters()
    assert c["dropped"] + len(got) == n
    assert [g.event_id for g in got] == [f"e{i}" for i in range(n - 4, n)]  # the newest
    assert [g.index for g in got] == [0, 1, 2, 3]  # dropped events take no index
    assert [g.data[0, 0, 0] for g in got] == [46, 47, 48, 49]
    assert c["dropped_ids"] == [f"e{i}" for i in range(n - 4)]
    assert (c["received"], c["accepted"], c["end_markers"]) == (n + 1, 4, 1)
    assert len(st.log) == 1  # first drop only (then at most every 10 s)
    assert "dropping the oldest" in st.log[0] and "1 dropped so far" in st.log[0]
    assert st.exhausted and st.depth() == 0


def test_idle_timeout_ends_a_stream_without_end_marker(streams):
    st = streams("tcp://127.0.0.1:*", bind=True, idle_timeout_s=0.5)
    Producer(st.endpoints[0], [("x", np.ones((4, 4)))] * 2, bind=False, end_markers=0).finish()
    t0 = time.monotonic()
    got = collect(st)
    assert [g.event_id for g in got] == ["x", "x"] and [g.index for g in got] == [0, 1]
    assert 0.3 <= time.monotonic() - t0 < 3.0
    assert st.exhausted and st.counters()["end_markers"] == 0
    assert len(st.log) == 1 and "idle_timeout_s=0.5" in st.log[0]
    # nobody ever sends (e.g. a wrong endpoint): the stream ends too
    lonely = streams(free_endpoint(), idle_timeout_s=0.3)
    assert collect(lonely, deadline_s=3.0) == [] and lonely.exhausted
    # the clock starts at the first poll: a slow driver start-up (model loading) does not end the stream
    late = streams("tcp://127.0.0.1:*", bind=True, idle_timeout_s=0.3)
    time.sleep(0.5)
    raw_push(late.endpoints[0], [encode_event(np.ones((2, 2)), "y")])
    assert [g.event_id for g in collect(late, deadline_s=3.0)] == ["y"]
    assert late.log and "after 1 message(s) and 0/1 end marker(s)" in late.log[0]


def test_poll_waits_at_most_timeout(streams):
    st = streams("tcp://127.0.0.1:*", bind=True)
    t0 = time.monotonic()
    assert st.poll(4, timeout=0.3) == []
    assert 0.25 <= time.monotonic() - t0 < 1.5
    assert st.counters()["wait_s"] >= 0.25 and not st.exhausted


def test_produce_rate_is_a_deadline_schedule(streams):
    st = streams("tcp://127.0.0.1:*", bind=True)
    prod = Producer(st.endpoints[0], [np.zeros((4, 4))] * 10, bind=False, rate_hz=40.0)
    got = collect(st)
    r = prod.finish()
    assert len(got) == 10 and r["sent"] == 10
    assert 9 / 40.0 - 0.01 <= r["seconds"] < 1.0


# ------------------------------------------------------------------------------------------------ CLI
def run_cli(argv: list[str]) -> threading.Thread:
    t = threading.Thread(target=lambda: t.__dict__.update(rc=producer_main(argv)), daemon=True)
    t.start()
    return t


def test_producer_main_simulated_detector(streams, capsys):
    st = streams("tcp://127.0.0.1:*", bind=True)
    t = run_cli([st.endpoints[0], "--connect", "--detector", "single:64x64", "--count", "5", "--pool", "2",
                 "--send-timeout", str(DEADLINE_S)])
    got = collect(st, deadline_s=30.0)
    t.join(DEADLINE_S)
    assert not t.is_alive() and t.rc == 0
    assert [g.event_id for g in got] == [f"sim:0:{i}" for i in range(5)]
    assert all(g.data.shape == (1, 64, 64) and np.isfinite(g.data).all() for g in got)
    assert not np.array_equal(got[0].data, got[1].data)  # distinct shots in the pool
    np.testing.assert_array_equal(got[0].data, got[2].data)  # the pool of 2 cycles
    out = capsys.readouterr().out
    assert "sent 5 event(s) [1, 64, 64]" in out and "1 end marker(s)" in out


def test_producer_main_replays_files(streams, tmp_path, capsys):
    frames = np.arange(3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16)
    np.save(tmp_path / "frames.npy", frames)
    st = streams("tcp://127.0.0.1:*", bind=True)
    t = run_cli([st.endpoints[0], "--connect", "--files", str(tmp_path / "frames.npy"), "--count", "5",
                 "--format", "raw", "--send-timeout", str(DEADLINE_S)])
    got = collect(st)
    t.join(DEADLINE_S)
    assert not t.is_alive() and t.rc == 0
    assert [g.event_id for g in got] == ["frames:0", "frames:1", "frames:2", "frames:0.r1", "frames:1.r1"]
    for g, k in zip(got, [0, 1, 2, 0, 1]):
        np.testing.assert_array_equal(g.data, frames[k][None])


def test_producer_main_reports_errors(capsys):
    assert producer_main([free_endpoint(), "--files", "/nonexistent/frames.npy"]) == 2
    assert "vitkit stream-producer: error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ config errors
def test_config_errors_name_the_problem(streams):
    with pytest.raises(ConfigError, match=r"unknown socket kind 'req'.*'pull'.*'sub'"):
        ZmqStream(free_endpoint(), socket="req")
    with pytest.raises(ConfigError, match=r"unknown overflow policy 'newest'.*drop_oldest"):
        ZmqStream(free_endpoint(), overflow="newest")
    with pytest.raises(ConfigError, match=r"bad endpoint 'localhost:5555'.*tcp://"):
        ZmqStream("localhost:5555")
    with pytest.raises(ConfigError, match=r"cannot connect to 'tcp://127.0.0.1:port'"):
        ZmqStream("tcp://127.0.0.1:port")
    with pytest.raises(ConfigError, match=r"hwm must be >= 1"):
        ZmqStream(free_endpoint(), hwm=0)
    taken = streams("tcp://127.0.0.1:*", bind=True)
    with pytest.raises(ConfigError, match=rf"cannot bind to '{taken.endpoints[0]}'.*Address already in use"):
        ZmqStream(taken.endpoints[0], bind=True)
    with pytest.raises(ConfigError, match=r"produce: unknown socket kind 'pull'"):
        produce(free_endpoint(), [], socket="pull")
    with pytest.raises(ConfigError, match=r"unknown format 'hdf5'"):
        encode_event(np.zeros((2, 2)), fmt="hdf5")


def test_missing_timestamp_is_nan_and_close_is_idempotent(streams):
    st = streams("tcp://127.0.0.1:*", bind=True)
    raw_push(st.endpoints[0], [encode_event(np.ones((2, 3)), "no-ts"), [b""]])
    (g,) = collect(st)
    assert g.event_id == "no-ts" and math.isnan(g.timestamp)
    st.close()
    st.close()
    assert st.poll(3) == []
