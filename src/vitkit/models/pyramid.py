"""The ViT side of the multi-scale trunks (:mod:`vitkit.models.trunk`): the backbone built through the one resolver,
brought to stride 16 (patch resampling or input resizing), its position table stored for the input grid, frozen and
cast as asked, and the input checks. The trunks add the pyramid levels on top of :class:`ViTPyramid`."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.backbones.config import FAMILIES
from vitkit.backbones.presets import PRESETS, get_preset
from vitkit.backbones.resolve import resolve_backbone
from vitkit.backbones.vit import VisionTransformer
from vitkit.dtypes import parse_dtype
from vitkit.errors import ConfigError, InputError
from vitkit.layers import PatchEmbed, resample_patch_embed
from vitkit.layers.precision import cast_for_inference

__all__ = ["ENCODER_TYPES", "STRIDE", "ViTPyramid", "build_vit", "resample_to_patch", "set_grid"]

STRIDE = 16  # the ViT token grid every pyramid level is derived from

# encoder_type -> backbone families it accepts ("custom", i.e. an explicit config, is always accepted)
ENCODER_TYPES: dict[str, tuple[str, ...]] = {
    "dino": ("dinov2", "dinov3", "vit"),  # DINO v1 weights are plain ViTs (family "vit")
    "dinov2": ("dinov2",),
    "dinov3": ("dinov3",),
    "ijepa": ("ijepa",),
    "clip": ("clip",),
    "vit": ("vit", "deit"),
    "deit": ("deit",),
    "auto": FAMILIES,
}

# ------------------------------------------------------------------------------------- backbones
def _native_patch(name: str | None, config: Mapping[str, Any]) -> int:
    if "patch_size" in config:
        return int(config["patch_size"])
    return int(get_preset(name).config.get("patch_size", 16)) if name else 16


def build_vit(backbone: str | Path | VisionTransformer | Mapping[str, Any] | None = None,
              pretrained: bool | str | Path | None = None, *, img_size: int | Sequence[int] | None = None,
              in_chans: int | None = None, **backbone_config: Any) -> VisionTransformer:
    """Resolve the ``backbone`` / ``pretrained`` arguments of the multi-scale trunks to a ViT.

    Args:
        backbone: a registered name (``"dinov2_vits14_reg"``), a checkpoint (file, HF-style directory or HF
            model id; its weights are always loaded), a :class:`VisionTransformer`, a mapping of
            :class:`ViTConfig` fields (explicit architecture), or None (then ``pretrained`` must be a checkpoint
            or ``backbone_config`` an explicit architecture).
        pretrained: None/False (random init for names and configs), True (the preset's official weights), or
            a checkpoint path loaded strictly through vitkit's loader.
        img_size: built at this size's grid when given (used only for names and explicit configs; the
            trunks resize other backbones' position tables themselves).
        in_chans: input channels (RGB weights are folded to 1 channel by summing).
        **backbone_config: ViTConfig fields overriding the preset (names / explicit configs only).

    Weights are never silently skipped: a contradiction (a checkpoint backbone with ``pretrained=False``, or
    ``pretrained=True`` without a preset name) raises :class:`ConfigError`.
    """
    if isinstance(backbone, VisionTransformer) and in_chans is not None and int(in_chans) != backbone.config.in_chans:
        raise ConfigError(f"in_chans={in_chans} but the given backbone takes {backbone.config.in_chans} "
                          f"channels; build it with create_backbone(..., in_chans={in_chans})")
    if isinstance(backbone, Mapping):  # explicit architecture (e.g. a Hydra node without _target_)
        backbone, backbone_config = None, {**dict(backbone), **backbone_config}
    if backbone is None and not backbone_config and pretrained in (None, False, True):
        raise ConfigError("no backbone: pass backbone=<preset name | checkpoint path | HF model id | "
                          "VisionTransformer> or pretrained=<checkpoint path | HF model id>; see "
                          "vitkit.list_models() for the names")
    checkpoint = isinstance(backbone, (str, Path)) and str(backbone) not in PRESETS
    if checkpoint and pretrained is False:
        raise ConfigError(f"backbone {str(backbone)!r} is a checkpoint, whose weights are always loaded, but "
                          f"pretrained=False; use pretrained=None, or a preset name for a random init")
    if checkpoint and backbone_config:
        raise ConfigError(f"backbone config {sorted(backbone_config)} given with checkpoint {str(backbone)!r}, "
                          f"whose architecture is read from the checkpoint; use a preset name instead")
    checkpoint |= backbone is None and not backbone_config  # pretrained= is the checkpoint
    size = None if checkpoint else img_size  # the trunks resize a checkpoint's position table themselves
    return resolve_backbone(backbone, pretrained, img_size=size, in_chans=in_chans, **backbone_config).train()


def resample_to_patch(vit: VisionTransformer, patch_size: int = STRIDE) -> VisionTransformer:
    """Give ``vit`` another patch size in place, keeping its token grid (FlexiViT resampling).

    The patch-embedding kernel is resampled with the pseudo-inverse of the bicubic resize (see
    :func:`vitkit.layers.resample_patch_embed`), so an image resized by ``patch_size / p`` gives nearly the
    same tokens as the original model on the original image. The position table is kept; the config
    records the new ``patch_size``, ``img_size = grid * patch_size`` and ``extra["patch_resampled_from"]``.
    """
    p = vit.patch_size
    if p == patch_size:
        return vit
    old = vit.patch_embed.proj
    new = PatchEmbed(patch_size, old.in_channels, old.out_channels, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.proj.weight.copy_(resample_patch_embed(old.weight.detach(), patch_size))
        if old.bias is not None:
            new.proj.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    c = vit.config
    grid = c.grid_size
    vit.patch_embed, vit.patch_size = new, patch_size
    c.patch_size, c.img_size = patch_size, (grid[0] * patch_size, grid[1] * patch_size)
    c.extra["patch_resampled_from"] = p
    c.validate()
    return vit


def set_grid(vit: VisionTransformer, grid: tuple[int, int]) -> VisionTransformer:
    """Store the position table for ``grid`` in place, computed exactly as the ViT would on the fly.

    Inputs of that grid then skip the per-call interpolation and give bit-identical tokens.
    """
    c = vit.config
    grid = (int(grid[0]), int(grid[1]))
    if grid == c.grid_size:
        return vit
    if vit.pos_embed is not None:
        with torch.no_grad():
            table = vit.interpolate_pos_encoding(grid).detach().clone()
        vit.pos_embed = nn.Parameter(table, requires_grad=vit.pos_embed.requires_grad)
    c.img_size = (grid[0] * vit.patch_size, grid[1] * vit.patch_size)
    c.validate()
    return vit


# --------------------------------------------------------------------------------------- common
class ViTPyramid(nn.Module):
    """Backbone handling shared by the trunks: building, stride 16, freezing, dtype, input checks."""

    channel_list: list[int]
    strides: list[int]

    def __init__(self, backbone, pretrained, encoder_type: str, img_size, in_chans: int | None, patch_mode: str,
                 freeze_vit: bool, force_dtype, pad: bool, verbose: bool, size_divisibility: int,
                 backbone_config: dict[str, Any], output_dtype=None):
        super().__init__()
        if encoder_type not in ENCODER_TYPES:
            hint = " ('hiera' is SAM2's own trunk: use sam2's configs)" if encoder_type == "hiera" else ""
            raise ConfigError(f"unknown encoder_type {encoder_type!r}; expected one of {sorted(ENCODER_TYPES)}"
                              + hint)
        if patch_mode not in ("resample", "resize"):
            raise ConfigError(f"unknown patch_mode {patch_mode!r}; expected 'resample' (patch embedding resampled "
                              f"to {STRIDE}x{STRIDE}) or 'resize' (input resized by patch/{STRIDE})")
        self.force_dtype = parse_dtype(force_dtype, "force_dtype")
        self.output_dtype = parse_dtype(output_dtype, "output_dtype", extra=("input",))  # None: follow force_dtype
        grid = None
        if img_size is not None:
            h, w = (int(img_size), int(img_size)) if isinstance(img_size, int) else (int(v) for v in img_size)
            d = size_divisibility
            if h % d or w % d:
                raise ConfigError(f"img_size {(h, w)} must be a multiple of {d} for exact strides "
                                  f"{self._stride_names(d)}; use e.g. {(h // d * d, w // d * d)}")
            grid = (h // STRIDE, w // STRIDE)
        native = None
        if grid is not None and (isinstance(backbone, Mapping) or (isinstance(backbone, (str, Path))
                                                                  and str(backbone) in PRESETS)
                                 or (backbone is None and backbone_config)):
            cfg = {**dict(backbone), **backbone_config} if isinstance(backbone, Mapping) else backbone_config
            name = str(backbone) if isinstance(backbone, (str, Path)) else None
            p = _native_patch(name, cfg)
            native = (grid[0] * p, grid[1] * p)  # built (or loaded) straight at the target grid
        vit = build_vit(backbone, pretrained, img_size=native, in_chans=in_chans, **backbone_config)
        family = vit.config.family
        if family != "custom" and family not in ENCODER_TYPES[encoder_type]:
            raise ConfigError(f"encoder_type={encoder_type!r} expects a backbone of family "
                              f"{' / '.join(ENCODER_TYPES[encoder_type])}, got family {family!r}; pass "
                              f"encoder_type={self._encoder_for(family)!r} (or 'auto')")
        if patch_mode == "resample":
            resample_to_patch(vit, STRIDE)
        if grid is not None:
            set_grid(vit, grid)
        if vit.mask_token is not None:  # never used here: keep it out of the optimiser and DDP's reducer
            vit.mask_token.requires_grad_(False)
        self.vit = vit
        self.encoder_type = encoder_type
        self.patch_mode = patch_mode
        self.embed_dim = vit.embed_dim
        self.in_chans = vit.config.in_chans
        self.pad = pad
        self.verbose = verbose
        self.size_divisibility = size_divisibility
        self.freeze_vit = freeze_vit
        self._logged_shape: tuple[int, ...] | None = None
        if freeze_vit:
            vit.freeze()  # no gradients; eval mode kept under .train()
            if self.force_dtype is not None:  # frozen: cast the weights once instead of autocasting every call
                cast_for_inference(vit, self.force_dtype)  # vitkit's one policy: norms, positions, RoPE stay fp32

    @staticmethod
    def _stride_names(div: int) -> str:
        return "/".join(str(s) for s in (4, 8, 16, 32) if s <= div)

    @staticmethod
    def _encoder_for(family: str) -> str:
        exact = next((k for k, v in ENCODER_TYPES.items() if v == (family,)), None)
        return exact or next((k for k, v in ENCODER_TYPES.items() if family in v and k != "auto"), "auto")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the ViT blocks in the backward pass (saves activation memory)."""
        self.vit.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------------------------ input
    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate ``x`` [B, C, H, W] and return it (zero-padded bottom/right when ``pad=True``)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"expected an image batch [B, C, H, W], got {shape}")
        if not x.is_floating_point():
            raise InputError(f"expected a floating-point image batch, got {x.dtype}; convert with x.float()")
        B, C, H, W = x.shape
        if C != self.in_chans:
            raise InputError(f"the trunk's ViT takes in_chans={self.in_chans} channels, got {C} (input "
                             f"{tuple(x.shape)}); build the trunk with in_chans={C}"
                             + (" (RGB weights are folded to 1 channel by summing)" if C == 1 else ""))
        d = self.size_divisibility
        if H % d or W % d:
            if not self.pad:
                lo, hi = (H // d * d, W // d * d), (-(-H // d) * d, -(-W // d) * d)
                raise InputError(f"image size {H}x{W} is not a multiple of {d}, so strides "
                                 f"{self._stride_names(d)} cannot all be exact; crop to {lo[0]}x{lo[1]}, pad to "
                                 f"{hi[0]}x{hi[1]}, or build the trunk with pad=True (zero-pads bottom/right)")
            x = F.pad(x, (0, -(-W // d) * d - W, 0, -(-H // d) * d - H))
        return x

    def result_dtype(self, input_dtype: torch.dtype) -> torch.dtype | None:
        """The dtype ``forward`` returns its maps in for an input of ``input_dtype`` (None: as computed).

        ``output_dtype`` when given (``"input"``: ``input_dtype``), else ``force_dtype`` (the seed's contract:
        "force output dtype"), else None: the maps keep the dtype they were computed in (the input's, or an
        enclosing autocast's).
        """
        if self.output_dtype == "input":
            return input_dtype
        return self.output_dtype if self.output_dtype is not None else self.force_dtype

    # -------------------------------------------------------------------------------------- ViT
    def vit_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ViT's final-norm patch tokens as a map [B, D, H/16, W/16] in ``x``'s dtype."""
        B, _, H, W = x.shape
        in_dtype = x.dtype
        p = self.vit.patch_size
        if p != STRIDE:  # patch_mode="resize": H/16 x W/16 tokens from an image resized by p/16
            size = (H // STRIDE * p, W // STRIDE * p)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=p < STRIDE)
        dtype = self.force_dtype
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if dtype is not None:
            if dtype == torch.float32:  # fp32 ViT even inside an outer autocast region
                x, ctx = x.float(), torch.autocast(x.device.type, enabled=False)
            elif self.vit.patch_embed.proj.weight.dtype == dtype:  # frozen ViT, weights cast once
                # an enclosing autocast of another dtype (SAM2 training's bf16 AMP) would hand these weights
                # activations of its own dtype: the ViT runs in force_dtype, outside it
                x, ctx = x.to(dtype), torch.autocast(x.device.type, enabled=False)
            else:  # trainable ViT: keep fp32 master weights, compute in the low precision
                ctx = torch.autocast(x.device.type, dtype=dtype)
        grad = contextlib.nullcontext() if not self.freeze_vit else torch.no_grad()
        with grad, ctx:
            tokens = self.vit.forward_features(x)["x_norm_patchtokens"]  # [B, HW, D]
        gh, gw = H // STRIDE, W // STRIDE
        fmap = tokens.transpose(1, 2).reshape(B, -1, gh, gw)  # NLC -> NCHW
        return fmap.to(in_dtype) if dtype is not None else fmap

    def _run(self, x: torch.Tensor, head) -> list[torch.Tensor]:
        x = self.check_input(x)
        feats = head(self.vit_features(x))
        out_dtype = self.result_dtype(x.dtype)
        if out_dtype is not None:
            feats = [f.to(out_dtype) for f in feats]
        if self.verbose and self._logged_shape != tuple(x.shape):
            self._logged_shape = tuple(x.shape)
            print(f"[vitkit {type(self).__name__}] input {tuple(x.shape)} -> "
                  + ", ".join(f"/{s}: {tuple(f.shape)}" for s, f in zip(self.strides, feats)))
        return feats
