"""Throughput, latency and queue-depth bookkeeping of a streaming run (no Ray)."""

from __future__ import annotations

import time
from array import array
from typing import Any

import numpy as np

__all__ = ["StreamStats", "percentiles", "stage_utilisation", "limiting_stage"]


def percentiles(values, qs=(50, 95)) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ...}`` of ``values`` (None when empty)."""
    v = np.asarray(values, dtype=np.float64)
    return {f"p{q}": (float(np.percentile(v, q)) if v.size else None) for q in qs}


class StreamStats:
    """Counters of one run. Times are seconds on the driver's ``time.perf_counter`` clock, from ``t0`` (the start
    of streaming; the pipeline resets it once its actors are up).

    Latency of a frame = the moment the driver read it from the source -> the moment the writer reported its row
    written to the CXI (in frame order, so a frame waiting for an earlier one counts that wait).
    """

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.latencies = array("d")
        self.write_times = array("d")
        self._window: list[float] = []
        self._last_report = self.t0
        self._last_written = 0
        self.read = 0
        self.written = 0
        self.dropped = 0
        self.max_depth: dict[str, int] = {}
        self.counters: dict[str, Any] = {}

    def start(self) -> float:
        """(Re)start the clock: rates, latencies and report windows count from now. Returns the seconds since
        the previous start (e.g. actor start-up)."""
        now = time.perf_counter()
        before, self.t0, self._last_report = now - self.t0, now, now
        return before

    def add(self, key: str, n: float = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def depths(self, **depths: int) -> None:
        """Record current queue depths; the maxima go to the summary."""
        for k, v in depths.items():
            if v is not None and v > self.max_depth.get(k, -1):
                self.max_depth[k] = int(v)

    def frame_written(self, latency_s: float) -> None:
        self.written += 1
        self.latencies.append(latency_s)
        self.write_times.append(time.perf_counter() - self.t0)
        self._window.append(latency_s)

    def report_line(self, depths: dict[str, Any], extra: str = "") -> str:
        """One progress line (``extra`` appended); resets the window."""
        now = time.perf_counter()
        el = now - self.t0
        dt = max(now - self._last_report, 1e-9)
        rate_now = (self.written - self._last_written) / dt
        p = percentiles(self._window)
        self._window = []
        self._last_report, self._last_written = now, self.written
        lat = "latency -" if p["p50"] is None else f"latency p50 {p['p50']:.3f} s p95 {p['p95']:.3f} s"
        q = " | ".join(f"{k} {v}" for k, v in depths.items())
        return (f"[stream {el:7.1f} s] {self.written} frames written, {self.written / max(el, 1e-9):.2f} frames/s "
                f"(now {rate_now:.2f}), {lat}; queues: {q}{'; ' + extra if extra else ''}")

    def steady_rate(self, lo: float = 0.1, hi: float = 0.9) -> float | None:
        """Frames/s between the ``lo`` and ``hi`` fractions of the writes (without pipeline fill and drain)."""
        t = np.asarray(self.write_times, dtype=np.float64)
        a, b = int(lo * len(t)), int(hi * len(t)) - 1
        if b - a < 2 or t[b] <= t[a]:
            return None
        return (b - a) / (t[b] - t[a])

    def summary(self) -> dict[str, Any]:
        el = time.perf_counter() - self.t0
        lat = np.asarray(self.latencies, dtype=np.float64)
        return {
            "frames_read": self.read,
            "frames_written": self.written,
            "elapsed_s": el,
            "frames_per_s": self.written / el if el > 0 else 0.0,
            "steady_frames_per_s": self.steady_rate(),
            "latency_s": {**percentiles(lat), "mean": float(lat.mean()) if lat.size else None,
                          "max": float(lat.max()) if lat.size else None},
            "max_queue_depths": dict(self.max_depth),
            **self.counters,
        }


# ---------------------------------------------------------------------------------------------- stages
def stage_utilisation(elapsed_s: float, busy_s: dict[str, float], workers: dict[str, float]) -> dict[str, dict]:
    """Per stage ``{"busy_s", "workers", "utilisation"}``: busy time over ``elapsed_s x workers`` (1.0: every
    worker of the stage was busy all the time)."""
    el = max(float(elapsed_s), 1e-9)
    return {k: {"busy_s": float(v), "workers": float(workers.get(k, 1)),
                "utilisation": float(v) / (el * max(float(workers.get(k, 1)), 1e-9))} for k, v in busy_s.items()}


def limiting_stage(stages: dict[str, dict], source_wait_s: float | None, elapsed_s: float) -> dict[str, Any]:
    """Which stage limits throughput, with the reason.

    The busiest stage (highest utilisation) limits the run when it is busy most of the time (>= 70 %); when
    no stage is, and the driver spent most of the run (>= 50 %) waiting for events, the source (the producer,
    the file system) is the limit. Returns ``{"stage", "utilisation", "why"}``.
    """
    busiest = max(stages, key=lambda k: stages[k]["utilisation"]) if stages else None
    u = stages[busiest]["utilisation"] if busiest else 0.0
    wait = None if source_wait_s is None else source_wait_s / max(elapsed_s, 1e-9)
    if busiest is not None and u >= 0.7:
        n = stages[busiest]["workers"]
        why = (f"{busiest} is busy {100 * u:.0f} % of the time on {n:g} worker(s); more {busiest} workers (or a "
               f"faster {busiest}) would raise throughput")
        return {"stage": busiest, "utilisation": u, "why": why}
    if wait is not None and wait >= 0.5:
        return {"stage": "source", "utilisation": wait,
                "why": f"the driver waited for events {100 * wait:.0f} % of the time and no stage is busy more than "
                       f"{100 * u:.0f} %: the producer (or the file system) sets the pace"}
    why = (f"no stage is busy most of the time (busiest: {busiest} {100 * u:.0f} %); the pipeline is limited by "
           "latency (batch timeout, queue caps: raise max_frames_in_flight / max_batches_per_actor)")
    return {"stage": busiest, "utilisation": u, "why": why}
