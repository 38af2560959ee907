"""The ``vitkit`` command line: ``info`` and ``convert``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitkit
from conftest import TINY, make_tiny, randomize
from vitkit import VisionTransformer, ViTConfig, get_preset
from vitkit.cli import main
from vitkit.weights import to_meta_state_dict

D = TINY["embed_dim"]
KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _assert_identical(a, b):
    for k in KEYS:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


def _expected_params(name: str) -> str:
    with torch.device("meta"):
        n = VisionTransformer(ViTConfig(**get_preset(name).config)).num_params()
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


# ---------------------------------------------------------------------------------------------------- info
def test_info_lists_every_model_with_parameter_count(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["name", "family"] and "params" in lines[0]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(vitkit.list_models())
    for name, line in rows.items():
        assert f" {_expected_params(name)} " in line, (name, line)
        assert f" {get_preset(name).config['family']} " in line
    assert "22.1 M" in rows["dinov2_vits14"] and "6.72 B" in rows["dinov3_vit7b16"]
    assert "1.14 B" in rows["dinov2_vitg14"] and "reg=4" in rows["dinov2_vitg14_reg"]
    assert "swiglu(8192)" in rows["dinov3_vit7b16"] and "no-cls" in rows["ijepa_vith14"]


def test_info_selected_names_and_verbose(capsys):
    assert main(["info", "-v", "dinov2_vits14", "dinov3_vitb16"]) == 0
    out = capsys.readouterr().out
    assert "dinov2_vits14: {" in out and "'interpolate_offset': 0.1" in out
    table = [line for line in out.splitlines() if not line.endswith("}")]
    assert [line.split()[0] for line in table] == ["name", "dinov2_vits14", "dinov3_vitb16"]


def test_info_unknown_name_exits_2_with_suggestion(capsys):
    assert main(["info", "dinov2_vits14_rge"]) == 2
    err = capsys.readouterr().err
    assert "vitkit info: error:" in err and "dinov2_vits14_reg" in err


def test_console_script():
    exe = shutil.which("vitkit") or str(Path(sys.executable).parent / "vitkit")
    if not Path(exe).exists():
        pytest.skip("vitkit console script not installed")
    r = subprocess.run([exe, "info", "dinov2_vits14_reg"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dinov2_vits14_reg" in r.stdout and "22.1 M" in r.stdout


# ------------------------------------------------------------------------------------------------- convert
@pytest.fixture(scope="module")
def hf_dinov2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=4 * D, image_size=56, patch_size=14)
    hf = transformers.Dinov2Model(cfg).eval()
    randomize_hf = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=randomize_hf) * 0.1)
    d = tmp_path_factory.mktemp("hf") / "dinov2"
    hf.save_pretrained(d)
    return d, hf


def test_convert_hf_dinov2_dir(hf_dinov2_dir, tmp_path, capsys):
    src, hf = hf_dinov2_dir
    dst = tmp_path / "out"
    assert main(["convert", str(src), str(dst)]) == 0
    assert "converted" in capsys.readouterr().out
    assert (dst / "config.json").exists() and (dst / "model.safetensors").exists()
    converted = vitkit.from_pretrained(dst)
    direct = vitkit.from_pretrained(src)
    assert converted.config.family == "dinov2" and converted.config.embed_dim == D
    x = torch.randn(2, 3, 56, 70)
    _assert_identical(_outputs(direct, x), _outputs(converted, x))
    # and it is the HF model (last_hidden_state = final norm of [CLS, patches]); 1e-5 as in test_parity
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
    out = _outputs(converted, x)
    torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, 1:], atol=1e-5, rtol=0)


def test_convert_hf_dir_to_one_channel(hf_dinov2_dir, tmp_path):
    src, _ = hf_dinov2_dir
    assert main(["convert", str(src), str(tmp_path / "grey"), "--in-chans", "1"]) == 0
    grey = vitkit.from_pretrained(tmp_path / "grey")
    assert grey.config.in_chans == 1
    rgb = vitkit.from_pretrained(src)
    x1 = torch.randn(2, 1, 56, 56)
    a, b = _outputs(rgb, x1.expand(-1, 3, -1, -1)), _outputs(grey, x1)
    for k in KEYS:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)


def test_convert_meta_pth_with_name_and_img_size(tmp_path, capsys):
    """A full-size dinov2_vits14 checkpoint in Meta's layout (the preset fixes the dimensions), converted
    at 56 px: equals the original model run at 56 px (position embeddings resized the Meta way)."""
    torch.manual_seed(0)
    model = vitkit.create_backbone("dinov2_vits14").eval()
    with torch.no_grad():  # weights are already random; make LayerScale, biases and tokens matter (cheaply)
        for k, p in model.named_parameters():
            if p.ndim <= 1 or k.endswith("_token") or k == "pos_embed":
                p.add_(torch.randn_like(p) * 0.1)
    src = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(to_meta_state_dict(model), src)
    dst = tmp_path / "out"
    assert main(["convert", str(src), str(dst), "--name", "dinov2_vits14", "--img-size", "56"]) == 0
    assert "img_size (56, 56)" in capsys.readouterr().out
    converted = vitkit.from_pretrained(dst)
    assert converted.config.img_size == (56, 56) and converted.config.interpolate_offset == 0.1
    x = torch.randn(1, 3, 56, 56)
    _assert_identical(_outputs(model, x), _outputs(converted, x))


def test_convert_meta_pth_inferred_architecture(tmp_path):
    """Without --name the architecture is inferred from the keys (standard width 384 -> 6 heads)."""
    torch.manual_seed(0)
    model = randomize(vitkit.create_backbone("dinov2_vits14_reg", depth=2, img_size=56)).eval()
    src = tmp_path / "ckpt.pth"
    torch.save(to_meta_state_dict(model), src)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 0
    converted = vitkit.from_pretrained(tmp_path / "out")
    c = converted.config
    assert (c.family, c.embed_dim, c.depth, c.num_heads, c.num_register_tokens, c.img_size) == \
        ("dinov2", 384, 2, 6, 4, (56, 56))
    x = torch.randn(1, 3, 56, 84)
    _assert_identical(_outputs(model, x), _outputs(converted, x))


def test_convert_mismatching_name_fails_cleanly(tmp_path, capsys):
    src = tmp_path / "tiny.pth"
    torch.save(to_meta_state_dict(make_tiny("dinov2_vits14")), src)
    assert main(["convert", str(src), str(tmp_path / "out"), "--name", "dinov2_vits14"]) == 2
    err = capsys.readouterr().err
    assert "vitkit convert: error:" in err and "shape mismatches" in err
    assert not (tmp_path / "out").exists()


def test_convert_missing_source(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "out")]) == 2
    assert "nope.pth" in capsys.readouterr().err
