"""Bad input is refused with an error that says what was expected, what came, and what to do."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import vitkit
from conftest import TINY, make_tiny
from vitkit import ConfigError, InputError, ViTConfig


@pytest.fixture(scope="module")
def v2():
    return make_tiny("dinov2_vits14_reg")  # 56 px, /14, 3 channels, mask token


def test_error_hierarchy():
    assert issubclass(InputError, ValueError) and issubclass(ConfigError, ValueError)
    assert issubclass(vitkit.CheckpointMismatchError, vitkit.CheckpointError)
    assert issubclass(vitkit.WeightsNotFoundError, FileNotFoundError)
    for cls in (InputError, ConfigError, vitkit.CheckpointError, vitkit.WeightsNotFoundError):
        assert issubclass(cls, vitkit.VitkitError)


# ------------------------------------------------------------------------------------------- input tensors
def test_wrong_channel_count(v2):
    with pytest.raises(InputError) as ei:
        v2(torch.randn(2, 1, 56, 56))
    msg = str(ei.value)
    assert "in_chans=3" in msg and "got 1" in msg and "(2, 1, 56, 56)" in msg
    assert "in_chans=1" in msg  # what to do


def test_wrong_channel_count_4(v2):
    with pytest.raises(InputError, match=r"in_chans=3 channels, got 4"):
        v2(torch.randn(1, 4, 56, 56))


@pytest.mark.parametrize("H,W,crop,pad", [(57, 56, "56x56", "70x56"), (56, 60, "56x56", "56x70"),
                                          (100, 90, "98x84", "112x98")])
def test_size_not_divisible_by_patch(v2, H, W, crop, pad):
    with pytest.raises(InputError) as ei:
        v2(torch.randn(1, 3, H, W))
    msg = str(ei.value)
    assert f"{H}x{W}" in msg and "patch size 14" in msg
    assert f"crop to {crop}" in msg and f"pad to {pad}" in msg and "dynamic_pad=True" in msg


@pytest.mark.parametrize("shape,hint", [((56, 56), "x[None, None]"), ((3, 56, 56), "x[None]"),
                                        ((2, 4, 3, 56, 56), "x.flatten(0, 1)")])
def test_wrong_rank_with_hint(v2, shape, hint):
    with pytest.raises(InputError) as ei:
        v2(torch.randn(*shape))
    msg = str(ei.value)
    assert f"{len(shape)}-D" in msg and str(tuple(shape)) in msg and "[B, C, H, W]" in msg
    assert hint in msg


def test_1d_has_no_hint_but_says_what_came(v2):
    with pytest.raises(InputError, match=r"got a 1-D tensor of shape \(10,\)"):
        v2(torch.randn(10))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_dtype(v2, dtype):
    x = torch.zeros(1, 3, 56, 56, dtype=dtype)
    with pytest.raises(InputError) as ei:
        v2(x)
    assert str(dtype) in str(ei.value) and "x.float()" in str(ei.value) and "floating-point" in str(ei.value)


@pytest.mark.parametrize("obj,typename", [(np.zeros((1, 3, 56, 56), np.float32), "ndarray"),
                                          ([[0.0]], "list"), (None, "NoneType")])
def test_non_tensor_input(v2, obj, typename):
    with pytest.raises(InputError) as ei:
        v2(obj)
    assert typename in str(ei.value) and "torch.Tensor" in str(ei.value)


def test_get_intermediate_layers_validates_input_too(v2):
    with pytest.raises(InputError, match="in_chans=3"):
        v2.get_intermediate_layers(torch.randn(1, 1, 56, 56))


# ------------------------------------------------------------------------------------------------- masks
def test_masks_wrong_shape(v2):
    bad = torch.zeros(2, 17, dtype=torch.bool)
    with pytest.raises(InputError) as ei:
        v2(torch.randn(2, 3, 56, 56), masks=bad)
    msg = str(ei.value)
    assert "(2, 16)" in msg and "(2, 17)" in msg and "bool" in msg


def test_masks_grid_shaped_is_refused(v2):
    with pytest.raises(InputError, match=re.escape("(2, 4, 4)")):
        v2(torch.randn(2, 3, 56, 56), masks=torch.zeros(2, 4, 4, dtype=torch.bool))


def test_masks_wrong_dtype(v2):
    with pytest.raises(InputError) as ei:
        v2(torch.randn(2, 3, 56, 56), masks=torch.zeros(2, 16))
    assert "torch.float32" in str(ei.value) and "bool" in str(ei.value)


@pytest.mark.parametrize("name,size", [("clip_vitb16", 64), ("ijepa_vith14", 56)])
def test_masks_on_model_without_mask_token(name, size):
    model = make_tiny(name)
    with pytest.raises(InputError, match="no mask token"):
        model(torch.randn(1, 3, size, size), masks=torch.zeros(1, (size // model.patch_size) ** 2, dtype=torch.bool))


# ------------------------------------------------------------------------------------------- names, configs
def test_unknown_preset_suggests_close_names():
    with pytest.raises(ConfigError) as ei:
        vitkit.create_backbone("dinov2_vits14_rg")
    msg = str(ei.value)
    assert "'dinov2_vits14_rg'" in msg and "did you mean" in msg and "dinov2_vits14_reg" in msg
    assert "vitkit info" in msg


def test_unknown_preset_without_close_match():
    with pytest.raises(ConfigError, match="unknown model name 'resnet50'") as ei:
        vitkit.get_preset("resnet50")
    assert "did you mean" not in str(ei.value)


def test_embed_dim_not_divisible_by_heads():
    with pytest.raises(ConfigError) as ei:
        vitkit.create_backbone("dinov2_vits14", embed_dim=30, depth=2, num_heads=4, img_size=56)
    assert "embed_dim 30" in str(ei.value) and "num_heads 4" in str(ei.value)


def test_unknown_ffn_layer():
    with pytest.raises(ConfigError) as ei:
        ViTConfig(embed_dim=32, num_heads=4, ffn_layer="geglu")
    msg = str(ei.value)
    assert "'geglu'" in msg and "'mlp'" in msg and "'swiglu'" in msg


@pytest.mark.parametrize("kw,needle", [(dict(pos_embed="rope2d"), "'rope2d'"),
                                       (dict(family="sam"), "'sam'"),
                                       (dict(depth=0), "depth must be positive"),
                                       (dict(drop_path_rate=1.0), "drop_path_rate"),
                                       (dict(rope=True, embed_dim=24, num_heads=4), "head_dim divisible by 4"),
                                       (dict(num_register_tokens=-1), "num_register_tokens")])
def test_invalid_config_fields(kw, needle):
    cfg = dict(embed_dim=32, num_heads=4)
    cfg.update(kw)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        ViTConfig(**cfg)


def test_img_size_not_divisible_in_config_suggests_sizes():
    with pytest.raises(ConfigError) as ei:
        ViTConfig(embed_dim=32, num_heads=4, patch_size=14, img_size=(352, 384))
    msg = str(ei.value)
    assert "(350, 378)" in msg and "(364, 392)" in msg and "dynamic_pad=True" in msg


def test_unknown_config_field_via_replace():
    with pytest.raises(ConfigError, match="embed_dimm"):
        ViTConfig(embed_dim=32, num_heads=4).replace(embed_dimm=64)


def test_misspelled_create_backbone_kwarg_is_a_config_error():
    """Regression: a misspelled override goes straight into ``ViTConfig(**cfg)`` and surfaces as a bare
    ``TypeError: ViTConfig.__init__() got an unexpected keyword argument``, not the ConfigError listing the
    known fields that ``ViTConfig.replace`` already produces."""
    with pytest.raises(ConfigError, match="embed_dimm"):
        vitkit.create_backbone("dinov2_vits14", embed_dimm=32)


def test_return_class_token_on_ijepa():
    model = make_tiny("ijepa_vith14")
    x = torch.randn(1, 3, 56, 56)
    with pytest.raises(ValueError, match="no CLS token") as ei:
        model.get_intermediate_layers(x, return_class_token=True)
    assert "I-JEPA" in str(ei.value) and "return_class_token=False" in str(ei.value)
    model.get_intermediate_layers(x)  # fine without


def test_pretrained_true_without_name():
    with pytest.raises(ConfigError, match="needs a model name"):
        vitkit.create_backbone(None, pretrained=True, **TINY)


def test_from_pretrained_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing path"):
        vitkit.from_pretrained(tmp_path / "nope")


def test_from_pretrained_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        vitkit.from_pretrained(tmp_path)


def test_unknown_format_name():
    with pytest.raises(vitkit.CheckpointError, match="unknown format 'meta_dinov5'"):
        vitkit.load_weights(make_tiny("dinov2_vits14"), {"a": torch.zeros(1)}, format="meta_dinov5")


def test_fold_error_message_for_non_rgb_checkpoint(tmp_path):
    """A 1-channel checkpoint into a 3-channel model: the message should name both channel counts sensibly.

    Regression: fold_in_chans says "only 1 -> 1 (summing) is supported. Build the model with
    in_chans=1 or 1." when the checkpoint has 1 channel; the "c -> 1" wording only makes sense for c > 1."""
    sd = make_tiny("dinov2_vits14", in_chans=1).state_dict()
    with pytest.raises(vitkit.CheckpointMismatchError) as ei:
        vitkit.load_weights(vitkit.create_backbone("dinov2_vits14", img_size=56, **TINY), sd)
    msg = str(ei.value)
    assert "1 input channels" in msg and "in_chans=3" in msg
    assert "in_chans=1 or 1" not in msg
