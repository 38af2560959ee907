"""Fast inference paths: weights cast once for bf16 (norms and RoPE kept fp32) and torch.compile without
graph breaks. Speed is measured in benchmarks/, not here; these tests pin down correctness."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vitkit
from helpers import randomise
from vitkit.layers.norm import LayerNorm, LayerNorm2d
from vitkit.layers.precision import cast_for_inference


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in the L2 norm (steadier than max-abs for bf16, whose worst element is noisy)."""
    return float((a.float() - ref).norm() / ref.norm())


def tiny(**kw) -> vitkit.VisionTransformer:
    torch.manual_seed(0)
    base = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=(48, 64), in_chans=1,
                num_register_tokens=2, layer_scale_init=0.5)
    return vitkit.create_backbone(**{**base, **kw}).eval()


# bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); over 12 blocks with the residual stream in bf16 the
# patch tokens' relative error reaches ~1e-2 (autocast, which keeps the residual stream in fp32, ~4e-3).
BF16_RTOL = 2e-2


def cast_vs_fp32(m: nn.Module, x: torch.Tensor, block_scale: float = 1.0) -> tuple[float, float]:
    """Relative errors of the cast model and of autocast against fp32. ``block_scale`` != 1 injects an error: the
    cast model's block 6 attention branch (after LayerScale) is scaled by it."""
    with torch.no_grad():
        ref = m.forward_features(x)["x_norm_patchtokens"]
        with torch.autocast("cpu", torch.bfloat16):
            auto = m.forward_features(x)["x_norm_patchtokens"]
        cast = cast_for_inference(copy.deepcopy(m))
        hook = cast.blocks[6].ls1.register_forward_hook(lambda mod, args, out: out * block_scale)
        out = cast.forward_features(x)["x_norm_patchtokens"]  # fp32 images go in unchanged
        hook.remove()
    assert out.dtype == torch.bfloat16
    return rel(out, ref), rel(auto, ref)


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_cast_for_inference_is_within_bf16_tolerance_of_fp32(name):
    """On a randomised preset (LayerScale ~1, so every block counts), the cast model is within the bf16 tolerance of
    fp32, and no worse than 3x autocast (it keeps the residual stream in bf16, autocast in fp32)."""
    torch.manual_seed(0)
    m = randomise(vitkit.create_backbone(name, img_size=112).eval())
    cast_err, auto_err = cast_vs_fp32(m, torch.randn(2, 3, 112, 112))
    assert cast_err < BF16_RTOL and cast_err < 3 * auto_err, (cast_err, auto_err)


def test_the_cast_comparison_catches_a_wrong_scale_inside_a_block():
    """A 25 % error on one block's attention branch is invisible on the preset as built (LayerScale 1e-5 mutes it)
    and fails the comparison above on the randomised model."""
    torch.manual_seed(0)
    m = vitkit.create_backbone("dinov2_vits14_reg", img_size=112).eval()
    x = torch.randn(1, 3, 112, 112)
    muted, _ = cast_vs_fp32(m, x, block_scale=1.25)
    caught, _ = cast_vs_fp32(randomise(m), x, block_scale=1.25)
    assert muted < BF16_RTOL < caught, (muted, caught)


def test_cast_keeps_norms_positions_and_rope_in_fp32():
    m = cast_for_inference(tiny(rope=True, pos_embed="none", family="dinov3"))
    dtypes = {n: p.dtype for n, p in m.named_parameters()}
    assert dtypes["blocks.0.attn.qkv.weight"] == torch.bfloat16 and dtypes["patch_embed.proj.weight"] == torch.bfloat16
    assert dtypes["blocks.0.ls1.gamma"] == torch.bfloat16 and dtypes["register_tokens"] == torch.bfloat16
    assert dtypes["blocks.0.norm1.weight"] == torch.float32 and dtypes["norm.weight"] == torch.float32
    assert all(b.dtype == torch.float32 for b in m.buffers())  # RoPE periods
    assert not m.training
    m2 = cast_for_inference(tiny())
    assert m2.pos_embed.dtype == torch.float32


def test_cast_eomt_end_to_end_and_fp32_norm_statistics():
    torch.manual_seed(0)
    e = vitkit.EoMT(tiny(depth=3, img_size=64), num_classes=3, num_q=5, num_blocks=2).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ref_masks, ref_cls = e(x)
        c = cast_for_inference(copy.deepcopy(e))
        masks, cls = c(x)
    assert masks[-1].dtype == torch.bfloat16 and len(masks) == len(ref_masks)
    assert rel(masks[-1], ref_masks[-1]) < 0.03 and rel(cls[-1], ref_cls[-1]) < 0.03
    # a norm fed bf16 with fp32 weights computes in fp32: equal to the fp32 norm of the same bf16 values
    ln = LayerNorm(16)
    xb = (torch.randn(4, 16) * 100 + 1000).bfloat16()  # large mean: bf16 statistics would lose it
    assert torch.equal(ln(xb), torch.nn.functional.layer_norm(xb.float(), (16,)).bfloat16())
    ln2 = LayerNorm2d(8)
    xm = torch.randn(1, 8, 3, 5).bfloat16()
    assert ln2(xm).dtype == torch.bfloat16 and torch.equal(ln2(xm), ln2(xm.float()).bfloat16())


def test_cast_refuses_foreign_norm_layers_and_bad_dtypes():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match="1 is a torch norm layer"):
        cast_for_inference(m)
    with pytest.raises(ValueError, match="dtype must be"):
        cast_for_inference(tiny(), torch.int8)


def _no_graph_breaks(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count, explanation.break_reasons


@pytest.mark.slow
def test_backbone_and_eomt_inference_compile_without_graph_breaks():
    torch._dynamo.reset()
    m = tiny(rope=True, pos_embed="none", family="dinov3")
    x = torch.randn(2, 1, 48, 64)
    with torch.no_grad():
        breaks, reasons = _no_graph_breaks(m.forward_features, x)
        assert breaks == 0, reasons
        compiled = torch.compile(m.forward_features, fullgraph=True)
        assert (compiled(x)["x_norm_patchtokens"] - m.forward_features(x)["x_norm_patchtokens"]).abs().max() < 1e-5

    torch._dynamo.reset()
    e = vitkit.EoMT(tiny(depth=3, img_size=64), num_classes=2, num_q=4, num_blocks=1).eval()
    e.masked_attn_enabled = False  # the inference model (masks annealed away)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        breaks, reasons = _no_graph_breaks(e, x)
        assert breaks == 0, reasons
        compiled = torch.compile(e, fullgraph=True)
        assert (compiled(x)[0][-1] - e(x)[0][-1]).abs().max() < 1e-5
    torch._dynamo.reset()
