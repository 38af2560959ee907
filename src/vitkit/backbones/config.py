"""The configuration of a vitkit VisionTransformer: one dataclass covers every family."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vitkit.errors import ConfigError
from vitkit.layers.mlp import swiglu_hidden_dim

FAMILIES = ("dinov2", "dinov3", "ijepa", "clip", "vit", "deit", "custom")


def to_2tuple(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    if len(t) != 2:
        raise ConfigError(f"expected an int or (height, width), got {v!r}")
    return t  # type: ignore[return-value]


@dataclass
class ViTConfig:
    """Everything that defines a VisionTransformer's architecture and numerics.

    Families differ only in these values (see ``vitkit.backbones.presets``).

    Token layout: ``[CLS?, distillation?, registers * R, patches]``. ``pos_embed="learned"`` covers
    the CLS/distillation tokens and the patches (registers get none, as in DINOv2).
    """

    family: str = "custom"
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_hidden_dim: int | None = None  # explicit FFN width; derived from mlp_ratio when None
    ffn_layer: str = "mlp"  # "mlp" | "swiglu"
    swiglu_align: int = 8
    act: str = "gelu"
    qkv_bias: bool = True
    mask_k_bias: bool = False
    proj_bias: bool = True
    ffn_bias: bool = True
    patch_bias: bool = True
    qk_norm: bool = False
    layer_scale_init: float | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    pre_norm: bool = False  # CLIP's ln_pre after the position embedding
    untie_cls_and_patch_norms: bool = False
    class_token: bool = True
    dist_token: bool = False
    num_register_tokens: int = 0
    mask_token: bool = False
    pos_embed: str = "learned"  # "learned" | "sincos" (fixed table) | "none"
    interpolate_offset: float = 0.0
    interpolate_antialias: bool = False
    rope: bool = False
    rope_base: float | None = 100.0
    rope_min_period: float | None = None
    rope_max_period: float | None = None
    rope_normalize_coords: str = "separate"
    rope_shift_coords: float | None = None
    rope_jitter_coords: float | None = None
    rope_rescale_coords: float | None = None
    proj_dim: int | None = None  # CLIP visual projection (no bias)
    dynamic_pad: bool = False  # zero-pad inputs bottom/right to a multiple of the patch size
    drop_path_rate: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # provenance notes (weights source, ...)

    def __post_init__(self) -> None:
        self.img_size = to_2tuple(self.img_size)
        # Meta's spellings: "swiglufused" (DINOv2 ViT-g), "swiglu64" (DINOv3 7B, align 64)
        if self.ffn_layer == "swiglufused":
            self.ffn_layer = "swiglu"
        elif self.ffn_layer.startswith("swiglu") and self.ffn_layer[6:].isdigit():
            self.ffn_layer, self.swiglu_align = "swiglu", int(self.ffn_layer[6:])
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> tuple[int, int]:
        p = self.patch_size
        return (-(-self.img_size[0] // p), -(-self.img_size[1] // p))  # ceil: padded inputs

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.dist_token) + self.num_register_tokens

    @property
    def num_pos_prefix(self) -> int:
        """Prefix tokens that carry a position embedding (CLS, distillation)."""
        return int(self.class_token) + int(self.dist_token)

    @property
    def ffn_hidden_dim(self) -> int:
        if self.mlp_hidden_dim is not None:
            return self.mlp_hidden_dim
        if self.ffn_layer == "swiglu":
            return swiglu_hidden_dim(self.embed_dim, self.mlp_ratio, self.swiglu_align)
        return int(self.embed_dim * self.mlp_ratio)

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"invalid ViT configuration: {msg}")

        if self.family not in FAMILIES:
            bad(f"family {self.family!r} is not one of {FAMILIES}")
        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if int(getattr(self, name)) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            bad(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        h, w = self.img_size
        p = self.patch_size
        if (h % p or w % p) and not self.dynamic_pad:
            bad(f"img_size {self.img_size} is not divisible by patch_size {p}; use e.g. "
                f"{(h // p * p, w // p * p)} or {(-(-h // p) * p, -(-w // p) * p)}, or set dynamic_pad=True "
                f"to zero-pad inputs bottom/right to a multiple of {p}")
        if self.ffn_layer not in ("mlp", "swiglu"):
            bad(f"ffn_layer {self.ffn_layer!r}; expected 'mlp' or 'swiglu' (Meta's 'swiglufused' is 'swiglu')")
        if self.pos_embed not in ("learned", "sincos", "none"):
            bad(f"pos_embed {self.pos_embed!r}; expected 'learned', 'sincos' or 'none'")
        if self.rope and self.head_dim % 4:
            bad(f"RoPE needs head_dim divisible by 4; embed_dim/num_heads = {self.head_dim}")
        if self.num_register_tokens < 0:
            bad(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")
        if self.untie_cls_and_patch_norms and not self.class_token:
            bad("untie_cls_and_patch_norms needs a class token")
        if not 0.0 <= self.drop_path_rate < 1.0:
            bad(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    def replace(self, **changes: Any) -> ViTConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown ViT config field(s) {sorted(unknown)}; "
                              f"known fields: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            import difflib

            hints = {u: difflib.get_close_matches(u, known, n=1) for u in sorted(unknown)}
            raise ConfigError("unknown ViT config field(s) " + ", ".join(
                f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in hints.items())
                + f"; known fields: {sorted(known)}")
        return cls(**d)
