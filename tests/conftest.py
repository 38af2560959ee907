"""Shared tiny fixtures for the unit tests (layers, backbone, loading, errors, CLI).

Nothing here is autouse: tests/test_parity.py shares this directory and is unaffected.

* ``tiny(name, **overrides)`` builds a registered preset at embed_dim 32, depth 2, 4 heads, with every
  parameter perturbed (``randomize``) so that biases, LayerScale and tokens all influence the output
  (vitkit's init has zero biases and LayerScale 1e-5, which would hide many bugs), in eval mode.
* ``TINY_SIZES`` gives a small native input size per patch size.
"""

from __future__ import annotations

import pytest
import torch

import vitkit

TINY = dict(embed_dim=32, depth=2, num_heads=4)

# one registered name per family / structural variant, with a small native image size
FAMILY_PRESETS = {
    "dinov2_vits14": 56,
    "dinov2_vits14_reg": 56,
    "dinov2_vitg14": 56,  # SwiGLU FFN
    "dinov3_vits16": 64,
    "dinov3_vits16plus": 64,  # SwiGLU FFN + RoPE
    "ijepa_vith14": 56,  # no CLS, fixed sin-cos
    "clip_vitb16": 64,  # pre-norm, QuickGELU, projection
    "vit_base_patch16": 64,
    "deit_tiny_patch16": 64,  # distillation token
}


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add N(0, scale) noise to every floating parameter (not buffers: RoPE periods stay exact).

    Norm weights stay near 1, LayerScale becomes ~0.1, biases and tokens become non-zero.
    The fixed sin-cos table of I-JEPA is left as it is.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed" and getattr(model.config, "pos_embed", "") == "sincos":
                continue
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return model


def make_tiny(name: str, seed: int = 0, eval: bool = True, **overrides) -> vitkit.VisionTransformer:
    kw = dict(TINY)
    if name in FAMILY_PRESETS and "img_size" not in overrides:
        kw["img_size"] = FAMILY_PRESETS[name]
    kw.update(overrides)
    torch.manual_seed(seed)
    model = randomize(vitkit.create_backbone(name, **kw), seed)
    return model.eval() if eval else model


def image(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny():
    """Factory: ``tiny(name, seed=0, eval=True, **create_backbone overrides)``."""
    return make_tiny


@pytest.fixture
def rand_image():
    """Factory: ``rand_image(b, c, h, w, seed=0)`` -> float32 N(0, 1) images."""
    return image


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    """Point every weights cache vitkit searches at empty temporary directories, offline."""
    home = tmp_path / "vitkit_home"
    home.mkdir()
    monkeypatch.setenv("VITKIT_HOME", str(home))
    monkeypatch.setenv("VITKIT_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return home


# A short `vitkit train` on simulated single frames whose model really finds peaks, shared by the files that need a
# trained model (test_train_learns.py checks what it learned; test_predict_flags.py runs `vitkit predict` on it).
LEARN_OVERRIDES = [
    "data=synthetic",          # single 128 x 128 frames with 15-40 peaks each (held out: 6 frames, ~120 peaks)
    "data.crop=[32,32]",       # training crops (and the model's window); the default small EoMT (model=eomt_tiny)
    "trainer.max_steps=160", "data.num_train=640", "data.num_val=8", "data.num_test=6",
    "trainer.val_check_interval=80", "trainer.log_every_n_steps=1",
    "module.warmup_steps=16", "module.lr=2e-3", "predict.overlays=1",
    "sparse.steps=40",         # the sparse-token model's fine-tune (800 in the main job)
]  # measured: held-out peak F1 0.90 (seed 0; 0.92 with seed 1), ~20 s of one core for the 160 steps


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory):
    """``vitkit train`` (the CLI entry point, in this process) with ``LEARN_OVERRIDES``: the run directory."""
    from vitkit.cli import main

    run = tmp_path_factory.mktemp("learned") / "run"
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    # one thread: this model's ops are too small to gain from a second, and a second thread waiting at every op's
    # barrier slows training ~10x when the cores are shared with other processes
    torch.set_num_threads(1)
    try:
        code = main(["train", f"run_dir={run}", *LEARN_OVERRIDES])
    finally:  # Lightning's deterministic=True is process-wide: give the other tests the settings they had
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    assert code == 0 and (run / "metrics.json").exists()
    return run
