"""Meta's checkpoint layouts (DINOv2, DINOv2 with registers, DINOv3, I-JEPA) pinned against an independent statement.

vitkit's own round trips (export with vitkit, import with vitkit) cannot see a mistake that the export and import
tables share. Here the Meta-layout checkpoints are written **by hand from Meta's published key names and shapes**
(``facebookresearch/dinov2`` hub checkpoints, ``facebookresearch/dinov3``, ``facebookresearch/ijepa`` training
checkpoints: see ``/work/shared/reference/backbones.md`` §1.5, §2.5, §3.3), never through vitkit's export. The same
file is then loaded twice:

* into vitkit through the real loader (``create_backbone(name, pretrained=<file>)``: file read, format detection,
  conversion, strict load);
* into timm through timm's own converter of Meta's layouts (``checkpoint_filter_fn``: ``_convert_dinov2`` for DINOv2,
  the Eva filter for DINOv3, the ``encoder`` branch for I-JEPA) and a strict ``load_state_dict``.

Both models then see the same images and must give the same tokens. Every tensor is random and nothing is muted
(LayerScale and norm weights drawn in [0.5, 1.5], biases and tokens non-zero), so a swapped, dropped or misplaced
tensor changes the output by O(1). Tolerance: fp32, relative error (max |a - b| / max |b|) below 1e-5 (different
kernels may round differently; observed: bit-identical). ``test_a_shared_naming_mistake_is_caught`` shows the
comparison fails (relative error > 1e-2) when vitkit reads a Meta name as another one.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import vitkit
from helpers import RTOL, rel

timm = pytest.importorskip("timm")

TOL = RTOL[torch.float32]
SEED = 1234


class Draw:
    """Seeded random tensors of the kinds a trained checkpoint has (no muted LayerScale, no unit norms)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def weight(self, *shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(shape, generator=self.g) * std

    def bias(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.g) * 0.05

    def token(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.g) * 0.5

    def scale(self, *shape: int) -> torch.Tensor:  # LayerNorm weights, LayerScale gammas
        return torch.rand(shape, generator=self.g) + 0.5


def _block(r: Draw, i: int, D: int, ffn: str, hidden: int, layer_scale: bool = True, k_bias_masked: bool = False
           ) -> dict[str, torch.Tensor]:
    """One block in Meta's names: norm1, attn.qkv (q, k, v row blocks), attn.proj, ls1, norm2, mlp, ls2."""
    p = f"blocks.{i}."
    sd = {p + "norm1.weight": r.scale(D), p + "norm1.bias": r.bias(D),
          # q/k/v large enough for peaked attention (near-uniform attention would hide a q/k mix-up)
          p + "attn.qkv.weight": r.weight(3 * D, D, std=0.15), p + "attn.qkv.bias": r.bias(3 * D),
          p + "attn.proj.weight": r.weight(D, D), p + "attn.proj.bias": r.bias(D),
          p + "norm2.weight": r.scale(D), p + "norm2.bias": r.bias(D)}
    if k_bias_masked:  # DINOv3 LinearKMaskedBias: bias * bias_mask, the mask 0 on the key rows
        sd[p + "attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
    if layer_scale:
        sd[p + "ls1.gamma"], sd[p + "ls2.gamma"] = r.scale(D), r.scale(D)
    if ffn == "mlp":
        sd.update({p + "mlp.fc1.weight": r.weight(hidden, D), p + "mlp.fc1.bias": r.bias(hidden),
                   p + "mlp.fc2.weight": r.weight(D, hidden), p + "mlp.fc2.bias": r.bias(D)})
    elif ffn == "swiglufused":  # DINOv2 ViT-g: SwiGLUFFNFused, w12 = [w1; w2] fused, w3
        sd.update({p + "mlp.w12.weight": r.weight(2 * hidden, D), p + "mlp.w12.bias": r.bias(2 * hidden),
                   p + "mlp.w3.weight": r.weight(D, hidden), p + "mlp.w3.bias": r.bias(D)})
    else:  # DINOv3 SwiGLUFFN: separate w1, w2, w3
        sd.update({p + "mlp.w1.weight": r.weight(hidden, D), p + "mlp.w1.bias": r.bias(hidden),
                   p + "mlp.w2.weight": r.weight(hidden, D), p + "mlp.w2.bias": r.bias(hidden),
                   p + "mlp.w3.weight": r.weight(D, hidden), p + "mlp.w3.bias": r.bias(D)})
    return sd


def meta_dinov2(D: int, depth: int, grid: int, registers: int = 0, ffn: str = "mlp", seed: int = SEED) -> dict:
    """A DINOv2 hub checkpoint (``dinov2_vit*14[_reg4]_pretrain.pth``): backbones.md §1.5."""
    r = Draw(seed)
    # Meta: hidden = (int(int(D * 4) * 2 / 3) + 7) // 8 * 8 for swiglufused, int(D * 4) for mlp
    hidden = (int(4 * D * 2 / 3) + 7) // 8 * 8 if ffn == "swiglufused" else 4 * D
    sd = {"cls_token": r.token(1, 1, D), "pos_embed": r.token(1, 1 + grid * grid, D), "mask_token": r.token(1, D),
          "patch_embed.proj.weight": r.weight(D, 3, 14, 14), "patch_embed.proj.bias": r.bias(D)}
    if registers:
        sd["register_tokens"] = r.token(1, registers, D)
    for i in range(depth):
        sd.update(_block(r, i, D, ffn, hidden))
    sd.update({"norm.weight": r.scale(D), "norm.bias": r.bias(D)})
    return sd


def meta_dinov3(D: int, heads: int, ffn: str = "mlp", ratio: float = 4.0, seed: int = SEED) -> dict:
    """A DINOv3 hub checkpoint (``dinov3_*_pretrain_lvd1689m-*.pth``): backbones.md §2.5, 4 storage tokens."""
    r = Draw(seed)
    if ffn == "swiglu":  # Meta: d = int(int(D * ratio) * 2 / 3), aligned up to 8
        d = int(int(D * ratio) * 2 / 3)
        hidden = d + (-d % 8)
    else:
        hidden = int(D * ratio)
    head_dim = D // heads
    # RoPE periods, base 100: periods[i] = 100 ** (2 i / (head_dim / 2)), i < head_dim / 4
    periods = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 2))
    sd = {"cls_token": r.token(1, 1, D), "storage_tokens": r.token(1, 4, D), "mask_token": r.token(1, D),
          "patch_embed.proj.weight": r.weight(D, 3, 16, 16), "patch_embed.proj.bias": r.bias(D),
          "rope_embed.periods": periods.float()}
    for i in range(2):
        sd.update(_block(r, i, D, ffn, hidden, k_bias_masked=True))
    sd.update({"norm.weight": r.scale(D), "norm.bias": r.bias(D)})
    return sd


def ijepa_sincos(D: int, grid: int) -> np.ndarray:
    """I-JEPA's fixed position table [grid*grid, D], from the paper's code description: per axis D/2 channels
    ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = 1 / 10000 ** (i / (D / 4))``; the first half encodes the column
    (x) index, the second the row (y) index; tokens in row-major order."""
    w = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    rows, cols = np.divmod(np.arange(grid * grid), grid)

    def axis(p):
        a = np.outer(p, w)
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    return np.concatenate([axis(cols), axis(rows)], axis=1)


def meta_ijepa_encoder(D: int, grid: int, seed: int) -> dict:
    """I-JEPA's encoder (src/models/vision_transformer.py): no CLS, no LayerScale, a stored sin-cos pos_embed."""
    r = Draw(seed)
    sd = {"patch_embed.proj.weight": r.weight(D, 3, 14, 14), "patch_embed.proj.bias": r.bias(D),
          "pos_embed": torch.from_numpy(ijepa_sincos(D, grid)).float()[None]}
    for i in range(2):
        sd.update(_block(r, i, D, "mlp", 4 * D, layer_scale=False))
    sd.update({"norm.weight": r.scale(D), "norm.bias": r.bias(D)})
    return sd


# ---------------------------------------------------------------------------------------------- helpers
def images(b: int, h: int, w: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def timm_from_meta(name: str, sd: dict, filter_module, **kwargs) -> torch.nn.Module:
    """A tiny timm model loaded strictly from a Meta-layout state dict through timm's own converter."""
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    converted = filter_module.checkpoint_filter_fn(copy.deepcopy(sd), model)  # timm's converters pop keys
    model.load_state_dict(converted, strict=True)
    return model.eval()


def vitkit_tokens(model, x: torch.Tensor, masks=None) -> torch.Tensor:
    """All normed tokens in timm's order: [CLS, registers, patches] (patches only without a CLS token)."""
    f = model.forward_features(x, masks)
    parts = [f["x_norm_clstoken"][:, None]] if f["x_norm_clstoken"] is not None else []
    return torch.cat(parts + [f["x_norm_regtokens"], f["x_norm_patchtokens"]], dim=1)


def load_vitkit(preset: str, path, **tiny) -> vitkit.VisionTransformer:
    return vitkit.create_backbone(preset, pretrained=path, **tiny).eval()


DINOV2 = {  # preset: (timm name, registers, Meta ffn, embed_dim, heads, Meta file name)
    "dinov2_vits14": ("vit_small_patch14_dinov2", 0, "mlp", 32, 4, "dinov2_vits14_pretrain.pth"),
    "dinov2_vits14_reg": ("vit_small_patch14_reg4_dinov2", 4, "mlp", 32, 4, "dinov2_vits14_reg4_pretrain.pth"),
    # ViT-g's fused SwiGLU; D = 48 so that timm's (D * 16/3 // 2) and Meta's (aligned 2/3 * 4D) widths agree
    "dinov2_vitg14": ("vit_giant_patch14_dinov2", 0, "swiglufused", 48, 4, "dinov2_vitg14_pretrain.pth"),
}


def _dinov2_pair(preset: str, tmp_path, dynamic: bool = False, sd: dict | None = None):
    timm_name, reg, ffn, D, heads, filename = DINOV2[preset]
    meta = meta_dinov2(D, 2, grid=4, registers=reg, ffn=ffn) if sd is None else sd
    path = tmp_path / filename
    torch.save(meta, path)
    from timm.models import vision_transformer as tvt

    ref = timm_from_meta(timm_name, meta, tvt, img_size=56, embed_dim=D, depth=2, num_heads=heads,
                         dynamic_img_size=dynamic)
    ours = load_vitkit(preset, path, img_size=56, embed_dim=D, depth=2, num_heads=heads)
    return meta, ref, ours


# ----------------------------------------------------------------------------------------------- DINOv2
@pytest.mark.parametrize("preset", sorted(DINOV2))
def test_meta_dinov2_checkpoint_gives_timms_tokens(preset, tmp_path):
    meta, ref, ours = _dinov2_pair(preset, tmp_path)
    assert ours.config.extra["weights_format"] == ("meta_dinov2_reg" if DINOV2[preset][1] else "meta_dinov2")
    x = images(2, 56, 56)
    with torch.no_grad():
        want, got = ref.forward_features(x), vitkit_tokens(ours, x)
    assert got.shape == want.shape
    assert rel(got, want) < TOL, rel(got, want)
    # the mask token (timm drops it) is read into vitkit unchanged
    assert torch.equal(ours.mask_token, meta["mask_token"])


def test_meta_dinov2_registers_resized_like_timm(tmp_path):
    """Registers get no position, the CLS position is Meta's pos_embed[:, 0]: at a non-native 70 x 84 input the
    patch positions are resampled (Meta's register models: bicubic, size=, antialias, as timm does for all
    DINOv2) and every token still agrees."""
    _, ref, ours = _dinov2_pair("dinov2_vits14_reg", tmp_path, dynamic=True)
    x = images(2, 70, 84)
    with torch.no_grad():
        want, got = ref.forward_features(x), vitkit_tokens(ours, x)
    assert got.shape == (2, 1 + 4 + 5 * 6, 32)
    assert rel(got, want) < TOL, rel(got, want)


def test_meta_dinov2_mask_token_replaces_masked_patches(tmp_path):
    """Meta: ``x = where(masks[..., None], mask_token, patch_embed(x))`` before the CLS token and the position
    embeddings. timm has no masks, so the same replacement is made by a hook on its patch embedding."""
    meta, ref, ours = _dinov2_pair("dinov2_vits14", tmp_path)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5, 6, 15]] = True
    masks[1, 3:11] = True

    def replace(module, args, out):  # timm's patch embedding output [B, N, D]
        return torch.where(masks[..., None], meta["mask_token"][None], out)

    handle = ref.patch_embed.register_forward_hook(replace)
    x = images(2, 56, 56)
    try:
        with torch.no_grad():
            want = ref.forward_features(x)
    finally:
        handle.remove()
    with torch.no_grad():
        got, unmasked = vitkit_tokens(ours, x, masks), vitkit_tokens(ours, x)
    assert rel(got, want) < TOL, rel(got, want)
    assert rel(unmasked, want) > 1e-2  # the masks did change the output


SHARED_MISTAKES = {  # a Meta name read as another one (identically in vitkit's export and import: round trips pass)
    "ls1 <-> ls2": lambda k: k.replace("ls1.", "lsX.").replace("ls2.", "ls1.").replace("lsX.", "ls2."),
    "norm1 <-> norm2": lambda k: k.replace("norm1.", "normX.").replace("norm2.", "norm1.").replace("normX.", "norm2."),
}


@pytest.mark.parametrize("mistake", ["ls1 <-> ls2", "norm1 <-> norm2", "q <-> k rows", "registers first"])
def test_a_shared_naming_mistake_is_caught(mistake, tmp_path):
    """What the round-trip tests could not see: if vitkit's model meant ``ls1`` where Meta means ``ls2`` (or q/k
    in the other order, or registers before the CLS token), vitkit's export and import would agree with each other.
    The same mistake applied here on vitkit's side only makes the comparison with timm fail."""
    preset = "dinov2_vits14_reg" if mistake == "registers first" else "dinov2_vits14"
    _, reg, ffn, D, heads, _ = DINOV2[preset]
    meta = meta_dinov2(D, 2, grid=4, registers=reg, ffn=ffn)
    if mistake in SHARED_MISTAKES:
        wrong = {SHARED_MISTAKES[mistake](k): v for k, v in meta.items()}
    elif mistake == "q <-> k rows":
        wrong = dict(meta)
        for i in range(2):
            for kind in ("weight", "bias"):
                q, k, v = meta[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)
                wrong[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([k, q, v])
    else:
        wrong = meta
    _, ref, _ = _dinov2_pair(preset, tmp_path, sd=meta)
    path = tmp_path / "wrong.pth"
    torch.save(wrong, path)
    ours = load_vitkit(preset, path, img_size=56, embed_dim=D, depth=2, num_heads=heads)
    x = images(2, 56, 56)
    with torch.no_grad():
        want = ref.forward_features(x)
        got = vitkit_tokens(ours, x)
    if mistake == "registers first":  # vitkit's tokens read in the order [registers, CLS, patches]
        got = torch.cat([got[:, 1:5], got[:, :1], got[:, 5:]], dim=1)
    err = rel(got, want)
    assert err > 1e-2, err  # observed 0.05 (ls, norms), 0.08 (q/k), 1.4 (token order): 5000 x the tolerance


# ----------------------------------------------------------------------------------------------- DINOv3
DINOV3 = {  # preset: (timm name, ffn, ratio, Meta file name)
    "dinov3_vits16": ("vit_small_patch16_dinov3_qkvb", "mlp", 4.0, "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
    "dinov3_vits16plus": ("vit_small_plus_patch16_dinov3_qkvb", "swiglu", 6.0,
                          "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"),
}


@pytest.mark.parametrize("preset", sorted(DINOV3))
def test_meta_dinov3_checkpoint_gives_timms_tokens(preset, tmp_path):
    """Storage tokens after CLS, RoPE from the stored periods, the key bias masked out (the checkpoint's key bias is
    random here: timm drops it, Meta multiplies it by bias_mask = 0), separate w1/w2/w3 SwiGLU for S+."""
    timm_name, ffn, ratio, filename = DINOV3[preset]
    from timm.models import eva

    meta = meta_dinov3(64, 4, ffn=ffn, ratio=ratio)
    assert meta["blocks.0.attn.qkv.bias"][64:128].abs().min() > 0  # a key bias that must be ignored
    torch.save(meta, tmp_path / filename)
    ref = timm_from_meta(timm_name, meta, eva, img_size=64, embed_dim=64, depth=2, num_heads=4)
    ours = load_vitkit(preset, tmp_path / filename, img_size=64, embed_dim=64, depth=2, num_heads=4)
    assert ours.config.extra["weights_format"] == "meta_dinov3"
    for h, w in ((64, 64), (48, 80)):  # native and another grid (RoPE needs no resampling)
        x = images(2, h, w)
        with torch.no_grad():
            want, got = ref.forward_features(x), vitkit_tokens(ours, x)
        assert got.shape == want.shape == (2, 1 + 4 + (h // 16) * (w // 16), 64)
        assert rel(got, want) < TOL, (h, w)


# ----------------------------------------------------------------------------------------------- I-JEPA
def test_meta_ijepa_training_checkpoint_gives_timms_tokens(tmp_path):
    """An I-JEPA training checkpoint (``IN1K-vit.h.14-300e.pth.tar``): ``encoder``, ``predictor`` and
    ``target_encoder`` state dicts with DDP's ``module.`` prefix. timm and transformers take ``encoder``; so must
    vitkit (the target encoder is drawn differently here, so taking it would fail)."""
    from timm.models import vision_transformer as tvt

    D = 32
    enc, tgt = meta_ijepa_encoder(D, 4, seed=1), meta_ijepa_encoder(D, 4, seed=2)
    ckpt = {"encoder": {"module." + k: v for k, v in enc.items()},
            "predictor": {"module.predictor_embed.weight": torch.zeros(16, D),
                          "module.mask_token": torch.zeros(1, 1, 16)},
            "target_encoder": {"module." + k: v for k, v in tgt.items()}, "epoch": 300, "batch_size": 2048}
    path = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    torch.save(ckpt, path)
    ref = timm_from_meta("vit_huge_patch14_gap_224", ckpt, tvt, img_size=56, embed_dim=D, depth=2, num_heads=4)
    ours = load_vitkit("ijepa_vith14", path, img_size=56, embed_dim=D, depth=2, num_heads=4)
    assert ours.config.extra["weights_format"] == "meta_ijepa"
    assert torch.equal(ours.pos_embed, enc["pos_embed"])  # the stored table is the one used
    x = images(2, 56, 56)
    with torch.no_grad():
        want, got = ref.forward_features(x), vitkit_tokens(ours, x)
    assert got.shape == (2, 16, D)
    assert rel(got, want) < TOL, rel(got, want)


def test_ijepa_sincos_table_is_metas():
    """vitkit's own I-JEPA position table (used when no checkpoint is loaded) is the one Meta's code stores: the
    formula above, at a non-square grid too (rows then columns of the patch grid)."""
    D = 64
    model = vitkit.create_backbone("ijepa_vith14", img_size=56, embed_dim=D, depth=1, num_heads=4)
    want = torch.from_numpy(ijepa_sincos(D, 4)).float()
    assert torch.allclose(model.pos_embed[0], want, atol=1e-6)
    from vitkit.layers import sincos_2d_pos_embed

    table = sincos_2d_pos_embed(D, (3, 5))[0]
    w = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    row, col = 2, 3  # token 2 * 5 + 3
    a, b = np.outer([col], w), np.outer([row], w)
    expect = np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=1)[0]
    assert np.allclose(table[2 * 5 + 3].numpy(), expect, atol=1e-6)
    assert math.isclose(float(table[0, D // 4]), 1.0)  # cos(0) of the column half
