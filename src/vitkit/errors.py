"""Exceptions raised by vitkit.

Every error says what was expected, what was found and what to do. They derive from the
built-in exception a caller would naturally catch (``ValueError`` for bad input,
``FileNotFoundError`` for a missing checkpoint) so generic handlers keep working.
"""

from __future__ import annotations


class VitkitError(Exception):
    """Base class of all vitkit errors."""


class InputError(VitkitError, ValueError):
    """An input tensor has the wrong rank, dtype, channel count or size."""


class ConfigError(VitkitError, ValueError):
    """A model configuration is inconsistent or names something unknown."""


class CheckpointError(VitkitError, ValueError):
    """A checkpoint cannot be read, is of an unknown format, or is unsafe to unpickle."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped keys."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path does not exist, or a model directory holds no weights file."""


class WeightsNotFoundError(CheckpointNotFoundError):
    """Pretrained weights are not in any cache and cannot be downloaded (offline)."""
