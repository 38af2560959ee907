"""DINOv3 hub functions with Meta's signatures: ``vitkit.dinov3_vitl16(pretrained=True, weights=...)``.

Each function builds the registered ``dinov3_*`` preset with :func:`vitkit.create_backbone` and, when
``pretrained``, loads weights strictly through vitkit's loader. ``weights`` is what Meta's
``torch.hub.load("facebookresearch/dinov3", ...)`` accepts:

* ``None`` or a known weights name (``"LVD1689M"``, ``"SAT493M"`` for ViT-L and 7B, or Meta's ``Weights``
  enum members): the official file ``dinov3_{arch}_pretrain_{name}-{hash}.pth``, looked up in
  ``$VITKIT_HOME``, the torch hub checkpoint directory and the Hugging Face cache. Meta gates these files
  (download links come by e-mail), so vitkit never downloads them; a missing file raises
  :class:`~vitkit.errors.WeightsNotFoundError` naming the file and where to put it.
* a URL (``https://...``, e.g. the signed link from Meta's e-mail): downloaded once into
  ``$VITKIT_HOME`` (when online), then read from there.
* a local path or ``file://`` URL: any format vitkit reads (Meta ``.pth``, HF safetensors, vitkit).

There is no fallback to random weights: ``pretrained=False`` is the only way to get them.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from vitkit.backbones.factory import create_backbone
from vitkit.backbones.presets import get_preset
from vitkit.backbones.vit import VisionTransformer
from vitkit.errors import ConfigError, WeightsNotFoundError
from vitkit.weights import hub
from vitkit.weights.io import find_weights_file

DOWNLOAD_PAGE = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"

# file hashes of the released weights other than LVD1689M (those are in the presets' file names)
_SAT493M_HASHES = {"vitl16": "eadcf0ff", "vit7b16": "a6675841"}

# Meta's DinoVisionTransformer keyword names -> vitkit ViTConfig fields
_META_KWARGS = {
    "n_storage_tokens": "num_register_tokens",
    "ffn_ratio": "mlp_ratio",
    "layerscale_init": "layer_scale_init",
    "pos_embed_rope_base": "rope_base",
    "pos_embed_rope_min_period": "rope_min_period",
    "pos_embed_rope_max_period": "rope_max_period",
    "pos_embed_rope_normalize_coords": "rope_normalize_coords",
    "pos_embed_rope_shift_coords": "rope_shift_coords",
    "pos_embed_rope_jitter_coords": "rope_jitter_coords",
    "pos_embed_rope_rescale_coords": "rope_rescale_coords",
}


def _weights_name(weights: Any) -> str | None:
    """``"LVD1689M"``/``"SAT493M"`` for a known weights name (any case, or Meta's enum), else None."""
    value = getattr(weights, "value", weights)  # dinov3.hub.backbones.Weights.SAT493M -> "SAT493M"
    if isinstance(value, str) and value.upper() in ("LVD1689M", "SAT493M"):
        return value.upper()
    return None


def _check_hash(path: Path, fn: str) -> None:
    """Meta's ``check_hash``: the file's SHA-256 must start with the ``-<hash>`` in its name."""
    m = re.search(r"-([0-9a-f]{8,})\.", path.name)
    if m is None:
        raise ConfigError(f"{fn}: check_hash=True but {path.name} has no '-<hash>' suffix to check against")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(m.group(1)):
        raise WeightsNotFoundError(f"{fn}: {path} is corrupt or not the released file: its SHA-256 starts with "
                                   f"{h.hexdigest()[:len(m.group(1))]}, the name says {m.group(1)}. Download it "
                                   f"again or pass check_hash=False.")


def official_weights(arch: str, name: str = "LVD1689M", file_hash: str | None = None, fn: str | None = None,
                     alternative: str = "weights='<path or URL of the file>'",
                     no_weights: str = "pretrained=False") -> Path:
    """The released weights file of ``dinov3_{arch}`` from the caches (never downloaded: the files are gated).

    Looks for ``dinov3_{arch}_pretrain_{name}-{hash}.pth`` in ``$VITKIT_HOME``, the torch hub checkpoint
    directory and a cached Hugging Face snapshot of ``facebook/dinov3-{arch}-pretrain-{name}`` (whose
    transformers-layout safetensors is used when the .pth is not there). ``fn``, ``alternative`` and
    ``no_weights`` word the error for the caller.
    """
    fn = fn or f"dinov3_{arch}"
    if name == "LVD1689M":
        preset_file = get_preset(f"dinov3_{arch}").filename
        file_hash = file_hash or re.search(r"-([0-9a-f]+)\.pth$", preset_file).group(1)
    elif arch in _SAT493M_HASHES:
        file_hash = file_hash or _SAT493M_HASHES[arch]
    else:
        raise ConfigError(f"{fn}: Meta released no {name} weights for dinov3_{arch} (SAT493M exists for "
                          f"{', '.join('dinov3_' + a for a in _SAT493M_HASHES)}); use weights='LVD1689M'")
    filename = f"dinov3_{arch}_pretrain_{name.lower()}-{file_hash}.pth"
    hf_id = f"facebook/dinov3-{arch}-pretrain-{name.lower()}"
    searched = [hub.vitkit_home(), hub.torch_hub_dir()]
    local = hub.local_file(filename, hf_id)
    if local is not None:
        return local
    snapshot = hub.hf_snapshot(hf_id)  # the same weights in transformers' layout, if that repo is cached
    if snapshot is not None:
        return find_weights_file(snapshot)
    raise WeightsNotFoundError(
        f"{fn}: weights file {filename} not found in {', '.join(map(str, searched))}, and the "
        f"Hugging Face cache ({hub.hf_cache_dir()}) has no snapshot of {hf_id}. Meta gates DINOv3 weights, so "
        f"vitkit does not download them: request them at {DOWNLOAD_PAGE} (links come by e-mail) or from the "
        f"Hugging Face repository {hf_id}, then put {filename} into {hub.vitkit_home()} (or set VITKIT_HOME), "
        f"or pass {alternative}. Use {no_weights} for random weights.")


def _resolve_weights(arch: str, weights: Any, file_hash: str | None, fn: str) -> Path:
    name = _weights_name("LVD1689M" if weights is None else weights)
    if name is not None:
        return official_weights(arch, name, file_hash, f"{fn}(pretrained=True)")
    if not isinstance(weights, (str, Path)):
        raise ConfigError(f"{fn}: weights must be None, 'LVD1689M', 'SAT493M', a URL or a path; "
                          f"got {type(weights).__name__} {weights!r}")
    text = str(weights)
    scheme = urlparse(text).scheme
    if scheme in ("http", "https"):
        filename = Path(urlparse(text).path).name
        if not filename:
            raise ConfigError(f"{fn}: the weights URL {text} does not end in a file name")
        try:
            return hub.resolve_file(filename, text)
        except WeightsNotFoundError as e:
            raise WeightsNotFoundError(
                f"{fn}(weights={text!r}): {filename} is not cached in {hub.vitkit_home()} and could not be "
                f"downloaded ({'vitkit is offline' if hub.offline() else str(e)}). Download it on a machine "
                f"with internet and put it into {hub.vitkit_home()} (or set VITKIT_HOME), or pass "
                f"weights='<local path>'.") from e
    path = Path(url2pathname(urlparse(text).path)) if scheme == "file" else Path(text).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(f"{fn}(weights={text!r}): the file {path} does not exist. Pass the path of a "
                                   f"downloaded checkpoint (Meta .pth, HF safetensors or vitkit), a URL, or "
                                   f"weights='LVD1689M' for the official file from the cache.")
    return path


def _build(arch: str, pretrained: bool, weights: Any, check_hash: bool, kwargs: dict[str, Any]) -> VisionTransformer:
    fn = f"dinov3_{arch}"
    kwargs = dict(kwargs)
    file_hash = kwargs.pop("hash", None)
    kwargs.pop("version", None)  # Meta's file-name suffix, None for every release
    # training-only in Meta's code (a separate norm for local crops): vitkit drops that norm when loading
    kwargs.pop("untie_global_and_local_cls_norm", None)
    rope_dtype = kwargs.pop("pos_embed_rope_dtype", "fp32")
    if rope_dtype != "fp32":
        raise ConfigError(f"{fn}: pos_embed_rope_dtype={rope_dtype!r} is not supported; vitkit computes RoPE in "
                          f"float32 (with the checkpoint's stored periods), as Meta's hub builders do")
    for meta_name, field in _META_KWARGS.items():
        if meta_name in kwargs:
            if field in kwargs:
                raise ConfigError(f"{fn}: both {meta_name} (Meta's name) and {field} given; pass one")
            kwargs[field] = kwargs.pop(meta_name)
    if not pretrained:
        if weights is not None and _weights_name(weights) is None:
            raise ConfigError(f"{fn}: weights={weights!r} given with pretrained=False; pass pretrained=True to "
                              f"load it (or drop weights= for random weights)")
        return create_backbone(fn, pretrained=False, **kwargs).eval()
    path = _resolve_weights(arch, weights, file_hash, fn)
    if check_hash:
        _check_hash(path, fn)
    return create_backbone(fn, pretrained=path, **kwargs).eval()


_DOC = """DINOv3 {title} (``dinov3_{arch}`` preset), as Meta's hub function of the same name.

    Args:
        pretrained: load weights (strictly, through vitkit's loader); False gives a randomly initialised model.
        weights: None or ``"LVD1689M"`` (the official file from the caches){sat}, a URL (downloaded once into
            ``$VITKIT_HOME`` when online), or a local path / ``file://`` URL of a checkpoint in any format
            vitkit reads. A missing file raises :class:`~vitkit.errors.WeightsNotFoundError` saying where to
            put it; nothing falls back to random weights.
        check_hash: verify that the file's SHA-256 starts with the hash in its name (Meta's ``check_hash``).
        **kwargs: passed to :func:`vitkit.create_backbone` (``img_size``, ``in_chans``, ``patch_size`` or any
            :class:`~vitkit.ViTConfig` field); Meta's spellings (``n_storage_tokens``, ``ffn_ratio``,
            ``layerscale_init``, ``pos_embed_rope_*``) and ``hash`` are accepted too.

    Returns:
        A :class:`~vitkit.VisionTransformer` in eval mode (call ``.train()`` to fine-tune; that also turns
        on DINOv3's train-time RoPE coordinate rescaling, as in Meta's model). Inputs are expected
        normalised with ImageNet mean/std (LVD1689M) or (0.430, 0.411, 0.296) / (0.213, 0.156, 0.143)
        (SAT493M).
    """


def _make(arch: str, title: str):
    def fn(*, pretrained: bool = True, weights: Any = None, check_hash: bool = False,
           **kwargs: Any) -> VisionTransformer:
        return _build(arch, pretrained, weights, check_hash, kwargs)

    fn.__name__ = fn.__qualname__ = f"dinov3_{arch}"
    sat = ", ``\"SAT493M\"`` (satellite imagery)" if arch in _SAT493M_HASHES else ""
    fn.__doc__ = _DOC.format(title=title, arch=arch, sat=sat)
    return fn


dinov3_vits16 = _make("vits16", "ViT-S/16 (21 M)")
dinov3_vits16plus = _make("vits16plus", "ViT-S+/16 (29 M, SwiGLU)")
dinov3_vitb16 = _make("vitb16", "ViT-B/16 (86 M)")
dinov3_vitl16 = _make("vitl16", "ViT-L/16 (300 M)")
dinov3_vitl16plus = _make("vitl16plus", "ViT-L+/16 (SwiGLU)")
dinov3_vith16plus = _make("vith16plus", "ViT-H+/16 (840 M, SwiGLU)")
dinov3_vit7b16 = _make("vit7b16", "ViT-7B/16 (6.7 B)")

__all__ = ["dinov3_vit7b16", "dinov3_vitb16", "dinov3_vith16plus", "dinov3_vitl16", "dinov3_vitl16plus",
           "dinov3_vits16", "dinov3_vits16plus"]
