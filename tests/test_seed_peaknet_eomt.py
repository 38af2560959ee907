"""Seed README 000 ("PeakNet EoMT"): every code example, run against vitkit.

Changes to the examples, and only these:
* the import lines: ``peaknet_eomt.modeling`` -> ``vitkit`` (``_target_: vitkit.EoMT`` in the Hydra YAML);
* sizes, where the seed's model would not fit a CI budget on 2 CPU cores (ViT-L is 300 M and ViT-g 1.1 B parameters,
  a 518 px forward of ViT-L is ~1.5 TFLOP). Each test says which of these it uses:
  - the seed's exact call is built on the meta device (``with torch.device("meta")``: parameters without storage,
    no initialisation cost), to check what it builds (parameter names and shapes, configuration, parameter counts)
    and which official weights ``pretrained=True`` asks for;
  - ``pretrained=True`` is exercised with ViT-S/14-reg4, the smallest released DINOv2 (the seed uses ViT-L), whose
    official file ``dinov2_vits14_reg4_pretrain.pth`` is a random stand-in of the real shapes written to an
    isolated ``$VITKIT_HOME`` (offline; nothing is downloaded);
  - forwards run at 56-112 px instead of 518 px, or with tiny dimensions (embed_dim 32, depth 2).
After each example the test checks shapes, values, warnings or errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import vitkit
from vitkit import ConfigError, WeightsNotFoundError

sys.path.insert(0, os.path.dirname(__file__))
from conftest import randomize  # noqa: E402

VITS_FILE = "dinov2_vits14_reg4_pretrain.pth"  # the official name of Meta's ViT-S/14-reg4 file
VITL_FILE = "dinov2_vitl14_reg4_pretrain.pth"
TINY = dict(embed_dim=32, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def vits_weights(tmp_path_factory):
    """A random stand-in for Meta's ViT-S/14-reg4 checkpoint: the real keys and shapes (Meta's layout), N(0, 0.02)
    values (so LayerScale, norms and tokens are all far from their init). Returns ``(path, state_dict)``."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in vitkit.create_backbone("dinov2_vits14_reg").state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    path = tmp_path_factory.mktemp("meta_weights") / VITS_FILE
    torch.save(sd, path)
    return path, sd


@pytest.fixture
def official_vits(isolated_caches, vits_weights):
    """Offline caches with the ViT-S/14-reg4 stand-in where ``pretrained=True`` looks first ($VITKIT_HOME)."""
    os.symlink(vits_weights[0], isolated_caches / VITS_FILE)
    return vits_weights[1]


def _same_encoder_weights(encoder, sd) -> None:
    own = encoder.state_dict()
    assert set(own) == set(sd)
    for k in ("cls_token", "register_tokens", "patch_embed.proj.weight", "blocks.0.ls1.gamma",
              "blocks.11.attn.qkv.weight", "blocks.11.mlp.fc2.bias", "norm.weight"):
        assert torch.equal(own[k], sd[k]), k
    # the position table is resized to the model's grid; the CLS position is kept as it is
    assert torch.equal(own["pos_embed"][:, :1], sd["pos_embed"][:, :1])


def _structure(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_outputs(model, x, num_q, num_classes, num_blocks=4, mask_hw=None):
    masks, classes = model(x)
    n = num_blocks + 1 if model.training or model.masked_attn_enabled else 1
    assert len(masks) == len(classes) == n  # one entry per masked block, then the final prediction
    hw = mask_hw or model.mask_size(*x.shape[-2:])
    assert all(tuple(m.shape) == (x.shape[0], num_q, *hw) for m in masks)
    assert all(tuple(c.shape) == (x.shape[0], num_q, num_classes + 1) for c in classes)
    assert all(torch.isfinite(t).all() for t in masks + classes)
    return masks, classes


# ------------------------------------------------------------ Basic Usage (New Configuration-Based Interface)
def test_basic_usage_seed_call_asks_for_the_official_vitl_reg4_weights(isolated_caches):
    """The seed's exact call (ViT-L, 518 px, pretrained=True), on the meta device: the configuration is recognised
    as DINOv2 ViT-L/14 with 4 registers and its official file is requested (not in the empty caches: an error
    naming the file and where to put it, never random weights)."""
    from vitkit import EoMT

    with torch.device("meta"), pytest.raises(WeightsNotFoundError) as info:
        # Create EoMT model with direct ViT configuration
        model = EoMT(  # noqa: F841
            # Core ViT architecture parameters
            patch_size=14,
            embed_dim=1024,        # ViT-Large
            depth=24,              # ViT-Large
            num_heads=16,          # ViT-Large
            mlp_ratio=4.0,

            # DINOv2 specific parameters
            num_register_tokens=4,  # Register tokens for training stability
            ffn_layer="mlp",       # or "swiglufused" for ViT-Giant

            # EoMT parameters
            img_size=(518, 518),
            num_classes=150,
            num_q=100,

            # Pretrained weights (auto-detected from config)
            pretrained=True
        )
    assert VITL_FILE in str(info.value) and str(isolated_caches) in str(info.value)


def test_basic_usage_pretrained_forward(official_vits):
    """The seed's call with ViT-S/14-reg4 dimensions (the smallest released DINOv2) and 112 px instead of ViT-L at
    518 px: ``pretrained=True`` loads the official file, and the forward pass gives the documented outputs."""
    from vitkit import EoMT

    model = EoMT(
        patch_size=14,
        embed_dim=384,         # ViT-Small (seed: 1024, ViT-Large)
        depth=12,              # ViT-Small (seed: 24)
        num_heads=6,           # ViT-Small (seed: 16)
        mlp_ratio=4.0,
        num_register_tokens=4,
        ffn_layer="mlp",
        img_size=(112, 112),   # seed: (518, 518)
        num_classes=150,
        num_q=100,
        pretrained=True
    )

    # Forward pass
    import torch
    x = torch.randn(2, 3, 112, 112)  # seed: (2, 3, 518, 518)
    mask_logits_per_layer, class_logits_per_layer = model(x)

    _same_encoder_weights(model.encoder, official_vits)
    assert model.encoder.config.extra["weights_format"] == "meta_dinov2_reg"
    # patch 14 -> grid 8x8, one x2 ScaleBlock (the official rule) -> 16x16 masks; 4 masked blocks + final
    assert model.mask_size(112, 112) == (16, 16)
    _check_outputs(model, x, num_q=100, num_classes=150, mask_hw=(16, 16))


# ------------------------------------------------------------------------------ Using Configuration Helpers
def test_configuration_helpers_build_the_seed_models():
    """The seed's two models (ViT-L and ViT-g at 518 px), built on the meta device: the helpers' dimensions, and the
    encoders' parameter counts against timm's published ``vit_{large,giant}_patch14_reg4_dinov2`` (304.4 M and
    1136.5 M); then the same helper with tiny overrides runs a forward pass."""
    from vitkit import EoMT, vit_giant_config, vit_large_config

    with torch.device("meta"):
        # Use predefined configurations
        config = vit_large_config(num_register_tokens=4)
        model = EoMT(**config, img_size=(518, 518), num_classes=150, num_q=100)

        # ViT-Giant with SwiGLU FFN
        giant_config = vit_giant_config(num_register_tokens=4)
        model_giant = EoMT(**giant_config, img_size=(518, 518), num_classes=150, num_q=100)

    for m, (dim, depth, heads, ffn, published) in ((model, (1024, 24, 16, "mlp", 304.4e6)),
                                                    (model_giant, (1536, 40, 24, "swiglu", 1136.5e6))):
        c = m.encoder.config
        assert (c.embed_dim, c.depth, c.num_heads, c.ffn_layer, c.num_register_tokens) == (dim, depth, heads, ffn, 4)
        assert (c.patch_size, c.img_size, c.family) == (14, (518, 518), "dinov2")
        assert abs(m.encoder.num_params() - published) / published < 1e-3
        assert (m.num_q, m.num_classes, m.class_head.out_features) == (100, 150, 151)

    # the helpers take overrides: the same call at a tiny size runs
    tiny = EoMT(**vit_large_config(num_register_tokens=4, **TINY), img_size=(56, 56), num_classes=150, num_q=100,
                num_blocks=2)
    _check_outputs(tiny.eval(), torch.randn(1, 3, 56, 56), num_q=100, num_classes=150, num_blocks=2)


# ------------------------------------------------------------------------- Available Standard Configurations
def test_available_standard_configurations_match_the_seed_comments():
    from vitkit import vit_base_config, vit_giant_config, vit_large_config, vit_small_config

    # ViT-Small: embed_dim=384, depth=12, num_heads=6
    small_config = vit_small_config(num_register_tokens=4)

    # ViT-Base: embed_dim=768, depth=12, num_heads=12
    base_config = vit_base_config(num_register_tokens=4)

    # ViT-Large: embed_dim=1024, depth=24, num_heads=16
    large_config = vit_large_config(num_register_tokens=4)

    # ViT-Giant: embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"
    giant_config = vit_giant_config(num_register_tokens=4)

    expected = {"small": (384, 12, 6, "mlp"), "base": (768, 12, 12, "mlp"), "large": (1024, 24, 16, "mlp"),
                "giant": (1536, 40, 24, "swiglufused")}
    for size, cfg in (("small", small_config), ("base", base_config), ("large", large_config),
                      ("giant", giant_config)):
        assert (cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["ffn_layer"]) == expected[size]
        assert cfg["patch_size"] == 14 and cfg["num_register_tokens"] == 4 and cfg["mlp_ratio"] == 4.0
    assert vit_small_config()["num_register_tokens"] == 0  # registers only when asked for


# --------------------------------------------------------------------------------------- Custom Configurations
def test_custom_configuration():
    """The seed's call as written (38 M parameters, random init); the forward runs on one 224 px image."""
    from vitkit import EoMT

    torch.manual_seed(0)
    # Completely custom ViT configuration
    custom_model = EoMT(
        patch_size=16,           # Different patch size
        embed_dim=512,           # Custom embedding dimension
        depth=12,                # Custom depth
        num_heads=8,             # Custom head count
        num_register_tokens=0,   # No register tokens
        drop_path_rate=0.1,      # Stochastic depth
        pretrained=False,        # Random initialization
        img_size=(224, 224),
        num_classes=1000,
        num_q=50
    )

    enc = custom_model.encoder
    assert (enc.patch_size, enc.embed_dim, len(enc.blocks), enc.config.num_heads) == (16, 512, 12, 8)
    assert enc.register_tokens is None and enc.config.img_size == (224, 224)
    # stochastic depth: linear from 0 to drop_path_rate over the blocks (DINOv2's rule)
    assert enc.blocks[0].drop_path1.p == 0.0 and enc.blocks[-1].drop_path1.p == pytest.approx(0.1)
    assert len(custom_model.upscale) == 2  # patch 16: masks at 1/4 (official rule)
    with torch.no_grad():
        _check_outputs(custom_model.eval(), torch.randn(1, 3, 224, 224), num_q=50, num_classes=1000,
                       mask_hw=(56, 56))


# ---------------------------------------------------------------------------------- Standalone DINOv2 Encoder
def test_standalone_encoder_seed_call_asks_for_the_official_vitl_reg4_weights(isolated_caches):
    """The seed's exact call (ViT-L, pretrained=True) on the meta device: ViT-L/14-reg4's official file is asked for."""
    from vitkit import create_dinov2_encoder

    with torch.device("meta"), pytest.raises(WeightsNotFoundError, match=VITL_FILE):
        # Create encoder with configuration
        encoder = create_dinov2_encoder(  # noqa: F841
            embed_dim=1024,
            depth=24,
            num_heads=16,
            num_register_tokens=4,
            pretrained=True
        )


def test_standalone_encoder_loads_official_weights(official_vits):
    """The same call with ViT-S dimensions: the official file is loaded strictly, and the encoder runs."""
    from vitkit import create_dinov2_encoder

    encoder = create_dinov2_encoder(
        embed_dim=384,  # seed: 1024 (ViT-L)
        depth=12,       # seed: 24
        num_heads=6,    # seed: 16
        num_register_tokens=4,
        pretrained=True
    )

    assert isinstance(encoder, vitkit.VisionTransformer)
    _same_encoder_weights(encoder, official_vits)
    with torch.no_grad():
        feats = encoder.eval().forward_features(torch.randn(2, 3, 56, 56))
    assert tuple(feats["x_norm_patchtokens"].shape) == (2, 16, 384)
    assert tuple(feats["x_norm_regtokens"].shape) == (2, 4, 384) and tuple(feats["x_norm_clstoken"].shape) == (2, 384)


# -------------------------------------------------------------------------------- Legacy Interface (Deprecated)
def test_legacy_interface_as_written(isolated_caches):
    """The seed's block verbatim (warnings silenced as it does): ViT-L/14-reg4's official file is asked for."""
    from vitkit import create_dinov2_encoder_legacy

    with pytest.raises(WeightsNotFoundError, match=VITL_FILE):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            encoder = create_dinov2_encoder_legacy(  # noqa: F841
                model_name="vit_large_patch14_reg4_dinov2",
                pretrained=True
            )


def test_legacy_interface_warns_and_loads(official_vits):
    from vitkit import create_dinov2_encoder, create_dinov2_encoder_legacy

    with pytest.warns(DeprecationWarning, match=r"create_dinov2_encoder_legacy is deprecated; use "
                                                r"vitkit\.create_backbone\('dinov2_vits14_reg'"):
        encoder = create_dinov2_encoder_legacy(model_name="vit_small_patch14_reg4_dinov2", pretrained=True)
    _same_encoder_weights(encoder, official_vits)
    # the legacy name builds what the explicit configuration builds (ViT-L on the meta device)
    with torch.device("meta"), pytest.warns(DeprecationWarning):
        legacy = create_dinov2_encoder_legacy(model_name="vit_large_patch14_reg4_dinov2")
    with torch.device("meta"):
        explicit = create_dinov2_encoder(embed_dim=1024, depth=24, num_heads=16, num_register_tokens=4)
    assert _structure(legacy) == _structure(explicit)
    legacy.config.extra, explicit.config.extra = {}, {}
    assert legacy.config == explicit.config
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="unknown legacy DINOv2 name"):
        create_dinov2_encoder_legacy(model_name="vit_huge_patch14_dinov2")


# ---------------------------------------------------------------- "Old way: Magic strings" -> deprecated, same model
def test_old_way_encoder_name_warns_and_builds_the_new_way_model():
    """The seed's two spellings, full size on the meta device: the old one warns naming the new one, and both build
    the same parameters (names and shapes) and the same encoder configuration."""
    from vitkit import EoMT

    with torch.device("meta"):
        with pytest.warns(DeprecationWarning) as record:
            # ❌ Old way: Magic strings
            model = EoMT(encoder_name="vit_large_patch14_reg4_dinov2")

        # ✅ New way: Explicit configuration
        new_model = EoMT(
            patch_size=14,
            embed_dim=1024,
            depth=24,
            num_heads=16,
            num_register_tokens=4
        )

    message = str(record[0].message)
    assert "EoMT(encoder_name='vit_large_patch14_reg4_dinov2') is deprecated" in message
    assert "EoMT(**vitkit.vit_large_config(num_register_tokens=4), ...)" in message
    assert "patch_size=14, embed_dim=1024, depth=24, num_heads=16" in message and "num_register_tokens=4" in message
    assert record[0].filename == __file__  # points at the caller
    assert _structure(model) == _structure(new_model)
    assert model.encoder.config == new_model.encoder.config and model.init_config == new_model.init_config


def test_old_way_same_seed_and_same_weights_give_the_same_outputs():
    """At a tiny size (the name's dimensions overridden, as keyword arguments may): the same seed gives the same
    initial weights and outputs; the same loaded weights give the same outputs. A third model from another seed
    differs, so the equalities are not trivial."""
    from vitkit import EoMT, vit_small_config

    kw = dict(img_size=(56, 56), num_classes=3, num_q=5, num_blocks=2)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="vit_small_config"):
        old = EoMT(encoder_name="vit_small_patch14_reg4_dinov2", **TINY, **kw).eval()
    torch.manual_seed(0)
    new = EoMT(**vit_small_config(num_register_tokens=4, **TINY), **kw).eval()
    torch.manual_seed(1)
    other = EoMT(**vit_small_config(num_register_tokens=4, **TINY), **kw).eval()
    assert _structure(old) == _structure(new)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (m_old, c_old), (m_new, c_new) = old(x), new(x)
        assert all(torch.equal(a, b) for a, b in zip(m_old + c_old, m_new + c_new))
        assert not torch.equal(other(x)[0][-1], m_new[-1])
        randomize(new, seed=5)  # weights far from init (LayerScale ~0.1): the blocks matter
        old.load_state_dict(new.state_dict())
        (m_old, c_old), (m_new, c_new) = old(x), new(x)
    assert all(torch.equal(a, b) for a, b in zip(m_old + c_old, m_new + c_new))
    assert len(m_new) == 3 and tuple(m_new[-1].shape) == (2, 5, 8, 8)


def test_old_way_pretrained_loads_the_same_official_weights(official_vits):
    from vitkit import EoMT

    with pytest.warns(DeprecationWarning):
        model = EoMT(encoder_name="vit_small_patch14_reg4_dinov2", img_size=(56, 56), pretrained=True)
    _same_encoder_weights(model.encoder, official_vits)


def test_old_way_refuses_unknown_names_and_two_encoders():
    from vitkit import EoMT

    with pytest.raises(ConfigError, match="unknown legacy DINOv2 name 'vit_large_patch16_dinov3'.*"
                                          "vit_large_patch14_reg4_dinov2"):
        EoMT(encoder_name="vit_large_patch16_dinov3")
    with pytest.raises(ConfigError, match="both name an encoder"):
        EoMT(backbone="dinov2_vits14", encoder_name="vit_small_patch14_dinov2")


# -------------------------------------------------------------------------------------- Hydra Integration Example
SEED_CONFIG_YAML = """\
# config.yaml
model:
  _target_: vitkit.EoMT

  # ViT architecture
  patch_size: 14
  embed_dim: 1024
  depth: 24
  num_heads: 16
  mlp_ratio: 4.0

  # DINOv2 features
  num_register_tokens: 4
  ffn_layer: mlp

  # EoMT parameters
  img_size: [518, 518]
  num_classes: 150
  num_q: 100

  # Training
  pretrained: true
  drop_path_rate: 0.1
"""

SEED_MAIN_PY = """\
# main.py
import hydra
from omegaconf import DictConfig

@hydra.main(version_base=None, config_path=".", config_name="config")
def main(cfg: DictConfig) -> None:
    model = hydra.utils.instantiate(cfg.model)
    # model is ready to use!
"""

# appended to the seed's main(): report what was built, for the test to check
REPORT = """\
    import json, torch
    x = torch.randn(2, 3, *cfg.model.img_size)
    masks, classes = model(x)
    enc = model.encoder
    print("REPORT " + json.dumps(dict(
        cls=type(model).__name__, dims=[enc.embed_dim, len(enc.blocks), enc.config.num_heads],
        registers=enc.num_register_tokens, weights=enc.config.extra.get("weights_format"),
        qkv=enc.state_dict()["blocks.11.attn.qkv.weight"][:2, :3].tolist(),
        drop_path=enc.blocks[-1].drop_path1.p, masks=[list(m.shape) for m in masks],
        classes=list(classes[-1].shape))))

if __name__ == "__main__":
    main()
"""


def test_hydra_yaml_composes_to_the_explicit_model(tmp_path):
    """The seed's YAML composed with Hydra's API and instantiated on the meta device (full ViT-L; ``pretrained``
    overridden to false there, since meta tensors cannot hold weights): the same model as the explicit call."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    (tmp_path / "config.yaml").write_text(SEED_CONFIG_YAML)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        cfg = compose(config_name="config")
        assert cfg.model.pretrained is True and list(cfg.model.img_size) == [518, 518]
        with torch.device("meta"):
            model = instantiate(compose(config_name="config", overrides=["model.pretrained=false"]).model)
            explicit = vitkit.EoMT(patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                                   num_register_tokens=4, ffn_layer="mlp", img_size=(518, 518), num_classes=150,
                                   num_q=100, drop_path_rate=0.1)
    GlobalHydra.instance().clear()
    assert isinstance(model, vitkit.EoMT) and _structure(model) == _structure(explicit)
    assert model.encoder.config == explicit.encoder.config
    assert model.encoder.blocks[-1].drop_path1.p == pytest.approx(0.1)


def test_hydra_main_as_written(tmp_path, vits_weights):
    """The seed's ``config.yaml`` and ``main.py`` run as a script (``@hydra.main``), offline, with command-line
    overrides to ViT-S dimensions and 56 px (seed: ViT-L at 518 px); ``pretrained: true`` loads the official
    ViT-S/14-reg4 file (the stand-in in $VITKIT_HOME)."""
    (tmp_path / "config.yaml").write_text(SEED_CONFIG_YAML)
    (tmp_path / "main.py").write_text(SEED_MAIN_PY + REPORT)
    home = tmp_path / "vitkit_home"
    home.mkdir()
    os.symlink(vits_weights[0], home / VITS_FILE)
    env = dict(os.environ, VITKIT_HOME=str(home), VITKIT_OFFLINE="1", HF_HUB_OFFLINE="1",
               TORCH_HOME=str(tmp_path / "torch"), HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf"))
    run = subprocess.run([sys.executable, "main.py", "model.embed_dim=384", "model.depth=12", "model.num_heads=6",
                          "model.img_size=[56,56]", "hydra.run.dir=out"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.split("REPORT ", 1)[1])
    assert report["cls"] == "EoMT" and report["dims"] == [384, 12, 6] and report["registers"] == 4
    assert report["weights"] == "meta_dinov2_reg"
    assert torch.allclose(torch.tensor(report["qkv"]), vits_weights[1]["blocks.11.attn.qkv.weight"][:2, :3])
    assert report["drop_path"] == pytest.approx(0.1)
    assert report["masks"] == [[2, 100, 8, 8]] * 5 and report["classes"] == [2, 100, 151]
