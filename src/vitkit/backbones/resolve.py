"""The one resolver: a backbone spec -> a :class:`VisionTransformer`, with or without its weights.

Every model that holds a ViT (EoMT, the zoo's classifier, the multi-scale trunks, the aggregator's patch
embedding) and every public builder (:func:`vitkit.create_backbone`, :func:`vitkit.from_pretrained`) builds it
here, so a name, a path, a Hugging Face id or an explicit configuration means the same thing everywhere::

    resolve_backbone("dinov2_vits14_reg", pretrained=True, img_size=(352, 384), in_chans=1)
    resolve_backbone("facebook/dinov2-small")                    # an HF id: cached snapshot, or a download
    resolve_backbone("runs/x/backbone.safetensors", img_size=448)
    resolve_backbone(None, pretrained="weights.pth", num_heads=4)  # architecture read from the checkpoint
    resolve_backbone({"embed_dim": 384, "depth": 12, "num_heads": 6})

A checkpoint is read once: its configuration and its weights come from the same read.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitkit.backbones.config import ViTConfig
from vitkit.backbones.presets import PRESETS, get_preset
from vitkit.backbones.vit import VisionTransformer
from vitkit.errors import CheckpointNotFoundError, ConfigError, WeightsNotFoundError
from vitkit.weights import hub
from vitkit.weights.formats import FORMATS
from vitkit.weights.hf import dir_config
from vitkit.weights.io import TORCH_SUFFIXES, find_weights_file
from vitkit.weights.loading import Converted, infer_config, load_weights, read_and_convert

__all__ = ["resolve_backbone", "preset_weights"]

# What a release's own numerics are: pretrained=True keeps the preset's values for them, whichever layout its weights
# were found in (a transformers snapshot of DINOv2 says "resize position embeddings without Meta's +0.1 offset").
_RELEASE_NUMERICS = frozenset({"interpolate_offset", "interpolate_antialias"})
_WEIGHT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors", ".json")


def resolve_backbone(spec: str | Path | VisionTransformer | Mapping[str, Any] | None = None,
                     pretrained: bool | str | Path | None = None, *, img_size: int | tuple[int, int] | None = None,
                     in_chans: int | None = None, patch_size: int | None = None,
                     **overrides: Any) -> VisionTransformer:
    """Build (or adopt) a backbone from any spec vitkit accepts.

    Args:
        spec: a registered name (``vitkit.list_models()``); a checkpoint file or model directory (``config.json``
            + weights, transformers' or vitkit's); a Hugging Face model id (``org/name``: a cached snapshot, or a
            download when online); a mapping of :class:`ViTConfig` fields (an explicit architecture); a
            :class:`VisionTransformer` (used as it is); or None (the architecture is ``overrides``, or read from
            the checkpoint ``pretrained``).
        pretrained: None (the default: a checkpoint spec's weights are loaded, names and configs start random),
            False (random weights: a checkpoint spec gives only its architecture), True (a name's official
            weights, found offline first, see :func:`preset_weights`; for a checkpoint spec the same as None), or
            a checkpoint path loaded strictly into the spec's architecture.
        img_size: input size (H, W) or an int; position embeddings are resized to it at load time. A size the
            patch does not divide turns ``dynamic_pad`` on (inputs are padded), unless ``dynamic_pad`` is given.
        in_chans: input channels; 1 folds RGB patch weights by summing.
        patch_size: resample the patch embedding to another patch size (e.g. 14 -> 16); without ``img_size`` the
            token grid is kept (518 px at /14 -> 592 px at /16).
        **overrides: :class:`ViTConfig` fields; they win over the spec's and over a checkpoint format's numerics.

    Returns:
        A :class:`VisionTransformer` in train mode. Loading is strict (a missing weight is an error, never a random
        fallback).
    """
    sizes = {k: v for k, v in (("img_size", img_size), ("in_chans", in_chans), ("patch_size", patch_size))
             if v is not None}
    if isinstance(spec, VisionTransformer):
        return _adopt(spec, pretrained, overrides)
    if isinstance(spec, Mapping):  # an explicit architecture (e.g. a Hydra node without _target_)
        return _explicit(dict(spec), pretrained, sizes, overrides)
    if spec is None:
        return _explicit({}, pretrained, sizes, overrides)
    if not isinstance(spec, (str, Path)):
        raise ConfigError(f"a backbone is a name, a path, a Hugging Face id, a config mapping or a VisionTransformer; "
                          f"got {type(spec).__name__}")
    if str(spec) in PRESETS:
        return _preset(str(spec), pretrained, sizes, overrides)
    return _checkpoint(spec, pretrained, sizes, overrides)


# ------------------------------------------------------------------------------------------- the kinds
def _adopt(bb: VisionTransformer, pretrained: Any, overrides: dict[str, Any]) -> VisionTransformer:
    if overrides:
        raise ConfigError(f"backbone config {sorted(overrides)} given with a VisionTransformer module; configure the "
                          f"module itself")
    if pretrained is True:
        raise ConfigError("pretrained=True needs a preset name; with a VisionTransformer module pass "
                          "pretrained=<checkpoint path> or load the weights yourself")
    if pretrained not in (None, False):
        load_weights(bb, Path(pretrained))
    return bb


def _explicit(base: dict[str, Any], pretrained: Any, sizes: dict[str, Any], overrides: dict[str, Any]
              ) -> VisionTransformer:
    if pretrained is True:
        raise ConfigError("pretrained=True needs a model name (a preset name, vitkit.list_models()): an explicit "
                          "config has no official weights; pass pretrained=<path> for explicit configs")
    if pretrained not in (None, False) and "embed_dim" not in {**base, **overrides}:
        # no architecture given: the checkpoint's (a file, a model directory or an HF id) with these overrides
        return _checkpoint(pretrained, None, sizes, {**base, **overrides})
    source = None if pretrained in (None, False) else Path(pretrained)
    return _build({"family": "custom", **base}, sizes, overrides, source, keep=set(overrides))


def _preset(name: str, pretrained: Any, sizes: dict[str, Any], overrides: dict[str, Any]) -> VisionTransformer:
    keep = set(overrides)
    source = None
    if pretrained is True:
        source, keep = preset_weights(name), keep | _RELEASE_NUMERICS
    elif pretrained not in (None, False):
        source = Path(pretrained)
    return _build(dict(get_preset(name).config), sizes, overrides, source, keep)


def _checkpoint(spec: str | Path, pretrained: Any, sizes: dict[str, Any], overrides: dict[str, Any]
                ) -> VisionTransformer:
    if pretrained not in (None, True, False):
        raise ConfigError(f"two weight sources: the checkpoint {str(spec)!r} and pretrained={str(pretrained)!r}")
    path = Path(spec).expanduser()
    hf_id = str(spec) if not path.exists() and hub.is_hf_id(str(spec)) else None
    if hf_id is None and not path.exists():
        s = str(spec)
        if s.endswith(_WEIGHT_SUFFIXES) or s.startswith((".", "/", "~")):
            raise CheckpointNotFoundError(f"{s} does not exist: expected a checkpoint file or model directory, a "
                                          f"vitkit name (vitkit.list_models()) or a Hugging Face id (org/name)")
        if difflib.get_close_matches(s, PRESETS, n=1):
            get_preset(s)  # a misspelt name: raises ConfigError naming the close ones
        raise ConfigError(f"{s!r} is not an existing file or directory, a vitkit preset (vitkit.list_models()) or "
                          f"a Hugging Face model id (org/name)")
    if pretrained is False:  # the architecture alone
        cfg = _hf_architecture(hf_id) if hf_id else _read_checkpoint(path, known=overrides, weights=False)[1]
        return _build(cfg, sizes, overrides, None, set())
    if hf_id is not None:
        path = hub.resolve_hf(hf_id)
    source, cfg = _read_checkpoint(path, known=overrides)
    return _build(cfg, sizes, overrides, source, keep=set(overrides))


# ------------------------------------------------------------------------------------------- helpers
def _read_checkpoint(path: Path, known: dict[str, Any], weights: bool = True
                     ) -> tuple[Path | Converted, dict[str, Any]]:
    """``(what to load, architecture)`` of a checkpoint file or model directory. A file is read (and converted)
    once: its configuration and its tensors come from that read. A directory's weights file must exist (said
    before anything is built) unless only the architecture is wanted."""
    if path.is_dir():
        cfg = dir_config(path)
        return (find_weights_file(path) if weights else path), cfg
    ckpt = read_and_convert(path)
    return ckpt, infer_config(ckpt.state_dict, ckpt.format, ckpt.stored_config, known.get("num_heads"))


def _build(cfg: dict[str, Any], sizes: dict[str, Any], overrides: dict[str, Any], source: Path | Converted | None,
           keep: set[str]) -> VisionTransformer:
    """The model of ``cfg`` with ``overrides`` and ``sizes`` applied, and the weights of ``source`` loaded."""
    base_patch, base_size = cfg.get("patch_size", 16), cfg.get("img_size")
    cfg.update(overrides)
    cfg.update(sizes)
    if "patch_size" in sizes and "img_size" not in sizes and base_size is not None and "img_size" not in overrides:
        # keep the token grid: 518 px at /14 is a 37x37 grid -> 592 px at /16
        h, w = (base_size, base_size) if isinstance(base_size, int) else base_size
        cfg["img_size"] = (h // base_patch * cfg["patch_size"], w // base_patch * cfg["patch_size"])
    size = cfg.get("img_size")
    if size is not None and "dynamic_pad" not in overrides:
        h, w = (size, size) if isinstance(size, int) else size
        p = cfg.get("patch_size", 16)
        if h % p or w % p:
            cfg["dynamic_pad"] = True  # e.g. 352x384 detector panels with a /14 model: pad inputs, do not refuse
    model = VisionTransformer(ViTConfig.from_dict(cfg))  # unknown keys -> ConfigError listing the fields
    if source is not None:
        if isinstance(source, Path) and source.is_dir():
            source = find_weights_file(source)
        load_weights(model, source, keep_config=keep)  # explicit arguments (and a release's numerics) win
    return model


def preset_weights(name: str) -> Path:
    """Where ``pretrained=True`` finds a preset's weights, offline first.

    1. the official file (``p.filename``, e.g. ``dinov2_vits14_reg4_pretrain.pth``) in ``$VITKIT_HOME``, the torch
       hub checkpoint directory (``$TORCH_HOME/hub/checkpoints``) or the preset's Hugging Face snapshot;
    2. the same weights in transformers' layout: a snapshot of ``p.hf_id`` (``$VITKIT_HOME/hf/<org>/<name>`` or the
       HF cache ``$HF_HUB_CACHE/models--<org>--<name>/snapshots/<rev>``, ``refs/main`` preferred);
    3. online only (``VITKIT_OFFLINE`` / ``HF_HUB_OFFLINE`` unset): a download of the official file.
    """
    p = get_preset(name)
    if p.filename:
        local = hub.local_file(p.filename, p.hf_id)  # local copies of the official file first
        if local is not None:
            return local
        snapshot = hub.hf_snapshot(p.hf_id) if p.hf_id else None
        if snapshot is not None:
            return find_weights_file(snapshot)
        try:
            return hub.resolve_file(p.filename, p.url, p.hf_id)
        except WeightsNotFoundError as e:
            if not p.hf_id:
                raise
            raise WeightsNotFoundError(
                f"{e} The same weights in transformers' layout are used too: a snapshot of {p.hf_id} (config.json + "
                f"model.safetensors) in the Hugging Face cache {hub.hf_cache_dir()} or in "
                f"{hub.vitkit_home() / 'hf' / p.hf_id} (`huggingface-cli download {p.hf_id}`).") from e
    if p.hf_id:
        return hub.resolve_hf(p.hf_id)
    raise ConfigError(f"preset {name!r} has no official weights; pass pretrained=<path> or pretrained=False")


def _hf_architecture(hf_id: str) -> dict[str, Any]:
    """ViTConfig fields of an HF model id without its weights: a cached snapshot's config.json, else the vitkit
    preset of that id (with the numerics its HF checkpoint would bring), else (online) its downloaded config.json."""
    snapshot = hub.hf_snapshot(hf_id)  # a cached copy (vitkit cache, then the HF cache)
    if snapshot is not None:
        return dir_config(snapshot)
    preset = next((p for p in PRESETS.values() if p.hf_id == hf_id), None)
    if preset is not None:
        cfg = dict(preset.config)
        fmt = {"dinov2": "hf_dinov2_reg" if cfg.get("num_register_tokens") else "hf_dinov2", "dinov3": "hf_dinov3",
               "clip": "hf_clip"}.get(cfg["family"], "hf_vit")
        cfg.update(FORMATS[fmt].config)  # e.g. transformers resizes DINOv2 position embeddings without Meta's offset
        cfg["extra"] = {"weights_source": f"vitkit preset {preset.name} (architecture of {hf_id}, random weights)"}
        return cfg
    if hub.offline():
        why = "vitkit is offline"
    else:
        try:
            from huggingface_hub import hf_hub_download

            return dir_config(Path(hf_hub_download(hf_id, "config.json")).parent)
        except Exception as e:  # network, gated or missing repo: reported below with the cause
            why = f"download of its config.json failed ({type(e).__name__}: {e})"
    raise ConfigError(f"no architecture for {hf_id!r}: its config.json is not cached, no vitkit preset describes it "
                      f"and {why}. Pass a local directory with config.json, or a vitkit preset name as model_name.")
