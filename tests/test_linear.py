"""The oneDNN inference path of vitkit's linear maps and attention (vitkit.layers.linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from vitkit.layers import linear as L
from vitkit.layers.attention import Attention, chunked_attention

needs_onednn = pytest.mark.skipif(L._LINEAR_POINTWISE is None or not torch.backends.mkldnn.is_available(),
                                  reason="PyTorch built without oneDNN")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Count the calls that reach oneDNN's fused linear."""
    calls = []
    original = L._LINEAR_POINTWISE

    def counting(*args):
        calls.append(args[3])  # the post-op name
        return original(*args)

    monkeypatch.setattr(L, "_LINEAR_POINTWISE", counting)
    previous = L.set_onednn(True)
    yield calls
    L.set_onednn(previous)


@needs_onednn
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "relu", "silu"])
def test_linear_equals_f_linear_with_activation(onednn_calls, act):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 41, 64, generator=g), torch.randn(96, 64, generator=g) * 0.1, torch.randn(96, generator=g)
    ref = L._EAGER[act](F.linear(x.double(), w.double(), b.double()))
    with torch.no_grad():
        out = L.linear(x, w, b, act)
        out_nobias = L.linear(x, w, None, act)
        out_bf16 = L.linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), act)
    assert onednn_calls == [L._FUSED[act][0]] * 3
    assert out.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 1e-5
    assert (out_nobias.double() - L._EAGER[act](F.linear(x.double(), w.double()))).abs().max() < 1e-5
    # bf16 operands: the error of bf16 inputs and one final rounding, far below a bf16 GEMM + separate activation
    assert (out_bf16.double() - ref).abs().max() < 0.05 * ref.abs().max()


@needs_onednn
def test_linear_keeps_autograd_when_a_gradient_is_needed(onednn_calls):
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    L.linear(x, lin.weight, lin.bias, "gelu").sum().backward()
    assert onednn_calls == []  # training goes through F.linear
    x2 = x.detach().clone().requires_grad_(True)
    lin2 = nn.Linear(16, 8)
    lin2.load_state_dict(lin.state_dict())
    F.gelu(lin2(x2)).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(lin.weight.grad, lin2.weight.grad)


@needs_onednn
def test_frozen_layer_under_grad_mode_uses_onednn(onednn_calls):
    lin = nn.Linear(16, 8).requires_grad_(False)
    y = L.linear(torch.randn(4, 16), lin.weight, lin.bias)
    assert onednn_calls == ["none"] and y.grad_fn is None
    lin.bias.requires_grad_(True)  # a trainable bias alone needs autograd
    assert L.linear(torch.randn(4, 16), lin.weight, lin.bias).grad_fn is not None
    assert onednn_calls == ["none"]


@needs_onednn
def test_strided_weight_is_made_dense(onednn_calls):
    """oneDNN runs a reference kernel ~100x slower on a weight with padded rows; linear passes a dense copy."""
    base = torch.randn(64, 3, 32)
    w = base[:, 0]  # [64, 32] with row stride 96
    x = torch.randn(10, 32)
    with torch.no_grad():
        assert torch.allclose(L.linear(x, w), x @ w.T, atol=1e-5)
    assert onednn_calls == ["none"]


def test_set_onednn_off_gives_f_linear_bit_for_bit():
    previous = L.set_onednn(False)
    try:
        x, w, b = torch.randn(5, 33, 64), torch.randn(48, 64), torch.randn(48)
        with torch.no_grad():
            assert torch.equal(L.linear(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)))
    finally:
        L.set_onednn(previous)


def test_linear_rejects_unknown_activation():
    with pytest.raises(ValueError, match="quick_gelu.*cannot be fused.*gelu_tanh"):
        L.linear(torch.randn(2, 4), torch.randn(3, 4), activation="quick_gelu")


def test_fusable_activation_names():
    from vitkit.layers.mlp import QuickGELU

    assert L.fusable_activation(nn.GELU()) == "gelu"
    assert L.fusable_activation(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert L.fusable_activation(nn.ReLU()) == "relu" and L.fusable_activation(nn.SiLU()) == "silu"
    assert L.fusable_activation(QuickGELU()) is None and L.fusable_activation(nn.Tanh()) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_attention_with_query_row_mask_equals_sdpa(dtype):
    """EoMT's masked query rows: the first R rows masked, split over several row blocks (R > chunk)."""
    g = torch.Generator().manual_seed(0)
    B, H, N, d, R = 2, 3, 45, 8, 13
    q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
    mask = torch.rand(B, H, R, N, generator=g) > 0.5
    mask[..., 0] = True  # every row may attend somewhere
    full = torch.ones(B, H, N, N, dtype=torch.bool)
    full[:, :, :R] = mask
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=full).transpose(1, 2).reshape(B, N, H * d)
    with torch.no_grad():
        out = chunked_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, chunk=8).float()
        shared = chunked_attention(q, k, v, mask[:1, :1], chunk=8)  # one mask broadcast over images and heads
    assert (out - ref).abs().max() < (1e-5 if dtype == torch.float32 else 0.03)
    full[:, :, :R] = mask[:1, :1]
    ref_shared = F.scaled_dot_product_attention(q, k, v, attn_mask=full).transpose(1, 2).reshape(B, N, H * d)
    assert (shared - ref_shared).abs().max() < 1e-5


@needs_onednn
@pytest.mark.parametrize("masked", [False, True])
def test_attention_inference_path_equals_training_path(onednn_calls, masked):
    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=True)
    x = torch.randn(2, 29, 32)
    mask = (torch.rand(2, 1, 7, 29) > 0.3) | (torch.arange(29) < 7) if masked else None
    train = attn(x, attn_mask=mask)  # grad mode, parameters require grad: SDPA and F.linear
    assert onednn_calls == []
    with torch.inference_mode():
        infer = attn(x, attn_mask=mask)
    assert len(onednn_calls) == 2 + 2 * 2 * 4 * (2 if masked else 1)  # qkv, proj, 2 GEMMs per image/head/block
    assert (infer - train.detach()).abs().max() < 1e-5


@needs_onednn
@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_backbone_inference_with_and_without_onednn(onednn_calls, name):
    torch.manual_seed(0)
    model = vitkit.create_backbone(name, embed_dim=64, depth=2, num_heads=4, img_size=56).eval()
    x = torch.randn(2, 3, 56, 84)
    with torch.inference_mode():
        fast = model(x)["x_norm_patchtokens"]
        L.set_onednn(False)
        ref = model(x)["x_norm_patchtokens"]
    assert onednn_calls  # the first call went through oneDNN, the second not
    assert (fast - ref).abs().max() < 1e-4 * ref.abs().max()


@needs_onednn
def test_eomt_inference_with_and_without_onednn(onednn_calls):
    torch.manual_seed(0)
    model = vitkit.EoMT("dinov3_vits16", num_classes=3, num_q=6, num_blocks=2, img_size=64, embed_dim=64,
                        depth=3, num_heads=4).eval()  # masks on (attn_mask_probs = 1): masked query rows
    x = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        masks, classes = model(x)
        L.set_onednn(False)
        ref_masks, ref_classes = model(x)
    assert len(masks) == 3 and "gelu" in onednn_calls
    for a, b in zip(masks + classes, ref_masks + ref_classes):
        assert (a - b).abs().max() < 1e-4 * b.abs().max()


def test_tune_cpu_allocator_stops_page_faults_on_reused_activations(tmp_path):
    """With glibc's defaults each forward faults its multi-MB activations in again; tuned, they are reused."""
    import subprocess
    import sys

    script = tmp_path / "faults.py"
    script.write_text(
        "import resource, sys, torch, vitkit\n"
        "from vitkit.runtime import tune_cpu_allocator\n"
        "if sys.argv[1] == 'tuned':\n"
        "    assert tune_cpu_allocator()\n"
        "torch.manual_seed(0)\n"
        "model = vitkit.create_backbone('dinov2_vits14', depth=2, img_size=448).eval()\n"
        "x = torch.randn(1, 3, 448, 448)\n"
        "with torch.inference_mode():\n"
        "    model(x)\n"
        "    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(3):\n"
        "        model(x)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 3)\n")
    faults = {mode: int(subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for mode in ("default", "tuned")}
    assert faults["default"] > 1000  # pages per forward
    assert faults["tuned"] < faults["default"] / 10


def test_tune_cpu_allocator_rejects_bad_thresholds():
    from vitkit.runtime import tune_cpu_allocator

    with pytest.raises(ValueError, match="32 MiB"):
        tune_cpu_allocator(mmap_threshold=64 << 20)
