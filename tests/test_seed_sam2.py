"""Seed README 003 ("DINO/JEPA Integration in SAM2"): every code example, run against vitkit.

Changes to the examples, and only these:
* the fork's ``sam2.modeling.backbones.vit_multiscale.ViTTrunkMultiScale`` import becomes ``vitkit``'s;
* ``facebook/dinov2-large`` / ``/path/to/ijepa/model`` become tiny Hugging Face style checkpoints written
  to tmp_path (the shipped configs default to random weights: ``pretrained: null``);
* ``device="cuda"`` becomes ``"cpu"``; the training runs add ``model.image_size=128`` for CPU speed;
* the fork's ``training/train.py`` flags (not part of the sam2 package) become the Hydra overrides of the
  table in ``docs/sam2.md`` (same names as the trunk's arguments); with ``--force-dtype`` the step runs under
  autocast, as SAM2's trainer does with AMP (``amp_dtype: bfloat16`` in sam2's training configs), since the trunk
  returns its maps in that dtype, as the fork documents.

Beyond the examples: ``force_dtype``'s output dtype, the configs' ``pretrained=true`` (weights placed where it
looks, offline) and every row of the flag table in ``docs/sam2.md``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import sys
from pathlib import Path

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
from vitkit.errors import ConfigError, WeightsNotFoundError  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import references as R  # noqa: E402
from conftest import randomize  # noqa: E402

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
def _train_step(model, amp_dtype=None):
    """One forward/backward of the image encoder; ``amp_dtype``: under autocast, as SAM2's trainer with AMP."""
    images = torch.randn(2, 3, 128, 128)
    amp = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with amp:
        out = model.forward_image(images)
    assert [tuple(f.shape[-2:]) for f in out["backbone_fpn"]] == [(32, 32), (16, 16), (8, 8)]
    if amp_dtype is None:
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
    assert not any(p.requires_grad for p in trunk.vit.parameters())
    # weights cast once to fp16 under vitkit's one casting policy (layers/precision.py): norms and the position
    # table stay fp32 (their statistics are computed in fp32 and returned in fp16)
    dtypes = {n: p.dtype for n, p in trunk.vit.named_parameters()}
    assert dtypes["patch_embed.proj.weight"] == dtypes["blocks.0.attn.qkv.weight"] == torch.float16
    assert all(d == (torch.float32 if "norm" in n or n == "pos_embed" else torch.float16) for n, d in dtypes.items())
    with torch.no_grad():  # "--force-dtype fp16": the fork's "force output dtype"
        assert [f.dtype for f in trunk(torch.randn(1, 3, 128, 128))] == [torch.float16] * 4
    _train_step(model, amp_dtype=torch.bfloat16)
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


# ----------------------------------------------------- force_dtype: "Force output dtype" (the fork's doc)
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def fp32_trunk():
    """A tiny trunk whose every parameter is perturbed (LayerScale ~0.1 instead of 1e-5), so that the blocks,
    not just the patch embedding, shape the maps a low-precision run is compared on."""
    torch.manual_seed(0)
    trunk = vitkit.ViTTrunkMultiScale("dinov3_vits16", embed_dim=32, depth=2, num_heads=4, out_dims=[32, 32, 16, 16])
    return randomize(trunk, seed=1).eval()


# relative error against the fp32 trunk, from the dtype's unit roundoff (bf16 2^-8, fp16 2^-11) times ~8 for a
# 2-block ViT plus the pyramid; measured: bf16 0.4-0.6 %, fp16 0.05-0.08 %
_TOL = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 1e-5}
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.mark.parametrize("freeze", [False, True])
@pytest.mark.parametrize("force", ["bf16", "fp16", "fp32"])
def test_force_dtype_returns_maps_in_that_dtype(fp32_trunk, force, freeze):
    """The fork's ``force_dtype=`` "Force output dtype": the four maps come back in it (frozen: ViT weights cast
    once; trainable: autocast over fp32 weights), close to the fp32 trunk; ``output_dtype="input"`` returns the
    input's dtype instead, with the same numbers up to that cast."""
    low = copy.deepcopy(fp32_trunk)
    low = vitkit.ViTTrunkMultiScale(low.vit, out_dims=[32, 32, 16, 16], freeze_vit=freeze, force_dtype=force).eval()
    low.load_state_dict(fp32_trunk.state_dict())
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = fp32_trunk(x), low(x)
        low.output_dtype = "input"
        as_input = low(x)
    assert low.result_dtype(torch.float32) == torch.float32
    assert [o.dtype for o in out] == [_DT[force]] * 4 and [o.dtype for o in as_input] == [torch.float32] * 4
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert max(_rel(o, r) for o, r in zip(out, ref)) < _TOL[force]
    assert all(torch.equal(o, a.to(o.dtype)) for o, a in zip(out, as_input))
    assert next(low.vit.parameters()).dtype == (_DT[force] if freeze else torch.float32)


def test_output_dtype_overrides_and_is_validated(fp32_trunk):
    trunk = vitkit.ViTTrunkMultiScale(copy.deepcopy(fp32_trunk.vit), out_dims=16, force_dtype="bf16",
                                      output_dtype="fp32").eval()
    assert [f.dtype for f in trunk(torch.randn(1, 3, 32, 32))] == [torch.float32] * 4
    plain = vitkit.ViTTrunkMultiScale(copy.deepcopy(fp32_trunk.vit), out_dims=16).eval()
    assert plain.result_dtype(torch.float32) is None  # nothing forced: the maps keep their computed dtype
    with pytest.raises(ConfigError, match="unknown output_dtype 'int8'.*'input'"):
        vitkit.ViTTrunkMultiScale(copy.deepcopy(fp32_trunk.vit), output_dtype="int8")


# --------------------------------------------- the configs' pretrained=true, offline (caches in tmp dirs)
TINY_TRUNK = [f"++{TRUNK}.embed_dim=32", f"++{TRUNK}.depth=1", f"++{TRUNK}.num_heads=4", "++model.image_size=64"]
HF_REG_SMALL = "facebook/dinov2-with-registers-small"  # the HF id of the dino config's default backbone


def _meta_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A tiny DINOv2-reg4 checkpoint in Meta's layout (ViT-S/14's file name, embed_dim 32, depth 1)."""
    torch.manual_seed(3)
    src = randomize(vitkit.create_backbone("dinov2_vits14_reg", embed_dim=32, depth=1, num_heads=4, img_size=56), 3)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd


def _place_hf_snapshot(cache: Path, repo_id: str, src: str | Path, revision: str = "0" * 40) -> Path:
    """Copy an HF model directory into the Hugging Face cache layout (what `huggingface-cli download` leaves)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


def _build_encoder(overrides):
    return instantiate(compose(config_name="sam2_vit_dino.yaml", overrides=overrides).model.image_encoder)


def test_dino_config_pretrained_loads_official_dinov2_file(isolated_caches):
    """``pretrained=true``: the official DINOv2 ViT-S/14-reg4 file, from $VITKIT_HOME (tiny stand-in)."""
    sd = _meta_checkpoint(isolated_caches / "dinov2_vits14_reg4_pretrain.pth")
    trunk = _build_encoder(TINY_TRUNK + [f"{TRUNK}.pretrained=true"]).trunk
    vit = trunk.vit
    assert vit.config.extra["weights_format"] == "meta_dinov2_reg"
    for k in ("cls_token", "register_tokens", "norm.weight", "blocks.0.attn.qkv.weight", "blocks.0.ls1.gamma",
              "blocks.0.mlp.fc2.bias"):
        assert torch.equal(vit.state_dict()[k], sd[k]), k
    random = _build_encoder(TINY_TRUNK).trunk  # the default, pretrained: null
    assert not torch.equal(random.vit.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_dino_config_pretrained_uses_hf_cache_snapshot(isolated_caches, tmp_path):
    """No official file, but the same weights in the Hugging Face cache (HF_HUB_OFFLINE=1): loaded from there."""
    hf_model, hf_dir = R.build_hf_reference("hf_dinov2_reg", out_dir=str(tmp_path / "src"), seed=4)
    _place_hf_snapshot(Path(os.environ["HF_HUB_CACHE"]), HF_REG_SMALL, hf_dir)
    trunk = _build_encoder([f"++{TRUNK}.embed_dim=32", f"++{TRUNK}.depth=2", f"++{TRUNK}.num_heads=4",
                            "++model.image_size=64", f"{TRUNK}.pretrained=true"]).trunk
    from safetensors.torch import load_file

    hf = load_file(os.path.join(hf_dir, "model.safetensors"))
    vit = trunk.vit
    assert vit.config.extra["weights_format"] == "hf_dinov2_reg"
    assert torch.equal(vit.norm.weight, hf["layernorm.weight"])
    assert torch.equal(vit.register_tokens, hf["embeddings.register_tokens"])
    assert torch.equal(vit.blocks[1].mlp.fc1.weight, hf["encoder.layer.1.mlp.fc1.weight"])
    assert torch.equal(vit.blocks[0].ls2.gamma, hf["encoder.layer.0.layer_scale2.lambda1"])


def test_pretrained_from_hf_snapshot_keeps_the_releases_numerics(isolated_caches, tmp_path):
    """``backbone=dinov2_vits14 pretrained=true`` with only transformers' copy cached (facebook/dinov2-small): the
    weights come from it, but position embeddings are still resized as Meta's release does (offset 0.1, no
    antialias), not as transformers does (offset 0), so a model is the same whichever cache held its weights."""
    _, hf_dir = R.build_hf_reference("hf_dinov2", out_dir=str(tmp_path / "src"), seed=5)
    _place_hf_snapshot(Path(os.environ["HF_HUB_CACHE"]), "facebook/dinov2-small", hf_dir)
    trunk = _build_encoder([f"{TRUNK}.backbone=dinov2_vits14", f"{TRUNK}.pretrained=true", f"++{TRUNK}.embed_dim=32",
                            f"++{TRUNK}.depth=2", f"++{TRUNK}.num_heads=4", "++model.image_size=64"]).trunk
    c = trunk.vit.config
    assert c.extra["weights_format"] == "hf_dinov2"
    assert (c.interpolate_offset, c.interpolate_antialias) == (0.1, False)
    ref = vitkit.create_backbone("dinov2_vits14", embed_dim=32, depth=2, num_heads=4).config
    assert (ref.interpolate_offset, ref.interpolate_antialias) == (0.1, False)


def test_dino_config_pretrained_without_weights_is_an_error(isolated_caches):
    with pytest.raises(InstantiationException) as info:
        _build_encoder(TINY_TRUNK + [f"{TRUNK}.pretrained=true"])
    err = info.value.__cause__
    assert isinstance(err, WeightsNotFoundError)
    assert "dinov2_vits14_reg4_pretrain.pth" in str(err) and str(isolated_caches) in str(err)
    assert HF_REG_SMALL in str(err) and "offline" in str(err)


def test_ijepa_config_pretrained_true_names_the_released_backbones():
    cfg = compose(config_name="sam2_vit_ijepa.yaml", overrides=TINY_TRUNK + [f"{TRUNK}.pretrained=true"])
    with pytest.raises(InstantiationException) as info:
        instantiate(cfg.model.image_encoder)
    assert isinstance(info.value.__cause__, ConfigError) and "preset name" in str(info.value.__cause__)


# ----------------------------------------------- docs/sam2.md: every row of the flag -> override table
DOC = Path(__file__).resolve().parents[1] / "docs" / "sam2.md"


def _flag_table() -> list[tuple[str, str]]:
    """``(flag, example override)`` of each row of the one table in docs/sam2.md that maps the fork's flags."""
    rows, text = [], DOC.read_text()
    table = text[text.index("| fork flag | Hydra override | example | notes |"):]
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((cells[0], re.fullmatch(r"`([^`]+)`", cells[2]).group(1)))
    return rows


def test_docs_flag_table_covers_every_flag_of_the_seed():
    flags = " ".join(flag for flag, _ in _flag_table())
    seed_flags = ["--encoder-type", "--encoder-ckpt", "--encoder-out-dims", "--encoder-upsample-mode",
                  "--no-refine-highres", "--freeze-vit", "--force-dtype", "--vit-verbose"]
    assert all(f in flags for f in seed_flags + ["--encoder-name"])
    assert DOC.read_text().count("| fork flag |") == 1  # one table


@pytest.mark.parametrize("flag,override", _flag_table(), ids=[f for f, _ in _flag_table()])
def test_docs_flag_table_overrides_build_the_trunk(flag, override, isolated_caches, tmp_path, capsys):
    """Each example override of the table composes, builds a SAM2 image encoder and sets what the row says."""
    key, value = override.split("=", 1)
    name = key.rsplit(".", 1)[1]
    overrides = [override]
    if name == "backbone" and "/" in value:  # an HF id: a tiny stand-in in the (offline) Hugging Face cache
        _, hf_dir = R.build_hf_reference("hf_dinov2", out_dir=str(tmp_path / "src"))
        _place_hf_snapshot(Path(os.environ["HF_HUB_CACHE"]), value, hf_dir)
        overrides.append("++model.image_size=64")
    else:
        overrides = TINY_TRUNK + overrides
    if name == "pretrained":
        _meta_checkpoint(isolated_caches / "dinov2_vits14_reg4_pretrain.pth")
    encoder = _build_encoder(overrides)
    trunk = encoder.trunk
    amp = torch.autocast("cpu", dtype=trunk.force_dtype) if trunk.force_dtype else contextlib.nullcontext()
    with torch.no_grad(), amp:
        out = encoder(torch.randn(1, 3, 64, 64))
    assert tuple(out["vision_features"].shape) == (1, 256, 4, 4)
    expected = {
        "encoder_type": lambda: trunk.encoder_type == value,
        "backbone": lambda: (trunk.vit.config.extra.get("weights_format") == "hf_dinov2" if "/" in value
                             else trunk.vit.config.family == "dinov2" and trunk.vit.num_register_tokens == 4),
        "pretrained": lambda: trunk.vit.config.extra.get("weights_format") == "meta_dinov2_reg",
        "out_dims": lambda: trunk.channel_list == [int(v) for v in value.strip("[]").split(",")]
        == list(encoder.neck.backbone_channel_list),
        "upsample_mode": lambda: trunk.upsample_mode == value,
        "refine_highres": lambda: isinstance(trunk.refine4, torch.nn.Identity),
        "freeze_vit": lambda: trunk.freeze_vit and not any(p.requires_grad for p in trunk.vit.parameters()),
        "force_dtype": lambda: [f.dtype for f in trunk(torch.randn(1, 3, 64, 64))] == [_DT[value]] * 4,
        "verbose": lambda: f"/4: (1, {trunk.channel_list[-1]}, 16, 16)" in capsys.readouterr().out,
    }
    assert expected[name](), (flag, override)


def test_encoder_type_hiera_points_to_sam2s_own_configs():
    with pytest.raises(InstantiationException) as info:
        _build_encoder(TINY_TRUNK + [f"{TRUNK}.encoder_type=hiera"])
    assert isinstance(info.value.__cause__, ConfigError) and "sam2's configs" in str(info.value.__cause__)
