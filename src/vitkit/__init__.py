"""vitkit: foundation vision transformers for dense scientific imaging, verified against the references.

Public API::

    bb = vitkit.create_backbone("dinov2_vits14_reg", pretrained=False, img_size=(352, 384), in_chans=1)
    m = vitkit.from_pretrained("path/to/hf_model_dir")
    feats = bb.forward_features(x)
"""

from vitkit.api import from_pretrained
from vitkit.backbones import PRESETS, VisionTransformer, ViTConfig, get_preset, list_models
from vitkit.backbones.factory import create_backbone, create_dinov2_encoder, create_dinov2_encoder_legacy
from vitkit.backbones.presets import vit_base_config, vit_giant_config, vit_large_config, vit_small_config
from vitkit.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    InputError,
    VitkitError,
    WeightsNotFoundError,
)
from vitkit.models import EoMT
from vitkit.weights import load_weights, save_pretrained

__version__ = "0.1.0"

# Optional parts are imported on first use, so `import vitkit` stays light.
_LAZY = {
    "build_model": "vitkit.models.classifier",
    "heads": "vitkit.heads",
    "ViTTrunkMultiScale": "vitkit.models.trunk",
    "SimpleFeaturePyramid": "vitkit.models.trunk",
    "Aggregator": "vitkit.models.aggregator",
    "PeakFinder": "vitkit.apps.peaks.finder",
    "Detector": "vitkit.apps.peaks.detector",
    "load_detector": "vitkit.apps.peaks.detector",
    "dinov3_vits16": "vitkit.backbones.hub_functions",
    "dinov3_vits16plus": "vitkit.backbones.hub_functions",
    "dinov3_vitb16": "vitkit.backbones.hub_functions",
    "dinov3_vitl16": "vitkit.backbones.hub_functions",
    "dinov3_vitl16plus": "vitkit.backbones.hub_functions",
    "dinov3_vith16plus": "vitkit.backbones.hub_functions",
    "dinov3_vit7b16": "vitkit.backbones.hub_functions",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith("." + name) else getattr(module, name)
    raise AttributeError(f"module 'vitkit' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "PRESETS",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ConfigError",
    "EoMT",
    "InputError",
    "ViTConfig",
    "VisionTransformer",
    "VitkitError",
    "WeightsNotFoundError",
    "create_backbone",
    "create_dinov2_encoder",
    "create_dinov2_encoder_legacy",
    "from_pretrained",
    "get_preset",
    "list_models",
    "load_weights",
    "save_pretrained",
    "vit_base_config",
    "vit_giant_config",
    "vit_large_config",
    "vit_small_config",
]
