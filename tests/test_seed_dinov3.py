"""Seed README 004 (a DINOv3 integration with a VGGT-style aggregator): every code example runs on vitkit,
and the DINOv3 hub functions load weights exactly and fail loudly.

Each example is kept verbatim below (trailing spaces stripped); the only edits are the ones listed next to
it (import lines and model names), applied by ``vitkit_version``, which also checks that each edited text is
present. Examples run twice:

* as written, at full size, on the meta device (``with torch.device("meta")``): every call, the strict
  loading of a full-size checkpoint and the printed shapes are real; the arithmetic is skipped, which is
  what lets a ViT-L and a 24-step aggregator over 16 frames run in well under a second on 2 CPU cores.
  ``pretrained=True`` stays on: the official file names in an isolated ``$VITKIT_HOME`` hold Meta-layout
  checkpoints of the real architectures made of meta tensors (shapes only, a few KB);
* in a tiny configuration with real numbers and weights from a tiny Meta-format checkpoint on disk.

Not run: the requirements list (checked instead: vitkit needs none of xformers/fvcore/timm) and
``python test_dinov3_integration.py`` (the seed's own test script; this file is its counterpart).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

import vitkit
from vitkit.backbones import hub_functions
from vitkit.errors import ConfigError, WeightsNotFoundError
from vitkit.models.aggregator import IMAGENET_MEAN, IMAGENET_STD, Aggregator, DINOv3IntegratedModel
from vitkit.weights import load_weights, to_meta_state_dict

TINY = dict(embed_dim=32, depth=2, num_heads=4)
HUB_NAMES = ["dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vitl16plus",
             "dinov3_vith16plus", "dinov3_vit7b16"]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

# ------------------------------------------------------------------------------------ README examples
EXAMPLE_BASIC = '''
from src.models.dinov3 import dinov3_vitl16

# Load a pretrained DINOv3 model
model = dinov3_vitl16(pretrained=True)

# Process images
import torch
images = torch.randn(2, 3, 224, 224)  # [batch, channels, height, width]
features = model.forward_features(images)

print(f"CLS token: {features['x_norm_clstoken'].shape}")      # [2, 1024]
print(f"Patch tokens: {features['x_norm_patchtokens'].shape}") # [2, 196, 1024]
'''

EXAMPLE_AGGREGATOR = '''
from src.models.dinov3 import Aggregator

# Create aggregator for multi-frame processing
aggregator = Aggregator(
    img_size=224,
    patch_size=16,
    embed_dim=1024,
    depth=24,
    num_heads=16,
    n_storage_tokens=4,
    patch_embed="dinov3_vitl16_reg",
    aa_order=["frame", "global"],
)

# Process video sequences
video_frames = torch.randn(2, 8, 3, 224, 224)  # [batch, frames, channels, height, width]
output_list, patch_start_idx = aggregator(video_frames)

print(f"Output features: {output_list[-1].shape}")  # [2, 8, 200, 2048]
'''

EXAMPLE_INTEGRATED = '''
from src.models.dinov3.example_usage import DINOv3IntegratedModel

# For single-frame processing
model = DINOv3IntegratedModel(
    dinov3_model="dinov3_vitb16",
    use_aggregator=False,
    pretrained=True
)

images = torch.randn(4, 3, 224, 224)
output = model(images)
print(f"CLS token: {output['cls_token'].shape}")

# For multi-frame processing
model_multi = DINOv3IntegratedModel(
    dinov3_model="dinov3_vitl16",
    use_aggregator=True,
    aa_order=["frame", "global"]
)

video = torch.randn(2, 6, 3, 224, 224)
output = model_multi(video)
print(f"Features: {output['features'].shape}")
'''

EXAMPLE_YAML = '''
model:
  backbone:
    dinov3_model: "dinov3_vitl14"
    img_size: 518
    patch_size: 14
    embed_dim: 1024
    depth: 24
    num_heads: 16
    n_storage_tokens: 4

  aggregator:
    enabled: true
    aa_order: ["frame", "global"]
    rope_freq: 100
'''

EXAMPLE_MIGRATION_IMPORTS = '''
# Old
from spatial_mllm.models.vggt import Aggregator

# New
from src.models.dinov3 import Aggregator
'''
EXAMPLE_MIGRATION_NAMES = '''
# Old
patch_embed="dinov2_vitl14_reg"

# New
patch_embed="dinov3_vitl14_reg"
'''
EXAMPLE_MIGRATION_TOKENS = '''
# Old: register tokens
num_register_tokens=4

# New: storage tokens
n_storage_tokens=4
'''
EXAMPLE_LOGGING = '''
import logging
logging.getLogger("dinov3").setLevel(logging.DEBUG)
'''

IMPORT_HUB = ("from src.models.dinov3 import dinov3_vitl16", "from vitkit import dinov3_vitl16")
IMPORT_AGG = ("from src.models.dinov3 import Aggregator", "from vitkit import Aggregator")
# DINOv3 models are /16 with 4 storage tokens; the seed's "_reg" and "vitl14" names do not exist
NAME_AGG = ('patch_embed="dinov3_vitl16_reg"', 'patch_embed="dinov3_vitl16"')


def vitkit_version(code: str, *edits: tuple[str, str]) -> str:
    for old, new in edits:
        assert old in code, f"README text changed: {old!r} not found"
        code = code.replace(old, new)
    return code


def run(code: str, namespace: dict | None = None) -> tuple[str, dict]:
    """exec an example; return what it printed and its namespace. ``torch`` is pre-imported because the
    README's later examples rely on the first one's ``import torch``."""
    ns = {"__name__": "seed_readme_example", "torch": torch, **(namespace or {})}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(textwrap.dedent(code), "<seed README 004 example>", "exec"), ns)
    return out.getvalue(), ns


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture
def full_size_cache(isolated_caches):
    """Official DINOv3 file names in an empty, offline $VITKIT_HOME, holding Meta-layout state dicts of the
    real ViT-B/16 and ViT-L/16 made of meta tensors (shapes, no data)."""
    for name in ("dinov3_vitb16", "dinov3_vitl16"):
        with torch.device("meta"):
            model = vitkit.create_backbone(name)
        torch.save(to_meta_state_dict(model), isolated_caches / vitkit.get_preset(name).filename)
    return isolated_caches


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny DINOv3 (width 32, depth 2, 4 heads, 4 storage tokens) saved in Meta's .pth layout."""
    torch.manual_seed(0)
    ref = perturb(vitkit.create_backbone("dinov3_vits16", **TINY)).eval()
    path = tmp_path / "tiny_dinov3_meta.pth"
    torch.save(to_meta_state_dict(ref), path)
    return path, ref


# Example "Basic Usage": dinov3_vitl16(pretrained=True) + forward_features
def test_example_basic_usage(full_size_cache, tiny_checkpoint):
    code = vitkit_version(EXAMPLE_BASIC, IMPORT_HUB)
    with torch.device("meta"):
        printed, ns = run(code)
    assert printed.splitlines() == ["CLS token: torch.Size([2, 1024])", "Patch tokens: torch.Size([2, 196, 1024])"]
    assert not ns["model"].training

    # tiny, with numbers: the same calls on a tiny local checkpoint
    path, ref = tiny_checkpoint
    model = vitkit.dinov3_vitl16(pretrained=True, weights=path, **TINY)
    images = torch.randn(2, 3, 64, 48)
    features = model.forward_features(images)
    assert features["x_norm_clstoken"].shape == (2, 32) and features["x_norm_patchtokens"].shape == (2, 12, 32)
    assert torch.equal(features["x_norm_patchtokens"], ref.forward_features(images)["x_norm_patchtokens"])


# Example "Multi-frame Processing with Aggregator"
def test_example_aggregator(tiny_checkpoint):
    code = vitkit_version(EXAMPLE_AGGREGATOR, IMPORT_AGG, NAME_AGG)
    with torch.device("meta"):
        printed, ns = run(code)
    # the README's comment says 200; it is 1 camera + 4 register + 14*14 patch tokens = 201
    assert printed.strip() == "Output features: torch.Size([2, 8, 201, 2048])"
    assert ns["patch_start_idx"] == 5 and len(ns["output_list"]) == 24

    # tiny, with numbers: the patch embedding is the checkpoint's DINOv3, loaded because asked
    path, ref = tiny_checkpoint
    agg = Aggregator(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=4, n_storage_tokens=4,
                     patch_embed="dinov3_vits16", aa_order=["frame", "global"], pretrained_patch_embed=path,
                     patch_embed_kwargs=TINY).eval()
    video = torch.rand(2, 3, 3, 64, 48)
    output_list, start = agg(video)
    assert start == 5 and [o.shape for o in output_list] == [(2, 3, 5 + 12, 64)] * 2
    patches = ref.forward_features((video.flatten(0, 1) - MEAN) / STD)["x_norm_patchtokens"]
    assert torch.equal(agg.embed(video)[:, start:], patches)


# Example "Using the Integrated Model" (single-frame and multi-frame)
def test_example_integrated_model(full_size_cache, tiny_checkpoint):
    code = vitkit_version(EXAMPLE_INTEGRATED, ("from src.models.dinov3.example_usage import DINOv3IntegratedModel",
                                               "from vitkit.models.aggregator import DINOv3IntegratedModel"))
    with torch.device("meta"):
        printed, ns = run(code)
    assert printed.splitlines() == ["CLS token: torch.Size([4, 768])", "Features: torch.Size([2, 6, 201, 2048])"]
    assert ns["model_multi"].aggregator.output_layers == [23]  # only the returned layer is kept

    # tiny, with numbers
    path, ref = tiny_checkpoint
    single = DINOv3IntegratedModel(dinov3_model="dinov3_vitb16", use_aggregator=False, pretrained=True,
                                   weights=path, backbone_kwargs=TINY)
    images = torch.rand(4, 3, 32, 32)
    out = single(images)
    expected = ref.forward_features((images - MEAN) / STD)
    assert torch.equal(out["cls_token"], expected["x_norm_clstoken"])
    assert torch.equal(out["patch_tokens"], expected["x_norm_patchtokens"])
    multi = DINOv3IntegratedModel(dinov3_model="dinov3_vitl16", use_aggregator=True, aa_order=["frame", "global"],
                                  weights=path, backbone_kwargs=TINY, depth=3)
    full = Aggregator(img_size=224, patch_size=16, embed_dim=32, depth=3, num_heads=4, patch_embed=ref)
    full.load_state_dict(multi.aggregator.state_dict())
    video = torch.rand(2, 3, 3, 32, 32)
    assert torch.equal(multi(video)["features"], full.eval()(video)[0][-1])
    with pytest.raises(ConfigError, match="unknown DINOv3 model 'dinov3_vitl14'"):
        DINOv3IntegratedModel(dinov3_model="dinov3_vitl14")


# Example "YAML Configuration" (model name dinov3_vitl14 -> dinov3_vitl16: there is no /14 DINOv3)
def test_example_yaml_config():
    cfg = yaml.safe_load(vitkit_version(EXAMPLE_YAML, ('"dinov3_vitl14"', '"dinov3_vitl16"')))["model"]
    bb, ag = dict(cfg["backbone"]), cfg["aggregator"]
    assert ag["enabled"]
    with torch.device("meta"):
        agg = Aggregator(patch_embed=bb.pop("dinov3_model"), aa_order=ag["aa_order"], rope_freq=ag["rope_freq"], **bb)
        out, start = agg(torch.rand(1, 2, 3, 518, 518))
    # the /16 backbone runs at /14 (its patch embedding is resampled when weights are loaded): 37 x 37 patches
    assert agg.patch_embed.patch_size == 14 and out[-1].shape == (1, 2, 1 + 4 + 37 * 37, 2048) and start == 5


# Example "Migration from DINOv2" 1: imports
def test_example_migration_imports():
    code = vitkit_version(EXAMPLE_MIGRATION_IMPORTS, ("from spatial_mllm.models.vggt import Aggregator",
                                                      "from vitkit import Aggregator"), IMPORT_AGG)
    _, ns = run(code)
    assert ns["Aggregator"] is vitkit.Aggregator is Aggregator


# Example "Migration from DINOv2" 2: model names (the README's new name does not exist and says so)
def test_example_migration_model_names():
    _, ns = run(vitkit_version(EXAMPLE_MIGRATION_NAMES, ('"dinov3_vitl14_reg"', '"dinov3_vitl16"')))
    assert ns["patch_embed"] == "dinov3_vitl16"
    with torch.device("meta"):
        for name in ("dinov2_vitl14_reg", ns["patch_embed"]):  # old and new
            agg = Aggregator(patch_embed=name)  # VGGT's defaults: 518 px, /14, width 1024
            assert agg(torch.rand(1, 2, 3, 518, 518))[0][-1].shape == (1, 2, 1374, 2048)
    with pytest.raises(ConfigError, match="no /14 DINOv3.*did you mean 'dinov3_vitl16'"):
        Aggregator(patch_embed="dinov3_vitl14_reg")


# Example "Migration from DINOv2" 3: token names (both spellings are accepted)
def test_example_migration_token_names():
    _, ns = run(EXAMPLE_MIGRATION_TOKENS)
    kw = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=4, patch_embed="conv")
    old = Aggregator(num_register_tokens=ns["num_register_tokens"], **kw)
    new = Aggregator(n_storage_tokens=ns["n_storage_tokens"], **kw)
    assert old.register_token.shape == new.register_token.shape == (1, 2, 4, 32)
    assert old.patch_start_idx == new.patch_start_idx == 5


# Example "Debug Mode": vitkit logs under the "vitkit" logger
def test_example_debug_logging(tiny_checkpoint, caplog):
    logger = logging.getLogger("vitkit")
    level = logger.level
    try:
        run(vitkit_version(EXAMPLE_LOGGING, ('getLogger("dinov3")', 'getLogger("vitkit")')))
        assert logger.level == logging.DEBUG
        with caplog.at_level(logging.DEBUG, logger="vitkit"):
            vitkit.dinov3_vits16(weights=tiny_checkpoint[0], **TINY)
        assert "format meta_dinov3" in caplog.text
    finally:
        logger.setLevel(level)


# "Requirements": vitkit needs none of xformers, fvcore or timm for these examples
def test_requirements_not_needed():
    code = ("import sys, torch, vitkit\n"
            "vitkit.dinov3_vits16(pretrained=False, embed_dim=32, depth=1, num_heads=4)\n"
            "vitkit.Aggregator(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=4,"
            " patch_embed='dinov3_vits16', patch_embed_kwargs=dict(embed_dim=32, depth=1, num_heads=4))"
            "(torch.rand(1, 2, 3, 32, 32))\n"
            "print(sorted(m for m in ('xformers', 'fvcore', 'timm', 'torchvision') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ hub functions
@pytest.mark.parametrize("name", HUB_NAMES)
def test_hub_function_matches_create_backbone_and_load_weights(name, tmp_path):
    torch.manual_seed(0)
    src = perturb(vitkit.create_backbone(name, **TINY))
    path = tmp_path / f"{name}_tiny.pth"
    torch.save(to_meta_state_dict(src), path)  # Meta's layout (w1/w2, storage_tokens, bias_mask)
    model = getattr(vitkit, name, None) or getattr(hub_functions, name)  # vits16plus is not exported (yet)
    hub_model = model(weights=str(path), **TINY)
    ref = vitkit.create_backbone(name, **TINY)
    load_weights(ref, path)
    ref.eval()
    assert not hub_model.training and hub_model.config == ref.config
    x = torch.randn(2, 3, 48, 64)
    a, b = hub_model.forward_features(x), ref.forward_features(x)
    for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["x_norm_patchtokens"], src.eval().forward_features(x)["x_norm_patchtokens"])
    if name == "dinov3_vit7b16":
        assert hub_model.blocks[0].attn.qkv.bias is None  # Meta's 7B has no qkv bias


def test_hub_weights_from_cache_url_and_names(isolated_caches, tiny_checkpoint, tmp_path):
    path, ref = tiny_checkpoint
    x = torch.randn(1, 3, 32, 32)
    expected = ref.forward_features(x)["x_norm_clstoken"]
    official = isolated_caches / vitkit.get_preset("dinov3_vits16").filename
    shutil.copy(path, official)
    for weights in (None, "LVD1689M", "lvd1689m", path.as_uri()):  # cache by name, file:// URL
        model = vitkit.dinov3_vits16(weights=weights, **TINY)
        assert torch.equal(model.forward_features(x)["x_norm_clstoken"], expected), weights

    class Weights:  # stands in for Meta's dinov3.hub.backbones.Weights enum member
        value = "SAT493M"

    sat = isolated_caches / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    shutil.copy(path, sat)
    model = vitkit.dinov3_vitl16(weights=Weights(), **TINY)
    assert torch.equal(model.forward_features(x)["x_norm_clstoken"], expected)
    with pytest.raises(ConfigError, match="no SAT493M weights for dinov3_vits16"):
        vitkit.dinov3_vits16(weights="SAT493M", **TINY)

    # check_hash: the file's SHA-256 must start with the hash in its name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    good = tmp_path / f"dinov3_vits16_pretrain_lvd1689m-{digest}.pth"
    shutil.copy(path, good)
    vitkit.dinov3_vits16(weights=good, check_hash=True, **TINY)
    with pytest.raises(WeightsNotFoundError, match="SHA-256"):
        vitkit.dinov3_vits16(weights=official, check_hash=True, **TINY)


def test_hub_meta_keyword_names():
    m = vitkit.dinov3_vits16(pretrained=False, n_storage_tokens=2, ffn_ratio=2.0, layerscale_init=0.5,
                             pos_embed_rope_base=50.0, pos_embed_rope_dtype="fp32", in_chans=1, img_size=(32, 48),
                             **TINY)
    c = m.config
    assert (c.num_register_tokens, c.mlp_ratio, c.layer_scale_init, c.rope_base, c.in_chans, c.img_size) == \
           (2, 2.0, 0.5, 50.0, 1, (32, 48))
    assert m.forward_features(torch.randn(1, 1, 32, 48))["x_norm_patchtokens"].shape == (1, 6, 32)
    with pytest.raises(ConfigError, match="both n_storage_tokens"):
        vitkit.dinov3_vits16(pretrained=False, n_storage_tokens=2, num_register_tokens=2)
    with pytest.raises(ConfigError, match="pos_embed_rope_dtype"):
        vitkit.dinov3_vits16(pretrained=False, pos_embed_rope_dtype="bf16")
    with pytest.raises(ConfigError, match="pretrained=False"):
        vitkit.dinov3_vits16(pretrained=False, weights="/some/file.pth")


def test_hub_offline_errors_name_the_file_and_where_to_put_it(isolated_caches, tmp_path):
    with pytest.raises(WeightsNotFoundError) as e:
        vitkit.dinov3_vitl16()
    msg = str(e.value)
    for part in ("dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", str(isolated_caches), "facebook/dinov3-vitl16-"
                 "pretrain-lvd1689m", "weights='<path or URL of the file>'", "pretrained=False"):
        assert part in msg, part
    assert isinstance(e.value, FileNotFoundError)
    url = "https://dl.fbaipublicfiles.com/dinov3/dinov3_vits16/dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    with pytest.raises(WeightsNotFoundError, match=r"not cached in .*vitkit_home and could not be downloaded "
                                                   r"\(vitkit is offline\)"):
        vitkit.dinov3_vits16(weights=url)
    with pytest.raises(WeightsNotFoundError, match="missing.pth does not exist"):
        vitkit.dinov3_vits16(weights=tmp_path / "missing.pth")
