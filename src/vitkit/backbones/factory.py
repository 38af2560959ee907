"""The public backbone builders (``create_backbone`` and PeakNet EoMT's seed-compatible ones), all through the
one resolver :func:`~vitkit.backbones.resolve.resolve_backbone`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from vitkit.backbones.presets import (
    dinov2_name_for,
    vit_base_config,
    vit_giant_config,
    vit_large_config,
    vit_small_config,
)
from vitkit.backbones.resolve import resolve_backbone
from vitkit.backbones.vit import VisionTransformer
from vitkit.errors import ConfigError


def create_backbone(name: str | None = None, *, pretrained: bool | str | Path = False,
                    img_size: int | tuple[int, int] | None = None, in_chans: int = 3,
                    patch_size: int | None = None, **config: Any) -> VisionTransformer:
    """Build a backbone by hub name or explicit configuration, optionally with weights.

    Args:
        name: a registered name (``dinov2_vits14_reg``, ``dinov3_vitl16``, ``clip_vitb16``... see
            ``vitkit info``), or None to build from ``config`` alone.
        pretrained: False (random init), True (official weights: the released file in ``$VITKIT_HOME`` or the
            torch hub checkpoints, else a cached Hugging Face snapshot of the same weights, else a download when
            online; see :func:`~vitkit.backbones.resolve.preset_weights`), or a path to a checkpoint of any
            supported format (Meta, timm, HF directory, vitkit).
        img_size: input size (H, W) or an int; position embeddings are resized to it at load time.
        in_chans: input channels; 1 folds RGB patch weights by summing.
        patch_size: resample the patch embedding to another patch size (e.g. 14 -> 16).
        **config: any :class:`ViTConfig` field, overriding the preset.

    Returns:
        A :class:`VisionTransformer` in train mode (call ``.eval()`` for inference). Built by
        :func:`~vitkit.backbones.resolve.resolve_backbone`, as every backbone in vitkit.
    """
    return resolve_backbone(name, pretrained=pretrained, img_size=img_size, in_chans=in_chans, patch_size=patch_size,
                            **config)


# ------------------------------------------------------------------------------ seed-compatible API
def create_dinov2_encoder(embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                          num_register_tokens: int = 0, ffn_layer: str = "mlp", patch_size: int = 14,
                          img_size: int | tuple[int, int] = 518, in_chans: int = 3,
                          pretrained: bool | str | Path = False, pretrained_path: str | Path | None = None,
                          drop_path_rate: float = 0.0, **config: Any) -> VisionTransformer:
    """A DINOv2 encoder from explicit dimensions (PeakNet EoMT's API).

    With ``pretrained=True`` the configuration must be a released DINOv2 model (ViT-S/B/L/g, 0 or 4
    registers); its official weights are loaded strictly. ``pretrained_path`` loads a local file instead.
    """
    name = dinov2_name_for(embed_dim, depth, num_heads, 14, num_register_tokens)
    source: bool | str | Path = pretrained_path if pretrained_path is not None else pretrained
    if source is True and name is None:
        raise ConfigError(
            f"no released DINOv2 weights for embed_dim={embed_dim}, depth={depth}, num_heads={num_heads}, "
            f"registers={num_register_tokens}; use pretrained=False or pretrained_path=<file>")
    dims = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, ffn_layer=ffn_layer,
                num_register_tokens=num_register_tokens, drop_path_rate=drop_path_rate, **config)
    # a released size is its preset; another one DINOv2's defaults. A patch size other than 14 resamples the /14
    # weights at load time (FlexiViT)
    spec = name if name is not None else dict(
        family="dinov2", layer_scale_init=1e-5, mask_token=True, norm_eps=1e-6,
        interpolate_offset=0.0 if num_register_tokens else 0.1, interpolate_antialias=bool(num_register_tokens))
    return resolve_backbone(spec, pretrained=source, img_size=img_size, in_chans=in_chans, patch_size=patch_size,
                            **dims)


_LEGACY_NAMES = {f"vit_{size}_patch14{reg}_dinov2": f"dinov2_vit{size[0]}14{'_reg' if reg else ''}"
                 for size in ("small", "base", "large", "giant") for reg in ("", "_reg4")}


def legacy_dinov2_config(model_name: str) -> tuple[dict[str, Any], str]:
    """A timm-style DINOv2 name (PeakNet EoMT's old ``encoder_name``) as explicit dimensions.

    Returns ``(config, spelling)``: ``vit_large_patch14_reg4_dinov2`` gives what
    ``vit_large_config(num_register_tokens=4)`` returns and the string ``"vit_large_config(num_register_tokens=4)"``
    (the new spelling, for deprecation messages). Unknown names raise :class:`ConfigError` listing the known ones.
    """
    if model_name not in _LEGACY_NAMES:
        raise ConfigError(f"unknown legacy DINOv2 name {model_name!r}; known: {sorted(_LEGACY_NAMES)}. For other "
                          f"models pass explicit dimensions (patch_size=..., embed_dim=..., depth=..., num_heads=...) "
                          f"or a registered name (vitkit.list_models())")
    size = model_name.split("_")[1]
    registers = 4 if "_reg4_" in model_name else 0
    helper = {"small": vit_small_config, "base": vit_base_config, "large": vit_large_config,
              "giant": vit_giant_config}[size]
    return helper(num_register_tokens=registers), f"{helper.__name__}(num_register_tokens={registers})"


def create_dinov2_encoder_legacy(model_name: str = "vit_large_patch14_reg4_dinov2", pretrained: bool = False,
                                 img_size: int | tuple[int, int] = 518, in_chans: int = 3,
                                 **config: Any) -> VisionTransformer:
    """Deprecated: timm-style names (``vit_large_patch14_reg4_dinov2``). Use :func:`create_backbone`."""
    warnings.warn("create_dinov2_encoder_legacy is deprecated; use vitkit.create_backbone("
                  f"{_LEGACY_NAMES.get(model_name, 'dinov2_vitl14_reg')!r}, ...) or create_dinov2_encoder",
                  DeprecationWarning, stacklevel=2)
    if model_name not in _LEGACY_NAMES:
        raise ConfigError(f"unknown legacy DINOv2 name {model_name!r}; known: {sorted(_LEGACY_NAMES)}")
    return create_backbone(_LEGACY_NAMES[model_name], pretrained=pretrained, img_size=img_size,
                           in_chans=in_chans, **config)
