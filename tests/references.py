"""Tiny, randomly initialised reference models (Hugging Face transformers and timm) for parity tests.

Every reference is built from a tiny config, every parameter and persistent buffer is re-randomised with a
seeded generator (so that defaults such as LayerNorm=1/0, LayerScale=1, zero register/mask tokens cannot hide
swapped norms, missing layer scales or a wrong token order), the model is put in eval() and saved to disk:

* HF models with ``save_pretrained(dir)`` -> ``config.json`` + ``model.safetensors`` (legacy/hub key names;
  transformers 5 renames modules in memory but reverses the renaming when saving).
* timm models as a raw state dict, both ``model.safetensors`` (safetensors) and ``model.pth`` (torch.save).

``reference_outputs(model, x)`` runs a reference and returns a normalised dict (see its docstring).

Token order of each reference (prefix tokens first, then patches in row-major order):

=========================  ===========================================  ==========
reference                  token order                                  num_prefix
=========================  ===========================================  ==========
HF Dinov2Model             [CLS, patches]                               1
HF Dinov2WithRegisters     [CLS, registers(R), patches]                 1 + R
HF DINOv3ViTModel          [CLS, registers(R), patches]                 1 + R
HF IJepaModel              [patches]                                    0
HF CLIPVisionModel         [CLS, patches]                               1
HF ViTModel                [CLS, patches]                               1
HF DeiTModel               [CLS, DISTILLATION, patches]                 2
timm *_dinov2              [CLS, patches]                               1
timm *_reg4_dinov2         [CLS, reg(4), patches]                       5
timm *_dinov3 (Eva)        [CLS, reg(4), patches]                       5
=========================  ===========================================  ==========

Position-embedding interpolation at a non-native size (see /work/notes/ref_facts.md for details):
HF Dinov2 / Dinov2WithRegisters interpolate always; HF ViT / DeiT / IJepa / CLIP only with
``interpolate_pos_encoding=True`` (``reference_outputs`` passes it); DINOv3 (HF and timm) use RoPE and need no
interpolation; timm ViTs interpolate per forward when built with ``dynamic_img_size=True``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import torch
from torch import nn

__all__ = [
    "HF_SPECS",
    "TIMM_SPECS",
    "RefSpec",
    "build_hf_reference",
    "build_timm_reference",
    "build_reference",
    "randomize_",
    "reference_outputs",
]

# ----------------------------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RefSpec:
    """Description of one tiny reference model."""

    name: str
    source: str  # "hf" or "timm"
    cls_name: str  # HF model class name, or timm model name
    config_cls: str | None  # HF config class name (None for timm)
    kwargs: dict  # config kwargs (HF) or create_model kwargs (timm)
    model_kwargs: dict  # extra kwargs for the HF model constructor
    patch_size: int
    native_size: int
    embed_dim: int
    depth: int
    num_heads: int
    num_prefix: int
    prefix_kinds: tuple  # kind of each prefix token, in the reference's order
    vitkit_preset: str | None  # create_backbone preset name matching a timm state dict (timm refs)
    interpolate_flag: bool = False  # HF forward needs interpolate_pos_encoding=True at non-native sizes
    is_clip: bool = False
    supports_in_chans_1: bool = True


def _dinov2_cfg(**over):
    cfg = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=56,
        patch_size=14,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg.update(over)
    return cfg


def _dinov3_cfg(**over):
    cfg = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=256,
        patch_size=16,
        image_size=64,
        num_channels=3,
        num_register_tokens=4,
        layer_norm_eps=1e-5,
        rope_theta=100.0,
        query_bias=True,
        key_bias=False,
        value_bias=True,
        proj_bias=True,
        mlp_bias=True,
        layerscale_value=1.0,
        use_gated_mlp=False,
        hidden_act="gelu",
        pos_embed_rescale=2.0,
        drop_path_rate=0.0,
    )
    cfg.update(over)
    return cfg


def _vit_cfg(**over):
    cfg = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_act="gelu",
        image_size=32,
        patch_size=8,
        num_channels=3,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # layer_norm_eps left at the class default (1e-12 for ViT/DeiT) on purpose
    cfg.update(over)
    return cfg


def _clip_cfg(**over):
    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=16,
    )
    cfg.update(over)
    return cfg


HF_SPECS: dict[str, RefSpec] = {
    s.name: s
    for s in [
        RefSpec("hf_dinov2", "hf", "Dinov2Model", "Dinov2Config",
                _dinov2_cfg(use_swiglu_ffn=False, use_mask_token=True),
                {}, 14, 56, 32, 2, 4, 1, ("cls",), None),
        RefSpec("hf_dinov2_swiglu", "hf", "Dinov2Model", "Dinov2Config",
                _dinov2_cfg(use_swiglu_ffn=True, use_mask_token=True), {}, 14, 56, 32, 2, 4, 1, ("cls",), None),
        RefSpec("hf_dinov2_reg", "hf", "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                _dinov2_cfg(num_register_tokens=4), {}, 14, 56, 32, 2, 4, 5, ("cls",) + ("reg",) * 4, None),
        RefSpec("hf_dinov3", "hf", "DINOv3ViTModel", "DINOv3ViTConfig", _dinov3_cfg(), {}, 16, 64, 64, 2, 4, 5,
                ("cls",) + ("reg",) * 4, None),
        RefSpec("hf_dinov3_gated", "hf", "DINOv3ViTModel", "DINOv3ViTConfig",
                _dinov3_cfg(use_gated_mlp=True, hidden_act="silu", intermediate_size=256), {}, 16, 64, 64, 2, 4, 5,
                ("cls",) + ("reg",) * 4, None),
        RefSpec("hf_ijepa", "hf", "IJepaModel", "IJepaConfig", _vit_cfg(layer_norm_eps=1e-6),
                {"add_pooling_layer": False}, 8, 32, 32, 2, 4, 0, (), None, interpolate_flag=True),
        RefSpec("hf_clip", "hf", "CLIPVisionModel", "CLIPVisionConfig", _clip_cfg(), {}, 8, 32, 32, 2, 4, 1,
                ("cls",), None, interpolate_flag=True, is_clip=True),
        RefSpec("hf_clip_proj", "hf", "CLIPVisionModelWithProjection", "CLIPVisionConfig", _clip_cfg(), {}, 8, 32, 32,
                2, 4, 1, ("cls",), None, interpolate_flag=True, is_clip=True),
        RefSpec("hf_vit", "hf", "ViTModel", "ViTConfig", _vit_cfg(), {}, 8, 32, 32, 2, 4, 1, ("cls",), None,
                interpolate_flag=True),
        RefSpec("hf_deit", "hf", "DeiTModel", "DeiTConfig", _vit_cfg(), {}, 8, 32, 32, 2, 4, 2, ("cls", "dist"), None,
                interpolate_flag=True),
    ]
}


def _timm_kw(img_size, embed_dim):
    return dict(img_size=img_size, embed_dim=embed_dim, depth=2, num_heads=4, dynamic_img_size=True, num_classes=0)


TIMM_SPECS: dict[str, RefSpec] = {
    s.name: s
    for s in [
        RefSpec("timm_dinov2", "timm", "vit_small_patch14_dinov2", None, _timm_kw(56, 32), {}, 14, 56, 32, 2, 4, 1,
                ("cls",), "dinov2_vits14"),
        RefSpec("timm_dinov2_reg", "timm", "vit_small_patch14_reg4_dinov2", None, _timm_kw(56, 32), {}, 14, 56, 32,
                2, 4, 5, ("cls",) + ("reg",) * 4, "dinov2_vits14_reg"),
        RefSpec("timm_dinov3", "timm", "vit_small_patch16_dinov3", None, _timm_kw(64, 64), {}, 16, 64, 64, 2, 4, 5,
                ("cls",) + ("reg",) * 4, "dinov3_vits16"),
        RefSpec("timm_dinov3_qkvb", "timm", "vit_small_patch16_dinov3_qkvb", None, _timm_kw(64, 64), {}, 16, 64, 64,
                2, 4, 5, ("cls",) + ("reg",) * 4, "dinov3_vits16"),
        RefSpec("timm_dinov3_plus", "timm", "vit_small_plus_patch16_dinov3", None, _timm_kw(64, 64), {}, 16, 64, 64,
                2, 4, 5, ("cls",) + ("reg",) * 4, "dinov3_vits16plus"),
    ]
}

ALL_SPECS: dict[str, RefSpec] = {**HF_SPECS, **TIMM_SPECS}

# ----------------------------------------------------------------------------------------------------------------
# Randomisation
# ----------------------------------------------------------------------------------------------------------------

_TOKEN_NAMES = (
    "cls_token",
    "reg_token",
    "register_tokens",
    "storage_tokens",
    "mask_token",
    "distillation_token",
    "dist_token",
    "class_embedding",
    "position_embedding",  # CLIP nn.Embedding -> "position_embedding.weight"
    "position_embeddings",
    "pos_embed",
)
_LAYERSCALE_NAMES = ("lambda1", "gamma", "gamma_1", "gamma_2")


def _kind(name: str, layernorm_weights: set[str]) -> str:
    leaf = name.rsplit(".", 1)[-1]
    parts = name.split(".")
    if any(p in _TOKEN_NAMES for p in parts):
        return "token"
    if leaf in _LAYERSCALE_NAMES:
        return "layerscale"
    if name in layernorm_weights:
        return "norm_weight"
    return "weight"  # linear / conv weights and every bias (incl. timm q_bias / v_bias)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-randomise every parameter and persistent floating buffer of ``model`` in place (deterministic).

    normal(0, 0.02) for weights and biases, uniform(0.5, 1.5) for LayerNorm weights and layer scales,
    normal(0, 0.5) for cls / register / mask / distillation tokens and position embeddings.
    """
    gen = torch.Generator().manual_seed(seed)
    norm_types = (nn.LayerNorm, nn.GroupNorm)
    if hasattr(nn, "RMSNorm"):
        norm_types = norm_types + (nn.RMSNorm,)
    ln_weights = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, norm_types)}
    state = model.state_dict(keep_vars=True)  # parameters + persistent buffers only
    seen = set()
    for name in sorted(state):
        t = state[name]
        if not torch.is_floating_point(t) or id(t) in seen:
            continue
        seen.add(id(t))
        kind = _kind(name, ln_weights)
        if kind == "token":
            new = torch.randn(t.shape, generator=gen) * 0.5
        elif kind in ("layerscale", "norm_weight"):
            new = torch.rand(t.shape, generator=gen) + 0.5
        else:
            new = torch.randn(t.shape, generator=gen) * 0.02
        t.data.copy_(new.to(t.dtype))
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------


def _outdir(out_dir: str | None, name: str) -> str:
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix=f"vitkit_ref_{name}_")
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def build_hf_reference(
    name: str,
    *,
    num_channels: int = 3,
    seed: int = 0,
    out_dir: str | None = None,
    attn_implementation: str = "sdpa",
    save: bool = True,
):
    """Build, randomise and save one HF reference. Returns ``(model, directory)``.

    ``attn_implementation``: "sdpa" (HF default, and what vitkit is expected to use) or "eager"; both are within
    ~1e-7 of each other for these tiny fp32 models.
    """
    transformers = __import__("transformers")
    spec = HF_SPECS[name]
    cfg_cls = getattr(transformers, spec.config_cls)
    model_cls = getattr(transformers, spec.cls_name)
    cfg = cfg_cls(**{**spec.kwargs, "num_channels": num_channels})
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(cfg, **spec.model_kwargs)
    model.set_attn_implementation(attn_implementation) if hasattr(model, "set_attn_implementation") else None
    randomize_(model, seed)
    path = None
    if save:
        path = _outdir(out_dir, name)
        model.save_pretrained(path)
    return model, path


def build_timm_reference(
    name: str,
    *,
    in_chans: int = 3,
    seed: int = 0,
    out_dir: str | None = None,
    save: bool = True,
):
    """Build, randomise and save one timm reference.

    Returns ``(model, paths)`` with ``paths = {"safetensors": .../model.safetensors, "pth": .../model.pth}``.
    """
    timm = __import__("timm")
    spec = TIMM_SPECS[name]
    torch.manual_seed(seed)
    model = timm.create_model(spec.cls_name, pretrained=False, in_chans=in_chans, **spec.kwargs)
    randomize_(model, seed)
    paths = None
    if save:
        from safetensors.torch import save_file

        d = _outdir(out_dir, name)
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        paths = {"safetensors": os.path.join(d, "model.safetensors"), "pth": os.path.join(d, "model.pth")}
        save_file(sd, paths["safetensors"])
        torch.save(sd, paths["pth"])
    return model, paths


def build_reference(name: str, *, in_chans: int = 3, seed: int = 0, out_dir: str | None = None):
    """Dispatch to the HF / timm builder by spec name. Returns ``(model, path_or_paths)``."""
    if name in HF_SPECS:
        return build_hf_reference(name, num_channels=in_chans, seed=seed, out_dir=out_dir)
    return build_timm_reference(name, in_chans=in_chans, seed=seed, out_dir=out_dir)


# ----------------------------------------------------------------------------------------------------------------
# Normalised outputs
# ----------------------------------------------------------------------------------------------------------------


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


@torch.no_grad()
def reference_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Run a reference model and return a normalised dict.

    Keys:
      ``final_norm``  [B,N,D] all tokens after the final norm (None for CLIP, whose last_hidden_state is not normed),
      ``pooler``      [B,D] CLIP only: HF ``pooler_output`` = post_layernorm(CLS) (None otherwise),
      ``image_embeds`` [B,P] CLIPVisionModelWithProjection only,
      ``prenorm``     [B,N,D] un-normed output of the last block, all tokens,
      ``layers``      list of [B,N,D] un-normed block outputs (index 0 = first block), all tokens,
      ``num_prefix``  number of non-patch tokens, in the reference's order (see module docstring),
      ``prefix_kinds`` tuple naming each prefix token ("cls", "dist", "reg").
    """
    model.eval()
    if _is_timm(model):
        return _timm_outputs(model, x)
    return _hf_outputs(model, x)


def _hf_outputs(model, x):
    name = type(model).__name__
    kwargs = {"output_hidden_states": True}
    if name in ("ViTModel", "DeiTModel", "IJepaModel", "CLIPVisionModel", "CLIPVisionModelWithProjection"):
        kwargs["interpolate_pos_encoding"] = True
    out = model(pixel_values=x, **kwargs)
    hs = out.hidden_states
    layers = list(hs[1:])  # hs[0] is the embedding output (after pre_layrnorm for CLIP)
    cfg = model.config
    res: dict[str, Any] = {"layers": layers, "prenorm": layers[-1], "pooler": None, "image_embeds": None}
    if name.startswith("CLIPVision"):
        res["final_norm"] = None
        if name == "CLIPVisionModelWithProjection":
            res["image_embeds"] = out.image_embeds
            res["pooler"] = model.vision_model.post_layernorm(out.last_hidden_state[:, 0])
        else:
            res["pooler"] = out.pooler_output
        prefix = ("cls",)
    else:
        res["final_norm"] = out.last_hidden_state
        if name == "IJepaModel":
            prefix = ()
        elif name == "DeiTModel":
            prefix = ("cls", "dist")
        else:
            prefix = ("cls",) + ("reg",) * int(getattr(cfg, "num_register_tokens", 0) or 0)
    res["num_prefix"] = len(prefix)
    res["prefix_kinds"] = prefix
    return res


def _timm_outputs(model, x):
    captured: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, i, o: captured.append(o)) for blk in model.blocks]
    try:
        final = model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    npt = int(model.num_prefix_tokens)
    reg = getattr(model, "reg_token", None)
    n_reg = 0 if reg is None else int(reg.shape[1])
    prefix = ("cls",) * (1 if getattr(model, "cls_token", None) is not None else 0) + ("reg",) * n_reg
    assert len(prefix) == npt, (prefix, npt)
    return {
        "final_norm": final,
        "pooler": None,
        "image_embeds": None,
        "prenorm": captured[-1],
        "layers": captured,
        "num_prefix": npt,
        "prefix_kinds": prefix,
    }
