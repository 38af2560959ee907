"""The streaming run's own errors."""

from __future__ import annotations

from vitkit.errors import VitkitError

__all__ = ["RayNotInstalledError", "StreamError"]


class RayNotInstalledError(VitkitError, ImportError):
    """Ray is needed (streaming inference) but not installed."""


class StreamError(VitkitError, RuntimeError):
    """A streaming run cannot go on (all model actors lost, a batch failed too often, resources missing)."""
