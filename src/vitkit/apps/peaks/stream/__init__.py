"""Streaming inference of the peaks app: find peaks in a stream of detector frames on a Ray cluster (``vitkit stream``).

* :mod:`.config` -- :class:`StreamConfig` and :func:`load_stream_config` (Hydra, checked keys).
* :mod:`.stages` -- the work of each stage without Ray (model masks, compact masks, peaks, file/simulated sources).
* :mod:`.zmq` -- the ZeroMQ socket source and producer; :mod:`.stats` -- rates, latencies, the limiting stage.
* :mod:`.ray` -- the pipeline (:func:`run_stream`); the only module that imports Ray. Without Ray installed it raises
  :class:`RayNotInstalledError` naming ``pip install "vitkit[ray]"``.
* rows are written by :class:`vitkit.apps.peaks.cxi.OrderedCXIWriter` (frame order whatever the completion order).

``run_stream`` and ``StreamPipeline`` are importable from here; they import Ray on first use.
"""

from __future__ import annotations

from typing import Any

from vitkit.apps.peaks.stream.config import StreamConfig, load_stream_config
from vitkit.apps.peaks.stream.errors import RayNotInstalledError, StreamError

__all__ = ["StreamConfig", "load_stream_config", "RayNotInstalledError", "StreamError", "run_stream",
           "StreamPipeline"]


def __getattr__(name: str) -> Any:
    if name in ("run_stream", "StreamPipeline"):  # Ray is optional: imported on first use
        from vitkit.apps.peaks.stream import ray as _ray

        return getattr(_ray, name)
    raise AttributeError(f"module 'vitkit.apps.peaks.stream' has no attribute {name!r}")
