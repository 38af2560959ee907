"""The one backbone resolver: every spec kind, a checkpoint read once, explicit arguments honoured.

``create_backbone``, ``from_pretrained``, EoMT, the zoo, the trunks and the aggregator all build their ViT through
:func:`vitkit.backbones.resolve.resolve_backbone`; these tests pin what a spec means.
"""

from __future__ import annotations

import pytest
import torch

import vitkit
from conftest import TINY, make_tiny
from vitkit.backbones.resolve import resolve_backbone
from vitkit.errors import CheckpointNotFoundError, ConfigError
from vitkit.weights import hub, loading


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def meta_file(tmp_path):
    """A tiny DINOv2 in Meta's layout (a bare state dict: no config, architecture inferred from the keys) with a
    width the standard sizes do not know (32: num_heads cannot be guessed)."""
    model = make_tiny("dinov2_vits14_reg")
    path = tmp_path / "tiny_dinov2.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_explicit_num_heads_is_used_when_the_architecture_comes_from_the_checkpoint(meta_file):
    """The known bug: ``create_backbone(pretrained=path, num_heads=4)`` said "cannot infer num_heads ... pass
    num_heads explicitly" although it was passed."""
    model, path = meta_file
    with pytest.raises(ConfigError, match="cannot infer num_heads"):
        vitkit.create_backbone(pretrained=path)  # a 32-wide model: no standard head count
    bb = vitkit.create_backbone(pretrained=path, num_heads=4, in_chans=3)
    assert bb.config.num_heads == 4 and bb.config.embed_dim == 32 and _same(bb.eval(), model)
    again = vitkit.from_pretrained(path, num_heads=4)  # the same through the top-level loader
    assert _same(again, model)


def test_a_checkpoint_is_read_once(meta_file, monkeypatch):
    _, path = meta_file
    reads = []
    real = loading.read_state_dict
    monkeypatch.setattr(loading, "read_state_dict", lambda p: reads.append(p) or real(p))
    resolve_backbone(path, num_heads=4)
    assert reads == [path]


def test_every_spec_kind_gives_the_same_backbone(meta_file, tmp_path):
    model, path = meta_file
    vitkit.save_pretrained(model, tmp_path / "dir")
    by_dir = resolve_backbone(tmp_path / "dir").eval()
    by_file = resolve_backbone(path, num_heads=4).eval()
    by_none = resolve_backbone(None, pretrained=path, num_heads=4).eval()
    by_preset = resolve_backbone("dinov2_vits14_reg", pretrained=path, img_size=56, **TINY).eval()
    by_mapping = resolve_backbone(dict(model.config.to_dict()), pretrained=path).eval()
    module = make_tiny("dinov2_vits14_reg", seed=1)
    by_module = resolve_backbone(module, pretrained=path)
    assert by_module is module
    for bb in (by_dir, by_file, by_none, by_preset, by_mapping, by_module):
        assert _same(bb, model)


def test_pretrained_false_gives_the_architecture_with_random_weights(meta_file, tmp_path):
    model, _ = meta_file
    vitkit.save_pretrained(model, tmp_path / "dir")
    bb = resolve_backbone(tmp_path / "dir", pretrained=False)
    assert bb.config.embed_dim == 32 and bb.state_dict().keys() == model.state_dict().keys()
    assert not _same(bb, model)


def test_the_one_hugging_face_id_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.is_hf_id("facebook/dinov2-small") and hub.is_hf_id("org/name.v2")
    for not_an_id in ("dinov2_vits14", "/abs/path", "./rel/dir", "a/b/c", "org/", "", "w.pth"):
        assert not hub.is_hf_id(not_an_id), not_an_id
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert not hub.is_hf_id("org/name")  # a path that exists is a path


def test_bad_specs_say_what_they_expected(tmp_path, isolated_caches):
    with pytest.raises(ConfigError, match="did you mean dinov2_vits14"):
        resolve_backbone("dinov2_vits15")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_backbone(str(tmp_path / "missing.pth"))
    with pytest.raises(vitkit.WeightsNotFoundError):
        resolve_backbone("facebook/dinov2-small")  # offline, not cached
    with pytest.raises(ConfigError, match="two weight sources"):
        resolve_backbone(str(tmp_path), pretrained=str(tmp_path))
    with pytest.raises(ConfigError, match="needs a model name"):
        resolve_backbone(None, pretrained=True, **TINY)
    with pytest.raises(ConfigError, match="VisionTransformer module"):
        resolve_backbone(make_tiny("dinov2_vits14"), depth=3)


def test_an_eomt_directory_is_not_a_backbone(tmp_path):
    seg = vitkit.EoMT(backbone="dinov2_vits14", num_classes=2, num_q=4, num_blocks=1, img_size=56, **TINY)
    seg.save_pretrained(tmp_path / "eomt")
    with pytest.raises(ConfigError, match="EoMT segmenter, not a backbone"):
        resolve_backbone(tmp_path / "eomt")
    assert isinstance(vitkit.from_pretrained(tmp_path / "eomt"), vitkit.EoMT)
