"""Loud checkpoint loading: every way a checkpoint file can be unreadable raises a vitkit CheckpointError naming
the file and saying what to do, through every public loader; EoMT input normalisation in a checkpoint is adopted,
checked or refused, never dropped silently.

Every checkpoint is written here from a tiny randomised model (width 192 or 32, depth 2-3), then damaged byte by
byte; nothing is downloaded. Helpers are local (no import from conftest or the tests package).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit
from vitkit.errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError, WeightsNotFoundError
from vitkit.weights import inspect, to_meta_state_dict
from vitkit.weights.io import read_safetensors_keys

TINY = dict(embed_dim=192, depth=2, num_heads=3, img_size=56)  # 192: a width whose head count can be inferred
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
# phrases of the "what to do" part of a message; each message has at least one
TODO = ("again", "rename it", "Check the path", "vitkit reads", "Pass the weights file")


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every parameter, so LayerScale (1e-5 at init) does not mute the blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _backbone(seed: int = 0) -> vitkit.VisionTransformer:
    return _randomise(vitkit.create_backbone("dinov2_vits14", **TINY), seed).eval()


def _assert_loud(exc: BaseException, path: Path, cls: type = CheckpointError) -> str:
    """The exact vitkit type, the file's name, something to do."""
    msg = str(exc)
    assert type(exc) is cls, f"{type(exc).__name__}: {msg}"
    assert str(path) in msg, msg
    assert any(t in msg for t in TODO), msg
    return msg


# ------------------------------------------------------------------------------------------- damage
def _corruptions(good: bytes, other_format: bytes, npz: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, a phrase the message must contain)."""
    return {
        "empty": (b"", "empty (0 bytes)"),
        "truncated_in_header": (good[:5], "truncated or corrupt"),
        "truncated_half": (good[:len(good) // 2], "truncated or corrupt"),
        "truncated_last_byte": (good[:-1], "truncated or corrupt"),
        "text": (b"these are not the weights you are looking for\n" * 4, "a text file"),
        "git_lfs_pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 99\n", "git lfs pull"),
        "html_error_page": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n", "HTML page"),
        "npz": (npz, "NumPy .npz"),
        "other_format": (other_format, "rename it"),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good checkpoints of one tiny DINOv2 backbone: vitkit safetensors (with its config in the metadata), Meta
    .pth, a Lightning-style .ckpt and an exported model directory; plus an .npz for wrong-container cases."""
    d = tmp_path_factory.mktemp("good")
    model = _backbone()
    vitkit.save_pretrained(model, d / "export")
    st = d / "export" / "model.safetensors"
    pth = d / "meta.pth"
    torch.save(to_meta_state_dict(model), pth)
    ckpt = d / "lightning.ckpt"
    torch.save({"state_dict": to_meta_state_dict(model), "epoch": 1}, ckpt)
    np.savez(d / "arrays.npz", a=np.zeros(4, dtype=np.float32))
    return dict(model=model, st=st, pth=pth, ckpt=ckpt, npz=(d / "arrays.npz").read_bytes(), dir=d / "export")


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# every public way a backbone checkpoint file is read
LOADERS = {
    "load_weights": lambda p: vitkit.load_weights(vitkit.create_backbone("dinov2_vits14", **TINY), p),
    "from_pretrained": lambda p: vitkit.from_pretrained(p),
    "create_backbone_named": lambda p: vitkit.create_backbone("dinov2_vits14", pretrained=p, **TINY),
    "create_backbone_inferred": lambda p: vitkit.create_backbone(pretrained=p),
    "inspect": lambda p: inspect(p),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".ckpt"])
def test_damaged_file_raises_checkpoint_error_naming_it(files, tmp_path, suffix, loader):
    good = files["st" if suffix == ".safetensors" else "pth" if suffix == ".pth" else "ckpt"]
    other = files["pth" if suffix == ".safetensors" else "st"]
    LOADERS[loader](good)  # the intact file loads through this loader
    for name, (data, phrase) in _corruptions(good.read_bytes(), other.read_bytes(), files["npz"]).items():
        path = _write(tmp_path / name / f"weights{suffix}", data)
        with pytest.raises(CheckpointError) as ei:
            LOADERS[loader](path)
        msg = _assert_loud(ei.value, path)
        assert phrase in msg, f"{name}: {msg}"
        assert "SafetensorError: Error while deserializing" not in msg.split(";")[0]  # vitkit's words come first


def test_safetensors_truncation_is_measured(files, tmp_path):
    good = files["st"].read_bytes()
    path = _write(tmp_path / "cut.safetensors", good[:-100])
    with pytest.raises(CheckpointError, match=rf"{len(good) - 100} bytes, the header describes {len(good)}"):
        vitkit.load_weights(vitkit.create_backbone("dinov2_vits14", **TINY), path)
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors") as ei:
        read_safetensors_keys(path)  # the header-only reader behind zoo.build_model's key check
    _assert_loud(ei.value, path)


def test_corrupt_safetensors_header_and_zip_directory(files, tmp_path):
    st = bytearray(files["st"].read_bytes())
    st[8:40] = b"\xff" * 32  # the JSON header
    path = _write(tmp_path / "hdr.safetensors", bytes(st))
    with pytest.raises(CheckpointError, match="JSON header is corrupt") as ei:
        vitkit.from_pretrained(path)
    _assert_loud(ei.value, path)
    pth = bytearray(files["pth"].read_bytes())
    pth[-22:] = b"\0" * 22  # the zip's end-of-central-directory record
    path = _write(tmp_path / "eocd.pth", bytes(pth))
    with pytest.raises(CheckpointError, match="truncated or corrupt PyTorch checkpoint") as ei:
        vitkit.from_pretrained(path)
    _assert_loud(ei.value, path)


def test_missing_paths_raise_checkpoint_not_found(tmp_path):
    for loader in ("load_weights", "create_backbone_named", "create_backbone_inferred", "from_pretrained"):
        path = tmp_path / "nowhere" / "weights.pth"
        with pytest.raises(CheckpointNotFoundError) as ei:
            LOADERS[loader](path)
        assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, CheckpointError)
        assert str(path) in str(ei.value), loader
    (tmp_path / "empty_dir").mkdir()
    for loader in ("load_weights", "create_backbone_named"):
        with pytest.raises(CheckpointNotFoundError, match="has no model.safetensors or pytorch_model.bin") as ei:
            LOADERS[loader](tmp_path / "empty_dir")
        _assert_loud(ei.value, tmp_path / "empty_dir", CheckpointNotFoundError)
    with pytest.raises(CheckpointNotFoundError, match="has no config.json"):
        vitkit.from_pretrained(tmp_path / "empty_dir")


def test_model_directory_with_damaged_weights_or_config(files, tmp_path):
    import shutil

    d = Path(shutil.copytree(files["dir"], tmp_path / "model"))
    vitkit.from_pretrained(d)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    for load in (vitkit.from_pretrained, lambda p: vitkit.create_backbone("dinov2_vits14", pretrained=p, **TINY),
                 lambda p: vitkit.create_backbone(pretrained=p)):
        with pytest.raises(CheckpointError, match="truncated or corrupt safetensors") as ei:
            load(d)
        _assert_loud(ei.value, st)
    d2 = Path(shutil.copytree(files["dir"], tmp_path / "model2"))
    cfg = d2 / "config.json"
    cfg.write_text(cfg.read_text()[:40])
    with pytest.raises(CheckpointError, match="is not valid JSON") as ei:
        vitkit.from_pretrained(d2)
    _assert_loud(ei.value, cfg)


def test_sharded_index_errors(files, tmp_path):
    import json

    keys = read_safetensors_keys(files["st"])
    index = _write(tmp_path / "model.safetensors.index.json",
                   json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}).encode())
    with pytest.raises(CheckpointNotFoundError, match="model-00001-of-00001.safetensors listed in") as ei:
        vitkit.load_weights(vitkit.create_backbone("dinov2_vits14", **TINY), tmp_path)
    assert str(index) in str(ei.value)
    _write(tmp_path / "model-00001-of-00001.safetensors", files["st"].read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors") as ei:
        vitkit.load_weights(vitkit.create_backbone("dinov2_vits14", **TINY), index)
    assert "model-00001-of-00001.safetensors" in str(ei.value)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid sharded-checkpoint index") as ei:
        vitkit.load_weights(vitkit.create_backbone("dinov2_vits14", **TINY), index)
    _assert_loud(ei.value, index)


def test_damaged_cached_download_says_delete_it(files, tmp_path, monkeypatch):
    """A truncated file in vitkit's cache (an interrupted download): the message says to delete it."""
    monkeypatch.setenv("VITKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITKIT_OFFLINE", "1")
    cached = _write(tmp_path / "home" / "dinov2_vits14_pretrain.pth", files["pth"].read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="download cache .*delete it") as ei:
        vitkit.create_backbone("dinov2_vits14", pretrained=True, **TINY)
    _assert_loud(ei.value, cached)
    cached.unlink()
    with pytest.raises(WeightsNotFoundError) as ei:  # and a cache miss is a CheckpointError too
        vitkit.create_backbone("dinov2_vits14", pretrained=True, **TINY)
    assert isinstance(ei.value, CheckpointNotFoundError) and "dinov2_vits14_pretrain.pth" in str(ei.value)


def test_unknown_suffix_is_read_by_content_or_refused(files, tmp_path):
    model = vitkit.create_backbone("dinov2_vits14", **TINY)
    vitkit.load_weights(model, _write(tmp_path / "weights.model", files["pth"].read_bytes()))
    vitkit.load_weights(model, _write(tmp_path / "weights.st", files["st"].read_bytes()))
    path = _write(tmp_path / "weights.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="is an HDF5 file, not a checkpoint") as ei:
        vitkit.load_weights(model, path)
    _assert_loud(ei.value, path)


# --------------------------------------------------------------------------------------------- EoMT
def _eomt(in_chans: int = 3, seed: int | None = None, **kw) -> vitkit.EoMT:
    torch.manual_seed(0)
    m = vitkit.EoMT(backbone="dinov2_vits14_reg", embed_dim=32, depth=3, num_heads=4, img_size=(64, 64),
                    in_chans=in_chans, patch_size=16, num_classes=2, num_q=4, num_blocks=2, **kw)
    return (_randomise(m, seed) if seed is not None else m).eval()


def _official(model: vitkit.EoMT, norm: tuple | None = IMAGENET, keys=("pixel_mean", "pixel_std")) -> dict:
    """An official tue-mps Lightning state dict of ``model``: network.encoder.backbone.* in timm's DINOv2-reg
    names (reg_token, no mask_token), heads under network.*, network.encoder.pixel_mean/std [1, C, 1, 1]."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            k = k[len("encoder."):]
            if k == "mask_token":
                continue
            sd["network.encoder.backbone." + ("reg_token" if k == "register_tokens" else k)] = v.clone()
        else:
            sd["network." + k] = v.clone()
    if norm is not None:
        for key, vals in zip(("pixel_mean", "pixel_std"), norm):
            if key in keys:
                sd[f"network.encoder.{key}"] = torch.tensor(vals).view(1, -1, 1, 1)
    sd["criterion.empty_weight"] = torch.ones(3)
    return sd


@pytest.fixture(scope="module")
def donor():
    return _eomt(seed=1)


def _out(model, x):
    with torch.no_grad():
        masks, classes = model(x)
    return masks[-1], classes[-1]


def _equal(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a, b))


def test_tue_mps_normalisation_is_adopted_and_equals_explicit(donor, tmp_path):
    path = tmp_path / "eomt.ckpt"
    torch.save({"state_dict": _official(donor), "epoch": 3}, path)
    x = torch.rand(2, 3, 64, 64)
    explicit = _eomt(pixel_mean=IMAGENET[0], pixel_std=IMAGENET[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal values: nothing to warn about
        report = explicit.load_weights(path)
    assert any("equal the model's" in a for a in report.adapted)

    plain = _eomt()
    assert plain.pixel_mean is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = plain.load_weights(path)
    ours = [w for w in caught if "input normalisation" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "pixel_mean=[0.485, 0.456, 0.406], pixel_std=[0.229, 0.224, 0.225]" in str(ours[0].message)
    assert str(path) in str(ours[0].message)
    assert any("adopted" in a and "0.485" in a for a in report.adapted) and "adopted" in report.summary()
    assert not any("pixel" in k for k, _ in report.dropped)
    assert _equal(_out(plain, x), _out(explicit, x))
    unnormalised = _eomt()
    unnormalised.load_weights({k: v for k, v in _official(donor).items() if "pixel" not in k})
    assert not torch.allclose(_out(unnormalised, x)[0], _out(plain, x)[0])  # normalisation matters here
    # saved and reloaded, the model keeps normalising
    plain.save_pretrained(tmp_path / "exported")
    again = vitkit.from_pretrained(tmp_path / "exported")
    assert again.pixel_mean is not None and _equal(_out(again, x), _out(explicit, x))


def test_checkpoint_without_normalisation_leaves_model_as_built(donor, tmp_path):
    x = torch.rand(1, 3, 64, 64)
    sd = _official(donor, norm=None)
    for kw in ({}, dict(pixel_mean=IMAGENET[0], pixel_std=IMAGENET[1])):
        model = _eomt(**kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.load_weights(sd)
        ref = _eomt(seed=1, **kw)
        assert (model.pixel_mean is None) == (not kw)
        assert _equal(_out(model, x), _out(ref, x))


def test_conflicting_normalisation_is_refused_and_model_untouched(donor, tmp_path):
    path = tmp_path / "eomt.ckpt"
    torch.save({"state_dict": _official(donor)}, path)
    model = _eomt(pixel_mean=[0.5, 0.5, 0.5], pixel_std=[0.25, 0.25, 0.25])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as ei:
        model.load_weights(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "pixel_mean=[0.485, 0.456, 0.406], pixel_std=[0.229, 0.224, 0.225]" in msg  # the checkpoint's
    assert "pixel_mean=[0.5, 0.5, 0.5], pixel_std=[0.25, 0.25, 0.25]" in msg  # the model's
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.pixel_mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_rgb_statistics_do_not_apply_to_a_mono_model(donor):
    """PeakNet's case: an RGB checkpoint into a 1-channel model (patch weights folded by summing). ImageNet
    statistics cannot be adopted: warned and reported when the model has none, reported only when it has its
    own 1-channel statistics."""
    sd = _official(donor)
    mono = _eomt(in_chans=1)
    with pytest.warns(UserWarning, match=r"does not apply to this 1-channel model"):
        report = mono.load_weights(sd)
    assert mono.pixel_mean is None
    dropped = sorted(k for k, _ in report.dropped if "pixel" in k)
    assert dropped == ["network.encoder.pixel_mean", "network.encoder.pixel_std"]
    own = _eomt(in_chans=1, pixel_mean=[100.0], pixel_std=[50.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = own.load_weights(sd)
    assert own.pixel_mean.flatten().tolist() == [100.0]
    assert any("does not apply" in r for k, r in report.dropped if "pixel" in k)


def test_half_a_normalisation_is_not_adopted(donor):
    model = _eomt()
    with pytest.warns(UserWarning, match="incomplete input normalisation"):
        report = model.load_weights(_official(donor, keys=("pixel_mean",)))
    assert model.pixel_mean is None and any("pixel_mean" in k for k, _ in report.dropped)


def test_eomt_loaders_name_the_damaged_file(donor, tmp_path):
    good = tmp_path / "eomt.ckpt"
    torch.save({"state_dict": _official(donor)}, good)
    donor.save_pretrained(tmp_path / "exported")
    st = tmp_path / "exported" / "model.safetensors"
    for name, (data, phrase) in _corruptions(good.read_bytes(), st.read_bytes(), b"PK\x05\x06" + b"\0" * 18).items():
        if name == "npz":
            continue
        path = _write(tmp_path / name / "eomt.ckpt", data)
        with pytest.raises(CheckpointError) as ei:
            _eomt().load_weights(path)
        assert phrase in _assert_loud(ei.value, path), name
    st.write_bytes(st.read_bytes()[:-1])
    for load in (vitkit.from_pretrained, vitkit.EoMT.from_pretrained):
        with pytest.raises(CheckpointError, match="truncated or corrupt safetensors") as ei:
            load(tmp_path / "exported")
        _assert_loud(ei.value, st)


def test_peak_finder_run_dir_with_broken_last_ckpt(donor, tmp_path):
    """`vitkit predict` / `vitkit stream` read a training run's checkpoints/last.ckpt."""
    from vitkit.apps.peaks.finder import load_model

    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at"):
        load_model(run)
    good = {"state_dict": {f"model.{k}": v for k, v in donor.state_dict().items()},
            "vitkit_model_config": {"_target_": "vitkit.EoMT", "backbone": "dinov2_vits14_reg", "embed_dim": 32,
                                    "depth": 3, "num_heads": 4, "img_size": [64, 64], "in_chans": 3,
                                    "patch_size": 16, "num_classes": 2, "num_q": 4, "num_blocks": 2}}
    last.parent.mkdir(parents=True)
    torch.save(good, last)
    x = torch.rand(1, 3, 64, 64)
    assert _equal(_out(load_model(run), x), _out(donor, x))  # the intact run loads
    raw = last.read_bytes()
    for data in (raw[:len(raw) // 3], b"", b"oops\n"):  # truncated, empty, not a checkpoint
        last.write_bytes(data)
        with pytest.raises(CheckpointError) as ei:
            load_model(run)
        _assert_loud(ei.value, last)
    torch.save({"state_dict": {}}, last)
    with pytest.raises(CheckpointError, match="was not written by `vitkit train`"):
        load_model(run)
