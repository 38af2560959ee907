"""The ``openai_clip`` checkpoint format: a state dict in OpenAI CLIP's layout (what ``clip.load(...)[0].state_dict()``
holds) loads into vitkit's CLIP backbone and gives transformers' ``CLIPVisionModelWithProjection`` outputs for the
same weights.

The OpenAI-layout file is written by hand from OpenAI's published key names (``visual.conv1.weight``,
``visual.class_embedding`` [D], ``visual.positional_embedding`` [N+1, D], ``visual.ln_pre``,
``visual.transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (q; k; v rows), attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}``, ``visual.ln_post``, ``visual.proj`` [D, P] (x @ proj), plus the text tower), from a tiny randomised
transformers model, never through vitkit. timm's own OpenAI-CLIP converter reads the same file as a second, independent
check of that hand-written layout.

Tolerance: fp32, relative error (max |a - b| / max |b|) below 1e-5.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import vitkit
from helpers import RTOL, rel

sys.path.insert(0, os.path.dirname(__file__))
import references as R  # noqa: E402

transformers = pytest.importorskip("transformers")

TOL = RTOL[torch.float32]
SPEC = R.HF_SPECS["hf_clip_proj"]  # hidden 32, 2 layers, 4 heads, MLP 64, patch 8, 32 px, projection 16
D, DEPTH, HEADS, PATCH, SIZE = SPEC.embed_dim, SPEC.depth, SPEC.num_heads, SPEC.patch_size, SPEC.native_size
MLP, PROJ = SPEC.kwargs["intermediate_size"], SPEC.kwargs["projection_dim"]


def openai_layout(hf: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of an HF CLIPVisionModelWithProjection in OpenAI CLIP's layout, plus a small text tower."""
    v = {k.removeprefix("vision_model."): t.detach().clone() for k, t in hf.state_dict().items()}
    sd = {"visual.conv1.weight": v["embeddings.patch_embedding.weight"],
          "visual.class_embedding": v["embeddings.class_embedding"],
          "visual.positional_embedding": v["embeddings.position_embedding.weight"],
          "visual.ln_pre.weight": v["pre_layrnorm.weight"], "visual.ln_pre.bias": v["pre_layrnorm.bias"],
          "visual.ln_post.weight": v["post_layernorm.weight"], "visual.ln_post.bias": v["post_layernorm.bias"],
          "visual.proj": v["visual_projection.weight"].t().contiguous()}  # OpenAI: x @ proj, proj [D, P]
    for i in range(DEPTH):
        a, o = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            sd[o + f"attn.in_proj_{kind}"] = torch.cat([v[a + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            sd[o + f"attn.out_proj.{kind}"] = v[a + f"self_attn.out_proj.{kind}"]
            sd[o + f"ln_1.{kind}"] = v[a + f"layer_norm1.{kind}"]
            sd[o + f"ln_2.{kind}"] = v[a + f"layer_norm2.{kind}"]
            sd[o + f"mlp.c_fc.{kind}"] = v[a + f"mlp.fc1.{kind}"]
            sd[o + f"mlp.c_proj.{kind}"] = v[a + f"mlp.fc2.{kind}"]
    g = torch.Generator().manual_seed(3)
    text = {"token_embedding.weight": (100, 24), "positional_embedding": (77, 24), "ln_final.weight": (24,),
            "ln_final.bias": (24,), "text_projection": (24, PROJ),
            "transformer.resblocks.0.attn.in_proj_weight": (72, 24), "transformer.resblocks.0.ln_1.weight": (24,)}
    sd.update({k: torch.randn(s, generator=g) for k, s in text.items()})
    sd["logit_scale"] = torch.tensor(4.6052)
    return sd


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    hf, _ = R.build_hf_reference("hf_clip_proj", seed=5, save=False)
    path = tmp_path_factory.mktemp("openai_clip") / "ViT-B-16.pth"
    torch.save(openai_layout(hf), path)
    return hf.eval(), path


def test_hand_written_layout_is_what_timm_reads_as_openai_clip(clip):
    """timm's ``_convert_openai_clip`` (its own table) reads the file into a timm CLIP tower whose head is the visual
    projection: its output must be transformers' image embeddings, so the file really is OpenAI's layout."""
    timm = pytest.importorskip("timm")
    from timm.models import vision_transformer as tvt

    hf, path = clip
    ref = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, img_size=SIZE, patch_size=PATCH,
                            embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / D, num_classes=PROJ)
    ref.load_state_dict(tvt.checkpoint_filter_fn(torch.load(path), ref), strict=True)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(ref.eval()(x), hf(pixel_values=x).image_embeds) < TOL


def _compare(ours, hf, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = hf(pixel_values=x, interpolate_pos_encoding=True)
        pooled = hf.vision_model.post_layernorm(want.last_hidden_state[:, 0])  # CLIPVisionModel's pooler_output
        got = ours.forward_features(x)
    assert rel(got["x_prenorm"], want.last_hidden_state) < TOL  # all tokens, before ln_post (HF does not norm them)
    assert rel(got["x_norm_clstoken"], pooled) < TOL
    assert rel(got["x_projected"], want.image_embeds) < TOL


def test_openai_clip_state_dict_loads_into_the_clip_preset(clip):
    hf, path = clip
    ours = vitkit.create_backbone("clip_vitb16", pretrained=path, img_size=SIZE, patch_size=PATCH, embed_dim=D,
                                  depth=DEPTH, num_heads=HEADS, mlp_hidden_dim=MLP, proj_dim=PROJ).eval()
    assert ours.config.extra["weights_format"] == "openai_clip"
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    _compare(ours, hf, x)
    # another input size: position embeddings resampled as transformers does (bicubic, size=, no antialias)
    _compare(ours, hf, torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(2)))


def test_openai_clip_architecture_is_read_from_the_file(clip):
    """No preset: ``from_pretrained`` infers the CLIP tower (quick-GELU, pre-norm, no patch bias, projection) from
    the OpenAI keys alone, drops the text tower and loads strictly. (The number of heads is not in the weights;
    standard widths map to their head counts, this tiny one is given.)"""
    hf, path = clip
    ours = vitkit.from_pretrained(path, num_heads=HEADS)
    c = ours.config
    assert (c.family, c.embed_dim, c.depth, c.patch_size, c.proj_dim, c.act, c.pre_norm, c.patch_bias) == \
           ("clip", D, DEPTH, PATCH, PROJ, "quick_gelu", True, False)
    _compare(ours, hf, torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)))
    report = vitkit.load_weights(ours, path)
    dropped = {k for k, _ in report.dropped}
    assert dropped == {k for k in torch.load(path) if not k.startswith("visual.")}  # the text tower, nothing else


def test_rgb_clip_folded_to_one_channel(clip):
    """Detector frames: a 1-channel model from the RGB checkpoint equals the RGB model on the frame repeated thrice."""
    _, path = clip
    kw = dict(pretrained=path, img_size=SIZE, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
              mlp_hidden_dim=MLP, proj_dim=PROJ)
    rgb = vitkit.create_backbone("clip_vitb16", **kw).eval()
    mono = vitkit.create_backbone("clip_vitb16", in_chans=1, **kw).eval()
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel(mono.forward_features(x)["x_projected"], rgb.forward_features(x.repeat(1, 3, 1, 1))["x_projected"]) \
            < TOL
