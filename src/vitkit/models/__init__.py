"""Models built on the vitkit backbone: EoMT segmenter (more heads follow)."""

from vitkit.models.eomt import EoMT, ScaleBlock

__all__ = ["EoMT", "ScaleBlock"]
