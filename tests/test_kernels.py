"""vitkit.kernels: the CPU kernel dispatcher (measured choice, cached per shape class, never a wrong result),
its candidates against stock PyTorch, autocast, forward hooks, and the models' fast paths against the stock path
on *randomised* models (LayerScale at ~1, so every block changes the output and an error inside one shows)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from helpers import randomise, rel
from vitkit import kernels as K
from vitkit.kernels import candidates as C
from vitkit.layers.attention import Attention
from vitkit.layers.mlp import Mlp

needs_onednn = pytest.mark.skipif(not K.onednn_available(), reason="PyTorch built without oneDNN")


@pytest.fixture(autouse=True)
def fresh_dispatcher():
    """Each test measures from scratch, in tuned mode, and leaves the process as it found it."""
    saved = (dict(K._chosen), dict(K._timings), K.mode())
    K._chosen.clear()
    K._timings.clear()
    K.set_mode("tuned")
    yield
    K._chosen.clear()
    K._timings.clear()
    K._chosen.update(saved[0])
    K._timings.update(saved[1])
    K.set_mode(saved[2])


@pytest.fixture
def onednn_calls(monkeypatch):
    """Count the calls that reach oneDNN's fused linear, and force the oneDNN candidates to be chosen."""
    calls = []
    original = C.LINEAR_POINTWISE

    def counting(*args):
        calls.append(args[3])  # the post-op name
        return original(*args)

    monkeypatch.setattr(C, "LINEAR_POINTWISE", counting)
    force(monkeypatch, linear="onednn", attention="blocked", bmm="onednn")
    return calls


def force(monkeypatch, **names):
    """Make the dispatcher choose these candidates (op -> name) whatever their timings, as long as they pass its
    exactness check."""
    orig = K._dispatch

    def dispatch(key, impls, args):
        out = orig(key, impls, args)
        want = names.get(key[0])
        if want is not None and K._chosen.get(key) != want and K._timings.get(key, {}).get(want) is not None:
            K._chosen[key] = want
            return impls[want](*args)
        return out

    monkeypatch.setattr(K, "_dispatch", dispatch)


# --------------------------------------------------------------------------------------------- candidates
@needs_onednn
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "relu", "silu"])
def test_onednn_linear_equals_f_linear_with_activation(act):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 41, 64, generator=g), torch.randn(96, 64, generator=g) * 0.1, torch.randn(96, generator=g)
    ref = C.EAGER[act](F.linear(x.double(), w.double(), b.double()))
    with torch.no_grad():
        out = C.linear_onednn(x, w, b, act)
        out_nobias = C.linear_onednn(x, w, None, act)
        out_bf16 = C.linear_onednn(x.bfloat16(), w.bfloat16(), b.bfloat16(), act)
    assert out.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 1e-5  # fp32: summation order only
    assert (out_nobias.double() - C.EAGER[act](F.linear(x.double(), w.double()))).abs().max() < 1e-5
    assert (out_bf16.double() - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 inputs, one final rounding


@needs_onednn
def test_strided_weight_is_made_dense(onednn_calls):
    """oneDNN runs a reference kernel ~100x slower on a weight with padded rows; the candidate passes a dense one."""
    w = torch.randn(64, 3, 32)[:, 0]  # [64, 32] with row stride 96
    x = torch.randn(10, 32)
    with torch.no_grad():
        assert torch.allclose(K.linear(x, w), x @ w.T, atol=1e-5)
    assert onednn_calls and set(onednn_calls) == {"none"}


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_and_batched_attention_with_query_row_mask_equal_sdpa(dtype):
    """EoMT's masked query rows: the first R rows masked, split over several row blocks (R > chunk); the batched
    candidate the same in one piece."""
    g = torch.Generator().manual_seed(0)
    B, H, N, d, R = 2, 3, 45, 8, 13
    q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
    mask = torch.rand(B, H, R, N, generator=g) > 0.5
    mask[..., 0] = True  # every row may attend somewhere
    full = torch.ones(B, H, N, N, dtype=torch.bool)
    full[:, :, :R] = mask
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=full).transpose(1, 2).reshape(B, N, H * d)
    with torch.no_grad():
        out = C.attention_blocked(q.to(dtype), k.to(dtype), v.to(dtype), mask, chunk=8).float()
        shared = C.attention_blocked(q, k, v, mask[:1, :1], chunk=8)  # one mask broadcast over images and heads
        stock = C.attention_stock(q, k, v, mask)
        batched = C.attention_batched(q.to(dtype), k.to(dtype), v.to(dtype), mask).float()
        batched_shared = C.attention_batched(q, k, v, mask[:1, :1])
    assert (out - ref).abs().max() < (1e-5 if dtype == torch.float32 else 0.03)
    assert (batched - ref).abs().max() < (1e-5 if dtype == torch.float32 else 0.03)
    assert (stock - ref).abs().max() < 1e-5  # the stock path splits masked and unmasked rows into two SDPA calls
    full[:, :, :R] = mask[:1, :1]
    ref_shared = F.scaled_dot_product_attention(q, k, v, attn_mask=full).transpose(1, 2).reshape(B, N, H * d)
    assert (shared - ref_shared).abs().max() < 1e-5 and (batched_shared - ref_shared).abs().max() < 1e-5


@needs_onednn
def test_batched_attention_is_offered_only_while_its_scores_stay_small(monkeypatch):
    q = torch.randn(4, 2, 30, 8)
    with torch.inference_mode():
        out = K.attention(q, q, q)
        assert "batched" in K.choices()[-1]["ms"]
        monkeypatch.setattr(C, "BATCHED_MAX", 8 * 32 * 32 - 1)  # this shape class's scores: 8 x 32^2
        K._chosen.clear()
        K._timings.clear()
        again = K.attention(q, q, q)
    assert set(K.choices()[-1]["ms"]) == {"stock", "blocked"}
    assert (again - out).abs().max() < 1e-5


@needs_onednn
def test_onednn_bmm_equals_matmul_on_channels_last_features():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 16, generator=g)
    feats = torch.randn(2, 16, 6, 7, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert (C.bmm_onednn(a, feats.flatten(2)) - torch.matmul(a, feats.flatten(2))).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------- dispatcher
@needs_onednn
def test_dispatcher_measures_each_shape_class_once_and_keeps_the_fastest(monkeypatch):
    calls = {"stock": 0, "onednn": 0}

    def slow_onednn(*a):
        calls["onednn"] += 1
        time.sleep(0.01)  # 10 ms: slower than any stock GEMM of this size
        return C.linear_onednn(*a)

    def stock(*a):
        calls["stock"] += 1
        return C.linear_stock(*a)

    monkeypatch.setitem(C.LINEAR, "onednn", slow_onednn)
    monkeypatch.setitem(C.LINEAR, "stock", stock)
    w, b = torch.randn(48, 32), torch.randn(48)
    with torch.no_grad():
        for m in (100, 90, 120, 100):  # one octave of rows: one shape class
            K.linear(torch.randn(m, 32), w, b)
        measured = dict(calls)
        K.linear(torch.randn(300, 32), w, b)  # another class: measured again
    assert measured == {"stock": 1 + K._REPS + 3, "onednn": 1 + K._REPS}  # warm-up + timed runs, then stock only
    (first, second) = [c for c in K.choices() if c["op"] == "linear"]
    assert first["chosen"] == second["chosen"] == "stock" and first["ms"]["onednn"] > first["ms"]["stock"]


@needs_onednn
def test_a_candidate_that_is_not_exact_is_never_used(monkeypatch):
    monkeypatch.setitem(C.LINEAR, "onednn", lambda *a: C.linear_onednn(*a) * 1.01)  # fast but 1 % off
    x, w = torch.randn(64, 32), torch.randn(16, 32)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="'onednn' for linear .* differs from stock"):
        out = K.linear(x, w)
    assert torch.equal(out, F.linear(x, w)) and K.choices()[0]["chosen"] == "stock"
    assert K.choices()[0]["ms"]["onednn"] is None


def test_stock_mode_is_f_linear_and_sdpa_bit_for_bit():
    K.set_mode("stock")
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 33, 64), torch.randn(48, 64), torch.randn(48)
    q, k, v = (torch.randn(2, 4, 33, 16) for _ in range(3))
    with torch.no_grad():
        assert torch.equal(K.linear(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)))
        ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 33, 64)
        assert torch.equal(K.attention(q, k, v), ref)
    assert K.choices() == []  # nothing measured
    assert K.set_onednn(True) is False and K.mode() == "tuned"  # the older switch is the same mode


@pytest.mark.parametrize("env,expected", [({"VITKIT_KERNELS": "stock"}, "stock"), ({"VITKIT_ONEDNN": "0"}, "stock"),
                                          ({}, "tuned")])
def test_mode_from_the_environment(env, expected):
    import os

    res = subprocess.run([sys.executable, "-c", "import vitkit.kernels as K; print(K.mode())"], capture_output=True,
                         text=True, env={k: v for k, v in os.environ.items() if not k.startswith("VITKIT_")} | env)
    assert res.stdout.strip() == expected, res.stderr


def test_linear_keeps_autograd_when_a_gradient_is_needed():
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    K.linear(x, lin.weight, lin.bias, "gelu").sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    lin2 = nn.Linear(16, 8)
    lin2.load_state_dict(lin.state_dict())
    F.gelu(lin2(x2)).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(lin.weight.grad, lin2.weight.grad)
    assert K.choices() == []  # training never measures or leaves the stock path


def test_linear_rejects_unknown_activation():
    with pytest.raises(ValueError, match="quick_gelu.*cannot be fused.*gelu_tanh"):
        K.linear(torch.randn(2, 4), torch.randn(3, 4), activation="quick_gelu")


def test_fusable_activation_names():
    from vitkit.layers.mlp import QuickGELU

    assert K.fusable_activation(nn.GELU()) == "gelu"
    assert K.fusable_activation(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert K.fusable_activation(nn.ReLU()) == "relu" and K.fusable_activation(nn.SiLU()) == "silu"
    assert K.fusable_activation(QuickGELU()) is None and K.fusable_activation(nn.Tanh()) is None


# ------------------------------------------------------------------------------------ autocast and hooks
@pytest.mark.parametrize("mode", ["tuned", "stock"])
def test_autocast_is_honoured(mode):
    """Under torch.autocast("cpu", bf16) a block computes and returns what F.linear + SDPA would: bf16, close to
    the stock path's autocast result (the issue: the oneDNN path used to run fp32 and return fp32)."""
    K.set_mode(mode)
    torch.manual_seed(0)
    model = randomise(vitkit.create_backbone("dinov2_vits14_reg", embed_dim=64, depth=2, num_heads=4,
                                             img_size=56)).eval()
    x = torch.randn(2, 3, 56, 84)
    with torch.inference_mode():
        mlp_in = torch.randn(2, 10, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.blocks[0].attn(torch.randn(2, 17, 64))
            mlp_out = model.blocks[0].mlp(mlp_in)
            feats = model(x)["x_norm_patchtokens"]
        K.set_mode("stock")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_mlp = model.blocks[0].mlp(mlp_in)
            ref = model(x)["x_norm_patchtokens"]
    assert out.dtype == mlp_out.dtype == torch.bfloat16
    assert rel(mlp_out, ref_mlp) < 3e-2 and feats.dtype == ref.dtype and rel(feats, ref) < 5e-2


def test_projections_are_nn_linear_and_their_hooks_fire():
    torch.manual_seed(0)
    model = randomise(vitkit.create_backbone("dinov3_vits16", embed_dim=64, depth=1, num_heads=4, img_size=32)).eval()
    blk = model.blocks[0]
    for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.w12 if hasattr(blk.mlp, "w12") else blk.mlp.fc1):
        assert isinstance(m, nn.Linear)
    x = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        plain = model(x)["x_norm_patchtokens"]
        seen = {}
        handles = [mod.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.shape))
                   for n, mod in blk.named_modules() if isinstance(mod, nn.Linear) or isinstance(mod, nn.GELU)]
        hooked = model(x)["x_norm_patchtokens"]
        for h in handles:
            h.remove()
    assert {"attn.qkv", "attn.proj"} <= set(seen) and any(n.startswith("mlp.") for n in seen)
    assert seen["attn.qkv"][-1] == 3 * 64
    assert rel(hooked, plain) < 1e-5  # hooks change the path (no fusion), not the result


def test_mlp_fuses_its_activation_unless_hooked(monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(32, 64).eval()
    x = torch.randn(3, 32)
    acts = []
    real = K.linear
    monkeypatch.setattr("vitkit.layers.mlp.linear", lambda *a, **k: acts.append(a[3] if len(a) > 3 else None)
                        or real(*a, **k))
    with torch.no_grad():
        fused = mlp(x)
        assert acts == ["gelu"]  # fc1 with GELU in one call
        mlp.act.register_forward_hook(lambda m, i, o: None)
        apart = mlp(x)
    assert acts == ["gelu"] and rel(apart, fused) < 1e-5


# --------------------------------------------------------------------- models: tuned against stock
@needs_onednn
@pytest.mark.parametrize("masked", [False, True])
def test_attention_tuned_equals_stock_and_training_path(onednn_calls, masked):
    torch.manual_seed(0)
    attn = randomise(Attention(32, 4, qk_norm=True))
    x = torch.randn(2, 29, 32)
    mask = (torch.rand(2, 1, 7, 29) > 0.3) | (torch.arange(29) < 7) if masked else None
    train = attn(x, attn_mask=mask)  # grad mode, parameters require grad: SDPA and F.linear
    assert onednn_calls == []
    with torch.inference_mode():
        infer = attn(x, attn_mask=mask)
    assert len(onednn_calls) >= 2 + 2 * 2 * 4 * (2 if masked else 1)  # qkv, proj, 2 GEMMs per image/head/block
    assert rel(infer, train.detach()) < 1e-5


@needs_onednn
@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_backbone_tuned_equals_stock_on_a_randomised_model(onednn_calls, name):
    torch.manual_seed(0)
    model = randomise(vitkit.create_backbone(name, embed_dim=64, depth=2, num_heads=4, img_size=56)).eval()
    x = torch.randn(2, 3, 56, 84)
    with torch.inference_mode():
        fast = model(x)["x_norm_patchtokens"]
        K.set_mode("stock")
        ref = model(x)["x_norm_patchtokens"]
        bf16 = model.to(torch.bfloat16)(x.bfloat16())["x_norm_patchtokens"]
    assert onednn_calls  # the first forward went through oneDNN, the second not
    assert rel(fast, ref) < 1e-4  # fp32: summation order
    assert 1e-4 < rel(bf16, ref) < 0.1  # bf16 differs (it computes in bf16) but stays close


@needs_onednn
def test_eomt_tuned_equals_stock_with_masked_query_rows(onednn_calls):
    torch.manual_seed(0)
    model = randomise(vitkit.EoMT("dinov3_vits16", num_classes=3, num_q=6, num_blocks=2, img_size=64, embed_dim=64,
                                  depth=3, num_heads=4)).eval()  # masks on (attn_mask_probs = 1): masked query rows
    x = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        masks, classes = model(x)
        K.set_mode("stock")
        ref_masks, ref_classes = model(x)
    assert len(masks) == 3 and "gelu" in onednn_calls
    for a, b in zip(masks + classes, ref_masks + ref_classes):
        assert rel(a, b) < 1e-4


@needs_onednn
def test_the_comparisons_catch_an_error_inside_a_block(monkeypatch):
    """Inject a 2 % error into the blocked attention and let it past the dispatcher's own exactness check: the
    tuned-vs-stock comparison catches it on the randomised model, and could not on the preset's (LayerScale
    1e-5 mutes every block)."""
    monkeypatch.setitem(C.ATTENTION, "blocked", lambda *a: C.attention_blocked(*a) * 1.02)
    monkeypatch.setattr(K, "_close", lambda out, ref: True)
    force(monkeypatch, attention="blocked")
    torch.manual_seed(0)
    model = vitkit.create_backbone("dinov2_vits14_reg", embed_dim=64, depth=2, num_heads=4, img_size=56).eval()
    x = torch.randn(1, 3, 56, 56)

    def tuned_vs_stock() -> float:
        K._chosen.clear()
        with torch.inference_mode():
            fast = model(x)["x_norm_patchtokens"]
            K.set_mode("stock")
            ref = model(x)["x_norm_patchtokens"]
        K.set_mode("tuned")
        return rel(fast, ref)

    muted = tuned_vs_stock()
    caught = tuned_vs_stock() if randomise(model) is not None else None
    assert muted < 1e-4 < 1e-3 < caught  # 1e-4: the tolerance of the comparisons above


def test_tune_cpu_allocator_rejects_bad_thresholds():
    from vitkit.runtime import tune_cpu_allocator

    with pytest.raises(ValueError, match="32 MiB"):
        tune_cpu_allocator(mmap_threshold=64 << 20)
