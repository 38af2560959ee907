"""Number-for-number parity of vitkit with the reference implementations (HF transformers, timm).

Every reference is a tiny randomly initialised model (see tests/references.py) saved to disk and loaded by
vitkit through its public API only (``vitkit.from_pretrained`` / ``vitkit.create_backbone``). fp32, eval,
CPU; every compared tensor must match to ``TOL`` (max-abs), including every intermediate block output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import references as R  # noqa: E402
import vitkit  # noqa: E402

TOL = 1e-5

# (case id, height, width) per patch size: native, another square size, non-square size(s)
SIZES = {
    14: [("native", 56, 56), ("square", 70, 70), ("nonsquare", 56, 84), ("nonsquare2", 42, 70)],
    16: [("native", 64, 64), ("square", 80, 80), ("nonsquare", 64, 96)],
    8: [("native", 32, 32), ("square", 48, 48), ("nonsquare", 32, 48)],
}


def _cases():
    out = []
    for name, spec in R.ALL_SPECS.items():
        for cid, h, w in SIZES[spec.patch_size]:
            out.append(pytest.param(name, 3, h, w, id=f"{name}-{cid}-{h}x{w}"))
        if spec.supports_in_chans_1:
            _, h, w = SIZES[spec.patch_size][2]
            out.append(pytest.param(name, 1, h, w, id=f"{name}-1ch-{h}x{w}"))
    return out


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def _deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev)


class _Cache:
    def __init__(self, root):
        self.root = root
        self.refs = {}
        self.vk = {}

    def ref(self, name, in_chans):
        key = (name, in_chans)
        if key not in self.refs:
            spec = R.ALL_SPECS[name]
            pytest.importorskip("transformers" if spec.source == "hf" else "timm")
            out_dir = os.path.join(self.root, f"{name}_c{in_chans}")
            self.refs[key] = R.build_reference(name, in_chans=in_chans, seed=0, out_dir=out_dir)
        return self.refs[key]

    def vitkit(self, name, in_chans, fmt="safetensors"):
        key = (name, in_chans, fmt)
        if key not in self.vk:
            spec = R.ALL_SPECS[name]
            _, path = self.ref(name, in_chans)
            self.vk[key] = load_vitkit(spec, path, in_chans, fmt)
        return self.vk[key]


def load_vitkit(spec, path, in_chans, fmt="safetensors"):
    if spec.source == "hf":
        model = vitkit.from_pretrained(path)
    else:
        model = vitkit.create_backbone(
            spec.vitkit_preset,
            pretrained=path[fmt],
            img_size=(spec.native_size, spec.native_size),
            in_chans=in_chans,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
        )
    return model.eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return _Cache(str(tmp_path_factory.mktemp("refs")))


# ------------------------------------------------------------------------------------------------ helpers


def _x(in_chans, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, in_chans, h, w, generator=g)


def _diff(name, got, ref, diffs, errors):
    """Record max-abs diff of got vs ref under ``name`` (shape mismatches and missing outputs are errors)."""
    if got is None:
        errors.append(f"{name}: vitkit returned None, reference shape {tuple(ref.shape)}")
        return
    if tuple(got.shape) != tuple(ref.shape):
        errors.append(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
        return
    d = (got.detach().float() - ref.detach().float()).abs().max().item() if ref.numel() else 0.0
    if not math.isfinite(d):
        errors.append(f"{name}: non-finite difference")
    diffs[name] = d


def _report(diffs, errors, tol=TOL):
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    lines = [f"{k}: max|diff|={v:.3e}" + ("  <-- FAIL" if k in bad else "") for k, v in diffs.items()]
    return bad, "\n".join(errors + lines)


def compare(model, ref_model, spec, x):
    """All comparisons of one vitkit model vs its reference on input x. Returns (diffs, errors)."""
    ref = R.reference_outputs(ref_model, x)
    diffs, errors = {}, []
    npfx = ref["num_prefix"]
    kinds = ref["prefix_kinds"]
    has_cls = "cls" in kinds
    n_reg = kinds.count("reg")
    with torch.no_grad():
        out = model.forward_features(x)
        # Models without CLS (I-JEPA) are asked for patch tokens only (vitkit raises for return_class_token=True).
        inter = model.get_intermediate_layers(x, n=spec.depth, reshape=False, return_class_token=has_cls, norm=False)
    if not has_cls:
        inter = [(t, None) if torch.is_tensor(t) else t for t in inter]

    if int(model.num_prefix_tokens) != npfx:
        errors.append(f"num_prefix_tokens {model.num_prefix_tokens} != reference {npfx} ({kinds})")

    # final normed tokens
    if spec.is_clip:
        _diff("x_norm_clstoken~pooler_output", out.get("x_norm_clstoken"), ref["pooler"], diffs, errors)
    else:
        fin = ref["final_norm"]
        if has_cls:
            _diff("x_norm_clstoken", out.get("x_norm_clstoken"), fin[:, kinds.index("cls")], diffs, errors)
        elif out.get("x_norm_clstoken") is not None:
            errors.append("x_norm_clstoken should be None/absent for a model without CLS token")
        if n_reg:
            r0 = kinds.index("reg")
            _diff("x_norm_regtokens", out.get("x_norm_regtokens"), fin[:, r0:r0 + n_reg], diffs, errors)
        elif out.get("x_norm_regtokens") is not None and out["x_norm_regtokens"].numel():
            errors.append(f"x_norm_regtokens should be empty, got {tuple(out['x_norm_regtokens'].shape)}")
        if "dist" in kinds:
            dk = [k for k in out if "dist" in k and torch.is_tensor(out[k])]
            for k in dk:  # optional output, compared when present
                _diff(k, out[k], fin[:, kinds.index("dist")], diffs, errors)
        _diff("x_norm_patchtokens", out.get("x_norm_patchtokens"), fin[:, npfx:], diffs, errors)
    _diff("x_prenorm", out.get("x_prenorm"), ref["prenorm"], diffs, errors)

    # every block, Meta get_intermediate_layers semantics (un-normed, patch tokens + CLS)
    if len(inter) != spec.depth:
        errors.append(f"get_intermediate_layers returned {len(inter)} layers, expected {spec.depth}")
    for i, (item, lay) in enumerate(zip(inter, ref["layers"])):
        patch, cls = item[0], item[1] if len(item) > 1 else None
        _diff(f"layer{i}.patch", patch, lay[:, npfx:], diffs, errors)
        if has_cls:
            _diff(f"layer{i}.cls", cls, lay[:, kinds.index("cls")], diffs, errors)
    return diffs, errors


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name,in_chans,h,w", _cases())
def test_parity(cache, name, in_chans, h, w):
    spec = R.ALL_SPECS[name]
    ref_model, _ = cache.ref(name, in_chans)
    model = cache.vitkit(name, in_chans)
    diffs, errors = compare(model, ref_model, spec, _x(in_chans, h, w))
    bad, msg = _report(diffs, errors)
    assert not errors and not bad, f"{name} {in_chans}ch {h}x{w} (tol {TOL:g}):\n{msg}"


@pytest.mark.parametrize("name", ["hf_clip_proj"])
def test_clip_projection_loads(cache, name):
    """CLIPVisionModelWithProjection keys carry a `vision_model.` prefix and a `visual_projection`."""
    ref_model, _ = cache.ref(name, 3)
    model = cache.vitkit(name, 3)
    x = _x(3, 32, 32)
    ref = R.reference_outputs(ref_model, x)
    with torch.no_grad():
        out = model.forward_features(x)
    diffs, errors = {}, []
    _diff("x_norm_clstoken~pooler", out.get("x_norm_clstoken"), ref["pooler"], diffs, errors)
    bad, msg = _report(diffs, errors)
    assert not errors and not bad, msg


@pytest.mark.parametrize("name", list(R.TIMM_SPECS))
def test_timm_pth_equals_safetensors(cache, name):
    """The same timm state dict saved as .pth and .safetensors gives bit-identical vitkit outputs."""
    spec = R.TIMM_SPECS[name]
    a = cache.vitkit(name, 3, "safetensors")
    b = cache.vitkit(name, 3, "pth")
    x = _x(3, *SIZES[spec.patch_size][2][1:])
    with torch.no_grad():
        oa, ob = a.forward_features(x), b.forward_features(x)
    d = (oa["x_prenorm"] - ob["x_prenorm"]).abs().max().item()
    assert d == 0.0, f"{name}: .pth vs .safetensors max|diff| = {d:.3e}"


META_ROUNDTRIP = {
    # reference -> (vitkit preset, Meta keys that must be present, keys that must be absent)
    "hf_dinov2": ("dinov2_vits14", ["cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight",
                                    "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.ls1.gamma",
                                    "blocks.0.ls2.gamma", "blocks.0.mlp.fc1.weight", "norm.weight"],
                  ["register_tokens"]),
    "hf_dinov2_swiglu": ("dinov2_vits14", ["blocks.0.mlp.w12.weight", "blocks.0.mlp.w3.weight", "pos_embed"], []),
    "hf_dinov2_reg": ("dinov2_vits14_reg", ["register_tokens", "pos_embed", "cls_token", "blocks.1.ls1.gamma"], []),
    "hf_dinov3": ("dinov3_vits16", ["cls_token", "storage_tokens", "mask_token", "blocks.0.attn.qkv.weight",
                                    "blocks.0.ls1.gamma", "blocks.0.mlp.fc1.weight", "norm.weight"],
                  ["pos_embed"]),
    "hf_dinov3_gated": ("dinov3_vits16plus", ["storage_tokens", "blocks.0.mlp.w1.weight", "blocks.0.mlp.w2.weight",
                                              "blocks.0.mlp.w3.weight"], ["pos_embed"]),
    "timm_dinov2": ("dinov2_vits14", ["cls_token", "pos_embed", "blocks.0.attn.qkv.weight"], []),
    "timm_dinov2_reg": ("dinov2_vits14_reg", ["register_tokens", "pos_embed"], []),
    "timm_dinov3": ("dinov3_vits16", ["storage_tokens", "blocks.0.attn.qkv.weight"], ["pos_embed"]),
    "timm_dinov3_qkvb": ("dinov3_vits16", ["storage_tokens", "blocks.0.attn.qkv.weight"], []),
    "timm_dinov3_plus": ("dinov3_vits16plus", ["storage_tokens", "blocks.0.mlp.w1.weight"], []),
}


@pytest.mark.parametrize("name", list(META_ROUNDTRIP))
def test_meta_roundtrip(cache, tmp_path, name):
    """vitkit -> Meta-layout state dict -> .pth -> create_backbone(pretrained=...) gives identical outputs."""
    spec = R.ALL_SPECS[name]
    preset, must, must_not = META_ROUNDTRIP[name]
    model = cache.vitkit(name, 3)
    sd = vitkit.weights.to_meta_state_dict(model)
    missing = [k for k in must if k not in sd]
    extra = [k for k in must_not if k in sd]
    assert not missing and not extra, f"Meta keys missing {missing}, unexpected {extra}; got {sorted(sd)[:40]}"
    path = str(tmp_path / "meta.pth")
    torch.save({k: v.detach().clone() for k, v in sd.items()}, path)
    cfg = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in ("extra",)}
    cfg.pop("img_size")
    cfg.pop("in_chans")
    cfg.pop("patch_size")
    model2 = vitkit.create_backbone(preset, pretrained=path, img_size=model.config.img_size, in_chans=3,
                                    patch_size=model.config.patch_size, **cfg).eval()
    diffs = {}
    for cid, h, w in SIZES[spec.patch_size]:
        x = _x(3, h, w, seed=1)
        with torch.no_grad():
            a, b = model.forward_features(x), model2.forward_features(x)
        for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
            diffs[f"{cid}.{k}"] = (a[k] - b[k]).abs().max().item()
    bad = {k: v for k, v in diffs.items() if v != 0.0}
    assert not bad, f"{name} Meta round trip not identical: " + ", ".join(f"{k}={v:.3e}" for k, v in diffs.items())


@pytest.mark.parametrize("name", ["hf_dinov2", "hf_dinov2_reg", "hf_dinov3"])
def test_mask_token(cache, name):
    """forward_features(x, masks) replaces masked patch embeddings by mask_token (HF bool_masked_pos)."""
    import inspect

    model = cache.vitkit(name, 3)
    if "masks" not in inspect.signature(model.forward_features).parameters:
        pytest.skip("vitkit forward_features has no `masks` argument")
    spec = R.ALL_SPECS[name]
    ref_model, _ = cache.ref(name, 3)
    h, w = SIZES[spec.patch_size][2][1:]
    x = _x(3, h, w)
    n = (h // spec.patch_size) * (w // spec.patch_size)
    masks = torch.zeros(2, n, dtype=torch.bool)
    masks[0, ::3] = True
    masks[1, 1::2] = True
    with torch.no_grad():
        ref = ref_model(pixel_values=x, bool_masked_pos=masks).last_hidden_state
        out = model.forward_features(x, masks=masks)
    d = (out["x_norm_patchtokens"] - ref[:, spec.num_prefix:]).abs().max().item()
    dc = (out["x_norm_clstoken"] - ref[:, 0]).abs().max().item()
    assert max(d, dc) <= TOL, f"{name} masked: patch diff {d:.3e}, cls diff {dc:.3e}"


def test_no_timm_import(cache, tmp_path):
    """Importing vitkit and building one model of every family never imports timm."""
    hf_dirs = {}
    for name in ("hf_dinov2", "hf_dinov2_swiglu", "hf_dinov2_reg", "hf_dinov3", "hf_dinov3_gated", "hf_ijepa",
                 "hf_clip", "hf_clip_proj", "hf_vit", "hf_deit"):
        try:
            hf_dirs[name] = cache.ref(name, 3)[1]
        except pytest.skip.Exception:
            pass
    timm_files = {}
    for name, spec in R.TIMM_SPECS.items():
        try:
            timm_files[name] = (spec.vitkit_preset, cache.ref(name, 3)[1]["safetensors"], spec.native_size,
                                spec.embed_dim)
        except pytest.skip.Exception:
            pass
    script = textwrap.dedent(
        """
        import json, sys
        import vitkit
        hf_dirs, timm_files = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        for d in hf_dirs.values():
            vitkit.from_pretrained(d)
        for preset, path, size, dim in timm_files.values():
            vitkit.create_backbone(preset, pretrained=path, img_size=size, embed_dim=dim, depth=2, num_heads=4)
        for preset in ("dinov2_vits14", "dinov2_vits14_reg", "dinov3_vits16", "dinov3_vits16plus"):
            vitkit.create_backbone(preset, img_size=64 if "dinov3" in preset else 56, embed_dim=64, depth=1,
                                   num_heads=4)
        print(json.dumps({m: m in sys.modules for m in ("timm", "transformers")}))
        """
    )
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(hf_dirs), json.dumps(timm_files)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-3000:]}"
    mods = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not mods["timm"], f"vitkit imported timm (modules: {mods})"
