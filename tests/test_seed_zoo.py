"""Every code example of the "Vision Transformer Zoo" README (seed 002) runs on vitkit.

Each test is one README example, kept as written except:
* the import lines (``vit_zoo.factory`` / ``vit_zoo.components`` -> ``vitkit.zoo`` / ``vitkit.heads``;
  ``pytorch_lightning`` -> ``lightning.pytorch``, the same API without a second multi-second import);
* the model names: pretrained weights come from tiny random transformers checkpoints saved to temporary
  directories and passed as ``model_name=`` (the examples hard-code ``input_dim=768``, so the ViT and DINOv2
  stand-ins keep hidden_size 768 with one layer and a narrow MLP).
After each example the test checks numbers/behaviour. Everything runs offline with empty caches.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import references as R  # noqa: E402

transformers = pytest.importorskip("transformers")

TOL = 1e-5


@pytest.fixture(autouse=True)
def _offline(isolated_caches):
    return isolated_caches


def _save(model, root, name):
    path = os.path.join(root, name)
    model.eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny stand-ins for the README's checkpoints: name -> (transformers model, directory)."""
    root = str(tmp_path_factory.mktemp("seed_zoo"))
    torch.manual_seed(0)
    vit768 = dict(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=64, image_size=32,
                  patch_size=16, attn_implementation="eager")
    out = {}
    m = transformers.ViTModel(transformers.ViTConfig(**vit768))  # google/vit-base-patch16-224 (768-dim)
    out["vit_base"] = (m.eval(), _save(m, root, "vit_base"))
    m = transformers.Dinov2Model(transformers.Dinov2Config(**{**vit768, "mlp_ratio": 1}))  # facebook/dinov2-base
    out["dinov2_base"] = (m.eval(), _save(m, root, "dinov2_base"))
    m = transformers.ViTModel(transformers.ViTConfig(**{**vit768, "hidden_size": 64, "num_attention_heads": 4}))
    out["vit_large"] = (m.eval(), _save(m, root, "vit_large"))  # google/vit-large-patch16-224 (other width)
    m = transformers.DeiTModel(transformers.DeiTConfig(**{**vit768, "hidden_size": 48, "num_attention_heads": 4}))
    out["deit_small"] = (m.eval(), _save(m, root, "deit_small"))  # facebook/deit-small-distilled-patch16-224
    out["clip"] = R.build_hf_reference("hf_clip", out_dir=os.path.join(root, "clip"))  # openai/clip-vit-base-patch16
    return out


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _cls(hf_model, images):
    with torch.no_grad():
        return hf_model(pixel_values=images).last_hidden_state[:, 0]


# ------------------------------------------------------------------------- Example 1: Simple Classification
def test_example1_simple_classification_lightning(ckpt, images):
    from vitkit.zoo import build_model

    # Create a model with 10 classes, freeze backbone
    model = build_model("vanilla_vit", model_name=ckpt["vit_base"][1], head=10, freeze_backbone=True)

    # Use in PyTorch Lightning
    import lightning.pytorch as pl

    class ViTLightningModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model("vanilla_vit", model_name=ckpt["vit_base"][1], head=10, freeze_backbone=True)

        def forward(self, x):
            return self.model(x)

    module = ViTLightningModule()
    module.train()
    logits = module(images)
    assert logits.shape == (2, 10) and model(images).shape == (2, 10)
    assert module.model.backbone.training is False and module.model.head.training
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"model.head.fc.weight", "model.head.fc.bias"}
    with torch.no_grad():  # the head sees the normed CLS token of the pretrained (tiny) ViT
        expected = module.model.head(_cls(ckpt["vit_base"][0], images))
        assert (module(images) - expected).abs().max() <= TOL


# ------------------------------------------------------------------------------ Example 2: Custom MLP Head
def test_example2_custom_mlp_head(ckpt, images):
    import torch.nn as nn

    from vitkit.heads import MLPHead
    from vitkit.zoo import build_model

    # Create MLP head with string activation (most common)
    mlp_head = MLPHead(
        input_dim=768,  # Must match backbone embedding dimension
        hidden_dims=[512, 256],
        output_dim=100,
        dropout=0.1,
        activation="gelu"  # String literal: 'relu', 'gelu', or 'tanh'
    )

    # Or use custom nn.Module activation
    mlp_head_custom = MLPHead(
        input_dim=768,
        hidden_dims=[512, 256],
        output_dim=100,
        activation=nn.SiLU()  # Any PyTorch activation module
    )

    model = build_model("dino_v2_vit", model_name=ckpt["dinov2_base"][1], head=mlp_head)

    assert model.head is mlp_head and model(images).shape == (2, 100)
    assert sum(isinstance(m, nn.GELU) for m in mlp_head.modules()) == 2
    assert sum(isinstance(m, nn.SiLU) for m in mlp_head_custom.modules()) == 2
    with torch.no_grad():
        emb = ckpt["dinov2_base"][0](pixel_values=images).pooler_output
        assert (model(images) - mlp_head.eval()(emb)).abs().max() <= TOL


# ------------------------------------------------------------------------ Example 3: Embedding Extraction
def test_example3_embedding_extraction(ckpt, images):
    from vitkit.zoo import build_model

    # No head - just extract embeddings
    model = build_model("clip_vit", model_name=ckpt["clip"][1], head=None)

    outputs = model(images, output_embeddings=True)
    embeddings = outputs["embeddings"]  # Shape: (batch_size, embedding_dim)

    assert embeddings.shape == (2, 32)
    with torch.no_grad():
        ref = ckpt["clip"][0](pixel_values=images).pooler_output  # CLIPVisionModel: post_layernorm(CLS)
    assert (embeddings - ref).abs().max() <= TOL


# ------------------------------------------------------------------------------ Example 4: Attention Weights
def test_example4_attention_weights(ckpt, images):
    from vitkit.zoo import build_model

    # For attention weights, you may need to set attn_implementation='eager'
    model = build_model(
        "vanilla_vit",
        model_name=ckpt["vit_base"][1],
        head=10,
        config_kwargs={"attn_implementation": "eager"}
    )
    outputs = model(images, output_attentions=True)

    predictions = outputs["predictions"]  # Shape: (batch_size, num_classes)
    attentions = outputs["attentions"]     # Tuple of attention tensors (may be None if not supported)

    assert predictions.shape == (2, 10)
    with torch.no_grad():
        ref = ckpt["vit_base"][0](pixel_values=images, output_attentions=True).attentions
    assert isinstance(attentions, tuple) and len(attentions) == len(ref) == 1
    assert attentions[0].shape == (2, 12, 5, 5)
    assert (attentions[0] - ref[0]).abs().max() <= TOL


# ------------------------------------------------------------------------------ Example 5: Custom Head Class
def test_example5_custom_head_class(ckpt, images):
    import torch
    import torch.nn as nn

    from vitkit.heads import BaseHead
    from vitkit.zoo import build_model

    class MyCustomHead(BaseHead):
        """Custom head - can be MLP, UNET decoder, attention-based, etc."""
        def __init__(self, input_dim: int, num_classes: int):
            super().__init__()
            self._input_dim = input_dim  # Store for input_dim property
            self.fc1 = nn.Linear(input_dim, 256)
            self.fc2 = nn.Linear(256, num_classes)

        @property
        def input_dim(self) -> int:
            """Returns the input dimension of the head."""
            return self._input_dim

        def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.fc1(embeddings))
            return self.fc2(x)

    # Use custom head - input_dim will be validated automatically
    head = MyCustomHead(input_dim=768, num_classes=10)  # vanilla_vit has 768-dim embeddings
    model = build_model("vanilla_vit", model_name=ckpt["vit_base"][1], head=head)  # Validates input_dim matches

    assert model(images).shape == (2, 10)
    from vitkit import ConfigError

    with pytest.raises(ConfigError, match="input_dim=512.*768-dim embeddings"):  # "Validates input_dim matches"
        build_model("vanilla_vit", model_name=ckpt["vit_base"][1], head=MyCustomHead(input_dim=512, num_classes=10))


# ---------------------------------------------------------------------------- Example 6: Override Model Name
def test_example6_override_model_name(ckpt, images):
    from vitkit.zoo import build_model

    # Use a different model variant from the registry default
    model = build_model(
        "vanilla_vit",
        model_name=ckpt["vit_large"][1],  # Override default
        head=10
    )

    assert model.embedding_dim == 64 and model(images).shape == (2, 10)  # the override's width, not 768
    with torch.no_grad():
        assert (model.embed(images) - _cls(ckpt["vit_large"][0], images)).abs().max() <= TOL


# ------------------------------------------------------------------- Example 7: Direct Usage (no registry)
def test_example7_direct_usage(ckpt, images):
    from vitkit import VisionTransformer as ViTModel
    from vitkit.zoo import build_model

    # Use any HuggingFace model directly without registry
    model = build_model(
        model_name=ckpt["vit_base"][1],
        backbone_cls=ViTModel,
        head=10
    )

    assert type(model.backbone) is ViTModel and model(images).shape == (2, 10)
    with torch.no_grad():
        assert (model.embed(images) - _cls(ckpt["vit_base"][0], images)).abs().max() <= TOL


# ------------------------------------------------- API reference: the three usage patterns of build_model()
def test_api_reference_usage_patterns(ckpt, images):
    from vitkit import VisionTransformer as CustomModel
    from vitkit.zoo import build_model

    base, large = ckpt["vit_base"][1], ckpt["vit_large"][1]
    m1 = build_model("vanilla_vit", model_name=base, head=10)  # 1. Registry shortcut
    m2 = build_model("vanilla_vit", model_name=large, head=10)  # 2. Override default
    m3 = build_model(model_name=base, backbone_cls=CustomModel, head=10)  # 3. Direct usage
    assert [m.embedding_dim for m in (m1, m2, m3)] == [768, 64, 768]
    assert all(m(images).shape == (2, 10) for m in (m1, m2, m3))
    # forward(): a tensor without flags, a dict with them
    assert torch.is_tensor(m1(images))
    assert set(m1(images, output_attentions=True, output_embeddings=True)) == {"predictions", "attentions",
                                                                              "embeddings"}


# ----------------------------------------------------- Advanced Usage: Using Any HuggingFace Model (verbatim)
def test_advanced_any_huggingface_model(ckpt, images):
    from transformers import DeiTModel, ViTModel  # kept: vitkit accepts these classes as family checks

    from vitkit.zoo import build_model

    # Use any ViT variant
    model = build_model(
        model_name=ckpt["vit_large"][1],
        backbone_cls=ViTModel,
        head=10
    )
    assert model.backbone.config.family == "vit" and model(images).shape == (2, 10)

    # Use any DeiT variant
    model = build_model(
        model_name=ckpt["deit_small"][1],
        backbone_cls=DeiTModel,
        head=10
    )
    assert model.backbone.config.family == "deit" and model(images).shape == (2, 10)
    with torch.no_grad():  # DeiT: the CLS token (the distillation token is not pooled by default)
        assert (model.embed(images) - _cls(ckpt["deit_small"][0], images)).abs().max() <= TOL


# ------------------------------------------------------------ Advanced Usage: Adding Models to Registry
def test_advanced_adding_models_to_registry(ckpt, images, monkeypatch):
    from vitkit import VisionTransformer as YourCustomModel
    from vitkit.zoo import MODEL_REGISTRY, build_model

    monkeypatch.setitem(MODEL_REGISTRY, "your_model", None)  # the key is removed again after the test
    MODEL_REGISTRY.update({
        "your_model": (YourCustomModel, ckpt["deit_small"][1]),
    })

    model = build_model("your_model", head=3)
    assert model.backbone.config.embed_dim == 48 and model(images).shape == (2, 3)


# ------------------------------------------------------------- Advanced Usage: Creating Custom Heads (UNET)
def test_advanced_creating_custom_heads(ckpt, images):
    import torch
    import torch.nn as nn

    from vitkit.heads import BaseHead
    from vitkit.zoo import build_model

    class UNETDecoderHead(BaseHead):
        """Example: UNET-style decoder head."""
        def __init__(self, input_dim: int, num_classes: int):
            super().__init__()
            self._input_dim = input_dim  # Store for input_dim property
            # Your custom architecture here
            self.decoder = nn.Sequential(
                nn.Linear(input_dim, 512),
                nn.ReLU(),
                nn.Linear(512, 256),
                nn.ReLU(),
                nn.Linear(256, num_classes)
            )

        @property
        def input_dim(self) -> int:
            """Returns the input dimension of the head."""
            return self._input_dim

        def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
            return self.decoder(embeddings)

    # Use it - input_dim will be automatically validated
    head = UNETDecoderHead(input_dim=768, num_classes=10)
    model = build_model("vanilla_vit", model_name=ckpt["vit_base"][1], head=head)  # Validates input_dim matches

    out = model(images)
    assert out.shape == (2, 10)
    with torch.no_grad():
        assert (out - head(_cls(ckpt["vit_base"][0], images))).abs().max() <= TOL


# --------------------------------------------- Supported Models: the registry's default ids, resolved offline
# Every other test passes model_name=; here each registry key is used as the README writes it,
# build_model("<model_type>", ...), and its default id (google/vit-base-patch16-224, ...) is resolved through the
# Hugging Face cache layout where load_pretrained=True looks (HF_HUB_OFFLINE=1, caches in tmp dirs): a tiny random
# checkpoint of the right architecture sits at $HF_HUB_CACHE/models--<org>--<name>/snapshots/<rev>/, refs/main
# naming that revision (what `huggingface-cli download` leaves behind).
_TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _tiny_default_models() -> dict[str, torch.nn.Module]:
    """model_type -> a tiny transformers model of the class its default id holds (randomised, eval)."""
    T = transformers
    vit = dict(_TINY_VIT, intermediate_size=64)
    dino2 = {k: v for k, v in _TINY_VIT.items() if "dropout" not in k}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, projection_dim=16)
    models = {
        "vanilla_vit": T.ViTModel(T.ViTConfig(**vit)),  # with transformers' pooler (dense + tanh)
        "deit_vit": T.DeiTModel(T.DeiTConfig(**vit)),
        "dino_vit": T.ViTModel(T.ViTConfig(**vit, layer_norm_eps=1e-6), add_pooling_layer=False),
        "dino_v2_vit": T.Dinov2Model(T.Dinov2Config(**dino2, mlp_ratio=2)),
        "dinov2_reg_vit": T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**dino2, mlp_ratio=2,
                                                                                num_register_tokens=4)),
        "dinov3_vit": T.DINOv3ViTModel(T.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=64, image_size=32, patch_size=8,
                                                        num_register_tokens=4)),
        # openai/clip-vit-base-patch16 is a full CLIPModel (text tower included)
        "clip_vit": T.CLIPModel(T.CLIPConfig(vision_config=vision, projection_dim=16, text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99))),
        "ijepa_vit": T.IJepaModel(T.IJepaConfig(**vit), add_pooling_layer=False),
    }
    return {k: R.randomize_(m, seed=i) for i, (k, m) in enumerate(models.items())}


def _expected_embedding(model_type: str, hf: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What build_model's ``embeddings`` must be, from the transformers model (see ZooModel.forward)."""
    with torch.no_grad():
        if model_type == "clip_vit":
            return hf.vision_model(pixel_values=images).pooler_output  # post_layernorm(CLS)
        out = hf(pixel_values=images)
        if model_type == "ijepa_vit":
            return out.last_hidden_state.mean(dim=1)
        if model_type in ("vanilla_vit", "deit_vit", "dino_vit"):
            return out.last_hidden_state[:, 0]  # normed CLS, not the pooler
        return out.pooler_output  # DINOv2 / DINOv3: the normed CLS token


@pytest.fixture(scope="module")
def default_checkpoints(tmp_path_factory):
    from vitkit.zoo import MODEL_REGISTRY

    root = tmp_path_factory.mktemp("default_ids")
    out = {}
    for model_type, model in _tiny_default_models().items():
        path = root / model_type
        model.save_pretrained(path)
        out[model_type] = (model, path, MODEL_REGISTRY[model_type].model_name)
    return out


def _into_hf_cache(src, repo_id: str, revision: str = "a" * 40) -> None:
    import shutil
    from pathlib import Path

    repo = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(src, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_registry_default_ids_are_the_readmes():
    from vitkit.zoo import MODEL_REGISTRY

    readme = {"vanilla_vit": "google/vit-base-patch16-224", "deit_vit": "facebook/deit-base-distilled-patch16-224",
              "dino_vit": "facebook/dino-vitb16", "dino_v2_vit": "facebook/dinov2-base",
              "dinov2_reg_vit": "facebook/dinov2-with-registers-base",
              "dinov3_vit": "facebook/dinov3-vitb16-pretrain-lvd1689m", "clip_vit": "openai/clip-vit-base-patch16"}
    assert {k: MODEL_REGISTRY[k].model_name for k in readme} == readme


@pytest.mark.parametrize("model_type", ["vanilla_vit", "deit_vit", "dino_vit", "dino_v2_vit", "dinov2_reg_vit",
                                        "dinov3_vit", "clip_vit", "ijepa_vit"])
def test_registry_default_id_resolves_offline(model_type, default_checkpoints, images):
    """``build_model("<model_type>", head=...)`` without model_name: the default id comes from the HF cache, its
    weights are loaded (embeddings equal the transformers model's, pooled as documented)."""
    from vitkit.zoo import build_model

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    hf, path, repo_id = default_checkpoints[model_type]
    _into_hf_cache(path, repo_id)

    model = build_model(model_type, head=10)

    assert model.backbone.config.extra["weights_source"].startswith("transformers model_type=")
    out = model(images, output_embeddings=True)
    assert out["predictions"].shape == (2, 10) and out["embeddings"].shape == (2, 32)
    assert (out["embeddings"] - _expected_embedding(model_type, hf, images)).abs().max() <= TOL


def test_default_id_from_vitkit_home_and_missing_default_id(default_checkpoints, images, isolated_caches):
    """The other place load_pretrained=True looks, $VITKIT_HOME/hf/<org>/<name>; and a default id cached nowhere
    is an error naming the id and both places (never random weights)."""
    import shutil

    from vitkit import WeightsNotFoundError
    from vitkit.zoo import build_model

    hf, path, repo_id = default_checkpoints["dino_v2_vit"]
    shutil.copytree(path, isolated_caches / "hf" / repo_id)
    model = build_model("dino_v2_vit", head=None)
    assert (model(images) - _expected_embedding("dino_v2_vit", hf, images)).abs().max() <= TOL

    with pytest.raises(WeightsNotFoundError) as info:
        build_model("vanilla_vit", head=10)
    msg = str(info.value)
    assert "google/vit-base-patch16-224" in msg and str(isolated_caches / "hf") in msg
    assert os.environ["HF_HUB_CACHE"] in msg and "load_pretrained=False" in msg


def test_vit_and_deit_embeddings_are_the_normed_cls_not_the_pooler(default_checkpoints, images):
    """vit_zoo returned transformers' ``pooler_output`` (tanh(dense(CLS))) for ViT/DeiT; vitkit returns the normed
    CLS token (documented in ZooModel.forward). Shown on the default ids."""
    from vitkit.zoo import ZooModel, build_model

    for model_type in ("vanilla_vit", "deit_vit"):
        hf, path, repo_id = default_checkpoints[model_type]
        _into_hf_cache(path, repo_id)
        emb = build_model(model_type, head=None)(images, output_embeddings=True)["embeddings"]
        with torch.no_grad():
            out = hf(pixel_values=images)
        assert (emb - out.last_hidden_state[:, 0]).abs().max() <= TOL
        assert (emb - out.pooler_output).abs().max() > 0.1  # a different vector, not a rounding difference
    doc = ZooModel.forward.__doc__
    assert "pooler_output" in doc and "last_hidden_state[:, 0]" in doc and "vit_zoo" in doc
