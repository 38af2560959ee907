"""The top-level entry points that know every kind of model: ``vitkit.from_pretrained``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from vitkit.backbones.resolve import resolve_backbone
from vitkit.errors import CheckpointNotFoundError
from vitkit.models.eomt import EoMT
from vitkit.weights import hub
from vitkit.weights.eomt import is_eomt_config
from vitkit.weights.io import read_json

__all__ = ["from_pretrained"]


def from_pretrained(path_or_id: str | Path, **overrides: Any) -> nn.Module:
    """Load a model from a directory (config.json + weights), a checkpoint file, or an HF model id (eval mode).

    The kind is read from ``config.json``: an EoMT segmenter (``model_type`` eomt / eomt_dinov3, or vitkit's
    EoMT) gives a :class:`~vitkit.EoMT`, any backbone (dinov2, dinov2_with_registers, dinov3_vit, ijepa, clip /
    clip_vision_model, vit, deit, or vitkit's own) a :class:`~vitkit.VisionTransformer`. A checkpoint file
    without a config is a backbone whose architecture is inferred from its keys. ``overrides`` (e.g.
    ``img_size``, ``in_chans``) are applied before the weights are loaded (and adapted).
    """
    path = Path(path_or_id)
    if not path.exists() and hub.is_hf_id(str(path_or_id)):
        path = hub.resolve_hf(str(path_or_id))
    if path.is_dir() and (path / "config.json").is_file() and is_eomt_config(read_json(path / "config.json")):
        return EoMT.from_pretrained(path, **overrides)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path_or_id} is neither an existing path nor a Hugging Face model id "
                                      f"(org/name); check the path")
    return resolve_backbone(path, **overrides).eval()
