"""Registered backbones: hub-style names -> configuration + where their official weights live.

A preset is data: the config values that make a family, and the weight source (Meta URL and file
name, or a Hugging Face repository). Names follow Meta's hub functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitkit.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    config: dict[str, Any]
    url: str | None = None  # direct download of the official checkpoint
    filename: str | None = None  # its file name in the caches
    hf_id: str | None = None  # Hugging Face repository with the same weights
    notes: str = ""
    published_params: str = ""  # as reported by the authors, for `vitkit info`


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ConfigError(f"preset {preset.name!r} registered twice")
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        raise ConfigError(f"unknown model name {name!r}"
                          + (f"; did you mean {', '.join(close)}?" if close else "")
                          + " Run `vitkit info` for the list.") from None


def list_models() -> list[str]:
    return sorted(PRESETS)


# ------------------------------------------------------------------------------------------ DINOv2
_DINOV2_SIZES = {  # arch letter: (embed_dim, depth, heads, ffn, published size, HF size word)
    "s": (384, 12, 6, "mlp", "21 M", "small"),
    "b": (768, 12, 12, "mlp", "86 M", "base"),
    "l": (1024, 24, 16, "mlp", "300 M", "large"),
    "g": (1536, 40, 24, "swiglu", "1.1 B", "giant"),
}
_DINOV2_BASE = dict(family="dinov2", img_size=518, patch_size=14, layer_scale_init=1e-5, norm_eps=1e-6,
                    mask_token=True, pos_embed="learned")

for _a, (_d, _depth, _h, _ffn, _pub, _word) in _DINOV2_SIZES.items():
    for _reg in (False, True):
        _name = f"dinov2_vit{_a}14" + ("_reg" if _reg else "")
        _full = f"dinov2_vit{_a}14" + ("_reg4" if _reg else "")
        register(Preset(
            name=_name,
            config=dict(_DINOV2_BASE, embed_dim=_d, depth=_depth, num_heads=_h, ffn_layer=_ffn,
                        num_register_tokens=4 if _reg else 0,
                        # Meta's hub: register models resize with size= and antialias, the others with
                        # scale_factor=(n + 0.1) / M and no antialias.
                        interpolate_offset=0.0 if _reg else 0.1, interpolate_antialias=_reg),
            url=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{_a}14/{_full}_pretrain.pth",
            filename=f"{_full}_pretrain.pth",
            hf_id=f"facebook/dinov2-{'with-registers-' if _reg else ''}{_word}",
            published_params=_pub,
        ))

# ------------------------------------------------------------------------------------------ DINOv3
_DINOV3_BASE = dict(family="dinov3", img_size=224, patch_size=16, layer_scale_init=1e-5, norm_eps=1e-5,
                    num_register_tokens=4, mask_token=True, mask_k_bias=True, pos_embed="none", rope=True,
                    rope_base=100.0, rope_normalize_coords="separate", rope_rescale_coords=2.0)
_DINOV3 = {  # name: (embed_dim, depth, heads, ffn, ratio, align, qkv_bias, file hash, published, hf word)
    "vits16": (384, 12, 6, "mlp", 4.0, 8, True, "08c60483", "21 M", "vits16"),
    "vits16plus": (384, 12, 6, "swiglu", 6.0, 8, True, "4057cbaa", "29 M", "vits16plus"),
    "vitb16": (768, 12, 12, "mlp", 4.0, 8, True, "73cec8be", "86 M", "vitb16"),
    "vitl16": (1024, 24, 16, "mlp", 4.0, 8, True, "8aa4cbdd", "300 M", "vitl16"),
    "vitl16plus": (1024, 24, 16, "swiglu", 6.0, 8, True, "46503df0", "", "vitl16plus"),
    "vith16plus": (1280, 32, 20, "swiglu", 6.0, 8, True, "7c1da9a5", "840 M", "vith16plus"),
    "vit7b16": (4096, 40, 32, "swiglu", 3.0, 64, False, "a955f4ea", "6.7 B", "vit7b16"),
}
for _arch, (_d, _depth, _h, _ffn, _r, _al, _qb, _hash, _pub, _word) in _DINOV3.items():
    _file = f"dinov3_{_arch}_pretrain_lvd1689m-{_hash}.pth"
    register(Preset(
        name=f"dinov3_{_arch}",
        config=dict(_DINOV3_BASE, embed_dim=_d, depth=_depth, num_heads=_h, ffn_layer=_ffn, mlp_ratio=_r,
                    swiglu_align=_al, qkv_bias=_qb),
        url=None,  # Meta gates DINOv3: download URLs are sent by e-mail, so no unattended download
        filename=_file,
        hf_id=f"facebook/dinov3-{_word}-pretrain-lvd1689m",
        notes="gated weights: request access from Meta, then put the .pth into the vitkit cache",
        published_params=_pub,
    ))

# ----------------------------------------------------------------------------------------- I-JEPA
_IJEPA_BASE = dict(family="ijepa", class_token=False, pos_embed="sincos", norm_eps=1e-6)
register(Preset("ijepa_vith14", dict(_IJEPA_BASE, img_size=224, patch_size=14, embed_dim=1280, depth=32,
                                     num_heads=16), hf_id="facebook/ijepa_vith14_1k", published_params="630 M"))
register(Preset("ijepa_vith14_22k", dict(_IJEPA_BASE, img_size=224, patch_size=14, embed_dim=1280, depth=32,
                                         num_heads=16), hf_id="facebook/ijepa_vith14_22k",
                published_params="630 M"))
register(Preset("ijepa_vith16_448", dict(_IJEPA_BASE, img_size=448, patch_size=16, embed_dim=1280, depth=32,
                                         num_heads=16), hf_id="facebook/ijepa_vith16_1k", published_params="630 M"))
register(Preset("ijepa_vitg16", dict(_IJEPA_BASE, img_size=224, patch_size=16, embed_dim=1408, depth=40,
                                     num_heads=16, mlp_hidden_dim=6144), hf_id="facebook/ijepa_vitg16_22k",
                published_params="1 B"))

# ------------------------------------------------------------------------------------------- CLIP
_CLIP_BASE = dict(family="clip", img_size=224, act="quick_gelu", norm_eps=1e-5, pre_norm=True, patch_bias=False)
register(Preset("clip_vitb32", dict(_CLIP_BASE, patch_size=32, embed_dim=768, depth=12, num_heads=12, proj_dim=512),
                hf_id="openai/clip-vit-base-patch32", published_params="88 M"))
register(Preset("clip_vitb16", dict(_CLIP_BASE, patch_size=16, embed_dim=768, depth=12, num_heads=12, proj_dim=512),
                hf_id="openai/clip-vit-base-patch16", published_params="86 M"))
register(Preset("clip_vitl14", dict(_CLIP_BASE, patch_size=14, embed_dim=1024, depth=24, num_heads=16,
                                    proj_dim=768), hf_id="openai/clip-vit-large-patch14", published_params="304 M"))

# ------------------------------------------------------------------------------ Google ViT, DINO, DeiT
_HF_VIT_BASE = dict(family="vit", img_size=224, norm_eps=1e-12)
register(Preset("vit_base_patch16", dict(_HF_VIT_BASE, patch_size=16, embed_dim=768, depth=12, num_heads=12),
                hf_id="google/vit-base-patch16-224", published_params="86 M"))
register(Preset("vit_large_patch16", dict(_HF_VIT_BASE, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
                hf_id="google/vit-large-patch16-224", published_params="304 M"))
register(Preset("dino_vits16", dict(_HF_VIT_BASE, norm_eps=1e-6, patch_size=16, embed_dim=384, depth=12,
                                    num_heads=6), hf_id="facebook/dino-vits16", published_params="21 M"))
register(Preset("dino_vitb16", dict(_HF_VIT_BASE, norm_eps=1e-6, patch_size=16, embed_dim=768, depth=12,
                                    num_heads=12), hf_id="facebook/dino-vitb16", published_params="85 M"))
_DEIT_BASE = dict(family="deit", img_size=224, patch_size=16, norm_eps=1e-12, dist_token=True)
register(Preset("deit_tiny_patch16", dict(_DEIT_BASE, embed_dim=192, depth=12, num_heads=3),
                hf_id="facebook/deit-tiny-distilled-patch16-224", published_params="6 M"))
register(Preset("deit_small_patch16", dict(_DEIT_BASE, embed_dim=384, depth=12, num_heads=6),
                hf_id="facebook/deit-small-distilled-patch16-224", published_params="22 M"))
register(Preset("deit_base_patch16", dict(_DEIT_BASE, embed_dim=768, depth=12, num_heads=12),
                hf_id="facebook/deit-base-distilled-patch16-224", published_params="87 M"))


# ------------------------------------------------------------------- seed helpers (PeakNet EoMT API)
def _size_config(embed_dim: int, depth: int, num_heads: int, ffn_layer: str, overrides: dict) -> dict:
    cfg = dict(patch_size=14, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0,
               num_register_tokens=0, ffn_layer=ffn_layer)
    cfg.update(overrides)
    return cfg


def vit_small_config(**overrides: Any) -> dict[str, Any]:
    """DINOv2 ViT-S/14: embed_dim 384, depth 12, 6 heads (override any key)."""
    return _size_config(384, 12, 6, "mlp", overrides)


def vit_base_config(**overrides: Any) -> dict[str, Any]:
    """DINOv2 ViT-B/14: embed_dim 768, depth 12, 12 heads."""
    return _size_config(768, 12, 12, "mlp", overrides)


def vit_large_config(**overrides: Any) -> dict[str, Any]:
    """DINOv2 ViT-L/14: embed_dim 1024, depth 24, 16 heads."""
    return _size_config(1024, 24, 16, "mlp", overrides)


def vit_giant_config(**overrides: Any) -> dict[str, Any]:
    """DINOv2 ViT-g/14: embed_dim 1536, depth 40, 24 heads, fused SwiGLU FFN."""
    return _size_config(1536, 40, 24, "swiglufused", overrides)


def dinov2_name_for(embed_dim: int, depth: int, num_heads: int, patch_size: int = 14,
                    num_register_tokens: int = 0) -> str | None:
    """The DINOv2 hub name of a configuration, or None when it is not a released model."""
    if patch_size != 14 or num_register_tokens not in (0, 4):
        return None
    for a, (d, dep, h, *_rest) in _DINOV2_SIZES.items():
        if (d, dep, h) == (embed_dim, depth, num_heads):
            return f"dinov2_vit{a}14" + ("_reg" if num_register_tokens else "")
    return None

