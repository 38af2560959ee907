"""Parameter counts of vitkit's I-JEPA, CLIP, ViT and DeiT presets, against the reference implementations built
the same way and against the numbers their authors published.

Every model is built on the ``meta`` device (shapes only: no memory, no weights, no download). What is counted is
``sum(p.numel() for p in model.parameters())``: parameters only, no buffers (transformers' CLIP ``position_ids``
is a buffer and not counted; I-JEPA's fixed sin-cos table is a parameter in Meta's code, in timm and in vitkit, so
it is counted on every side).

Two kinds of comparison, with two tolerances:

* **vitkit vs a reference implementation** (timm, transformers) with the same configuration: **exact** equality.
  Counts are integers and the architectures are meant to be the same, so any difference is a missing or extra
  tensor (a bias, a token, a position slot, a norm).
* **vitkit vs a published number**: equal **after rounding to the precision the number was published with**
  (torchvision's weight tables give exact integers, timm's model cards 0.1 M, OpenCLIP's profile 0.01 M, the
  papers 1 M). Published counts are of classifiers: the test says for each whether it adds the ImageNet-1k head
  (``D * 1000 + 1000``) to vitkit's backbone, or compares the backbone alone.
"""

from __future__ import annotations

import pytest
import torch

import vitkit

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

IN1K = 1000  # classes of the published classifiers


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def vitkit_count(name: str, **overrides) -> int:
    """Parameters of a vitkit preset, built on the meta device exactly as ``create_backbone`` builds it."""
    cfg = dict(vitkit.get_preset(name).config, **overrides)
    model = vitkit.VisionTransformer(vitkit.ViTConfig.from_dict(cfg), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    return n_params(model)


def timm_count(name: str, **kwargs) -> int:
    with torch.device("meta"):
        return n_params(timm.create_model(name, pretrained=False, **kwargs))


def hf_count(model_cls: str, config_cls: str, model_kwargs: dict | None = None, **config) -> int:
    cfg = getattr(transformers, config_cls)(**config)
    with torch.device("meta"):
        return n_params(getattr(transformers, model_cls)(cfg, **(model_kwargs or {})))


def head(dim: int, classes: int = IN1K) -> int:
    """A linear classifier with bias: what published classifier counts add to the backbone."""
    return dim * classes + classes


def hf_vit_config(dim: int, depth: int, heads: int, patch: int = 16, image: int = 224) -> dict:
    return dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim,
                patch_size=patch, image_size=image)


# ------------------------------------------------------------------------------------ ViT (Google)
# Published: torchvision's weight tables (exact integers, ViT_B_16 / ViT_L_16 IMAGENET1K_V1 "num_params") and timm's
# model cards ("86.6" / "304.3"), both with the 1000-class head. (The ViT paper's Table 1 rounds loosely: ViT-Base
# "86M" is the encoder's 85.8M, ViT-Large "307M" matches neither 303.3M nor 304.3M, so it is not used.)
VIT = {  # preset: (timm name, dim, depth, heads, published with head)
    "vit_base_patch16": ("vit_base_patch16_224", 768, 12, 12, 86_567_656),
    "vit_large_patch16": ("vit_large_patch16_224", 1024, 24, 16, 304_326_632),
}


@pytest.mark.parametrize("preset", sorted(VIT))
def test_vit_backbone_equals_timm_and_transformers(preset):
    timm_name, d, depth, h, _ = VIT[preset]
    n = vitkit_count(preset)
    assert n == timm_count(timm_name, num_classes=0)  # timm without its head
    assert n == hf_count("ViTModel", "ViTConfig", {"add_pooling_layer": False}, **hf_vit_config(d, depth, h))


@pytest.mark.parametrize("preset", sorted(VIT))
def test_vit_with_imagenet_head_is_the_published_count(preset):
    timm_name, d, _, _, published = VIT[preset]
    n = vitkit_count(preset) + head(d)
    assert n == published  # torchvision's exact count
    assert n == timm_count(timm_name, num_classes=IN1K)
    assert round(n / 1e6, 1) == {"vit_base_patch16": 86.6, "vit_large_patch16": 304.3}[preset]  # timm's cards


def test_published_constants_match_torchvision_tables():
    """The exact constants above are torchvision's published ones (read from its weight metadata, no download)."""
    tv = pytest.importorskip("torchvision.models")
    assert tv.ViT_B_16_Weights.IMAGENET1K_V1.meta["num_params"] == VIT["vit_base_patch16"][4]
    assert tv.ViT_L_16_Weights.IMAGENET1K_V1.meta["num_params"] == VIT["vit_large_patch16"][4]
    assert tv.ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1.meta["num_params"] == IJEPA_H14_PUBLISHED_WITH_HEAD


# ------------------------------------------------------------------------------------------- DeiT
# vitkit's DeiT presets are the distilled checkpoints (facebook/deit-*-distilled-patch16-224): a distillation token
# with its own position slot, and (in the published classifier) two 1000-class heads. Published (DeiT paper,
# Touvron et al. 2021, Table 1: 5M / 22M / 86M, truncated to whole millions (5.7, 22.05, 86.57); timm's model cards
# to 0.1 M):
DEIT = {  # preset: (timm base name, dim, depth, heads, plain DeiT with head, distilled DeiT with both heads)
    "deit_tiny_patch16": ("deit_tiny", 192, 12, 3, 5.7, 5.9),
    "deit_small_patch16": ("deit_small", 384, 12, 6, 22.1, 22.4),
    "deit_base_patch16": ("deit_base", 768, 12, 12, 86.6, 87.3),
}
DEIT_PAPER_M = {"deit_tiny_patch16": 5, "deit_small_patch16": 22, "deit_base_patch16": 86}


@pytest.mark.parametrize("preset", sorted(DEIT))
def test_deit_backbone_equals_timm_and_transformers(preset):
    base, d, depth, h, *_ = DEIT[preset]
    n = vitkit_count(preset)
    assert n == timm_count(f"{base}_distilled_patch16_224", num_classes=0)
    assert n == hf_count("DeiTModel", "DeiTConfig", {"add_pooling_layer": False}, **hf_vit_config(d, depth, h))
    # the distillation token and its position slot are the whole difference to the plain DeiT
    plain = vitkit_count(preset, dist_token=False)
    assert n - plain == 2 * d
    assert plain == timm_count(f"{base}_patch16_224", num_classes=0)


@pytest.mark.parametrize("preset", sorted(DEIT))
def test_deit_with_imagenet_heads_is_the_published_count(preset):
    base, d, depth, h, plain_m, distilled_m = DEIT[preset]
    plain = vitkit_count(preset, dist_token=False) + head(d)  # DeiT: one head on the CLS token
    distilled = vitkit_count(preset) + 2 * head(d)  # DeiT-distilled: CLS head + distillation head
    assert plain == timm_count(f"{base}_patch16_224", num_classes=IN1K)
    assert distilled == timm_count(f"{base}_distilled_patch16_224", num_classes=IN1K)
    assert distilled == hf_count("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=IN1K,
                                 **hf_vit_config(d, depth, h))
    assert round(plain / 1e6, 1) == plain_m  # e.g. DeiT-S 22.1M
    assert round(distilled / 1e6, 1) == distilled_m  # e.g. DeiT-S distilled 22.4M
    assert int(plain / 1e6) == DEIT_PAPER_M[preset]  # the paper's 5M / 22M / 86M (whole millions, truncated)


# ------------------------------------------------------------------------------------------- CLIP
# vitkit's CLIP backbone is the vision tower with its visual projection (``proj``, no bias), as OpenAI's
# ``model.visual``. Published: OpenCLIP's model profile (docs/model_profile.csv, "image_mparams", 0.01 M) for the
# OpenAI architectures ViT-B-32 / ViT-B-16 / ViT-L-14: 87.85 / 86.19 / 303.97.
CLIP = {  # preset: (timm name, HF patch, dim, depth, heads, projection dim, published M)
    "clip_vitb32": ("vit_base_patch32_clip_quickgelu_224", 32, 768, 12, 12, 512, 87.85),
    "clip_vitb16": ("vit_base_patch16_clip_quickgelu_224", 16, 768, 12, 12, 512, 86.19),
    "clip_vitl14": ("vit_large_patch14_clip_quickgelu_224", 14, 1024, 24, 16, 768, 303.97),
}


@pytest.mark.parametrize("preset", sorted(CLIP))
def test_clip_vision_tower_equals_transformers_and_timm(preset):
    timm_name, patch, d, depth, h, proj, _ = CLIP[preset]
    n = vitkit_count(preset)
    cfg = dict(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=depth, num_attention_heads=h,
               patch_size=patch, image_size=224, projection_dim=proj)
    assert n == hf_count("CLIPVisionModelWithProjection", "CLIPVisionConfig", **cfg)  # tower + visual_projection
    assert n - d * proj == hf_count("CLIPVisionModel", "CLIPVisionConfig", **cfg)  # tower alone
    # timm's CLIP tower keeps the projection as its (biased) head: compare without it
    assert n - d * proj == timm_count(timm_name, num_classes=0)


@pytest.mark.parametrize("preset", sorted(CLIP))
def test_clip_vision_tower_is_the_published_count(preset):
    n = vitkit_count(preset)
    assert round(n / 1e6, 2) == CLIP[preset][-1]  # e.g. CLIP ViT-B/16 image tower 86.19M (~86M)


# ----------------------------------------------------------------------------------------- I-JEPA
# I-JEPA has no CLS token; its encoder is the backbone. The I-JEPA paper (Assran et al. 2023, Table 1) lists ViT-H/14
# at 632M, the ViT paper's count of ViT-H/14 *with* a CLS token (and its position slot) and a 1000-class head:
# torchvision's vit_h_14 at 224 px, exactly 632,045,800.
IJEPA_H14_PUBLISHED_WITH_HEAD = 632_045_800
IJEPA = {  # preset: (timm name, HF patch, image, dim, depth, heads, mlp)
    "ijepa_vith14": ("vit_huge_patch14_gap_224", 14, 224, 1280, 32, 16, 5120),
    "ijepa_vith16_448": ("vit_huge_patch16_gap_448", 16, 448, 1280, 32, 16, 5120),
    "ijepa_vitg16": ("vit_giant_patch16_gap_224", 16, 224, 1408, 40, 16, 6144),
}


@pytest.mark.parametrize("preset", sorted(IJEPA))
def test_ijepa_encoder_equals_timm_and_transformers(preset):
    timm_name, patch, image, d, depth, h, mlp = IJEPA[preset]
    n = vitkit_count(preset)
    assert n == timm_count(timm_name, num_classes=0)
    assert n == hf_count("IJepaModel", "IJepaConfig", {"add_pooling_layer": False}, hidden_size=d,
                         num_hidden_layers=depth, num_attention_heads=h, intermediate_size=mlp, patch_size=patch,
                         image_size=image)


def test_ijepa_vith14_is_the_published_632m():
    d = 1280
    n = vitkit_count("ijepa_vith14")
    assert round(n / 1e6, 1) == 630.8  # the encoder alone (vitkit info's "630 M")
    with_cls_and_head = n + 2 * d + head(d)  # CLS token + its position slot + the ImageNet-1k head
    assert with_cls_and_head == IJEPA_H14_PUBLISHED_WITH_HEAD
    assert with_cls_and_head == timm_count("vit_huge_patch14_224", num_classes=IN1K)
    assert round(with_cls_and_head / 1e6) == 632
