"""Building backbones: by hub name, by explicit config, or from a Hugging Face style directory."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from vitkit.backbones.config import ViTConfig
from vitkit.backbones.presets import (
    dinov2_name_for,
    get_preset,
    vit_base_config,
    vit_giant_config,
    vit_large_config,
    vit_small_config,
)
from vitkit.backbones.vit import VisionTransformer
from vitkit.errors import CheckpointNotFoundError, ConfigError, WeightsNotFoundError
from vitkit.weights import hub
from vitkit.weights.eomt import is_eomt_config
from vitkit.weights.hf import hf_to_vit_config
from vitkit.weights.io import read_json, read_state_dict
from vitkit.weights.loading import infer_config, load_weights, read_and_convert

# What a release's own numerics are: pretrained=True keeps the preset's values for them, whichever layout its weights
# were found in (a transformers snapshot of DINOv2 says "resize position embeddings without Meta's +0.1 offset").
_RELEASE_NUMERICS = frozenset({"interpolate_offset", "interpolate_antialias"})


def _preset_weights(name: str) -> Path:
    """Where ``pretrained=True`` finds a preset's weights, offline first.

    1. the official file (``p.filename``, e.g. ``dinov2_vits14_reg4_pretrain.pth``) in ``$VITKIT_HOME``, the torch
       hub checkpoint directory (``$TORCH_HOME/hub/checkpoints``) or the preset's Hugging Face snapshot;
    2. the same weights in transformers' layout: a snapshot of ``p.hf_id`` (``$VITKIT_HOME/hf/<org>/<name>`` or the
       HF cache ``$HF_HUB_CACHE/models--<org>--<name>/snapshots/<rev>``, ``refs/main`` preferred);
    3. online only (``VITKIT_OFFLINE`` / ``HF_HUB_OFFLINE`` unset): a download of the official file.
    """
    p = get_preset(name)
    if p.filename:
        local = hub.local_file(p.filename, p.hf_id)  # local copies of the official file first
        if local is not None:
            return local
        snapshot = hub.hf_snapshot(p.hf_id) if p.hf_id else None
        if snapshot is not None:
            return _dir_weights(snapshot)
        try:
            return hub.resolve_file(p.filename, p.url, p.hf_id)
        except WeightsNotFoundError as e:
            if not p.hf_id:
                raise
            raise WeightsNotFoundError(
                f"{e} The same weights in transformers' layout are used too: a snapshot of {p.hf_id} (config.json + "
                f"model.safetensors) in the Hugging Face cache {hub.hf_cache_dir()} or in "
                f"{hub.vitkit_home() / 'hf' / p.hf_id} (`huggingface-cli download {p.hf_id}`).") from e
    if p.hf_id:
        return hub.resolve_hf(p.hf_id)
    raise ConfigError(f"preset {name!r} has no official weights; pass pretrained=<path> or pretrained=False")


def create_backbone(name: str | None = None, *, pretrained: bool | str | Path = False,
                    img_size: int | tuple[int, int] | None = None, in_chans: int = 3,
                    patch_size: int | None = None, **config: Any) -> VisionTransformer:
    """Build a backbone by hub name or explicit configuration, optionally with weights.

    Args:
        name: a registered name (``dinov2_vits14_reg``, ``dinov3_vitl16``, ``clip_vitb16``... see
            ``vitkit info``), or None to build from ``config`` alone.
        pretrained: False (random init), True (official weights: the released file in ``$VITKIT_HOME`` or the
            torch hub checkpoints, else a cached Hugging Face snapshot of the same weights, else a download when
            online; see ``_preset_weights``), or a path to a checkpoint of any supported format (Meta, timm, HF
            directory, vitkit).
        img_size: input size (H, W) or an int; position embeddings are resized to it at load time.
        in_chans: input channels; 1 folds RGB patch weights by summing.
        patch_size: resample the patch embedding to another patch size (e.g. 14 -> 16).
        **config: any :class:`ViTConfig` field, overriding the preset.

    Returns:
        A :class:`VisionTransformer` in train mode (call ``.eval()`` for inference).
    """
    source = None
    if pretrained is True:
        if name is None:
            raise ConfigError("pretrained=True needs a model name; pass pretrained=<path> for explicit configs")
        source = _preset_weights(name)
    elif pretrained not in (False, None):
        source = Path(pretrained)

    if name is not None:
        cfg = dict(get_preset(name).config)
    elif source is not None and not config.get("embed_dim"):
        cfg = _config_from_checkpoint(source, config.get("num_heads"))
    else:
        cfg = {}
    cfg.update(config)
    cfg["in_chans"] = in_chans
    if img_size is not None:
        cfg["img_size"] = img_size
    if patch_size is not None:
        cfg["patch_size"] = patch_size
        if img_size is None and name is not None:
            # keep the preset's patch grid: 518 px at /14 is a 37x37 grid -> 592 px at /16
            p0, s0 = get_preset(name).config["patch_size"], get_preset(name).config["img_size"]
            cfg["img_size"] = s0 // p0 * patch_size
    size = cfg.get("img_size")
    if size is not None and "dynamic_pad" not in config:
        h, w = (size, size) if isinstance(size, int) else size
        p = cfg.get("patch_size", 16)
        if h % p or w % p:
            # e.g. 352x384 detector panels with a /14 model: pad inputs instead of refusing them
            cfg["dynamic_pad"] = True
    if name is None and "family" not in cfg:
        cfg["family"] = "custom"
    model = VisionTransformer(ViTConfig.from_dict(cfg))  # unknown keys -> ConfigError listing the fields
    if source is not None:
        if source.is_dir():
            source = _dir_weights(source)
        keep = set(config) | (_RELEASE_NUMERICS if pretrained is True else set())
        load_weights(model, source, keep_config=keep)  # explicit arguments (and the release's numerics) win
    return model


def _dir_weights(directory: Path) -> Path:
    from vitkit.weights.io import find_weights_file

    return find_weights_file(directory)


def _config_from_checkpoint(source: Path, num_heads: int | None = None) -> dict[str, Any]:
    if source.is_dir() and (source / "config.json").exists():
        doc = read_json(source / "config.json")
        if doc.get("model_type") == "vitkit":
            return dict(doc["config"])
        keys = set(read_state_dict(source)[0])
        return hf_to_vit_config(doc, keys)
    sd, fmt, _, stored, _ = read_and_convert(source)
    return infer_config(sd, fmt, stored, num_heads)  # heads are not in the weights: the caller's, if given


def backbone_from_pretrained(path_or_id: str | Path, **overrides: Any) -> VisionTransformer:
    """A backbone from a directory (config.json + weights), a checkpoint file, or an HF model id (eval mode).

    The family is read from ``config.json`` (``model_type`` dinov2, dinov2_with_registers, dinov3_vit,
    ijepa, clip / clip_vision_model, vit, deit, or vitkit's own). A checkpoint file without a
    config has its architecture inferred from its keys. ``overrides`` (e.g. ``img_size``, ``in_chans``)
    are applied before the weights are loaded (and adapted). An EoMT directory raises :class:`ConfigError`
    (``vitkit.from_pretrained`` loads those).
    """
    path = Path(path_or_id)
    if not path.exists():
        if hub.is_hf_id(str(path_or_id)):
            path = hub.resolve_hf(str(path_or_id))
        else:
            raise CheckpointNotFoundError(f"{path_or_id} is neither an existing path nor a Hugging Face model id "
                                          f"(org/name); check the path")
    if path.is_file():  # architecture from the file (vitkit metadata, or inferred from the keys)
        cfg = _config_from_checkpoint(path, overrides.get("num_heads"))
        cfg.update(overrides)
        model = VisionTransformer(ViTConfig.from_dict(cfg))
        load_weights(model, path, keep_config=set(overrides))
        return model.eval()
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointNotFoundError(f"{path} has no config.json; pass a checkpoint file instead, or use "
                                      f"create_backbone(name, pretrained='{path}/<file>')")
    doc = read_json(cfg_file)
    if is_eomt_config(doc):
        raise ConfigError(f"{path} is an EoMT segmenter, not a backbone; load it with vitkit.from_pretrained (its "
                          f"backbone is model.encoder)")
    weights = _dir_weights(path)
    if doc.get("model_type") == "vitkit":
        cfg = ViTConfig.from_dict(doc["config"]).replace(**overrides) if overrides else ViTConfig.from_dict(
            doc["config"])
    else:
        keys = set(read_state_dict(weights)[0])
        cfg = ViTConfig.from_dict(hf_to_vit_config(doc, keys))
        if overrides:
            cfg = cfg.replace(**overrides)
    model = VisionTransformer(cfg)
    load_weights(model, weights, keep_config=set(overrides))  # explicit overrides win
    return model.eval()


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
    if name is not None:
        cfg = dict(get_preset(name).config)
    else:
        cfg = dict(family="dinov2", layer_scale_init=1e-5, mask_token=True, norm_eps=1e-6,
                   interpolate_offset=0.0 if num_register_tokens else 0.1,
                   interpolate_antialias=bool(num_register_tokens))
    cfg.update(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, ffn_layer=ffn_layer,
               num_register_tokens=num_register_tokens, drop_path_rate=drop_path_rate, **config)
    # a patch size other than 14 resamples the /14 weights at load time (FlexiViT)
    model = VisionTransformer(ViTConfig(**dict(cfg, img_size=img_size, in_chans=in_chans, patch_size=patch_size)))
    if source is True:
        load_weights(model, _preset_weights(name), keep_config=_RELEASE_NUMERICS)
    elif source not in (False, None):
        load_weights(model, Path(source))
    return model


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
