"""Model directories (``config.json`` + weights, transformers' or vitkit's) -> ViTConfig fields (a dict).

:func:`dir_config` is the one reader of a backbone directory's ``config.json``; transformers' configs go through
one small table per ``model_type`` (:func:`hf_to_vit_config`). Like every module of :mod:`vitkit.weights` this
converts data only: it never imports the model classes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitkit.errors import CheckpointNotFoundError, ConfigError
from vitkit.weights.eomt import is_eomt_config
from vitkit.weights.io import read_json, read_safetensors_keys

HF_BACKBONE_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit", "ijepa", "vit", "deit", "clip",
                     "clip_vision_model")


def _common(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(embed_dim=cfg["hidden_size"], depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                img_size=cfg.get("image_size", 224), patch_size=cfg.get("patch_size", 16),
                in_chans=cfg.get("num_channels", 3), norm_eps=cfg.get("layer_norm_eps", 1e-12),
                drop_path_rate=cfg.get("drop_path_rate", 0.0) or 0.0)


def _act(cfg: dict[str, Any], default: str = "gelu") -> str:
    act = cfg.get("hidden_act", default)
    return {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "swish": "silu"}.get(act, act)


def hf_to_vit_config(cfg: dict[str, Any], weight_keys: set[str] | None = None) -> dict[str, Any]:
    """Translate a transformers config dict into vitkit ``ViTConfig`` fields.

    ``weight_keys`` (the checkpoint's keys) decides things configs do not record, such as whether a
    CLIP checkpoint carries its visual projection.
    """
    mt = cfg.get("model_type")
    keys = weight_keys or set()
    if mt == "clip":  # full CLIPModel: take the vision tower
        vision = dict(cfg.get("vision_config") or {})
        vision.setdefault("projection_dim", cfg.get("projection_dim", 512))
        cfg, mt = vision, "clip_vision_model"
    if mt in ("dinov2", "dinov2_with_registers"):
        reg = cfg.get("num_register_tokens", 0) if mt == "dinov2_with_registers" else 0
        swiglu = bool(cfg.get("use_swiglu_ffn", False))
        out = dict(_common(cfg), family="dinov2", mlp_ratio=cfg.get("mlp_ratio", 4), act=_act(cfg),
                   ffn_layer="swiglu" if swiglu else "mlp", qkv_bias=cfg.get("qkv_bias", True),
                   layer_scale_init=cfg.get("layerscale_value", 1.0), mask_token=True, num_register_tokens=reg,
                   interpolate_offset=0.0, interpolate_antialias=reg > 0)
    elif mt == "dinov3_vit":
        gated = bool(cfg.get("use_gated_mlp", False))
        qb, kb, vb = cfg.get("query_bias", True), cfg.get("key_bias", False), cfg.get("value_bias", True)
        if qb != vb:
            raise ConfigError(f"DINOv3 config with query_bias={qb} but value_bias={vb} is not supported")
        out = dict(_common(cfg), family="dinov3", norm_eps=cfg.get("layer_norm_eps", 1e-5),
                   mlp_hidden_dim=cfg["intermediate_size"], ffn_layer="swiglu" if gated else "mlp",
                   act=_act(cfg), qkv_bias=qb or kb, mask_k_bias=(qb or vb) and not kb,
                   proj_bias=cfg.get("proj_bias", True), ffn_bias=cfg.get("mlp_bias", True),
                   layer_scale_init=cfg.get("layerscale_value", 1.0), mask_token=True,
                   num_register_tokens=cfg.get("num_register_tokens", 0), pos_embed="none", rope=True,
                   rope_base=cfg.get("rope_theta", 100.0), rope_shift_coords=cfg.get("pos_embed_shift"),
                   rope_jitter_coords=cfg.get("pos_embed_jitter"), rope_rescale_coords=cfg.get("pos_embed_rescale"))
    elif mt in ("vit", "deit", "ijepa"):
        out = dict(_common(cfg), family={"vit": "vit", "deit": "deit", "ijepa": "ijepa"}[mt],
                   mlp_hidden_dim=cfg["intermediate_size"], act=_act(cfg), qkv_bias=cfg.get("qkv_bias", True),
                   class_token=mt != "ijepa", dist_token=mt == "deit",
                   pos_embed="sincos" if mt == "ijepa" else "learned",
                   interpolate_offset=0.0, interpolate_antialias=False)
    elif mt == "clip_vision_model":
        has_proj = "visual_projection.weight" in keys
        out = dict(_common(cfg), family="clip", norm_eps=cfg.get("layer_norm_eps", 1e-5),
                   mlp_hidden_dim=cfg["intermediate_size"], act=_act(cfg, "quick_gelu"), pre_norm=True,
                   patch_bias=False, proj_dim=cfg.get("projection_dim", 512) if has_proj else None,
                   interpolate_offset=0.0, interpolate_antialias=False)
    else:
        raise ConfigError(f"config.json model_type {mt!r} is not a supported backbone; supported: "
                          f"{', '.join(HF_BACKBONE_TYPES)} (and 'eomt' for vitkit.EoMT directories)")
    out["extra"] = {"weights_source": f"transformers model_type={mt}"}
    return out


def weight_keys(directory: Path, doc: dict[str, Any]) -> set[str]:
    """Checkpoint keys of a model directory, read from the safetensors header or index (no tensors loaded);
    without a weights file, the config's ``architectures`` tell whether a CLIP checkpoint has its projection."""
    keys: set[str] = set()
    st, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if st.exists():
        keys = set(read_safetensors_keys(st))
    elif index.exists():
        keys = set(json.loads(index.read_text())["weight_map"])
    archs = doc.get("architectures") or []
    if not keys and (doc.get("model_type") == "clip" or any(a in ("CLIPModel", "CLIPVisionModelWithProjection")
                                                            for a in archs)):
        keys.add("visual_projection.weight")
    return keys


def dir_config(directory: str | Path) -> dict[str, Any]:
    """ViTConfig fields of a backbone directory (vitkit's ``config.json`` or transformers' of a supported
    ``model_type``). An EoMT directory raises :class:`ConfigError` (``vitkit.from_pretrained`` loads those)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointNotFoundError(f"{directory} has no config.json; pass a checkpoint file instead, or use "
                                      f"create_backbone(name, pretrained='{directory}/<file>')")
    doc = read_json(directory / "config.json")
    if is_eomt_config(doc):
        raise ConfigError(f"{directory} is an EoMT segmenter, not a backbone; load it with vitkit.from_pretrained "
                          f"(its backbone is model.encoder)")
    if doc.get("model_type") == "vitkit":
        return dict(doc["config"])
    return hf_to_vit_config(doc, weight_keys(directory, doc))
