"""Fast inference paths: weights cast once for bf16 (norms and RoPE kept fp32) and torch.compile without
graph breaks. Speed is measured in benchmarks/, not here; these tests pin down correctness."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vitkit
from vitkit.layers.norm import LayerNorm, LayerNorm2d
from vitkit.layers.precision import cast_for_inference


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm())


def tiny(**kw) -> vitkit.VisionTransformer:
    torch.manual_seed(0)
    base = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=(48, 64), in_chans=1,
                num_register_tokens=2, layer_scale_init=0.5)
    return vitkit.create_backbone(**{**base, **kw}).eval()


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_cast_for_inference_is_as_accurate_as_autocast(name):
    torch.manual_seed(0)
    m = vitkit.create_backbone(name, img_size=112).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = m.forward_features(x)["x_norm_patchtokens"]
        with torch.autocast("cpu", torch.bfloat16):
            auto = m.forward_features(x)["x_norm_patchtokens"]
        cast = cast_for_inference(copy.deepcopy(m))
        out = cast.forward_features(x)["x_norm_patchtokens"]  # fp32 images go in unchanged
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < 0.01 and rel(out, ref) < 2 * rel(auto, ref) + 1e-3, (rel(out, ref), rel(auto, ref))


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
