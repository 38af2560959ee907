"""Checkpoint loading: round trips, strictness, safety, caches, load-time adaptations, format detection.

All checkpoints are written from tiny randomised models (tests/conftest.py); nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

import vitkit
from conftest import FAMILY_PRESETS, TINY, make_tiny
from vitkit.weights import detect_format, load_weights, read_and_convert, read_state_dict, to_meta_state_dict

D = TINY["embed_dim"]
OUT_KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "x_norm_disttoken",
            "x_projected")


def assert_same_outputs(a: dict, b: dict, exact: bool = True, atol: float = 1e-6):
    for k in OUT_KEYS:
        if a.get(k) is None:
            assert b.get(k) is None, k
            continue
        if exact:
            assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max()}"
        else:
            torch.testing.assert_close(b[k], a[k], atol=atol, rtol=0, msg=k)


def run(model, x):
    with torch.no_grad():
        return model.eval()(x)


def save_meta(model, path):
    torch.save(to_meta_state_dict(model), path)
    return path


class NotAWeight:  # a pickled instance of this class must be refused by weights_only loading
    def __init__(self):
        self.payload = "arbitrary code could run here"


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", list(FAMILY_PRESETS))
def test_save_pretrained_from_pretrained_roundtrip(name, tmp_path):
    model = make_tiny(name)
    s = FAMILY_PRESETS[name]
    x = torch.randn(2, 3, s, s + model.patch_size)  # non-native size: interpolation settings survive too
    vitkit.save_pretrained(model, tmp_path / "m")
    assert (tmp_path / "m" / "config.json").exists() and (tmp_path / "m" / "model.safetensors").exists()
    loaded = vitkit.from_pretrained(tmp_path / "m")
    assert not loaded.training
    assert loaded.config.to_dict() == model.config.to_dict()
    assert_same_outputs(run(model, x), run(loaded, x))


def test_from_pretrained_file_is_eval_like_directory(tmp_path):
    """Regression: ``from_pretrained(dir)`` returns ``model.eval()`` but ``from_pretrained(file)`` goes through
    ``create_backbone`` and returns a model in train mode. For DINOv3 (rope_rescale_coords=2) train mode
    draws random RoPE coordinates, so outputs of the loaded file are random until the user calls .eval()."""
    model = make_tiny("dinov3_vits16")
    vitkit.save_pretrained(model, tmp_path / "m")
    loaded = vitkit.from_pretrained(tmp_path / "m" / "model.safetensors")
    assert loaded.config.to_dict() == model.config.to_dict()
    assert not loaded.training


def test_from_pretrained_file_keeps_stored_in_chans(tmp_path):
    """Regression: ``from_pretrained(file)`` calls ``create_backbone(None, pretrained=file, in_chans=3)``
    (``_split_overrides`` sets in_chans=3 and ``create_backbone`` always writes ``cfg["in_chans"] = in_chans``),
    overriding the in_chans recorded in the checkpoint. A 1-channel vitkit file then fails with
    "cannot adapt a patch embedding with 1 input channels to in_chans=3"."""
    model = make_tiny("dinov2_vits14_reg", in_chans=1)
    vitkit.save_pretrained(model, tmp_path / "m")
    loaded = vitkit.from_pretrained(tmp_path / "m" / "model.safetensors")
    assert loaded.config.in_chans == 1
    x = torch.randn(1, 1, 56, 56)
    assert_same_outputs(run(model, x), run(loaded, x))


def test_meta_layout_roundtrip_dinov3(tmp_path):
    """to_meta_state_dict writes Meta's DINOv3 keys (storage_tokens, w1/w2, bias_mask); they load back."""
    model = make_tiny("dinov3_vits16plus")
    sd = to_meta_state_dict(model)
    assert "storage_tokens" in sd and "register_tokens" not in sd
    assert "blocks.0.mlp.w1.weight" in sd and "blocks.0.mlp.w12.weight" not in sd
    assert torch.equal(sd["blocks.0.attn.qkv.bias_mask"][D:2 * D], torch.zeros(D))
    path = save_meta(model, tmp_path / "v3.pth")
    loaded = vitkit.create_backbone("dinov3_vits16plus", pretrained=path, img_size=64, **TINY)
    x = torch.randn(1, 3, 64, 80)
    assert_same_outputs(run(model, x), run(loaded, x))


def test_meta_dinov3_stored_rope_periods_are_used(tmp_path):
    """Meta's released checkpoints store bf16-rounded RoPE periods; bit parity needs exactly those."""
    model = make_tiny("dinov3_vits16")
    sd = to_meta_state_dict(model)
    # (head_dim 8 gives periods [1, 10], exact in bf16: scale them so that the stored values differ)
    sd["rope_embed.periods"] = (sd["rope_embed.periods"] * 1.37).bfloat16().float()
    assert not torch.equal(sd["rope_embed.periods"], model.rope_embed.periods)
    torch.save(sd, tmp_path / "v3.pth")
    loaded = vitkit.create_backbone("dinov3_vits16", pretrained=tmp_path / "v3.pth", img_size=64, **TINY)
    assert torch.equal(loaded.rope_embed.periods, sd["rope_embed.periods"])
    vitkit.save_pretrained(loaded, tmp_path / "m")  # and they survive vitkit's own format
    assert torch.equal(vitkit.from_pretrained(tmp_path / "m").rope_embed.periods, sd["rope_embed.periods"])


# ------------------------------------------------------------------------------------------- strictness
def _fresh(name="dinov2_vits14_reg"):
    return vitkit.create_backbone(name, img_size=FAMILY_PRESETS[name], **TINY)


def test_missing_key_raises_and_lists_it():
    sd = make_tiny("dinov2_vits14_reg").state_dict()
    del sd["blocks.1.norm2.bias"]
    target = _fresh()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(vitkit.CheckpointMismatchError) as ei:
        load_weights(target, sd)
    e = ei.value
    assert isinstance(e, vitkit.CheckpointError)
    assert e.missing == ["blocks.1.norm2.bias"] and e.unexpected == [] and e.mismatched == []
    assert "blocks.1.norm2.bias" in str(e) and "missing 1 key" in str(e)
    # nothing was loaded partially
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_failed_load_leaves_config_unchanged():
    """Regression: load_weights writes the format's numerics into ``model.config`` (here
    meta_dinov2_reg: interpolate_offset 0.0, antialias True) *before* the strict check, so a refused
    checkpoint still changes how the untouched model resamples position embeddings ("never loads
    partially" holds for tensors, not for the config). Apply fmt.config after check_and_load succeeds."""
    target = _fresh("dinov2_vits14")  # offset 0.1, antialias False
    before = target.config.to_dict()
    with pytest.raises(vitkit.CheckpointMismatchError):
        load_weights(target, make_tiny("dinov2_vits14_reg").state_dict())  # unexpected register_tokens
    assert target.config.to_dict() == before


def test_mismatch_advice_names_existing_functions():
    """Regression: the mismatch error says "vitkit.weights.inspect shows what a checkpoint contains",
    but vitkit.weights has no ``inspect``. Every ``vitkit.*`` name the message recommends must exist."""
    import importlib
    import re

    sd = make_tiny("dinov2_vits14_reg").state_dict()
    del sd["norm.bias"]
    with pytest.raises(vitkit.CheckpointMismatchError) as ei:
        load_weights(_fresh(), sd)
    for dotted in re.findall(r"\bvitkit(?:\.\w+)+", str(ei.value)):
        mod, _, attr = dotted.rpartition(".")
        assert hasattr(importlib.import_module(mod), attr), f"message recommends {dotted}, which does not exist"


def test_unexpected_key_raises_and_lists_it():
    sd = make_tiny("dinov2_vits14_reg").state_dict()
    sd["blocks.0.attn.extra_thing"] = torch.zeros(3)
    with pytest.raises(vitkit.CheckpointMismatchError) as ei:
        load_weights(_fresh(), sd)
    assert ei.value.unexpected == ["blocks.0.attn.extra_thing"] and not ei.value.missing
    assert "blocks.0.attn.extra_thing" in str(ei.value) and "unexpected 1 key" in str(ei.value)


def test_wrong_shape_raises_and_lists_it():
    sd = make_tiny("dinov2_vits14_reg").state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(4 * D + 8, D)
    with pytest.raises(vitkit.CheckpointMismatchError) as ei:
        load_weights(_fresh(), sd)
    assert ei.value.mismatched == [("blocks.1.mlp.fc1.weight", (4 * D + 8, D), (4 * D, D))]
    msg = str(ei.value)
    assert "blocks.1.mlp.fc1.weight" in msg and str((4 * D + 8, D)) in msg and str((4 * D, D)) in msg


def test_wrong_depth_lists_all_problems():
    sd = make_tiny("dinov2_vits14_reg", depth=3).state_dict()
    with pytest.raises(vitkit.CheckpointMismatchError) as ei:
        load_weights(_fresh(), sd)
    assert all(k.startswith("blocks.2.") for k in ei.value.unexpected) and len(ei.value.unexpected) > 5
    assert "depth=2" in str(ei.value)


def test_dinov2_checkpoint_into_dinov3_model_raises(tmp_path):
    path = save_meta(make_tiny("dinov2_vits14_reg"), tmp_path / "v2.pth")
    target = vitkit.create_backbone("dinov3_vits16", img_size=64, **TINY)
    with pytest.raises(vitkit.CheckpointMismatchError, match="dinov2") as ei:
        load_weights(target, path)
    assert "dinov3" in str(ei.value)


def test_dinov3_checkpoint_into_dinov2_model_raises(tmp_path):
    path = save_meta(make_tiny("dinov3_vits16"), tmp_path / "v3.pth")
    with pytest.raises(vitkit.CheckpointMismatchError):
        load_weights(_fresh(), path)


def test_pickle_with_custom_class_is_refused(tmp_path):
    sd = make_tiny("dinov2_vits14").state_dict()
    path = tmp_path / "evil.pth"
    torch.save({"model": sd, "extra": NotAWeight()}, path)
    with pytest.raises(vitkit.CheckpointError, match="weights_only") as ei:
        load_weights(_fresh("dinov2_vits14"), path)
    assert str(path) in str(ei.value)
    # and a plain tensor dict in a container is accepted
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ok.pth")
    load_weights(_fresh("dinov2_vits14"), tmp_path / "ok.pth")


def test_unknown_format_raises():
    with pytest.raises(vitkit.CheckpointError, match="unrecognised checkpoint format"):
        detect_format({"foo.weight": torch.zeros(1), "bar": torch.zeros(2)})


# ------------------------------------------------------------------------------------------------ caches
def test_pretrained_offline_empty_cache_names_file_and_directory(isolated_caches):
    with pytest.raises(vitkit.WeightsNotFoundError) as ei:
        vitkit.create_backbone("dinov2_vits14", pretrained=True)
    msg = str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)
    assert "dinov2_vits14_pretrain.pth" in msg
    assert str(isolated_caches) in msg
    assert "offline" in msg
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth" in msg


def test_pretrained_offline_gated_dinov3_names_file(isolated_caches):
    with pytest.raises(vitkit.WeightsNotFoundError) as ei:
        vitkit.create_backbone("dinov3_vitl16", pretrained=True)
    assert "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth" in str(ei.value)
    assert str(isolated_caches) in str(ei.value)


@pytest.mark.parametrize("name,filename", [("dinov2_vits14", "dinov2_vits14_pretrain.pth"),
                                           ("dinov2_vits14_reg", "dinov2_vits14_reg4_pretrain.pth"),
                                           ("dinov3_vits16", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")])
def test_file_in_vitkit_home_is_found_and_loaded(name, filename, isolated_caches):
    # preset-named file holding a tiny model in Meta's layout, at the preset's native image size
    model = make_tiny(name, img_size=vitkit.get_preset(name).config["img_size"])
    save_meta(model, isolated_caches / filename)
    loaded = vitkit.create_backbone(name, pretrained=True, **TINY)
    x = torch.randn(1, 3, 56, 56) if "14" in name else torch.randn(1, 3, 64, 48)
    assert_same_outputs(run(model, x), run(loaded, x))


# ---------------------------------------------------------------------------------- load-time adaptation
@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
@pytest.mark.parametrize("new_size", [(84, 84), (70, 98)], ids=str)
def test_load_resizes_pos_embed(name, new_size, tmp_path):
    """Weights stored at 56 px loaded at another size == the original model run on the fly at that size."""
    model = make_tiny(name)
    path = save_meta(model, tmp_path / "ckpt.pth")
    loaded = vitkit.create_backbone(name, pretrained=path, img_size=new_size, **TINY)
    gh, gw = new_size[0] // 14, new_size[1] // 14
    assert loaded.pos_embed.shape == (1, 1 + gh * gw, D)
    report = load_weights(vitkit.create_backbone(name, img_size=new_size, **TINY), path)
    assert any("pos_embed" in a and "(4, 4)" in a for a in report.adapted), report.adapted
    x = torch.randn(2, 3, *new_size)
    assert_same_outputs(run(model, x), run(loaded, x))


def test_from_pretrained_dir_with_nonsquare_grid_and_new_size(tmp_path):
    """vitkit directories record their grid: a non-square stored grid resizes correctly."""
    model = make_tiny("dinov2_vits14_reg", img_size=(56, 84))
    vitkit.save_pretrained(model, tmp_path / "m")
    loaded = vitkit.from_pretrained(tmp_path / "m", img_size=(70, 42))
    assert loaded.config.grid_size == (5, 3)
    x = torch.randn(1, 3, 70, 42)
    assert_same_outputs(run(model, x), run(loaded, x))


def test_load_folds_rgb_checkpoint_to_one_channel(tmp_path):
    model = make_tiny("dinov2_vits14_reg")
    path = save_meta(model, tmp_path / "rgb.pth")
    grey = vitkit.create_backbone("dinov2_vits14_reg", pretrained=path, in_chans=1, img_size=56, **TINY)
    assert grey.patch_embed.proj.weight.shape == (D, 1, 14, 14)
    report = load_weights(vitkit.create_backbone("dinov2_vits14_reg", in_chans=1, img_size=56, **TINY), path)
    assert any("folded" in a for a in report.adapted)
    x1 = torch.randn(2, 1, 56, 56)
    assert_same_outputs(run(model, x1.expand(-1, 3, -1, -1)), run(grey, x1), exact=False, atol=1e-5)


def test_load_resamples_patch_size_14_to_16(tmp_path):
    model = make_tiny("dinov2_vits14", img_size=518)  # preset grid 37 x 37
    path = save_meta(model, tmp_path / "p14.pth")
    m16 = vitkit.create_backbone("dinov2_vits14", pretrained=path, patch_size=16, **TINY)
    # the preset's 37 x 37 grid is kept: 592 px at /16, position embeddings untouched
    assert m16.config.img_size == (592, 592) and m16.config.grid_size == (37, 37)
    assert m16.patch_embed.proj.weight.shape == (D, 3, 16, 16)
    assert torch.equal(m16.pos_embed, model.pos_embed)
    report = load_weights(vitkit.create_backbone("dinov2_vits14", patch_size=16, img_size=64, **TINY), path)
    assert any("resampled" in a and "16" in a for a in report.adapted), report.adapted
    assert any("pos_embed" in a for a in report.adapted)  # 37 x 37 -> 4 x 4
    with torch.no_grad():
        out = m16.eval()(torch.randn(1, 3, 64, 80))
    assert out["x_norm_patchtokens"].shape == (1, 20, D)


def test_ijepa_training_checkpoint_loads_encoder_like_hf_and_timm(tmp_path):
    """Regression: I-JEPA's original checkpoints hold ``encoder``, ``predictor`` and ``target_encoder``.
    HF's conversion script and timm's checkpoint_filter_fn both take ``encoder`` (backbones.md §3.3), and
    vitkit's I-JEPA presets point at those HF weights; vitkit.weights.io._CONTAINER_KEYS tries
    ``target_encoder`` before ``encoder``, so the same .pth.tar gives different weights in vitkit."""
    enc = make_tiny("ijepa_vith14", seed=1)
    tgt = make_tiny("ijepa_vith14", seed=2)
    ckpt = {"encoder": {"module." + k: v for k, v in enc.state_dict().items()},
            "target_encoder": {"module." + k: v for k, v in tgt.state_dict().items()},
            "predictor": {"module.predictor_embed.weight": torch.zeros(4, D)}, "epoch": 300}
    torch.save(ckpt, tmp_path / "IN1K-vit.h.14-300e.pth.tar")
    sd, fmt, *_ = read_and_convert(tmp_path / "IN1K-vit.h.14-300e.pth.tar")
    assert fmt.name == "meta_ijepa"
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], enc.state_dict()["blocks.0.attn.qkv.weight"])


# ------------------------------------------------------------------------------------------ format detection
@pytest.mark.parametrize("name,fmt", [("dinov2_vits14", "meta_dinov2"), ("dinov2_vitg14", "meta_dinov2"),
                                      ("dinov2_vits14_reg", "meta_dinov2_reg"), ("dinov3_vits16", "meta_dinov3"),
                                      ("dinov3_vits16plus", "meta_dinov3"), ("ijepa_vith14", "meta_ijepa")])
def test_detect_meta_layouts(name, fmt):
    sd = to_meta_state_dict(make_tiny(name))
    assert detect_format(sd).name == fmt
    # wrapped as in training checkpoints
    assert detect_format({"module." + k: v for k, v in sd.items()}).name == fmt


def _chunked(sd):
    """Meta training checkpoints with block_chunks>0 (vitg14 config): ``blocks.{chunk}.{i}.*``, global i."""
    return {(k.replace("blocks.", f"blocks.{int(k.split('.')[1]) // 2}.", 1) if k.startswith("blocks.") else k): v
            for k, v in sd.items()}


def test_block_chunked_dinov2_with_explicit_format():
    sd = to_meta_state_dict(make_tiny("dinov2_vits14"))
    chunked = _chunked(sd)
    assert "blocks.0.1.attn.qkv.weight" in chunked
    converted, fmt, *_ = read_and_convert(chunked, format="meta_dinov2")
    assert set(converted) == set(sd)
    assert all(torch.equal(converted[k], sd[k]) for k in sd)


def test_block_chunked_dinov2_is_detected():
    """Regression: meta_dinov2 renames ``blocks.{chunk}.{i}.`` (its comment: "block_chunks>0 training
    checkpoints"), but its detection signature requires ``^blocks\\.0\\.attn\\.qkv\\.weight$`` and
    ``^blocks\\.0\\.ls1\\.gamma$``, which chunked keys (``blocks.0.0.attn.qkv.weight``) never match, so
    auto-detection raises "unrecognised checkpoint format" and the rename is only reachable with format=."""
    sd = to_meta_state_dict(make_tiny("dinov2_vits14"))
    converted, fmt, *_ = read_and_convert(_chunked(sd))
    assert fmt.name == "meta_dinov2"
    assert set(converted) == set(sd)


def test_vitkit_saved_file_is_read_as_vitkit(tmp_path):
    vitkit.save_pretrained(make_tiny("dinov3_vits16"), tmp_path / "m")
    _, fmt, _, stored, _ = read_and_convert(tmp_path / "m" / "model.safetensors")
    assert fmt.name == "vitkit" and stored["family"] == "dinov3"


@pytest.mark.parametrize("timm_name,fmt,size", [("vit_small_patch14_dinov2", "timm_dinov2", 56),
                                                ("vit_small_patch14_reg4_dinov2", "timm_dinov2", 56),
                                                ("vit_small_patch16_dinov3", "timm_dinov3", 64)])
def test_detect_timm_state_dicts(timm_name, fmt, size):
    timm = pytest.importorskip("timm")
    m = timm.create_model(timm_name, pretrained=False, img_size=size, **TINY)
    sd = m.state_dict()
    assert detect_format(sd).name == fmt
    # and it converts to a loadable checkpoint of the same architecture
    family = "dinov3" if "dinov3" in timm_name else "dinov2"
    name = {"dinov3": "dinov3_vits16", "dinov2": "dinov2_vits14_reg" if "reg4" in timm_name else "dinov2_vits14"}
    # timm's DINOv3 S/B/L/H+ are qkv_bias=False (Meta's distilled biases are all zero): build to match
    qkv_bias = "blocks.0.attn.qkv.bias" in sd or "blocks.0.attn.q_bias" in sd
    target = vitkit.create_backbone(name[family], img_size=size, qkv_bias=qkv_bias, **TINY)
    report = load_weights(target, sd)
    assert report.format == fmt


def _hf_models():
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * D)
    return {
        "hf_dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(image_size=56, patch_size=14,
                                                                               **common)),
        "hf_dinov2_reg": lambda: transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            image_size=56, patch_size=14, num_register_tokens=4, **common)),
        "hf_dinov3": lambda: transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
            image_size=64, patch_size=16, num_register_tokens=4, **common)),
        "hf_vit": lambda: transformers.ViTModel(transformers.ViTConfig(image_size=64, patch_size=16, **common),
                                                add_pooling_layer=False),
        "hf_clip": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(image_size=64, patch_size=16,
                                                                                      **common)),
    }


@pytest.mark.parametrize("fmt", ["hf_dinov2", "hf_dinov2_reg", "hf_dinov3", "hf_vit", "hf_clip"])
def test_detect_hf_saved_dirs(fmt, tmp_path):
    torch.manual_seed(0)
    hf = _hf_models()[fmt]().eval()
    hf.save_pretrained(tmp_path / "hf")
    sd, _ = read_state_dict(tmp_path / "hf")
    assert detect_format(sd).name == fmt
    # the directory loads through the public API
    model = vitkit.from_pretrained(tmp_path / "hf")
    assert model.config.embed_dim == D and model.config.depth == 2
