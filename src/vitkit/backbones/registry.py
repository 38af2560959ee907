"""The Vision Transformer Zoo's registry: model types -> a checkpoint and its family (beside the presets).

``MODEL_REGISTRY["dinov2_reg_vit"]`` is the checkpoint ``build_model("dinov2_reg_vit")`` loads; users add keys with
:func:`register_model` (or the seed's ``MODEL_REGISTRY.update({"your_model": (YourCustomModel, "your-org/name")})``).
transformers classes users arrive with (``backbone_cls=ViTModel``) are read as family hints, never imported or run.
"""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple

from vitkit.backbones.vit import VisionTransformer
from vitkit.errors import ConfigError

__all__ = ["MODEL_REGISTRY", "ZooEntry", "backbone_class", "list_models", "lookup", "register_model"]


class ZooEntry(NamedTuple):
    """A registry entry. A plain ``(backbone_cls, model_name)`` tuple works too (the seed's
    ``MODEL_REGISTRY.update({"your_model": (YourCustomModel, "your-org/your-model-name")})``)."""

    backbone_cls: Any
    model_name: str
    family: str | None = None  # the checkpoint must be of this vitkit family (None: any)


MODEL_REGISTRY: dict[str, ZooEntry] = {
    "vanilla_vit": ZooEntry(VisionTransformer, "google/vit-base-patch16-224", "vit"),
    "deit_vit": ZooEntry(VisionTransformer, "facebook/deit-base-distilled-patch16-224", "deit"),
    "dino_vit": ZooEntry(VisionTransformer, "facebook/dino-vitb16", "vit"),
    "dino_v2_vit": ZooEntry(VisionTransformer, "facebook/dinov2-base", "dinov2"),
    "dinov2_reg_vit": ZooEntry(VisionTransformer, "facebook/dinov2-with-registers-base", "dinov2"),
    "dinov3_vit": ZooEntry(VisionTransformer, "facebook/dinov3-vitb16-pretrain-lvd1689m", "dinov3"),
    "clip_vit": ZooEntry(VisionTransformer, "openai/clip-vit-base-patch16", "clip"),
    "ijepa_vit": ZooEntry(VisionTransformer, "facebook/ijepa_vith14_1k", "ijepa"),
}
_ALIASES = {"dinov2_vit": "dino_v2_vit"}  # vit_zoo 0.1's code spells the key this way, its README dino_v2_vit


def list_models() -> list[str]:
    """The registered model types."""
    return sorted(MODEL_REGISTRY)


def register_model(model_type: str, model_name: str, backbone_cls: Any = VisionTransformer,
                   family: str | None = None, overwrite: bool = False) -> None:
    """Add a registry key: ``model_name`` is an HF id, a local directory / checkpoint or a vitkit preset."""
    if model_type in MODEL_REGISTRY and not overwrite:
        raise ConfigError(f"model_type {model_type!r} is already registered ({MODEL_REGISTRY[model_type]}); "
                          f"pass overwrite=True to replace it")
    MODEL_REGISTRY[model_type] = ZooEntry(backbone_cls, str(model_name), family)


def lookup(model_type: str) -> ZooEntry:
    """The registry entry of ``model_type`` (aliases accepted); an unknown key raises naming the close ones."""
    key = _ALIASES.get(model_type, model_type) if model_type not in MODEL_REGISTRY else model_type
    if key not in MODEL_REGISTRY:
        close = difflib.get_close_matches(str(model_type), list(MODEL_REGISTRY), n=2)
        raise ConfigError(f"unknown model_type {model_type!r}" + (f" (did you mean {' or '.join(close)}?)" if close
                                                                  else "")
                          + f"; valid model types: {', '.join(list_models())}. For any other checkpoint pass "
                          f"model_name=<HF id, local directory or vitkit preset> without model_type.")
    entry = MODEL_REGISTRY[key]
    if not isinstance(entry, ZooEntry):  # a user's (backbone_cls, model_name[, family]) tuple
        if not isinstance(entry, tuple) or not 2 <= len(entry) <= 3:
            raise ConfigError(f"MODEL_REGISTRY[{key!r}] must be (backbone_cls, model_name[, family]), got {entry!r}")
        entry = ZooEntry(*entry)
    return entry


# transformers classes users arrive with (seed: backbone_cls=ViTModel): a family hint, never imported or run
_HF_CLASSES: dict[str, tuple[str | None, str | None]] = {  # class name: (family, default pooling)
    "AutoModel": (None, None),
    "ViTModel": ("vit", None), "ViTForImageClassification": ("vit", None),
    "DeiTModel": ("deit", None), "DeiTForImageClassification": ("deit", None),
    "DeiTForImageClassificationWithTeacher": ("deit", None),
    "Dinov2Model": ("dinov2", None), "Dinov2WithRegistersModel": ("dinov2", None),
    "DINOv3ViTModel": ("dinov3", None),
    "CLIPVisionModel": ("clip", None), "CLIPVisionModelWithProjection": ("clip", "projection"),
    "CLIPModel": ("clip", "projection"),
    "IJepaModel": ("ijepa", None),
}


def backbone_class(backbone_cls: Any) -> tuple[type[VisionTransformer], str | None, str | None]:
    """``(vitkit class to build, family hint, pooling hint)`` for a ``backbone_cls`` argument."""
    if backbone_cls is None:
        return VisionTransformer, None, None
    if isinstance(backbone_cls, type) and issubclass(backbone_cls, VisionTransformer):
        return backbone_cls, None, None
    name = getattr(backbone_cls, "__name__", None)
    module = getattr(backbone_cls, "__module__", "") or ""
    if isinstance(backbone_cls, type) and module.split(".")[0] == "transformers":
        if name in _HF_CLASSES:
            return (VisionTransformer, *_HF_CLASSES[name])
        raise ConfigError(f"backbone_cls=transformers.{name} is not a supported vision backbone; supported "
                          f"transformers classes: {', '.join(sorted(_HF_CLASSES))} (vitkit loads their checkpoints "
                          f"into its own VisionTransformer)")
    raise ConfigError(f"backbone_cls must be vitkit.VisionTransformer (or a subclass) or one of the transformers "
                      f"classes {', '.join(sorted(_HF_CLASSES))}; got {backbone_cls!r}. To use an already built "
                      f"vitkit backbone pass it as backbone=<VisionTransformer>.")
