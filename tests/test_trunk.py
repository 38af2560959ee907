"""Multi-scale trunks (vitkit.models.trunk): exact strides, numbers against the backbone, freezing, dtypes,
bad input, loading, and SAM2 end to end (shipped config + SAM2ImagePredictor)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.errors import ConfigError, InputError, WeightsNotFoundError
from vitkit.models.trunk import SimpleFeaturePyramid, ViTTrunkMultiScale, sam2_image_predictor

TINY = dict(embed_dim=32, depth=2, num_heads=4)
BACKBONES = {"p14": "dinov2_vits14_reg", "p16": "dinov3_vits16"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def smooth_image(h: int, w: int, c: int = 3) -> torch.Tensor:
    """A band-limited image defined on [0, 1]^2, so that sampling it at two resolutions is nearly lossless."""
    y, x = torch.linspace(0, 1, h)[:, None], torch.linspace(0, 1, w)[None]
    chans = [torch.sin(2 * math.pi * (0.7 * x + 0.4 * y)), torch.cos(2 * math.pi * (0.5 * x - 0.9 * y)), x * y - 0.3]
    return torch.stack(chans[:c])[None]


def make_trunk(cls, key="p16", in_chans=3, **kw):
    torch.manual_seed(0)
    return cls(BACKBONES[key], in_chans=in_chans, **TINY, **kw)


# ------------------------------------------------------------------------------------ exact strides
@pytest.mark.parametrize("mode", ["bilinear", "deconv"])
@pytest.mark.parametrize("key", ["p14", "p16"])
@pytest.mark.parametrize("cls", [ViTTrunkMultiScale, SimpleFeaturePyramid])
def test_exact_strides_mono_non_square(cls, key, mode):
    """1x1x352x384 detector panel: every level exactly H/s x W/s, exactly 2x between levels, channels as
    channel_list (reversed: channel_list is lowest resolution first, outputs highest first)."""
    dims = dict(out_dims=[40, 24, 16, 8]) if cls is ViTTrunkMultiScale else dict(out_channels=16)
    trunk = make_trunk(cls, key, in_chans=1, upsample_mode=mode, **dims).eval()
    assert trunk.vit.patch_size == 16 and trunk.strides == [4, 8, 16, 32]
    x = torch.randn(1, 1, 352, 384)
    feats = trunk(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(352 // s, 384 // s) for s in (4, 8, 16, 32)]
    for hi, lo in zip(feats, feats[1:]):
        assert hi.shape[-2] == 2 * lo.shape[-2] and hi.shape[-1] == 2 * lo.shape[-1]
    assert [f.shape[1] for f in feats] == trunk.channel_list[::-1]
    assert all(torch.isfinite(f).all() for f in feats)


def test_exact_strides_rgb_batch_and_resize_mode():
    """patch_mode='resize' (patch-14 ViT on an image resized by 14/16) keeps the same exact sizes."""
    trunk = make_trunk(ViTTrunkMultiScale, "p14", patch_mode="resize", out_dims=16).eval()
    assert trunk.vit.patch_size == 14
    feats = trunk(torch.randn(2, 3, 96, 160))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 96 // s, 160 // s) for s in (4, 8, 16, 32)]


def test_pad_option_keeps_2x():
    """pad=True: sizes that are not multiples of 32 are zero-padded; the levels cover the padded image."""
    trunk = make_trunk(ViTTrunkMultiScale, in_chans=1, out_dims=8, pad=True).eval()
    feats = trunk(torch.randn(1, 1, 100, 140))  # padded to 128 x 160
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 40), (16, 20), (8, 10), (4, 5)]
    sfp = make_trunk(SimpleFeaturePyramid, scale_factors=(4.0, 2.0, 1.0), out_channels=8).eval()
    assert sfp.size_divisibility == 16  # no 1/32 level: multiples of 16 suffice
    assert [tuple(f.shape[-2:]) for f in sfp(torch.randn(1, 3, 48, 80))] == [(12, 20), (6, 10), (3, 5)]


# ---------------------------------------------------------------------------------------- numbers
def _token_map(vit, x):
    tokens = vit.forward_features(x)["x_norm_patchtokens"]
    gh, gw = x.shape[-2] // 16, x.shape[-1] // 16
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)


@pytest.mark.parametrize("key", ["p14", "p16"])
def test_stride16_level_is_projection_of_patch_tokens(key):
    x = torch.randn(2, 3, 64, 96)
    trunk = make_trunk(ViTTrunkMultiScale, key, out_dims=[24, 48, 16, 8]).eval()  # C16 != D: a 1x1 conv
    with torch.no_grad():
        f4, f8, f16, f32 = trunk(x)
        tokens = _token_map(trunk.vit, x)
        expected = F.conv2d(tokens, trunk.proj16.weight, trunk.proj16.bias)
        torch.testing.assert_close(f16, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f32, trunk.down32(expected), rtol=1e-5, atol=1e-5)
        same = make_trunk(ViTTrunkMultiScale, key, out_dims=[32, 32, 32, 32]).eval()  # C16 == D: identity
        assert torch.equal(same(x)[2], _token_map(same.vit, x))
        # refine is residual: without it, bilinear F8 is exactly the upsampled (projected) F16
        plain = make_trunk(ViTTrunkMultiScale, key, out_dims=32, refine_highres=False).eval()
        up = F.interpolate(_token_map(plain.vit, x), scale_factor=2.0, mode="bilinear", align_corners=False)
        torch.testing.assert_close(plain(x)[1], up, rtol=1e-5, atol=1e-6)


def test_simple_feature_pyramid_branches_from_last_map():
    """Every SFP level is its branch applied to the last ViT map; 1/32 is max-pool then 1x1 + 3x3 convs."""
    x = torch.randn(1, 3, 64, 64)
    sfp = make_trunk(SimpleFeaturePyramid, out_channels=8).eval()
    with torch.no_grad():
        feats, tokens = sfp(x), _token_map(sfp.vit, x)
        for f, branch in zip(feats, sfp.branches):
            torch.testing.assert_close(f, branch(tokens))
        b = sfp.branches[-1]
        manual = b[4](b[3](b[2](b[1](F.max_pool2d(tokens, 2)))))
        torch.testing.assert_close(feats[-1], manual)


def test_patch14_resampled_to_16_keeps_features_on_smooth_input():
    """FlexiViT resampling: the /16 trunk on a 128-px rendering of a smooth image gives the /14 model's
    tokens on its 112-px rendering within 1% (measured 0.24%; 8.4% on white noise, where resizing loses
    information, shown for contrast). patch_mode='resize' measured 0.36%."""
    vit14 = vitkit.create_backbone("dinov2_vits14_reg", img_size=112, **TINY).eval()
    with torch.no_grad():
        for p in vit14.parameters():  # non-trivial biases / LayerScale / tokens
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        ref = vit14.forward_features(smooth_image(112, 112))["x_norm_patchtokens"]
        trunk = ViTTrunkMultiScale(copy.deepcopy(vit14), out_dims=32).eval()
        assert trunk.vit.config.extra["patch_resampled_from"] == 14
        ours = _token_map(trunk.vit, smooth_image(128, 128)).flatten(2).transpose(1, 2)
        assert rel(ours, ref) < 1e-2
        resize = ViTTrunkMultiScale(copy.deepcopy(vit14), out_dims=32, patch_mode="resize").eval()
        assert rel(resize.vit_features(smooth_image(128, 128)).flatten(2).transpose(1, 2), ref) < 1e-2
        noise = torch.randn(1, 3, 112, 112)
        noisy = _token_map(trunk.vit, F.interpolate(noise, size=(128, 128), mode="bicubic")).flatten(2).transpose(1, 2)
        assert rel(noisy, vit14.forward_features(noise)["x_norm_patchtokens"]) > 3e-2


def test_img_size_stores_position_table_bit_exactly():
    """img_size stores the position table of that grid, computed as the ViT would on the fly."""
    vit = vitkit.create_backbone("dinov2_vits14_reg", **TINY).eval()  # 518 px, 37x37 grid
    on_the_fly = ViTTrunkMultiScale(copy.deepcopy(vit), out_dims=32).eval()
    stored = ViTTrunkMultiScale(copy.deepcopy(vit), out_dims=32, img_size=(64, 96)).eval()
    assert stored.vit.config.grid_size == (4, 6) and stored.vit.pos_embed.shape[1] == 1 + 24
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(_token_map(stored.vit, x), _token_map(on_the_fly.vit, x))


# ---------------------------------------------------------------------------------- freeze, dtype
def test_freeze_vit_no_grad_and_eval_mode():
    trunk = make_trunk(ViTTrunkMultiScale, "p14", in_chans=1, out_dims=[16, 32, 16, 8], freeze_vit=True)
    trunk.train()
    assert not trunk.vit.training and trunk.up8.training
    sum(f.mean() for f in trunk(torch.randn(1, 1, 64, 64))).backward()
    assert all(p.grad is None and not p.requires_grad for p in trunk.vit.parameters())
    head = [(n, p) for n, p in trunk.named_parameters() if not n.startswith("vit.")]
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in head)


@pytest.mark.parametrize("cls", [ViTTrunkMultiScale, SimpleFeaturePyramid])
def test_every_trainable_parameter_gets_a_gradient(cls):
    """DDP-safe: no trainable parameter is unused (the unused mask token is excluded from training)."""
    trunk = make_trunk(cls, "p14", **(dict(out_dims=8) if cls is ViTTrunkMultiScale else dict(out_channels=8)))
    trunk.train()
    sum(f.square().mean() for f in trunk(torch.randn(1, 3, 64, 64))).backward()
    assert not trunk.vit.mask_token.requires_grad
    missing = [n for n, p in trunk.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing


@pytest.mark.parametrize("freeze", [True, False])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_force_dtype_outputs_in_that_dtype_and_close_to_fp32(dtype, freeze):
    """Frozen: ViT weights cast once (buffers stay fp32); trainable: autocast with fp32 weights. The maps come
    back in ``force_dtype`` (seed 003's contract; ``output_dtype="input"``: the input's dtype).
    Measured relative error vs fp32: bf16 0.3-0.4%, fp16 0.05%; bounds 2% and 0.5%."""
    ref = make_trunk(ViTTrunkMultiScale, "p16", out_dims=[32, 32, 16, 16]).eval()
    low = ViTTrunkMultiScale(copy.deepcopy(ref.vit), out_dims=[32, 32, 16, 16], freeze_vit=freeze,
                             force_dtype=dtype).eval()
    low.load_state_dict(ref.state_dict())
    target = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert next(low.vit.parameters()).dtype == (target if freeze else torch.float32)
    assert low.vit.rope_embed.periods.dtype == torch.float32
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=target):  # the fp32 neck under autocast, as SAM2 trains
        out = low(x)
    with torch.no_grad():
        expected = ref(x)
        low.output_dtype = torch.float32  # what output_dtype="input" resolves to for an fp32 input
        as_input = low(x)
    assert all(o.dtype == target for o in out) and all(o.dtype == torch.float32 for o in as_input)
    tol = {"bf16": 2e-2, "fp16": 5e-3}[dtype]
    assert max(rel(o, e) for o, e in zip(out, expected)) < 2 * tol
    assert max(rel(o, e) for o, e in zip(as_input, expected)) < tol


def test_force_dtype_fp32_inside_autocast():
    trunk = make_trunk(ViTTrunkMultiScale, out_dims=16, force_dtype="fp32").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = trunk.vit_features(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = trunk.vit_features(x)
    assert inside.dtype == torch.float32 and torch.equal(inside, ref)


# ---------------------------------------------------------------------------------------- loading
def test_backbone_from_checkpoint_path_and_pretrained_path(tmp_path):
    src = vitkit.create_backbone("dinov3_vits16", img_size=64, **TINY).eval()
    vitkit.save_pretrained(src, tmp_path / "bb")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = _token_map(src, x)
        for kw in (dict(backbone=tmp_path / "bb"), dict(pretrained=str(tmp_path / "bb")),
                   dict(backbone="dinov3_vits16", pretrained=tmp_path / "bb" / "model.safetensors", **TINY)):
            trunk = ViTTrunkMultiScale(out_dims=32, encoder_type="dinov3", **kw).eval()
            assert torch.equal(_token_map(trunk.vit, x), expected), kw
    # explicit architecture (a Hydra mapping) + a checkpoint for it, loaded strictly
    arch = dict(patch_size=16, embed_dim=32, depth=2, num_heads=4)
    custom = vitkit.create_backbone(None, img_size=64, **arch).eval()
    vitkit.save_pretrained(custom, tmp_path / "custom")
    trunk = ViTTrunkMultiScale(backbone=arch, pretrained=tmp_path / "custom" / "model.safetensors", out_dims=8,
                               img_size=64).eval()
    with torch.no_grad():
        assert torch.equal(_token_map(trunk.vit, x), _token_map(custom, x))
    # a trunk's state dict (patch 16) reloads strictly into a trunk built from the same arguments
    again = make_trunk(ViTTrunkMultiScale, "p14", out_dims=8)
    again.load_state_dict(make_trunk(ViTTrunkMultiScale, "p14", out_dims=8).state_dict(), strict=True)


def test_weights_are_never_silently_skipped(tmp_path, isolated_caches):
    vitkit.save_pretrained(vitkit.create_backbone("dinov3_vits16", **TINY), tmp_path / "bb")
    with pytest.raises(ConfigError, match="pretrained=False"):
        ViTTrunkMultiScale(backbone=tmp_path / "bb", pretrained=False)
    with pytest.raises(ConfigError, match="two weight sources"):
        ViTTrunkMultiScale(backbone=tmp_path / "bb", pretrained=tmp_path / "bb")
    with pytest.raises(ConfigError, match="preset name"):
        ViTTrunkMultiScale(vitkit.create_backbone("dinov3_vits16", **TINY), pretrained=True)
    with pytest.raises(WeightsNotFoundError):
        ViTTrunkMultiScale("dinov2_vits14", pretrained=True)  # offline, not cached: loud, never random
    with pytest.raises(WeightsNotFoundError):
        ViTTrunkMultiScale(pretrained="facebook/dinov2-small")
    with pytest.raises(vitkit.CheckpointMismatchError):  # strict: a 64-wide model vs a 32-wide checkpoint
        ViTTrunkMultiScale("dinov3_vits16", embed_dim=64, depth=2, num_heads=4,
                           pretrained=tmp_path / "bb" / "model.safetensors")


# ------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, match", [
    (dict(encoder_type="hiera"), "unknown encoder_type 'hiera'.*SAM2's own trunk"),
    (dict(encoder_type="ijepa"), "encoder_type='ijepa' expects a backbone of family ijepa, got family 'dinov3'"),
    (dict(out_dims=[32, 32, 32]), "out_dims must list 4 channel counts"),
    (dict(out_dims="32,32,32,32"), "out_dims must be"),
    (dict(out_dims=[32, 0, 32, 32]), "positive"),
    (dict(upsample_mode="nearest"), "unknown upsample_mode"),
    (dict(force_dtype="int8"), "unknown force_dtype"),
    (dict(patch_mode="crop"), "unknown patch_mode"),
    (dict(img_size=(100, 96)), "multiple of 32"),
    (dict(scale_factors=(4.0, 1.0)), "log2-contiguous"),
    (dict(in_chans=2), "in_chans=2 but the given backbone takes 3"),
])
def test_bad_configuration(kwargs, match):
    cls = SimpleFeaturePyramid if "scale_factors" in kwargs else ViTTrunkMultiScale
    with pytest.raises(ConfigError, match=match):
        if "in_chans" in kwargs:  # a built module with another channel count
            cls(vitkit.create_backbone("dinov3_vits16", **TINY), **kwargs)
        else:
            cls("dinov3_vits16", **TINY, **kwargs)


def test_bad_backbone_arguments():
    with pytest.raises(ConfigError, match="no backbone"):
        ViTTrunkMultiScale()
    with pytest.raises(ConfigError, match="did you mean dinov2_vits14"):
        ViTTrunkMultiScale("dinov2_vits15")
    with pytest.raises(FileNotFoundError):
        ViTTrunkMultiScale("/no/such/checkpoint_dir")
    with pytest.raises(ConfigError, match="unknown ViT config field"):
        ViTTrunkMultiScale("dinov3_vits16", embed_dims=32)


def test_bad_input_tensors():
    trunk = make_trunk(ViTTrunkMultiScale, in_chans=1, out_dims=8).eval()
    with pytest.raises(InputError, match="in_chans=1 channels, got 3"):
        trunk(torch.randn(1, 3, 64, 64))
    with pytest.raises(InputError, match=r"350x384 is not a multiple of 32.*crop to 320x384, pad to 352x384"):
        trunk(torch.randn(1, 1, 350, 384))
    with pytest.raises(InputError, match="floating-point"):
        trunk(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))
    with pytest.raises(InputError, match=r"\[B, C, H, W\]"):
        trunk(torch.randn(1, 64, 64))


# --------------------------------------------------------------------------------------- SAM2
@pytest.fixture
def sam2_build():
    pytest.importorskip("sam2", reason="sam2 is not installed (SAM2_BUILD_CUDA=0 pip install sam2==1.1.0)")
    from hydra.core.global_hydra import GlobalHydra
    from sam2.build_sam import build_sam2

    if not GlobalHydra.instance().is_initialized():  # another test may have cleared sam2's Hydra context
        from hydra import initialize_config_module

        initialize_config_module("sam2", version_base="1.2")
    return build_sam2


TINY_SAM2 = ["++model.image_size=256", "++model.image_encoder.trunk.embed_dim=32",
             "++model.image_encoder.trunk.depth=2", "++model.image_encoder.trunk.num_heads=4",
             "model.image_encoder.trunk.out_dims=[64,32,32,16]"]


def test_sam2_predicts_mask_from_point_prompt(sam2_build):
    """The shipped config (tiny overrides, image_size 256) builds with sam2's build_sam2, and
    SAM2ImagePredictor segments a small non-square RGB image from one point: shapes, and mask logits that depend
    on the point and its label (deterministically)."""
    model = sam2_build(config_file="sam2_vit_dino.yaml", ckpt_path=None, device="cpu",
                       hydra_overrides_extra=TINY_SAM2)
    trunk = model.image_encoder.trunk
    assert isinstance(trunk, ViTTrunkMultiScale) and trunk.channel_list == [64, 32, 32, 16]
    assert list(model.image_encoder.neck.backbone_channel_list) == trunk.channel_list
    predictor = sam2_image_predictor(model)
    assert predictor._bb_feat_sizes == [(64, 64), (32, 32), (16, 16)]
    rng = np.random.default_rng(0)
    image = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
    predictor.set_image(image)
    masks, scores, low_res = predictor.predict(point_coords=np.array([[60.0, 40.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 96, 128) and scores.shape == (3,) and low_res.shape == (3, 64, 64)
    assert np.isfinite(scores).all() and np.isfinite(low_res).all()
    single, s1, l1 = predictor.predict(point_coords=np.array([[60.0, 40.0]]), point_labels=np.array([1]),
                                       multimask_output=False)
    assert single.shape == (1, 96, 128) and s1.shape == (1,) and l1.shape == (1, 64, 64)
    # the prompt reaches the masks: the same point gives the same logits, another point or a negative label
    # at the same point gives different ones (random weights: no claim about where the mask lies)
    again = predictor.predict(point_coords=np.array([[60.0, 40.0]]), point_labels=np.array([1]))[2]
    other = predictor.predict(point_coords=np.array([[10.0, 85.0]]), point_labels=np.array([1]))[2]
    negative = predictor.predict(point_coords=np.array([[60.0, 40.0]]), point_labels=np.array([0]))[2]
    np.testing.assert_array_equal(again, low_res)
    for changed in (other, negative):
        assert np.abs(changed - low_res).max() > 1e-2 * np.abs(low_res).max()
