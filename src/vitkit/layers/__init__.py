"""Model-agnostic building blocks shared by every vitkit model."""

from vitkit.layers.activation import get_act_layer
from vitkit.layers.attention import Attention
from vitkit.layers.block import Block
from vitkit.layers.drop_path import DropPath
from vitkit.layers.layer_scale import LayerScale
from vitkit.layers.mlp import Mlp, SwiGLU
from vitkit.layers.norm import LayerNorm2d, make_norm
from vitkit.layers.patch_embed import PatchEmbed, fold_in_chans, resample_patch_embed
from vitkit.layers.pos_embed import resample_pos_embed, sincos_2d_pos_embed
from vitkit.layers.rope import RopeEmbedding, apply_rope

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerNorm2d",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "RopeEmbedding",
    "SwiGLU",
    "apply_rope",
    "fold_in_chans",
    "get_act_layer",
    "make_norm",
    "resample_patch_embed",
    "resample_pos_embed",
    "sincos_2d_pos_embed",
]
