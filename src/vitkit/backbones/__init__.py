"""One VisionTransformer, its configuration, the registry of presets and the builders."""

from vitkit.backbones.config import ViTConfig
from vitkit.backbones.presets import PRESETS, Preset, get_preset, list_models
from vitkit.backbones.vit import VisionTransformer

__all__ = ["PRESETS", "Preset", "ViTConfig", "VisionTransformer", "get_preset", "list_models"]
