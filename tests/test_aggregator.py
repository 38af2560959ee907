"""vitkit.Aggregator (VGGT-style alternating frame/global attention): behaviour with numbers.

Tiny models only (width 32, 4 heads, depth <= 4, 8-16 px patches); every parameter is perturbed so that
special tokens, biases and LayerScale all matter.
"""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.errors import ConfigError, InputError, WeightsNotFoundError
from vitkit.models.aggregator import IMAGENET_MEAN, IMAGENET_STD
from vitkit.weights import to_meta_state_dict

C = 32
TINY_BB = dict(embed_dim=C, depth=1, num_heads=4)  # a 1-block DINOv3 backbone as patch embedding


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def tiny_agg(seed: int = 0, **kw) -> vitkit.Aggregator:
    args = dict(img_size=32, patch_size=8, embed_dim=C, depth=3, num_heads=4, n_storage_tokens=2,
                patch_embed="conv")
    args.update(kw)
    torch.manual_seed(seed)
    return perturb(vitkit.Aggregator(**args), seed).eval()


def dinov3_agg(seed: int = 0, **kw) -> vitkit.Aggregator:
    return tiny_agg(seed, img_size=32, patch_size=16, patch_embed="dinov3_vits16", patch_embed_kwargs=TINY_BB, **kw)


def frames(B: int, S: int, H: int = 32, W: int = 48, seed: int = 0, c: int = 3) -> torch.Tensor:
    return torch.rand(B, S, c, H, W, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- shapes
def test_shapes_non_square_and_token_layout():
    agg = tiny_agg()
    out, start = agg(frames(2, 3, 32, 48))
    P = 1 + 2 + (32 // 8) * (48 // 8)
    assert start == 3 == agg.patch_start_idx
    assert len(out) == 3 and all(o.shape == (2, 3, P, 2 * C) for o in out)
    assert all(torch.isfinite(o).all() for o in out)
    # VGGT's README example size: 224 px / 16 with 4 registers -> 1 + 4 + 196 = 201 tokens (not 200)
    agg = tiny_agg(img_size=224, patch_size=16, depth=1, n_storage_tokens=4)
    assert agg(frames(1, 2, 224, 224))[0][-1].shape == (1, 2, 201, 2 * C)


@pytest.mark.parametrize("kw", [dict(aa_order=["global", "frame"]), dict(depth=4, aa_block_size=2),
                                dict(n_storage_tokens=0), dict(rope_freq=None)])
def test_variants_run(kw):
    agg = tiny_agg(**kw)
    out, start = agg(frames(1, 2))
    assert len(out) == agg.depth and start == 1 + agg.num_register_tokens
    assert out[-1].shape[-1] == 2 * C and torch.isfinite(out[-1]).all()


def test_aa_order_changes_the_output_and_each_order_is_deterministic():
    """The same weights run frame-then-global and global-then-frame give different tokens (at every layer), and
    one order run twice gives identical tokens (so the difference is the order, not noise)."""
    fg = tiny_agg(aa_order=["frame", "global"])
    gf = tiny_agg(aa_order=["global", "frame"])
    gf.load_state_dict(fg.state_dict())
    x = frames(2, 3)
    with torch.no_grad():
        a, _ = fg(x)
        a2, _ = fg(x)
        b, _ = gf(x)
    assert all(torch.equal(p, q) for p, q in zip(a, a2))
    for p, q in zip(a, b):
        assert float((p - q).abs().max() / q.abs().max()) > 1e-2


# ------------------------------------------------------------------------------- frame vs global mixing
def test_frame_attention_never_mixes_frames_global_attention_does():
    agg = dinov3_agg(depth=2)
    x = frames(2, 4, 32, 48)
    y = x.clone()
    j = 2
    y[:, j] = torch.rand(y[:, j].shape, generator=torch.Generator().manual_seed(7))
    out_x, _ = agg(x)
    out_y, _ = agg(y)
    a, b = out_x[0], out_y[0]  # first aa step: frame attention sees only its own frame
    for i in range(4):
        if i == j:
            assert not torch.equal(a[:, i, :, :C], b[:, i, :, :C])
        else:
            assert torch.equal(a[:, i, :, :C], b[:, i, :, :C]), f"frame {i}'s frame-attention output changed"
        # global attention mixes every frame of the sequence
        assert (a[:, i, :, C:] - b[:, i, :, C:]).abs().max() > 1e-4, f"frame {i}'s global output did not change"
    # sequences of a batch never mix, not even in global attention
    z = x.clone()
    z[1] = torch.rand(z[1].shape, generator=torch.Generator().manual_seed(8))
    out_z, _ = agg(z)
    assert all(torch.equal(o[0], p[0]) for o, p in zip(out_x, out_z))


# ------------------------------------------------------------------------------- first-frame tokens
def test_first_frame_specialisation():
    agg = tiny_agg()
    R, n = 2, agg.patch_start_idx
    a, b, c = (frames(1, 1, seed=s)[:, 0] for s in (1, 2, 3))
    # the tokens in front of each frame: set 0 for frame 0, set 1 for all other frames
    tokens = agg.embed(torch.stack([a, b, c], 1))
    assert torch.equal(tokens[0, :1], agg.camera_token[0, 0]) and torch.equal(tokens[0, 1:n], agg.register_token[0, 0])
    for s in (1, 2):
        assert torch.equal(tokens[s, :1], agg.camera_token[0, 1])
        assert torch.equal(tokens[s, 1:n], agg.register_token[0, 1])
    assert (agg.camera_token[0, 0] - agg.camera_token[0, 1]).abs().max() > 1e-3
    assert agg.register_token.shape == (1, 2, R, C)

    # identical frames: frames 1 and 2 agree (to float rounding: their rows sit in different GEMM tiles),
    # frame 0 (the reference) does not
    out, _ = agg(torch.stack([a, a, a], 1))
    for o in out:
        torch.testing.assert_close(o[:, 1], o[:, 2], rtol=0, atol=1e-6)
        assert (o[:, 0] - o[:, 1]).abs().max() > 1e-3

    # swapping frames 0 and 1: a's frame-attention output changes with its role, c's (frame 2) does not
    abc, _ = agg(torch.stack([a, b, c], 1))
    bac, _ = agg(torch.stack([b, a, c], 1))
    assert torch.equal(abc[0][:, 2, :, :C], bac[0][:, 2, :, :C])
    assert (abc[0][:, 0, :, :C] - bac[0][:, 1, :, :C]).abs().max() > 1e-3
    # swapping two non-reference frames only permutes the outputs (global attention is order-free)
    acb, _ = agg(torch.stack([a, c, b], 1))
    torch.testing.assert_close(acb[-1][:, 1], abc[-1][:, 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acb[-1][:, 0], abc[-1][:, 0], rtol=1e-5, atol=1e-5)

    # with the two token sets made equal the role difference disappears: the specialisation is the tokens
    with torch.no_grad():
        agg.camera_token[:, 1] = agg.camera_token[:, 0]
        agg.register_token[:, 1] = agg.register_token[:, 0]
    abc, _ = agg(torch.stack([a, b, c], 1))
    bac, _ = agg(torch.stack([b, a, c], 1))
    torch.testing.assert_close(abc[0][:, 0, :, :C], bac[0][:, 1, :, :C], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ RoPE
def test_rope_rotates_patch_tokens_only():
    agg = tiny_agg()
    B, S, grid = 2, 3, (4, 6)
    n, HW = agg.patch_start_idx, grid[0] * grid[1]
    P = n + HW
    frame_rope, global_rope = agg.rope_tables(grid, S)
    sin, cos = agg.rope_embed(*grid)
    assert torch.equal(frame_rope[0], sin) and torch.equal(frame_rope[1], cos)
    g_sin, g_cos = (t.view(S, P, -1) for t in global_rope)
    assert torch.equal(g_sin[:, :n], torch.zeros_like(g_sin[:, :n]))  # special tokens: no rotation
    assert torch.equal(g_cos[:, :n], torch.ones_like(g_cos[:, :n]))
    assert all(torch.equal(g_sin[s, n:], sin) and torch.equal(g_cos[s, n:], cos) for s in range(S))
    assert sin.abs().max() > 0.1  # the patch rows really rotate

    attn = agg.frame_blocks[0].attn
    x = torch.randn(B * S, P, C, generator=torch.Generator().manual_seed(0))
    q, k, _ = attn.qkv_heads(x, frame_rope)
    q0, k0, _ = attn.qkv_heads(x, None)
    assert torch.equal(q[:, :, :n], q0[:, :, :n]) and torch.equal(k[:, :, :n], k0[:, :, :n])
    assert (q[:, :, n:] - q0[:, :, n:]).abs().max() > 1e-3 and (k[:, :, n:] - k0[:, :, n:]).abs().max() > 1e-3

    attn = agg.global_blocks[0].attn
    xg = x.reshape(B, S * P, C)
    q, k, _ = attn.qkv_heads(xg, global_rope)
    q0, k0, _ = attn.qkv_heads(xg, None)
    h, d = attn.num_heads, attn.head_dim
    q, k, q0, k0 = (t.reshape(B, h, S, P, d) for t in (q, k, q0, k0))
    assert torch.equal(q[..., :n, :], q0[..., :n, :]) and torch.equal(k[..., :n, :], k0[..., :n, :])
    assert (q[..., n:, :] - q0[..., n:, :]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3  # every frame rotated
    # every frame's patches get the same positions as in frame attention
    qf, _, _ = agg.global_blocks[0].attn.qkv_heads(x, frame_rope)
    torch.testing.assert_close(q.transpose(1, 2).reshape(B * S, h, P, d), qf, rtol=1e-6, atol=1e-6)

    # without RoPE the model is blind to where patches are: shuffling whole patches permutes the outputs
    no_rope = tiny_agg(rope_freq=0)
    assert no_rope.rope_embed is None and no_rope.rope_tables(grid, S) == (None, None)
    img = frames(1, 2, 16, 16)
    swapped = torch.cat([img[..., 8:], img[..., :8]], dim=-1)  # swap the two patch columns
    for model, same in ((no_rope, True), (agg, False)):
        o1 = model(img)[0][-1][..., n:, :]
        o2 = model(swapped)[0][-1][..., n:, :]
        o2 = o2.reshape(*o2.shape[:2], 2, 2, -1).flip(3).reshape(o1.shape)  # undo the column swap
        assert torch.allclose(o1, o2, atol=1e-5) == same


# ------------------------------------------------------------------------------- intermediate layers
def test_intermediate_layers_select_exactly_and_skip_later_blocks():
    agg = tiny_agg(depth=4)
    x = frames(1, 3)
    full, start = agg(x)
    assert len(full) == 4
    for sel in ([0, -1, 1], [-1], [2, 0], [1]):
        agg.intermediate_layers = sel
        out, start2 = agg(x)
        assert start2 == start and len(out) == len(sel)
        for o, i in zip(out, sel):
            assert torch.equal(o, full[i])
    # blocks after the last requested layer are not run
    calls = []
    hooks = [b.register_forward_hook(lambda *a, i=i: calls.append(i))
             for i, b in enumerate([*agg.frame_blocks, *agg.global_blocks])]
    agg.intermediate_layers = [1]
    agg(x)
    for h in hooks:
        h.remove()
    assert sorted(calls) == [0, 1, 4, 5]  # frame blocks 0, 1 and global blocks 0, 1

    # aa_block_size 2: output k is frame block k + global block k, also when selected alone
    agg = tiny_agg(depth=4, aa_block_size=2)
    full, _ = agg(x)
    agg.intermediate_layers = [0]
    assert torch.equal(agg(x)[0][0], full[0])
    agg = tiny_agg(depth=4, aa_block_size=2, intermediate_layers=[-3])
    assert agg.output_layers == [1] and torch.equal(agg(x)[0][0], full[1])

    for bad in ([4], [-5], [0, -4], []):
        with pytest.raises(ConfigError, match="intermediate_layers"):
            tiny_agg(depth=4, intermediate_layers=bad)


# -------------------------------------------------------------------------------------- normalisation
def test_imagenet_normalisation_inside():
    agg = tiny_agg()
    assert agg.pixel_mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert agg.pixel_std.flatten().tolist() == pytest.approx(IMAGENET_STD)
    assert "pixel_mean" not in agg.state_dict()  # constants, not weights
    raw = tiny_agg(pixel_mean=None, pixel_std=None)
    raw.load_state_dict(agg.state_dict())
    x = frames(1, 2)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    assert torch.equal(agg(x)[0][-1], raw((x - mean) / std)[0][-1])
    # one-channel detector frames with their own statistics
    mono = tiny_agg(in_chans=1, pixel_mean=(0.5,), pixel_std=(0.25,))
    assert mono(frames(1, 2, c=1))[0][-1].shape == (1, 2, 27, 2 * C)
    with pytest.raises(ConfigError, match="pixel_mean/pixel_std need 1 values"):
        tiny_agg(in_chans=1)


# ------------------------------------------------------------------------------- backbone patch embed
def test_backbone_patch_embed_is_forward_features_and_loads_only_when_asked(tmp_path):
    torch.manual_seed(0)
    ref = perturb(vitkit.create_backbone("dinov3_vits16", img_size=32, **TINY_BB)).eval()
    path = tmp_path / "tiny_dinov3.pth"
    torch.save(to_meta_state_dict(ref), path)  # Meta's layout: storage_tokens, bias_mask, ...
    kw = dict(img_size=32, patch_size=16, embed_dim=C, depth=2, num_heads=4, patch_embed="dinov3_vits16",
              patch_embed_kwargs=TINY_BB)
    agg = vitkit.Aggregator(pretrained_patch_embed=path, **kw).eval()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in agg.patch_embed.state_dict().items())
    assert not agg.patch_embed.mask_token.requires_grad
    x = frames(2, 3, 32, 48)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    expected = ref.forward_features(((x - mean) / std).flatten(0, 1))["x_norm_patchtokens"]
    assert torch.equal(agg.embed(x)[:, agg.patch_start_idx:], expected)
    # default: nothing loaded
    fresh = vitkit.Aggregator(**kw)
    assert not torch.equal(fresh.patch_embed.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    # a ready VisionTransformer is used as it is
    agg2 = vitkit.Aggregator(**{**kw, "patch_embed": ref, "patch_embed_kwargs": None})
    assert agg2.patch_embed is ref


def test_missing_patch_embed_weights_are_an_error(isolated_caches, tmp_path):
    kw = dict(img_size=32, patch_size=16, embed_dim=C, depth=1, num_heads=4, patch_embed="dinov3_vits16",
              patch_embed_kwargs=TINY_BB)
    with pytest.raises(WeightsNotFoundError) as e:
        vitkit.Aggregator(pretrained_patch_embed=True, **kw)
    msg = str(e.value)
    assert "dinov3_vits16_pretrain_lvd1689m-08c60483.pth" in msg and str(isolated_caches) in msg
    assert "pretrained_patch_embed='<path of the file>'" in msg and "pretrained_patch_embed=False" in msg
    # other presets go through create_backbone's resolver, with the wording adapted
    with pytest.raises(WeightsNotFoundError, match="pretrained_patch_embed=<path>, or pretrained_patch_embed=False"):
        vitkit.Aggregator(img_size=28, patch_size=14, embed_dim=C, depth=1, num_heads=4,
                          patch_embed="dinov2_vits14_reg", pretrained_patch_embed=True, patch_embed_kwargs=TINY_BB)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vitkit.Aggregator(pretrained_patch_embed=tmp_path / "missing.pth", **kw)


# ------------------------------------------------------------------------------------- errors
def test_input_errors():
    agg = tiny_agg()
    cases = [
        (torch.rand(2, 3, 32, 32), "one sequence \\[S, C, H, W\\] needs images\\[None\\]"),
        (torch.rand(1, 2, 3, 32, 32).mul(255).to(torch.uint8), "images.float\\(\\) / 255"),
        (torch.rand(1, 2, 1, 32, 32), "expected 3 channels"),
        (torch.rand(1, 2, 3, 30, 32), "30x32 is not divisible by the patch size 8; crop to 24x32 or pad to 32x32"),
        (torch.rand(1, 0, 3, 32, 32), "empty"),
        ([[0.0]], "expected a torch.Tensor"),
    ]
    for x, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            agg(x)


def test_config_errors():
    with pytest.raises(ConfigError, match="set embed_dim=32"):
        vitkit.Aggregator(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=4,
                          patch_embed="dinov3_vits16", patch_embed_kwargs=TINY_BB)
    with pytest.raises(ConfigError, match="no '_reg' suffix.*did you mean 'dinov3_vitl16'"):
        vitkit.Aggregator(patch_embed="dinov3_vitl16_reg")
    with pytest.raises(ConfigError, match="no /14 DINOv3.*did you mean 'dinov3_vitl16'"):
        vitkit.Aggregator(patch_embed="dinov3_vitl14_reg")
    bad = [dict(aa_order=["frame"]), dict(aa_order=["frame", "frame"]), dict(depth=3, aa_block_size=2),
           dict(n_storage_tokens=4, num_register_tokens=2), dict(embed_dim=24, num_heads=4),  # head width 6
           dict(pretrained_patch_embed=True), dict(img_size=30), dict(pixel_mean=None)]
    for kw in bad:
        with pytest.raises(ConfigError):
            tiny_agg(**kw)


def test_register_token_aliases():
    a = tiny_agg(n_storage_tokens=None, num_register_tokens=3)
    b = tiny_agg(n_storage_tokens=3)
    assert a.register_token.shape == b.register_token.shape == (1, 2, 3, C)
    assert tiny_agg(n_storage_tokens=None).num_register_tokens == 4  # VGGT's default
    assert tiny_agg(n_storage_tokens=0).register_token is None


# ------------------------------------------------------------------------------------- training
def test_backward_every_parameter_and_checkpointing_matches():
    agg = dinov3_agg(depth=2).train()  # train mode: the DINOv3 backbone draws random RoPE rescales
    x = frames(1, 2)
    torch.manual_seed(0)
    out, _ = agg(x)
    loss = sum(o.square().mean() for o in out)
    loss.backward()
    for name, p in agg.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"no gradient for {name}"
    assert not agg.patch_embed.mask_token.requires_grad
    grads = {k: p.grad.clone() for k, p in agg.named_parameters() if p.requires_grad}
    agg.zero_grad(set_to_none=True)
    agg.set_grad_checkpointing(True)
    assert agg.patch_embed.grad_checkpointing
    torch.manual_seed(0)
    out2, _ = agg(x)
    loss2 = sum(o.square().mean() for o in out2)
    loss2.backward()
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    for k, p in agg.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-6, atol=1e-8)
