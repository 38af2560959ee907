"""Seed README 003 ("DINO/JEPA Integration in SAM2"): every code example, run against vitkit.

Changes to the examples, and only these:
* the fork's ``sam2.modeling.backbones.vit_multiscale.ViTTrunkMultiScale`` import becomes ``vitkit``'s;
* ``facebook/dinov2-large`` / ``/path/to/ijepa/model`` become tiny Hugging Face style checkpoints written
  to tmp_path (the shipped configs default to random weights: ``pretrained: null``);
* ``device="cuda"`` becomes ``"cpu"``; the training runs add ``model.image_size=128`` for CPU speed;
* the fork's ``training/train.py`` flags (not part of the sam2 package) become the Hydra overrides listed
  in the configs' header (same names as the trunk's arguments).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sam2", reason="sam2 is not installed (SAM2_BUILD_CUDA=0 pip install sam2==1.1.0)")
transformers = pytest.importorskip("transformers", reason="tiny Hugging Face checkpoints need transformers")

from hydra import compose  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import vitkit  # noqa: E402
from vitkit.errors import WeightsNotFoundError  # noqa: E402

TRUNK = "model.image_encoder.trunk"


@pytest.fixture(autouse=True)
def sam2_hydra():
    """sam2 opens its Hydra context on import; make sure it is there even if another test cleared it."""
    if not GlobalHydra.instance().is_initialized():
        from hydra import initialize_config_module

        initialize_config_module("sam2", version_base="1.2")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny stand-ins for facebook/dinov2-large and an I-JEPA model directory (config.json + safetensors)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    dino = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14))
    dino.save_pretrained(root / "dinov2")
    ijepa = transformers.IJepaModel(transformers.IJepaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=56,
        patch_size=14))
    ijepa.save_pretrained(root / "ijepa")
    return {"dino": root / "dinov2", "ijepa": root / "ijepa", "dino_model": dino}


# ------------------------------------------------------------------- Example 1: pre-configured YAML
def test_example1_preconfigured_yaml_files():
    from sam2.build_sam import build_sam2

    # Load SAM2 with DINO encoder
    model = build_sam2(
        config_file="sam2_vit_dino.yaml",
        ckpt_path=None,  # No pretrained SAM2 weights when using different encoder
        device="cpu"
    )

    # Load SAM2 with I-JEPA encoder
    model_ijepa = build_sam2(
        config_file="sam2_vit_ijepa.yaml",
        ckpt_path=None,
        device="cpu"
    )

    for m, family in ((model, "dinov2"), (model_ijepa, "ijepa")):
        trunk = m.image_encoder.trunk
        assert isinstance(trunk, vitkit.ViTTrunkMultiScale) and not m.training
        assert trunk.vit.config.family == family and trunk.vit.patch_size == 16
        assert trunk.vit.config.img_size == (1024, 1024) and m.image_size == 1024
        assert trunk.channel_list == list(m.image_encoder.neck.backbone_channel_list) == [768, 384, 192, 96]


# ------------------------------------------------------- Example 2: training with command-line flags
def _train_step(model, dtype=torch.float32):
    images = torch.randn(2, 3, 128, 128, dtype=dtype)
    out = model.forward_image(images)
    assert [tuple(f.shape[-2:]) for f in out["backbone_fpn"]] == [(32, 32), (16, 16), (8, 8)]
    assert all(f.dtype == torch.float32 for f in out["backbone_fpn"])
    loss = sum(f.float().square().mean() for f in out["backbone_fpn"])
    loss.backward()
    return out


def test_example2a_train_dino_encoder(hf_dirs):
    # python training/train.py --config configs/sam2_training/base_config.yaml \
    #     --encoder-type dino --encoder-ckpt facebook/dinov2-large --encoder-out-dims 1024,1024,1024,1024
    from sam2.build_sam import build_sam2

    model = build_sam2("sam2_vit_dino.yaml", ckpt_path=None, device="cpu", mode="train", hydra_overrides_extra=[
        f"{TRUNK}.encoder_type=dino",
        f"{TRUNK}.backbone='{hf_dirs['dino']}'",  # --encoder-ckpt facebook/dinov2-large
        f"{TRUNK}.out_dims=[1024,1024,1024,1024]",
        "++model.image_size=128",
    ])
    trunk = model.image_encoder.trunk
    assert model.image_encoder.neck.backbone_channel_list == [1024] * 4  # follows out_dims
    torch.testing.assert_close(trunk.vit.norm.weight, hf_dirs["dino_model"].layernorm.weight)  # real weights
    _train_step(model)
    assert trunk.vit.training and trunk.vit.blocks[0].attn.qkv.weight.grad is not None
    assert trunk.up4[-1].weight.grad is not None


def test_example2b_train_ijepa_encoder_frozen_fp16(hf_dirs):
    # python training/train.py --config configs/sam2_training/base_config.yaml \
    #     --encoder-type ijepa --encoder-ckpt /path/to/ijepa/model --freeze-vit --force-dtype fp16
    from sam2.build_sam import build_sam2

    model = build_sam2("sam2_vit_ijepa.yaml", ckpt_path=None, device="cpu", mode="train", hydra_overrides_extra=[
        f"{TRUNK}.encoder_type=ijepa",
        f"{TRUNK}.backbone='{hf_dirs['ijepa']}'",  # --encoder-ckpt /path/to/ijepa/model
        f"{TRUNK}.freeze_vit=true",
        f"{TRUNK}.force_dtype=fp16",
        "++model.image_size=128",
    ])
    trunk = model.image_encoder.trunk
    assert trunk.vit.config.family == "ijepa" and trunk.vit.config.extra["patch_resampled_from"] == 14
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in trunk.vit.parameters())
    _train_step(model)
    assert not trunk.vit.training and all(p.grad is None for p in trunk.vit.parameters())
    assert trunk.down32.weight.grad is not None and model.image_encoder.neck.convs[0].conv.weight.grad is not None


# -------------------------------------------------------------------- Example 3: custom configuration
def test_example3_custom_configuration(hf_dirs, capsys):
    from omegaconf import OmegaConf  # noqa: F401 - as in the example
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder

    from vitkit import ViTTrunkMultiScale

    # Create custom trunk with your preferred ViT model
    trunk = ViTTrunkMultiScale(
        pretrained=str(hf_dirs["dino"]),  # Any HuggingFace ViT model
        encoder_type="dino",
        out_dims=[1024, 1024, 1024, 1024],  # Output channel dimensions for each scale
        upsample_mode="bilinear",  # or "deconv"
        refine_highres=True,  # Use depthwise separable convs for refinement
        freeze_vit=False,  # Whether to freeze ViT weights
        force_dtype=None,  # Force output dtype: None, "fp16", "bf16", "fp32"
        verbose=True  # Print feature shapes
    )

    # beyond the example: it is a SAM2 trunk
    from sam2.modeling.position_encoding import PositionEmbeddingSine

    neck = FpnNeck(PositionEmbeddingSine(num_pos_feats=256), d_model=256, backbone_channel_list=trunk.channel_list,
                   fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
    encoder = ImageEncoder(trunk=trunk, neck=neck, scalp=1).eval()
    with torch.no_grad():
        out = encoder(torch.randn(1, 3, 64, 96))
    assert tuple(out["vision_features"].shape) == (1, 256, 4, 6)
    printed = capsys.readouterr().out
    assert "(1, 1024, 16, 24)" in printed and "(1, 1024, 2, 3)" in printed


# ---------------------------------------------------- Example 4: troubleshooting, config resolvers
def test_example4_no_custom_resolvers_needed():
    # from training.utils.train_utils import register_omegaconf_resolvers
    # register_omegaconf_resolvers()
    # -> not needed: vitkit's configs use only ${} references, which OmegaConf resolves by itself
    for name in ("sam2_vit_dino.yaml", "sam2_vit_ijepa.yaml"):
        cfg = compose(config_name=name)
        OmegaConf.resolve(cfg)
        enc = cfg.model.image_encoder
        assert list(enc.neck.backbone_channel_list) == list(enc.trunk.out_dims)
        assert list(enc.trunk.img_size if not isinstance(enc.trunk.img_size, int) else [enc.trunk.img_size]) \
            == [1024]


# ---------------------------------------------------- Example 5: troubleshooting, model not found
def test_example5_model_ids_and_local_directories(hf_dirs, isolated_caches):
    from vitkit import ViTTrunkMultiScale

    # Good: HuggingFace model ID (offline and not cached here: a clear error naming where to put it)
    with pytest.raises(WeightsNotFoundError, match="facebook/dinov2-large"):
        ViTTrunkMultiScale(pretrained="facebook/dinov2-large", encoder_type="dino")
    # Good: Local directory with config.json ("/path/to/my/model/" does not exist here)
    with pytest.raises(FileNotFoundError, match="/path/to/my/model"):
        ViTTrunkMultiScale(pretrained="/path/to/my/model/", encoder_type="dino")
    trunk = ViTTrunkMultiScale(pretrained=str(hf_dirs["dino"]) + "/", encoder_type="dino")
    assert trunk.channel_list == [32] * 4  # default: the ViT width at every scale


# ------------------------------------------------ Example 6: troubleshooting, channel dimensions
def test_example6_channel_dimension_match():
    # trunk:
    #   out_dims: [1024, 1024, 1024, 1024]
    # neck:
    #   backbone_channel_list: [1024, 1024, 1024, 1024]  # Must match
    tiny = [f"++{TRUNK}.embed_dim=32", f"++{TRUNK}.depth=1", f"++{TRUNK}.num_heads=4", "++model.image_size=64"]
    both = [f"{TRUNK}.out_dims=[1024,1024,1024,1024]",
            "model.image_encoder.neck.backbone_channel_list=[1024,1024,1024,1024]"]
    encoder = instantiate(compose(config_name="sam2_vit_dino.yaml", overrides=tiny + both).model.image_encoder)
    assert encoder.trunk.channel_list == [1024] * 4
    # in vitkit's configs the neck follows the trunk: overriding out_dims alone is enough
    cfg = compose(config_name="sam2_vit_dino.yaml", overrides=tiny + [f"{TRUNK}.out_dims=[64,32,32,16]"])
    assert instantiate(cfg.model.image_encoder).neck.backbone_channel_list == [64, 32, 32, 16]
    # a mismatch set by hand is still refused by SAM2's ImageEncoder
    bad = compose(config_name="sam2_vit_dino.yaml",
                  overrides=tiny + both[:1] + ["model.image_encoder.neck.backbone_channel_list=[1024,1024,1024,512]"])
    with pytest.raises(InstantiationException, match="Channel dims of trunk and neck do not match"):
        instantiate(bad.model.image_encoder)


# ------------------------------------------------------------------- Example 7: validation script
def test_example7_validation():
    # python test_dino_jepa_integration.py  -> pytest tests/test_seed_sam2.py tests/test_trunk.py
    # It checks: configuration loading, component compatibility, training integration, parameter validation.
    for name, family in (("sam2_vit_dino.yaml", "dino"), ("sam2_vit_ijepa.yaml", "ijepa")):
        cfg = compose(config_name=name)  # configuration loading
        trunk = cfg.model.image_encoder.trunk
        assert trunk._target_ == "vitkit.models.trunk.ViTTrunkMultiScale" and trunk.encoder_type == family
        assert cfg.model.image_encoder.neck.fpn_top_down_levels == [2, 3]  # stride 32 is used, not dead
    with pytest.raises(vitkit.ConfigError, match="encoder_type"):  # parameter validation
        vitkit.ViTTrunkMultiScale("dinov3_vits16", encoder_type="ijepa", embed_dim=32, depth=1, num_heads=4)
