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
