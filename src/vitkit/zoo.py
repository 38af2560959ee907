"""The Vision Transformer Zoo's API (``vitkit.zoo``, as ``vit_zoo.factory``): :func:`build_model` and its registry.

The model is :mod:`vitkit.models.classifier`, the registry :mod:`vitkit.backbones.registry`, the Lightning module
:mod:`vitkit.tasks.train.classifier`; this module gathers them under the zoo's names::

    import vitkit
    model = vitkit.build_model("dinov2_reg_vit", head=10, freeze_backbone=True)
    logits = model(images)                                         # [B, 10]
"""

from __future__ import annotations

from typing import Any

from vitkit.backbones.registry import MODEL_REGISTRY, ZooEntry, list_models, register_model
from vitkit.models.classifier import POOLINGS, ZooModel, build_model, default_pooling, set_backbone_dropout

# ZooClassifier (a LightningModule) is importable from here too, on first access
__all__ = ["MODEL_REGISTRY", "POOLINGS", "ZooEntry", "ZooModel", "build_model", "default_pooling", "list_models",
           "register_model", "set_backbone_dropout"]


def __getattr__(name: str) -> Any:
    if name == "ZooClassifier":  # needs Lightning, which takes seconds to import: only on first use
        from vitkit.tasks.train.classifier import ZooClassifier

        return ZooClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
