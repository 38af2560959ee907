"""Fault injection for the streaming tests: a :class:`StreamPipeline` that kills one model actor once.

Production runs inject no faults; the tests install this subclass instead, through the pipeline's public extension
points (``on_loop``, ``may_finish``, ``summary_extra``): in process with :func:`run_with_kill`, in a ``vitkit stream``
subprocess with :func:`install` (``run_stream`` then builds this pipeline)::

    s = run_with_kill(cfg, after_batches=2, mode="sigkill", log=None)
    run_cli(..., pre=stream_faults.pre_code(after_batches=2, mode="ray_kill"))
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from vitkit.apps.peaks.stream import ray as stream_ray
from vitkit.apps.peaks.stream.config import load_stream_config
from vitkit.apps.peaks.stream.errors import StreamError

KILL_MODES = ("ray_kill", "sigkill")


class KillOneActor(stream_ray.StreamPipeline):
    """Kills the first busy model actor once ``after_batches`` batches came back (``ray_kill``:
    ``ray.kill(actor, no_restart=False)``; ``sigkill``: ``os.kill(pid, SIGKILL)``, same node), and with
    ``await_restart`` ends the run only once that actor is back (or dropped), so its summary shows the restart.
    The summary's ``fault_injected`` says what was killed."""

    after_batches = 2
    mode = "ray_kill"
    await_restart = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.mode not in KILL_MODES:
            raise ValueError(f"mode must be one of {KILL_MODES}, got {self.mode!r}")
        self.killed: dict | None = None
        self.summary_extra["fault_injected"] = None

    def on_loop(self) -> None:
        if self.killed is not None or self.batches_done < self.after_batches:
            return
        busy = [s for s in self.slots if s.state == "alive" and s.inflight > 0]
        if not busy:
            return
        s = busy[0]
        batches = self.batches_in_flight(s)
        if self.mode == "sigkill":
            if s.node != stream_ray.ray.get_runtime_context().get_node_id():
                raise StreamError("kill mode sigkill needs the actor on the driver's node; use ray_kill.")
            os.kill(s.pid, signal.SIGKILL)
        else:
            stream_ray.ray.kill(s.handle, no_restart=False)
        self.killed = {"actor": s.i, "pid": s.pid, "mode": self.mode, "after_batches": self.batches_done,
                       "batches_in_flight": batches}
        self.summary_extra["fault_injected"] = self.killed
        self.log(f"[stream] fault injection: killed model actor {s.i} (pid {s.pid}, {self.mode}) with batches "
                 f"{batches} in flight")

    def may_finish(self) -> bool:
        return not (self.killed is not None and self.await_restart
                    and self.slots[self.killed["actor"]].state == "recovering")


def _pipeline(after_batches: int, mode: str, await_restart: bool = True) -> type[KillOneActor]:
    return type("KillOneActorOnce", (KillOneActor,), {"after_batches": after_batches, "mode": mode,
                                                      "await_restart": await_restart})


def run_with_kill(cfg, after_batches: int = 2, mode: str = "ray_kill", log=stream_ray._stderr, queue=None
                  ) -> dict[str, Any]:
    """``run_stream(cfg)`` with one model actor killed once; returns the summary."""
    cfg = cfg if isinstance(cfg, stream_ray.StreamConfig) else load_stream_config(cfg)
    return _pipeline(after_batches, mode)(cfg, queue=queue, log=log).run()


def install(after_batches: int = 2, mode: str = "ray_kill") -> None:
    """Make ``run_stream`` (and so ``vitkit stream``) in this process build :class:`KillOneActor` pipelines."""
    stream_ray.StreamPipeline = _pipeline(after_batches, mode)


def pre_code(after_batches: int = 2, mode: str = "ray_kill") -> str:
    """Python source that installs the pipeline in a fresh interpreter (``run_cli(..., pre=...)``)."""
    here = str(Path(__file__).resolve().parent)
    return (f"sys.path.insert(0, {here!r}); import stream_faults; "
            f"stream_faults.install({int(after_batches)}, {mode!r})")
