"""The Zoo (vitkit.build_model, vitkit.heads): parity of embeddings and attention maps with transformers, heads,
freezing, attention maps only on request, registry, offline errors and a Lightning training run.

References are tiny random transformers models (tests/references.py, eager attention so that they return
attention maps) saved to disk and loaded through vitkit's loader (``model_name=<dir>``). Every test runs
offline with empty caches (``isolated_caches``), so a default HF id can never be resolved by accident.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import references as R  # noqa: E402
import vitkit  # noqa: E402
from vitkit import ConfigError, InputError, VisionTransformer, WeightsNotFoundError  # noqa: E402
from vitkit.heads import BaseHead, IdentityHead, LinearHead, MLPHead  # noqa: E402
from vitkit.zoo import MODEL_REGISTRY, ZooModel, build_model, list_models  # noqa: E402

TOL = 1e-5  # fp32, tiny models: measured max |diff| is ~2e-7 for embeddings and ~1e-8 for attention maps
REGISTRY_KEYS = ["vanilla_vit", "deit_vit", "dino_vit", "dino_v2_vit", "dinov2_reg_vit", "dinov3_vit", "clip_vit",
                 "ijepa_vit"]

# reference -> (registry key of its family, pooling asked for, how transformers pools it)
CASES = {
    "hf_dinov2": ("dino_v2_vit", None, "pooler_output"),
    "hf_dinov2_reg": ("dinov2_reg_vit", None, "pooler_output"),
    "hf_dinov3": ("dinov3_vit", None, "pooler_output"),
    "hf_clip": ("clip_vit", None, "pooler_output"),
    "hf_clip_proj": ("clip_vit", "projection", "image_embeds"),
    "hf_vit": ("vanilla_vit", None, "cls"),
    "hf_deit": ("deit_vit", None, "cls"),
    "hf_ijepa": ("ijepa_vit", None, "mean"),
}


@pytest.fixture(autouse=True)
def _offline(isolated_caches):
    return isolated_caches


class _Refs:
    """Tiny HF references, built once per module on first use."""

    def __init__(self, root):
        self.root, self.built = root, {}

    def __call__(self, name):
        if name not in self.built:
            pytest.importorskip("transformers")
            self.built[name] = R.build_hf_reference(name, attn_implementation="eager",
                                                    out_dir=os.path.join(self.root, name))
        return self.built[name]


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    return _Refs(str(tmp_path_factory.mktemp("zoo_refs")))


def _x(c, h, w, b=2, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _expected_embedding(out, how):
    if how == "cls":
        return out.last_hidden_state[:, 0]
    if how == "mean":  # IJepaForImageClassification: classifier(last_hidden_state.mean(dim=1)); no CLS token
        return out.last_hidden_state.mean(dim=1)
    return getattr(out, how)


def _maxdiff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(CASES))
def test_embeddings_and_attentions_match_transformers(refs, name):
    key, pooling, how = CASES[name]
    ref, path = refs(name)
    spec = R.HF_SPECS[name]
    model = build_model(key, model_name=path, pooling=pooling)
    x = _x(3, spec.native_size, spec.native_size)
    with torch.no_grad():
        out = model(x, output_attentions=True, output_embeddings=True)
        r = ref(pixel_values=x, output_attentions=True)
    assert set(out) == {"predictions", "attentions", "embeddings"}
    expected = _expected_embedding(r, how)
    assert _maxdiff(out["embeddings"], expected) <= TOL
    assert model.embedding_dim == expected.shape[-1]
    assert isinstance(model.head, IdentityHead) and torch.equal(out["predictions"], out["embeddings"])
    assert isinstance(out["attentions"], tuple) and len(out["attentions"]) == spec.depth == len(r.attentions)
    for i, (a, b) in enumerate(zip(out["attentions"], r.attentions)):
        n = spec.num_prefix + (spec.native_size // spec.patch_size) ** 2
        assert a.shape == (2, spec.num_heads, n, n), f"layer {i}"
        assert _maxdiff(a, b) <= TOL, f"layer {i}"


def test_vit_embedding_is_normed_cls_not_the_untrained_pooler(refs):
    """transformers' ViTModel pooler (dense + tanh) was never trained with the backbone: vitkit drops it."""
    ref, path = refs("hf_vit")
    assert ref.pooler is not None
    model = build_model(model_name=path)
    x = _x(3, 32, 32)
    with torch.no_grad():
        emb, r = model(x, output_embeddings=True)["embeddings"], ref(pixel_values=x)
    assert _maxdiff(emb, r.last_hidden_state[:, 0]) <= TOL
    assert _maxdiff(emb, r.pooler_output) > 0.1


@pytest.mark.parametrize("name,h,w", [("hf_dinov2_reg", 42, 70), ("hf_dinov3", 64, 96)])
def test_parity_at_non_square_size(refs, name, h, w):
    """Position-embedding interpolation (DINOv2) and RoPE (DINOv3) at another, non-square size."""
    ref, path = refs(name)
    model = build_model(model_name=path)
    x = _x(3, h, w, seed=1)
    with torch.no_grad():
        out = model(x, output_attentions=True, output_embeddings=True)
        r = ref(pixel_values=x, output_attentions=True)
    assert _maxdiff(out["embeddings"], r.pooler_output) <= TOL
    assert max(_maxdiff(a, b) for a, b in zip(out["attentions"], r.attentions)) <= TOL


def test_deit_distillation_token_options(refs):
    """Default: CLS only (as DeiTForImageClassification); pooling='cls_dist' averages CLS and distillation."""
    ref, path = refs("hf_deit")
    x = _x(3, 32, 32)
    with torch.no_grad():
        hs = ref(pixel_values=x).last_hidden_state
        cls_only = build_model(model_name=path).embed(x)
        both = build_model(model_name=path, pooling="cls_dist").embed(x)
    assert _maxdiff(cls_only, hs[:, 0]) <= TOL
    assert _maxdiff(both, (hs[:, 0] + hs[:, 1]) / 2) <= TOL


def test_cls_mean_pooling(refs):
    ref, path = refs("hf_dinov2")
    model = build_model(model_name=path, pooling="cls_mean", head=3)
    x = _x(3, 56, 56)
    with torch.no_grad():
        hs = ref(pixel_values=x).last_hidden_state
        emb = model(x, output_embeddings=True)["embeddings"]
    assert model.embedding_dim == 64 and model.head.input_dim == 64
    assert _maxdiff(emb, torch.cat([hs[:, 0], hs[:, 1:].mean(1)], -1)) <= TOL


def test_clip_projection_class_hint(refs):
    """backbone_cls=CLIPVisionModelWithProjection (a transformers class, never run) selects image_embeds."""
    transformers = pytest.importorskip("transformers")
    ref, path = refs("hf_clip_proj")
    model = build_model("clip_vit", model_name=path, backbone_cls=transformers.CLIPVisionModelWithProjection)
    assert model.pooling == "projection" and model.embedding_dim == 16
    x = _x(3, 32, 32)
    with torch.no_grad():
        assert _maxdiff(model.embed(x), ref(pixel_values=x).image_embeds) <= TOL
    _, no_proj = refs("hf_clip")
    with pytest.raises(ConfigError, match="visual projection"):
        build_model(model_name=no_proj, backbone_cls=transformers.CLIPVisionModelWithProjection)


# ------------------------------------------------------------------------------ attention maps on request
def test_attentions_only_when_asked(refs, monkeypatch):
    ref, path = refs("hf_dinov2_reg")
    model = build_model(model_name=path, head=5)
    x = _x(3, 56, 56)
    calls = {"attn": 0, "probs": 0}
    forward = vitkit.layers.Attention.forward
    probs = vitkit.layers.Attention.attention_probs

    def count_forward(self, *a, **k):
        calls["attn"] += 1
        return forward(self, *a, **k)

    def count_probs(self, *a, **k):
        calls["probs"] += 1
        return probs(self, *a, **k)

    monkeypatch.setattr(vitkit.layers.Attention, "forward", count_forward)
    monkeypatch.setattr(vitkit.layers.Attention, "attention_probs", count_probs)
    with torch.no_grad():
        before = model(x)
        assert calls == {"attn": 2, "probs": 0}  # the fused path only, one attention call per block
        out = model(x, output_attentions=True)
        assert calls == {"attn": 4, "probs": 2}  # the same fused forward plus one map per block
        after = model(x)
    assert calls == {"attn": 6, "probs": 2}  # back to the fused path alone
    assert torch.equal(before, after) and torch.equal(out["predictions"], before)
    assert set(out) == {"predictions", "attentions"}
    for blk in model.backbone.blocks:  # nothing left behind by the call
        assert not blk.attn._forward_pre_hooks and not blk._forward_pre_hooks and not blk.attn._forward_hooks
    for a in out["attentions"]:
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_attentions_follow_grad_mode(refs, checkpointing):
    """Attention maps keep the autograd graph when gradients are on (e.g. for attention-gradient saliency),
    also with gradient checkpointing (off for that call only)."""
    _, path = refs("hf_vit")
    model = build_model(model_name=path, head=2).train()
    model.backbone.set_grad_checkpointing(checkpointing)
    out = model(_x(3, 32, 32), output_attentions=True)
    assert model.backbone.grad_checkpointing is checkpointing
    (out["predictions"].sum() + out["attentions"][0][:, :, 0, 1:].sum()).backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_output_dict_keys():
    model = build_model("dino_v2_vit", load_pretrained=False, head=4,
                        config_kwargs=dict(embed_dim=32, depth=1, num_heads=4, img_size=28))
    x = _x(3, 28, 28)
    with torch.no_grad():
        assert model(x).shape == (2, 4)
        out = model(x, output_embeddings=True)
    assert set(out) == {"predictions", "embeddings"} and out["embeddings"].shape == (2, 32)


# --------------------------------------------------------------------------------------- freezing, dropout
def _tiny(**kw):
    cfg = dict(embed_dim=32, depth=2, num_heads=4, img_size=32, drop_path_rate=0.5)
    return build_model("vanilla_vit", load_pretrained=False, config_kwargs=cfg, **kw)


def test_freeze_backbone_keeps_eval_mode_and_no_grads():
    torch.manual_seed(0)
    model = _tiny(head=3, freeze_backbone=True, backbone_dropout=0.5)
    model.train()
    assert model.training and model.head.training
    assert model.backbone.training is False
    assert not any(m.training for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    x = _x(3, 32, 32)
    a, b = model(x), model(x)
    assert torch.equal(a, b)  # dropout and drop path inactive in the frozen backbone
    a.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    model.freeze_backbone(False).train()
    assert model.backbone.training and all(p.requires_grad for p in model.backbone.parameters())
    assert not torch.equal(model(x), model(x))  # now dropout/drop path are live


def test_backbone_dropout_active_in_train_mode_only_and_keys_unchanged():
    torch.manual_seed(0)
    model = _tiny(head=3, backbone_dropout=0.3)
    plain = _tiny(head=3)
    assert set(model.state_dict()) == set(plain.state_dict())
    drops = [m for m in model.backbone.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 4 and all(d.p == 0.3 for d in drops)  # attention and MLP branch of 2 blocks
    x = _x(3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # built in eval mode
        model.train()
        assert not torch.equal(model(x), model(x))
    with pytest.raises(ConfigError, match="backbone_dropout"):
        _tiny(backbone_dropout=1.5)


def test_config_kwargs_resize_and_fold_channels(refs):
    """image_size (HF spelling) resizes the position table at load time; num_channels=1 folds RGB weights."""
    ref, path = refs("hf_vit")
    x = _x(3, 48, 48)
    model = build_model(model_name=path, config_kwargs={"image_size": 48, "attn_implementation": "eager"})
    assert model.backbone.config.img_size == (48, 48)
    with torch.no_grad():
        r = ref(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0]
        assert _maxdiff(model.embed(x), r) <= TOL
        mono = build_model(model_name=path, config_kwargs={"num_channels": 1})
        g = x[:, :1]
        r1 = ref(pixel_values=g.expand(-1, 3, -1, -1)[..., :32, :32]).last_hidden_state[:, 0]
        assert _maxdiff(mono.embed(g[..., :32, :32]), r1) <= TOL


def test_config_kwargs_numerics_win_over_the_checkpoint_format(refs):
    """Explicit config_kwargs are kept when the weights' format would set its own numerics."""
    _, path = refs("hf_dinov2")
    model = build_model(model_name=path, config_kwargs={"interpolate_antialias": True, "interpolate_offset": 0.1})
    assert model.backbone.config.interpolate_antialias is True and model.backbone.config.interpolate_offset == 0.1
    assert build_model(model_name=path).backbone.config.interpolate_antialias is False  # transformers' numerics


# ------------------------------------------------------------------------------------------------- heads
def test_heads_compute_what_they_say():
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    lin = LinearHead(8, 3)
    assert lin.input_dim == 8 and lin.output_dim == 3
    assert torch.allclose(lin(x), x @ lin.fc.weight.T + lin.fc.bias)
    mlp = MLPHead(8, [6, 4], 3, dropout=0.2, activation="tanh").eval()
    lins = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lins] == [(8, 6), (6, 4), (4, 3)]
    assert sum(isinstance(m, nn.Dropout) for m in mlp.modules()) == 2
    manual = lins[2](torch.tanh(lins[1](torch.tanh(lins[0](x)))))
    assert torch.allclose(mlp(x), manual)
    ident = IdentityHead(8)
    assert ident(x) is x and ident.output_dim == 8


@pytest.mark.parametrize("activation,cls", [("gelu", nn.GELU), ("ReLU", nn.ReLU), (nn.SiLU, nn.SiLU),
                                            (nn.SiLU(), nn.SiLU), (nn.PReLU(), nn.PReLU)])
def test_mlp_head_activation_forms(activation, cls):
    mlp = MLPHead(8, [6, 4], 2, activation=activation)
    acts = [m for m in mlp.mlp if isinstance(m, cls)]
    assert len(acts) == 2 and acts[0] is not acts[1]  # one module per layer (PReLU parameters not shared)
    if isinstance(activation, nn.Module):
        assert activation not in acts


def test_head_errors():
    with pytest.raises(ConfigError, match="unknown activation 'swishy'.*gelu"):
        MLPHead(8, [4], 2, activation="swishy")
    with pytest.raises(ConfigError, match="activation must be"):
        MLPHead(8, [4], 2, activation=3)
    with pytest.raises(ConfigError, match=r"hidden_dims\[1\] must be a positive int"):
        MLPHead(8, [4, 0], 2)
    with pytest.raises(ConfigError, match="dropout"):
        MLPHead(8, [4], 2, dropout=1.0)
    with pytest.raises(ConfigError, match="input_dim must be a positive int"):
        LinearHead(0, 2)
    with pytest.raises(TypeError):
        BaseHead()  # abstract
    with pytest.raises(InputError, match="expects embeddings of size 8"):
        LinearHead(8, 2)(torch.randn(2, 7))


def test_head_input_dim_checked_against_backbone():
    cfg = dict(embed_dim=32, depth=1, num_heads=4, img_size=32)
    with pytest.raises(ConfigError) as ei:
        build_model("vanilla_vit", load_pretrained=False, config_kwargs=cfg, head=MLPHead(768, [16], 10))
    msg = str(ei.value)
    assert "input_dim=768" in msg and "32-dim embeddings" in msg and "build the head with input_dim=32" in msg
    with pytest.raises(ConfigError, match="not a vitkit.heads.BaseHead"):
        build_model("vanilla_vit", load_pretrained=False, config_kwargs=cfg, head=nn.Linear(32, 2))
    for bad in (0, -3, True, "10", 2.5):
        with pytest.raises(ConfigError, match="head"):
            build_model("vanilla_vit", load_pretrained=False, config_kwargs=cfg, head=bad)
    model = build_model("vanilla_vit", load_pretrained=False, config_kwargs=cfg, head=MLPHead(32, 16, 10))
    assert model(_x(3, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------------------------------- registry, inputs
def test_registry_keys_and_unknown_key():
    assert list_models() == sorted(REGISTRY_KEYS)
    with pytest.raises(ConfigError) as ei:
        build_model("dinov2_vitt", head=3)
    msg = str(ei.value)
    assert "unknown model_type 'dinov2_vitt'" in msg
    assert all(k in msg for k in REGISTRY_KEYS)
    with pytest.raises(ConfigError, match="model_type .* or model_name"):
        build_model(head=3)
    alias = build_model("dinov2_vit", load_pretrained=False,  # vit_zoo 0.1's code spelling of dino_v2_vit
                        config_kwargs=dict(embed_dim=32, depth=1, num_heads=4, img_size=28))
    assert alias.backbone.config.family == "dinov2" and alias.backbone.num_register_tokens == 0


def test_family_mismatch_is_refused(refs):
    _, clip = refs("hf_clip")
    with pytest.raises(ConfigError, match="'dino_v2_vit' expects a dinov2 checkpoint.*clip"):
        build_model("dino_v2_vit", model_name=clip)
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="backbone_cls Dinov2Model expects a dinov2"):
        build_model(model_name=clip, backbone_cls=transformers.Dinov2Model)
    with pytest.raises(ConfigError, match="is a clip model but backbone_cls=ViTModel is vit"):
        build_model("clip_vit", model_name=clip, backbone_cls=transformers.ViTModel)
    with pytest.raises(ConfigError, match="not a supported vision backbone"):
        build_model(model_name=clip, backbone_cls=transformers.BertModel)
    with pytest.raises(ConfigError, match="backbone_cls must be"):
        build_model(model_name=clip, backbone_cls=nn.Linear)


def test_backbone_cls_subclass_and_instance(refs):
    _, path = refs("hf_vit")

    class MyViT(VisionTransformer):
        pass

    base = build_model(model_name=path)
    sub = build_model(model_name=path, backbone_cls=MyViT, head=2)
    assert type(sub.backbone) is MyViT
    sd_a, sd_b = base.backbone.state_dict(), sub.backbone.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    bb = vitkit.from_pretrained(path)
    assert build_model(backbone=bb, head=2).backbone is bb
    assert build_model(backbone_cls=bb).backbone is bb
    with pytest.raises(ConfigError, match="do not also pass"):
        build_model("vanilla_vit", backbone=bb)


def test_registry_extension(refs, monkeypatch):
    """Seed: MODEL_REGISTRY.update({"your_model": (YourCustomModel, "your-org/your-model-name")})."""
    _, path = refs("hf_deit")
    monkeypatch.setitem(MODEL_REGISTRY, "my_deit", (VisionTransformer, path))
    model = build_model("my_deit", head=4)
    assert model.backbone.config.family == "deit" and model(_x(3, 32, 32)).shape == (2, 4)
    with pytest.raises(ConfigError, match="already registered"):
        vitkit.zoo.register_model("vanilla_vit", path)


def test_wrong_inputs_are_refused():
    model = _tiny(head=2)
    with pytest.raises(InputError, match=r"in_chans=3 channels, got 1"):
        model(_x(1, 32, 32))
    with pytest.raises(InputError, match="4-D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(InputError, match="torch.Tensor"):
        model([[0.0]])


# --------------------------------------------------------------------------------- pretrained and offline
def test_pretrained_not_available_offline_is_an_error(isolated_caches):
    with pytest.raises(WeightsNotFoundError) as ei:
        build_model("dinov2_reg_vit", head=10, freeze_backbone=True)
    msg = str(ei.value)
    assert "facebook/dinov2-with-registers-base" in msg and str(isolated_caches) in msg
    assert "load_pretrained=False" in msg
    with pytest.raises(WeightsNotFoundError, match="dinov2_vits14_pretrain.pth"):
        build_model(model_name="dinov2_vits14")  # a vitkit preset: Meta's file
    with pytest.raises(ConfigError, match="no architecture for 'someone/unknown-vit'.*offline"):
        build_model(model_name="someone/unknown-vit", load_pretrained=False)
    with pytest.raises(ConfigError, match="not an existing file or directory"):
        build_model(model_name="no such dir")


def test_config_without_weights_refused_unless_random(refs, tmp_path):
    _, path = refs("hf_dinov2")
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    with pytest.raises(WeightsNotFoundError, match="has no model.safetensors.*load_pretrained=False"):
        build_model(model_name=tmp_path)
    model = build_model(model_name=tmp_path, load_pretrained=False)  # architecture from the HF config
    c = model.backbone.config
    assert (c.family, c.embed_dim, c.depth, c.patch_size, c.img_size) == ("dinov2", 32, 2, 14, (56, 56))


def test_default_id_resolves_through_vitkit_cache(refs, isolated_caches):
    """build_model("vanilla_vit") loads google/vit-base-patch16-224 from vitkit's cache (here a tiny copy)."""
    ref, path = refs("hf_vit")
    shutil.copytree(path, isolated_caches / "hf" / "google" / "vit-base-patch16-224")
    x = _x(3, 32, 32)
    model = build_model("vanilla_vit")
    with torch.no_grad():
        r = ref(pixel_values=x).last_hidden_state[:, 0]
        assert _maxdiff(model.embed(x), r) <= TOL
        rand = build_model("vanilla_vit", load_pretrained=False)  # same architecture (cached config), new weights
        assert rand.backbone.config.embed_dim == 32 and _maxdiff(rand.embed(x), r) > 0.1


@pytest.mark.parametrize("key,family,pooling,extra", [
    ("dino_v2_vit", "dinov2", "cls", dict(img_size=28)),
    ("dinov2_reg_vit", "dinov2", "cls", dict(img_size=28)),
    ("dinov3_vit", "dinov3", "cls", dict(img_size=32)),
    ("ijepa_vit", "ijepa", "mean", dict(img_size=28)),
    ("clip_vit", "clip", "cls", dict(img_size=32)),
    ("deit_vit", "deit", "cls", dict(img_size=32)),
])
def test_random_weights_from_preset_when_offline(key, family, pooling, extra):
    """No cached config: the architecture comes from vitkit's preset for the default HF id (sizes shrunk)."""
    model = build_model(key, load_pretrained=False, head=3, config_kwargs=dict(embed_dim=32, depth=1, num_heads=4,
                                                                                **extra))
    c = model.backbone.config
    assert c.family == family and model.pooling == pooling
    if key == "dinov2_reg_vit":
        assert c.num_register_tokens == 4 and c.interpolate_antialias  # as transformers' checkpoint would load
    if key == "dino_v2_vit":
        assert c.interpolate_offset == 0.0 and c.layer_scale_init
    s = extra["img_size"]
    assert model(_x(3, s, s)).shape == (2, 3)


def test_config_kwargs_errors():
    with pytest.raises(ConfigError, match="unknown config_kwargs key 'embed_dimm'.*did you mean 'embed_dim'"):
        build_model("vanilla_vit", load_pretrained=False, config_kwargs={"embed_dimm": 3})
    with pytest.raises(ConfigError, match="backbone_dropout=0.1"):
        build_model("vanilla_vit", load_pretrained=False, config_kwargs={"hidden_dropout_prob": 0.1})
    with pytest.raises(ConfigError, match="attn_implementation='fast'"):
        build_model("vanilla_vit", load_pretrained=False, config_kwargs={"attn_implementation": "fast"})
    with pytest.raises(ConfigError, match="unknown pooling 'max'"):
        build_model("vanilla_vit", load_pretrained=False, pooling="max")
    with pytest.raises(ConfigError, match="needs a CLS token"):
        build_model("ijepa_vit", load_pretrained=False, pooling="cls",
                    config_kwargs=dict(embed_dim=32, depth=1, num_heads=4, img_size=28))


def test_no_timm_transformers_or_lightning_import():
    script = ("import sys, vitkit\n"
              "m = vitkit.build_model('dino_v2_vit', load_pretrained=False, head=2,\n"
              "                       config_kwargs=dict(embed_dim=32, depth=1, num_heads=4, img_size=28))\n"
              "print([k for k in ('timm', 'transformers', 'lightning') if k in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VITKIT_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------------------------- Lightning
@pytest.mark.parametrize("freeze", [True, False])
def test_lightning_training_steps(freeze):
    L = pytest.importorskip("lightning")
    from vitkit.zoo import ZooClassifier

    torch.manual_seed(0)
    model = build_model("dino_v2_vit", load_pretrained=False, head=3, freeze_backbone=freeze,
                        config_kwargs=dict(embed_dim=32, depth=1, num_heads=4, img_size=28))
    clf = ZooClassifier(model, lr=5e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _x(3, 28, 28, b=8), torch.arange(8) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    seen = {"loss": [], "backbone_training": [], "head_training": []}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen["backbone_training"].append(module.model.backbone.training)
            seen["head_training"].append(module.model.head.training)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen["loss"].append(float(outputs["loss"]))

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(clf, loader)
    assert len(seen["loss"]) == 2 and seen["loss"][1] < seen["loss"][0]
    assert seen["head_training"] == [True, True]
    assert seen["backbone_training"] == [not freeze] * 2
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in changed if k.startswith("head.")} == {"head.fc.weight", "head.fc.bias"}
    backbone_changed = {k for k in changed if k.startswith("backbone.")}
    if freeze:
        assert not backbone_changed
    else:
        assert "backbone.blocks.0.attn.qkv.weight" in backbone_changed
    assert isinstance(clf.model, ZooModel) and clf.hparams.lr == 5e-3


def test_lightning_example_runs():
    """examples/zoo_lightning.py in its tiny configuration (the example is run, so it cannot go stale)."""
    pytest.importorskip("lightning")
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "zoo_lightning.py")
    spec = importlib.util.spec_from_file_location("zoo_lightning_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    metrics = example.main(["--freeze-backbone", "--max-steps", "2"])
    assert {"train_loss", "val_loss", "val_acc"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
