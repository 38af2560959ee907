"""Checkpoint formats as data: key renames, q/k/v fusions, intentional drops and shape rules.

Each :class:`Format` turns a source state dict into vitkit's layout (which is Meta's DINOv2 layout).
``convert`` is a pure ``state_dict -> state_dict`` function; what is dropped is listed in the format
with the reason, never discovered at load time. ``detect_format`` picks the format from signature keys.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vitkit.errors import CheckpointError

Tensor = torch.Tensor


def _as_token(t: Tensor) -> Tensor:  # [D] or [1, D] -> [1, 1, D]
    return t.reshape(1, 1, -1)


def _as_pos(t: Tensor) -> Tensor:  # [N, D] -> [1, N, D]
    return t.reshape(1, *t.shape[-2:])


def _as_row(t: Tensor) -> Tensor:  # [1, 1, D] -> [1, D]
    return t.reshape(1, -1)


def _transpose(t: Tensor) -> Tensor:
    return t.t().contiguous()


@dataclass(frozen=True)
class Fuse:
    """Concatenate source keys along dim 0 into one target key.

    ``pattern`` matches a source key and has groups ``i`` (block index), ``part`` and ``kind``
    (weight/bias). Parts are joined in ``parts`` order into ``target.format(i=..., kind=...)``.
    A part missing from the checkpoint (HF DINOv3 has no key bias) is zero-filled when listed
    in ``zero_fill``; if another part is missing the keys are left as they are.
    """

    pattern: str
    parts: tuple[str, ...]
    target: str
    zero_fill: tuple[str, ...] = ()


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    family: str | None  # family the checkpoint belongs to, when the format implies it
    signature: tuple[str, ...]  # regexes that must all match some key
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement), first match wins; unmatched keys kept
    fuses: tuple[Fuse, ...] = ()
    drops: tuple[tuple[str, str], ...] = ()  # (regex, reason): keys vitkit does not use, by design
    shapes: tuple[tuple[str, Callable[[Tensor], Tensor]], ...] = ()  # (target regex, fix) after renaming
    strip_prefixes: tuple[str, ...] = ()  # optional wrappers, removed when every key has them
    optional_missing: tuple[tuple[str, str], ...] = ()  # (vitkit key regex, reason) allowed to be absent
    zero_missing: tuple[tuple[str, str], ...] = ()  # (vitkit key regex, reason) absent and exactly zero
    patch_tokens_only_pos: bool = False  # pos table has no CLS slot although the model has a CLS token
    config: dict = field(default_factory=dict)  # numerics of the weights' source, recorded in the model config


_BLK = r"blocks\.(\d+)\."
_HF_LAYER = r"encoder\.layer\.(?P<i>\d+)\."

_HF_VIT_BLOCK_RENAMES = (
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^layernorm\.", "norm."),
)
_HF_QKV = Fuse(_HF_LAYER + r"attention\.attention\.(?P<part>query|key|value)\.(?P<kind>weight|bias)$",
               ("query", "key", "value"), "blocks.{i}.attn.qkv.{kind}")
_HF_HEAD_DROPS = (
    (r"^pooler\.", "HF pooler (dense+tanh) is not part of the pretrained backbone"),
    (r"^classifier\.|^distillation_classifier\.|^cls_classifier\.", "classification head"),
)

FORMATS: dict[str, Format] = {}


def _register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


_register(Format(
    name="vitkit",
    description="vitkit / Meta DINOv2 layout (identity)",
    family=None,
    signature=(r"^patch_embed\.proj\.weight$", r"^blocks\.0\.attn\.qkv\.weight$", r"^norm\.weight$"),
    strip_prefixes=("module.", "backbone."),
))

_register(Format(
    name="meta_dinov2",
    description="Meta DINOv2 hub checkpoint (dinov2_*_pretrain.pth)",
    family="dinov2",
    # block_chunks>0 training checkpoints nest blocks as blocks.{chunk}.{i}
    signature=(r"^mask_token$", r"^pos_embed$", r"^blocks\.0\.(0\.)?attn\.qkv\.weight$",
               r"^blocks\.0\.(0\.)?ls1\.gamma$"),
    renames=((r"^blocks\.(\d+)\.(\d+)\.", r"blocks.\2."),),  # block_chunks>0 training checkpoints
    strip_prefixes=("module.", "backbone.", "teacher.backbone.", "student.backbone."),
    # Meta's hub: no registers -> scale_factor with the 0.1 offset, no antialias
    config=dict(interpolate_offset=0.1, interpolate_antialias=False),
))

_register(Format(
    name="meta_dinov3",
    description="Meta DINOv3 hub checkpoint (dinov3_*_pretrain_*.pth)",
    family="dinov3",
    signature=(r"^storage_tokens$|^rope_embed\.periods$", r"^blocks\.0\.attn\.qkv\.weight$"),
    renames=((r"^storage_tokens$", "register_tokens"),),
    fuses=(Fuse(_BLK.replace("(\\d+)", "(?P<i>\\d+)") + r"mlp\.(?P<part>w1|w2)\.(?P<kind>weight|bias)$",
                ("w1", "w2"), "blocks.{i}.mlp.w12.{kind}"),),
    drops=((r"\.bias_mask$", "qkv key-bias mask is rebuilt from the config (mask_k_bias)"),
           (r"^local_cls_norm\.", "DINOv3 training-only norm for local crops")),
    shapes=((r"^mask_token$", _as_row),),
    strip_prefixes=("module.", "backbone.", "teacher.backbone.", "student.backbone."),
))

_register(dataclasses.replace(
    FORMATS["meta_dinov2"], name="meta_dinov2_reg", description="Meta DINOv2 hub checkpoint with registers",
    signature=FORMATS["meta_dinov2"].signature + (r"^register_tokens$",),
    config=dict(interpolate_offset=0.0, interpolate_antialias=True)))

_register(Format(
    name="timm_dinov2",
    description="timm vit_*_patch14_dinov2 / vit_*_patch14_reg4_dinov2 state dict",
    family="dinov2",
    signature=(r"^pos_embed$", r"^blocks\.0\.ls1\.gamma$", r"^blocks\.0\.attn\.qkv\.weight$"),
    renames=((r"^reg_token$", "register_tokens"),),
    optional_missing=((r"^mask_token$", "timm drops the mask token (only used for masked-image training)"),),
    drops=((r"^head\.", "classification head"),),
    patch_tokens_only_pos=True,  # only reg4 models: their CLS position is folded into cls_token
    # timm resamples position embeddings with size= and antialias for every DINOv2 model
    config=dict(interpolate_offset=0.0, interpolate_antialias=True),
))

_register(Format(
    name="timm_dinov3",
    description="timm vit_*_patch16_dinov3 (Eva) state dict",
    family="dinov3",
    signature=(r"^reg_token$", r"^blocks\.0\.gamma_1$"),
    renames=((r"^reg_token$", "register_tokens"),
             (_BLK + r"gamma_1$", r"blocks.\1.ls1.gamma"),
             (_BLK + r"gamma_2$", r"blocks.\1.ls2.gamma")),
    fuses=(Fuse(r"blocks\.(?P<i>\d+)\.attn\.(?P<part>q|k|v)_(?P<kind>bias)$", ("q", "k", "v"),
                "blocks.{i}.attn.qkv.{kind}", zero_fill=("k",)),
           Fuse(r"blocks\.(?P<i>\d+)\.mlp\.(?P<part>fc1_g|fc1_x)\.(?P<kind>weight|bias)$", ("fc1_g", "fc1_x"),
                "blocks.{i}.mlp.w12.{kind}")),
    optional_missing=((r"^mask_token$", "timm drops the mask token (only used for masked-image training)"),),
    # timm builds DINOv3 S/B/L/H+ without q/v bias because Meta's distilled checkpoints have all-zero biases
    zero_missing=((r"^blocks\.\d+\.attn\.qkv\.bias$", "timm stores no qkv bias (Meta's is all zero)"),),
    drops=((r"^head\.", "classification head"),),
))

_register(Format(
    name="hf_dinov2",
    description="Hugging Face Dinov2Model / Dinov2WithRegistersModel",
    family="dinov2",
    signature=(r"^embeddings\.mask_token$", r"layer_scale1\.lambda1$"),
    renames=((r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
             (r"encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
             (r"encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
             (r"encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
             (r"encoder\.layer\.(\d+)\.", r"blocks.\1."),
             (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
             (r"^embeddings\.(cls_token|mask_token|register_tokens)$", r"\1"),
             (r"^embeddings\.position_embeddings$", "pos_embed"),
             (r"^layernorm\.", "norm.")),
    fuses=(_HF_QKV,),
    drops=_HF_HEAD_DROPS,
    shapes=((r"^mask_token$", _as_row),),
    strip_prefixes=("dinov2.", "dinov2_with_registers."),
    # transformers resizes with size= and no +0.1 offset (PR #33226), unlike Meta's original
    config=dict(interpolate_offset=0.0, interpolate_antialias=False),
))

_register(dataclasses.replace(
    FORMATS["hf_dinov2"], name="hf_dinov2_reg", description="Hugging Face Dinov2WithRegistersModel",
    signature=FORMATS["hf_dinov2"].signature + (r"^embeddings\.register_tokens$",),
    config=dict(interpolate_offset=0.0, interpolate_antialias=True)))

def _hf_dinov3_tables(layer: str) -> dict:
    """Renames and fusions of HF's DINOv3 layers (``layer.N`` in DINOv3ViTModel, ``layers.N`` in EoMT)."""
    L = re.escape(layer)
    return dict(
        renames=((rf"^{L}\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
                 (rf"^{L}\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
                 (rf"^{L}\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.fc1."),  # plain MLP (w12/w3 if gated)
                 (rf"^{L}\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),
                 (rf"^{L}\.(\d+)\.", r"blocks.\1."),
                 (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
                 (r"^embeddings\.(cls_token|mask_token|register_tokens)$", r"\1"),
                 (r"^layernorm\.", "norm.")),
        fuses=(Fuse(rf"^{L}\.(?P<i>\d+)\.attention\.(?P<part>q|k|v)_proj\.(?P<kind>weight|bias)$", ("q", "k", "v"),
                    "blocks.{i}.attn.qkv.{kind}", zero_fill=("k",)),  # HF keeps no key bias
               # gated MLP: gate_proj (silu) and up_proj -> w12
               Fuse(rf"^{L}\.(?P<i>\d+)\.mlp\.(?P<part>gate_proj|up_proj)\.(?P<kind>weight|bias)$",
                    ("gate_proj", "up_proj"), "blocks.{i}.mlp.w12.{kind}")),
        shapes=((r"^mask_token$", _as_row),),
    )


_register(Format(
    name="hf_dinov3",
    description="Hugging Face DINOv3ViTModel",
    family="dinov3",
    signature=(r"^embeddings\.patch_embeddings\.weight$", r"^layer\.0\.attention\.q_proj\.weight$"),
    drops=((r"^pooler\.|^classifier\.", "classification head"),),
    strip_prefixes=("dinov3.", "model."),
    **_hf_dinov3_tables("layer"),
))

_register(Format(
    name="hf_vit",
    description="Hugging Face ViTModel / DeiTModel / IJepaModel",
    family=None,
    signature=(r"^embeddings\.patch_embeddings\.projection\.weight$", r"layernorm_before\.weight$"),
    renames=_HF_VIT_BLOCK_RENAMES + ((r"^embeddings\.distillation_token$", "dist_token"),),
    fuses=(_HF_QKV,),
    drops=_HF_HEAD_DROPS,
    strip_prefixes=("vit.", "deit.", "ijepa."),
    config=dict(interpolate_offset=0.0, interpolate_antialias=False),
))

_register(Format(
    name="hf_clip",
    description="Hugging Face CLIPVisionModel(WithProjection) / CLIPModel (vision tower)",
    family="clip",
    signature=(r"^embeddings\.class_embedding$", r"^pre_layrnorm\.weight$"),
    renames=((r"^encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
             (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
             (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
             (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
             (r"^embeddings\.class_embedding$", "cls_token"),
             (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
             (r"^pre_layrnorm\.", "norm_pre."),
             (r"^post_layernorm\.", "norm."),
             (r"^visual_projection\.weight$", "proj.weight")),
    fuses=(Fuse(r"^encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<part>q|k|v)_proj\.(?P<kind>weight|bias)$",
                ("q", "k", "v"), "blocks.{i}.attn.qkv.{kind}"),),
    drops=((r"^text_model\.|^text_projection\.|^logit_scale$", "CLIP text tower"),
           (r"^embeddings\.position_ids$", "index buffer")),
    shapes=((r"^cls_token$", _as_token), (r"^pos_embed$", _as_pos)),
    strip_prefixes=("vision_model.",),
    config=dict(interpolate_offset=0.0, interpolate_antialias=False),
))

_register(Format(
    name="openai_clip",
    description="OpenAI CLIP checkpoint (visual.* keys)",
    family="clip",
    signature=(r"^visual\.conv1\.weight$",),
    renames=((r"^visual\.conv1\.", "patch_embed.proj."),
             (r"^visual\.class_embedding$", "cls_token"),
             (r"^visual\.positional_embedding$", "pos_embed"),
             (r"^visual\.ln_pre\.", "norm_pre."),
             (r"^visual\.ln_post\.", "norm."),
             (r"^visual\.proj$", "proj.weight"),
             (r"^visual\.transformer\.resblocks\.(\d+)\.ln_(\d)\.", r"blocks.\1.norm\2."),
             (r"^visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
             (r"^visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
             (r"^visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
             (r"^visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2.")),
    drops=((r"^(?!visual\.)", "CLIP text tower"),),
    shapes=((r"^cls_token$", _as_token), (r"^pos_embed$", _as_pos), (r"^proj\.weight$", _transpose)),
    config=dict(interpolate_offset=0.0, interpolate_antialias=False),
))

_register(Format(
    name="meta_ijepa",
    description="Meta I-JEPA checkpoint (encoder / target_encoder with module. prefix)",
    family="ijepa",
    signature=(r"^pos_embed$", r"^blocks\.0\.attn\.qkv\.weight$", r"^blocks\.0\.mlp\.fc1\.weight$"),
    strip_prefixes=("module.",),
    config=dict(interpolate_offset=0.0, interpolate_antialias=False),
))

# HF EomtForUniversalSegmentation backbone (DINOv2-style, timm-like pos table without a CLS slot)
_register(Format(
    name="hf_eomt",
    description="Hugging Face EomtForUniversalSegmentation backbone",
    family=None,
    signature=(r"^embeddings\.position_embeddings\.weight$", r"^layers\.0\.attention\.q_proj\.weight$"),
    renames=((r"^layers\.(\d+)\.attention\.out_proj\.", r"blocks.\1.attn.proj."),
             (r"^layers\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
             (r"^layers\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
             (r"^layers\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
             (r"^layers\.(\d+)\.", r"blocks.\1."),
             (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
             (r"^embeddings\.(cls_token|register_tokens)$", r"\1"),
             (r"^embeddings\.position_embeddings\.weight$", "pos_embed"),
             (r"^layernorm\.", "norm.")),
    fuses=(Fuse(r"^layers\.(?P<i>\d+)\.attention\.(?P<part>q|k|v)_proj\.(?P<kind>weight|bias)$", ("q", "k", "v"),
                "blocks.{i}.attn.qkv.{kind}"),),
    shapes=((r"^pos_embed$", _as_pos),),
    patch_tokens_only_pos=True,
    config=dict(interpolate_offset=0.0, interpolate_antialias=True),
))

_register(Format(
    name="hf_eomt_dinov3",
    description="Hugging Face EomtDinov3ForUniversalSegmentation backbone",
    family="dinov3",
    signature=(r"^layers\.0\.attention\.o_proj\.weight$",),
    optional_missing=((r"^mask_token$", "EoMT does not use the mask token"),),
    **_hf_dinov3_tables("layers"),
))


# Order matters: more specific signatures first.
DETECTION_ORDER = ("hf_dinov3", "hf_dinov2_reg", "hf_dinov2", "hf_clip", "hf_vit", "openai_clip", "meta_dinov3",
                   "timm_dinov3", "meta_dinov2_reg", "meta_dinov2", "timm_dinov2")


def strip_common_prefix(sd: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    for p in prefixes:
        keys = [k for k in sd if k.startswith(p)]
        if keys and len(keys) == len(sd):
            return {k[len(p):]: v for k, v in sd.items()}
        if keys and p in ("vision_model.",):  # CLIPModel: keep the vision tower + projection
            out = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
            out.update({k: v for k, v in sd.items() if not k.startswith(p)})
            return out
    return sd


def detect_format(sd: dict[str, Tensor]) -> Format:
    """Pick the checkpoint format from signature keys (after stripping wrapper prefixes)."""
    for name in DETECTION_ORDER:
        fmt = FORMATS[name]
        keys = list(strip_common_prefix(sd, fmt.strip_prefixes))
        if all(any(re.search(sig, k) for k in keys) for sig in fmt.signature):
            return fmt
    keys = list(strip_common_prefix(sd, ("module.",)))
    if any(k == "pos_embed" for k in keys) and not any(k == "cls_token" for k in keys) \
            and any(re.match(r"blocks\.0\.attn\.qkv\.weight$", k) for k in keys):
        return FORMATS["meta_ijepa"]
    if all(any(re.search(s, k) for k in keys) for s in FORMATS["vitkit"].signature):
        return FORMATS["vitkit"]
    sample = ", ".join(sorted(sd)[:8])
    raise CheckpointError(
        f"unrecognised checkpoint format ({len(sd)} keys, e.g. {sample}). Supported: "
        + ", ".join(f"{f.name} ({f.description})" for f in FORMATS.values())
        + ". If this is a training checkpoint, extract the backbone state dict first.")


def convert(sd: dict[str, Tensor], fmt: Format) -> tuple[dict[str, Tensor], list[tuple[str, str]]]:
    """Convert a state dict into vitkit's layout.

    Returns the converted dict and the list of ``(source key, reason)`` dropped on purpose.
    """
    sd = strip_common_prefix(dict(sd), fmt.strip_prefixes)
    dropped: list[tuple[str, str]] = []
    kept: dict[str, Tensor] = {}
    for k, v in sd.items():
        reason = next((r for pat, r in fmt.drops if re.search(pat, k)), None)
        if reason is not None:
            dropped.append((k, reason))
        else:
            kept[k] = v
    # fusions: group parts per target
    for fuse in fmt.fuses:
        groups: dict[str, dict[str, Tensor]] = {}
        for k in list(kept):
            m = re.search(fuse.pattern, k)
            if m:
                target = fuse.target.format(i=m.group("i"), kind=m.group("kind"))
                groups.setdefault(target, {})[m.group("part")] = (k, kept.pop(k))
        for target, parts in groups.items():
            missing = [p for p in fuse.parts if p not in parts]
            if any(p not in fuse.zero_fill for p in missing):
                # not this layout (e.g. HF DINOv3 up_proj without gate_proj is a plain MLP): leave the keys
                # to the renames; a truly incomplete checkpoint then fails the strict check by name
                kept.update(dict(parts.values()))
                continue
            ref = next(iter(parts.values()))[1]
            kept[target] = torch.cat([parts[p][1] if p in parts else torch.zeros_like(ref) for p in fuse.parts])
    out: dict[str, Tensor] = {}
    for k, v in kept.items():
        new = k
        for pat, rep in fmt.renames:
            if re.search(pat, k):
                new = re.sub(pat, rep, k)
                break
        for pat, fix in fmt.shapes:
            if re.search(pat, new):
                v = fix(v)
        if new in out:
            raise CheckpointError(f"two checkpoint keys map to {new!r} in format {fmt.name}")
        out[new] = v
    return out, dropped
