"""Streaming inference: find peaks in a stream of detector frames on a Ray cluster.

* :mod:`vitkit.infer.config` -- :class:`StreamConfig` and :func:`load_stream_config` (Hydra, checked keys).
* :mod:`vitkit.infer.stages` -- the work of each stage without Ray (model masks, compact masks, peaks, sources).
* :mod:`vitkit.infer.cxi` -- :class:`OrderedCXIWriter`: rows in frame order whatever the completion order.
* :mod:`vitkit.infer.ray` -- the pipeline (:func:`run_stream`); the only module that imports Ray. Without Ray
  installed it raises :class:`RayNotInstalledError` naming ``pip install "vitkit[ray]"``.

``run_stream`` and ``StreamPipeline`` are importable from here; they import Ray on first use.
"""

from __future__ import annotations

from typing import Any

from vitkit.infer.config import StreamConfig, load_stream_config
from vitkit.infer.errors import RayNotInstalledError, StreamError

__all__ = ["StreamConfig", "load_stream_config", "RayNotInstalledError", "StreamError", "run_stream",
           "StreamPipeline"]


def __getattr__(name: str) -> Any:
    if name in ("run_stream", "StreamPipeline"):  # Ray is optional: imported on first use
        from vitkit.infer import ray as _ray

        return getattr(_ray, name)
    raise AttributeError(f"module 'vitkit.infer' has no attribute {name!r}")
