"""VisionTransformer behaviour on tiny presets of every family: outputs, intermediates, masks, training
features (drop path, activation checkpointing, gradients), dynamic padding, DINOv3's masked key bias,
and the parameter counts of the full-size presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitkit
from conftest import FAMILY_PRESETS, TINY, make_tiny, randomize
from vitkit import VisionTransformer, ViTConfig, get_preset

D = TINY["embed_dim"]


def _expected_tokens(model):
    c = model.config
    return int(c.class_token), int(c.dist_token), c.num_register_tokens


# --------------------------------------------------------------------------------------- forward_features
@pytest.mark.parametrize("name", list(FAMILY_PRESETS))
@pytest.mark.parametrize("shape", ["native", "nonsquare"])
def test_forward_features_keys_and_shapes(name, shape):
    model = make_tiny(name)
    s = FAMILY_PRESETS[name]
    p = model.patch_size
    H, W = (s, s) if shape == "native" else (s, s + 2 * p)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        out = model.forward_features(x)
    has_cls, has_dist, R = _expected_tokens(model)
    HW = (H // p) * (W // p)
    N = has_cls + has_dist + R + HW
    assert out["x_norm_patchtokens"].shape == (2, HW, D)
    assert out["x_norm_regtokens"].shape == (2, R, D)
    assert out["x_prenorm"].shape == (2, N, D)
    assert out["masks"] is None
    if has_cls:
        assert out["x_norm_clstoken"].shape == (2, D)
    else:
        assert out["x_norm_clstoken"] is None
    assert ("x_norm_disttoken" in out) == bool(has_dist)
    if has_dist:
        assert out["x_norm_disttoken"].shape == (2, D)
    if model.config.proj_dim:
        assert out["x_projected"].shape == (2, model.config.proj_dim)
        torch.testing.assert_close(out["x_projected"], out["x_norm_clstoken"] @ model.proj.weight.T)
    else:
        assert "x_projected" not in out
    for k, v in out.items():
        if isinstance(v, torch.Tensor):
            assert torch.isfinite(v).all(), k
    # normed outputs are the final norm of x_prenorm, split as [CLS, dist, registers, patches]
    normed = model.norm(out["x_prenorm"])
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, N - HW:], atol=1e-6, rtol=0)
    torch.testing.assert_close(out["x_norm_regtokens"], normed[:, has_cls + has_dist:N - HW], atol=1e-6, rtol=0)
    if has_cls:
        torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0], atol=1e-6, rtol=0)
    # forward == forward_features
    with torch.no_grad():
        again = model(x)
    assert torch.equal(again["x_norm_patchtokens"], out["x_norm_patchtokens"])


def test_batch_elements_are_independent():
    model = make_tiny("dinov3_vits16")
    x = torch.randn(3, 3, 64, 48)
    with torch.no_grad():
        full = model(x)["x_norm_patchtokens"]
        single = model(x[1:2])["x_norm_patchtokens"]
    torch.testing.assert_close(full[1:2], single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16", "clip_vitb16"])
def test_in_chans_1(name):
    model = make_tiny(name, in_chans=1)
    assert model.patch_embed.proj.weight.shape[1] == 1
    s = FAMILY_PRESETS[name]
    with torch.no_grad():
        out = model(torch.randn(2, 1, s, s))
    assert out["x_norm_patchtokens"].shape == (2, (s // model.patch_size) ** 2, D)


def test_learned_pos_embed_is_interpolated_on_the_fly():
    """At a non-native size, the model uses its stored table resampled the configured way."""
    model = make_tiny("dinov2_vits14")  # offset 0.1, no antialias
    from vitkit.layers import resample_pos_embed

    pos = model.interpolate_pos_encoding((5, 7))
    ref = resample_pos_embed(model.pos_embed[:, 1:], (4, 4), (5, 7), offset=0.1, antialias=False)
    assert torch.equal(pos[:, 1:], ref) and torch.equal(pos[:, :1], model.pos_embed[:, :1])
    assert model.interpolate_pos_encoding((4, 4)) is model.pos_embed


def test_ijepa_sincos_table_is_fixed_and_matches_formula():
    from vitkit.layers import sincos_2d_pos_embed

    model = make_tiny("ijepa_vith14")
    assert not model.pos_embed.requires_grad
    assert torch.equal(model.pos_embed, sincos_2d_pos_embed(D, (4, 4)))


# ---------------------------------------------------------------------------------- get_intermediate_layers
@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16", "ijepa_vith14", "deit_tiny_patch16"])
def test_get_intermediate_layers(name):
    model = make_tiny(name)
    s = FAMILY_PRESETS[name]
    p = model.patch_size
    H, W = s, s + p
    h, w = H // p, W // p
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        ff = model(x)
        last = model.get_intermediate_layers(x)
        both = model.get_intermediate_layers(x, n=2)
        by_idx = model.get_intermediate_layers(x, n=[0, 1])
        neg = model.get_intermediate_layers(x, n=[-1])
        resh = model.get_intermediate_layers(x, n=2, reshape=True)
        raw = model.get_intermediate_layers(x, n=2, norm=False)
    assert isinstance(last, tuple) and len(last) == 1 and len(both) == 2
    assert last[0].shape == (2, h * w, D)
    # last layer, normed == forward_features patch tokens
    torch.testing.assert_close(last[0], ff["x_norm_patchtokens"], atol=1e-6, rtol=0)
    for a, b in zip(both, by_idx):
        assert torch.equal(a, b)
    assert torch.equal(neg[0], last[0])
    # the two layers differ (it really returns per-block outputs)
    assert (both[0] - both[1]).abs().max() > 1e-3
    for r, t in zip(resh, both):
        assert r.shape == (2, D, h, w)
        assert torch.equal(r, t.transpose(1, 2).reshape(2, D, h, w))
    # norm=True is the final norm applied to the norm=False output
    for n_out, r_out in zip(both, raw):
        torch.testing.assert_close(n_out, model.norm(r_out), atol=1e-6, rtol=0)
        assert (n_out - r_out).abs().max() > 1e-3
    torch.testing.assert_close(raw[1], ff["x_prenorm"][:, -h * w:], atol=1e-6, rtol=0)


def test_get_intermediate_layers_class_and_extra_tokens():
    model = make_tiny("dinov2_vits14_reg")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ff = model(x)
        out = model.get_intermediate_layers(x, n=2, return_class_token=True)
        extra = model.get_intermediate_layers(x, n=1, return_class_token=True, return_extra_tokens=True)
        raw = model.get_intermediate_layers(x, n=1, return_class_token=True, norm=False)
    assert len(out) == 2
    for patch, cls in out:
        assert patch.shape == (2, 16, D) and cls.shape == (2, D)
    torch.testing.assert_close(out[1][1], ff["x_norm_clstoken"], atol=1e-6, rtol=0)
    patch, cls, reg = extra[0]
    assert reg.shape == (2, 4, D)
    torch.testing.assert_close(reg, ff["x_norm_regtokens"], atol=1e-6, rtol=0)
    torch.testing.assert_close(raw[0][1], ff["x_prenorm"][:, 0], atol=1e-6, rtol=0)


def test_get_intermediate_layers_rejects_bad_indices():
    model = make_tiny("dinov2_vits14")
    x = torch.randn(1, 3, 56, 56)
    with pytest.raises(ValueError, match="depth 2"):
        model.get_intermediate_layers(x, n=3)
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[2])


# ------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_masks_replace_patch_tokens(name):
    model = make_tiny(name)
    s, p = FAMILY_PRESETS[name], model.patch_size
    g = s // p
    x = torch.randn(2, 3, s, s)
    masks = torch.zeros(2, g * g, dtype=torch.bool)
    masks[0, 5] = masks[1, [0, 7]] = True
    # the token entering the blocks at a masked position is the mask token (+ position embedding)
    with torch.no_grad():
        tokens, _ = model.prepare_tokens(x, masks)
        npre = model.num_prefix_tokens
        expected = model.mask_token[0]
        if model.pos_embed is not None:
            expected = expected + model.pos_embed[0, 1 + 5]
        torch.testing.assert_close(tokens[0, npre + 5], expected, atol=1e-6, rtol=0)
        out = model(x, masks=masks)
        assert out["masks"] is masks
        # changing a masked patch's pixels changes nothing
        x2 = x.clone()
        r, c = divmod(5, g)
        x2[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += 10.0
        out2 = model(x2, masks=masks)
        assert torch.equal(out2["x_norm_patchtokens"], out["x_norm_patchtokens"])
        assert torch.equal(out2["x_prenorm"], out["x_prenorm"])
        # ... while changing an unmasked patch does, and masking changes the output
        x3 = x.clone()
        x3[0, :, :p, p:2 * p] += 10.0  # patch 1, unmasked
        assert (model(x3, masks=masks)["x_norm_patchtokens"][0] - out["x_norm_patchtokens"][0]).abs().max() > 1e-3
        assert (model(x)["x_norm_patchtokens"] - out["x_norm_patchtokens"]).abs().max() > 1e-3
        # an all-False mask is the same as no mask
        none = model(x, masks=torch.zeros_like(masks))
        assert torch.equal(none["x_norm_patchtokens"], model(x)["x_norm_patchtokens"])


# --------------------------------------------------------------------------------------- training features
def test_drop_path_train_vs_eval():
    torch.manual_seed(0)
    model = randomize(vitkit.create_backbone("dinov2_vits14", drop_path_rate=0.5, img_size=56, **TINY))
    ref = vitkit.create_backbone("dinov2_vits14", img_size=56, **TINY)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 56, 56)
    with torch.no_grad():
        model.train()
        torch.manual_seed(1)
        a = model(x)["x_norm_patchtokens"]
        torch.manual_seed(2)
        b = model(x)["x_norm_patchtokens"]
        assert (a - b).abs().max() > 1e-3
        model.eval()
        e1, e2 = model(x)["x_norm_patchtokens"], model(x)["x_norm_patchtokens"]
        assert torch.equal(e1, e2)
        assert torch.equal(e1, ref.eval()(x)["x_norm_patchtokens"])
    # linear decay: first block 0, last block drop_path_rate
    assert model.blocks[0].drop_path1.p == 0.0 and model.blocks[-1].drop_path1.p == pytest.approx(0.5)


def _loss_and_grads(model, x, masks=None, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, masks=masks)
    loss = sum((v.float() ** 2).mean() for k, v in out.items()
               if isinstance(v, torch.Tensor) and v.numel() and k not in ("masks", "x_prenorm"))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16plus"])
def test_grad_checkpointing_gives_identical_gradients(name):
    # drop path and DINOv3's train-time RoPE rescaling are random: checkpointing must replay them
    model = make_tiny(name, eval=False, drop_path_rate=0.3)
    s = FAMILY_PRESETS[name]
    x = torch.randn(2, 3, s, s)
    loss0, g0 = _loss_and_grads(model, x)
    model.set_grad_checkpointing(True)
    loss1, g1 = _loss_and_grads(model, x)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-7, rtol=1e-6, msg=k)
    # in no_grad the checkpointed model runs normally
    with torch.no_grad():
        torch.manual_seed(0)
        model(x)


@pytest.mark.parametrize("name", list(FAMILY_PRESETS))
def test_every_parameter_gets_a_finite_gradient(name):
    model = make_tiny(name, eval=False)
    s = FAMILY_PRESETS[name]
    x = torch.randn(2, 3, s, s)
    masks = None
    if model.mask_token is not None:
        masks = torch.zeros(2, (s // model.patch_size) ** 2, dtype=torch.bool)
        masks[:, 3] = True
    loss, grads = _loss_and_grads(model, x, masks)
    assert torch.isfinite(loss)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = trainable - set(grads)
    assert not missing, f"no gradient for {sorted(missing)}"
    for n, g in grads.items():
        assert torch.isfinite(g).all(), n
        assert g.abs().sum() > 0, f"zero gradient for {n}"


# ----------------------------------------------------------------------------------------------- dynamic pad
def test_dynamic_pad_equals_manual_zero_padding():
    model = vitkit.create_backbone("dinov2_vits14_reg", img_size=(352, 384), in_chans=1, **TINY)
    randomize(model).eval()
    assert model.config.dynamic_pad
    assert model.config.grid_size == (26, 28)
    assert model.pos_embed.shape == (1, 1 + 26 * 28, D)
    x = torch.randn(1, 1, 352, 384)
    with torch.no_grad():
        out = model(x)
        ref = model(F.pad(x, (0, 392 - 384, 0, 364 - 352)))
    assert out["x_norm_patchtokens"].shape == (1, 26 * 28, D)
    for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        assert torch.equal(out[k], ref[k]), k
    with torch.no_grad():
        inter = model.get_intermediate_layers(x, reshape=True)
    assert inter[0].shape == (1, D, 26, 28)


# ----------------------------------------------------------------------------------------- DINOv3 k-bias
def test_dinov3_mask_k_bias_ignores_key_bias():
    model = make_tiny("dinov3_vits16")
    assert model.config.mask_k_bias
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ref = model(x)["x_norm_patchtokens"]
        bias = model.blocks[0].attn.qkv.bias
        bias[D:2 * D] += torch.randn(D) * 5
        assert torch.equal(model(x)["x_norm_patchtokens"], ref)
        bias[:D] += torch.randn(D)  # control: the query bias is used
        assert (model(x)["x_norm_patchtokens"] - ref).abs().max() > 1e-3


def test_key_bias_matters_with_rope_when_not_masked():
    """Control for the test above: with RoPE, an unmasked key bias changes the output (q.R(b) varies
    with the key position), so the masked-bias test can fail."""
    model = make_tiny("dinov3_vits16", mask_k_bias=False)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ref = model(x)["x_norm_patchtokens"]
        model.blocks[0].attn.qkv.bias[D:2 * D] += torch.randn(D) * 5
        assert (model(x)["x_norm_patchtokens"] - ref).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ parameter counts
PUBLISHED = {  # Meta's reported / hub-model parameter counts (backbone only)
    "dinov2_vits14": 22.06e6,
    "dinov2_vitb14": 86.6e6,
    "dinov2_vitl14": 304.4e6,
    "dinov2_vitg14": 1.136e9,
    "dinov3_vits16": 21.6e6,
    "dinov3_vits16plus": 28.7e6,
    "dinov3_vitb16": 85.7e6,
    "dinov3_vitl16": 303e6,
    "dinov3_vith16plus": 840.6e6,
    "dinov3_vit7b16": 6.716e9,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = VisionTransformer(ViTConfig(**get_preset(name).config))
    n = sum(p.numel() for p in model.parameters())
    assert n == model.num_params()
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.005, f"{name}: {n / 1e6:.2f} M"
