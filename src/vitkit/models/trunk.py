"""Multi-scale trunks on a plain ViT: SAM2's trunk contract and ViTDet's simple feature pyramid.

A plain ViT has one feature map, at the patch stride. Detectors and SAM2 want four, at strides 4, 8, 16
and 32. Both modules here build them from the ViT's stride-16 token grid, with exact sizes:

* :class:`ViTTrunkMultiScale` (SAM2 trunk, cascaded): F16 is a projection of the patch tokens, F32 a
  stride-2 conv of F16, F8 and F4 are x2 upsamplings of F16 and F8 (learned deconvs, or bilinear + conv),
  optionally refined by residual depthwise-separable convs.
* :class:`SimpleFeaturePyramid` (ViTDet, parallel): every level comes straight from the last ViT map
  through deconvs / identity / max-pool, then a 1x1 and a 3x3 conv, each with LayerNorm2d.

Both follow SAM2's trunk contract: ``channel_list`` lists the channels lowest resolution first (as
Hiera's ``[C32, C16, C8, C4]``), and ``forward(x)`` returns the maps highest resolution first
``[F4, F8, F16, F32]``, each exactly half the size of the previous one. They plug into
``sam2.modeling.backbones.image_encoder.ImageEncoder`` unchanged (configs in ``vitkit/configs/sam2``).

**Stride 16.** Patch-14 backbones (DINOv2, I-JEPA /14, CLIP L/14) reach stride 16 either by resampling
the patch embedding to 16x16 (``patch_mode="resample"``, FlexiViT pseudo-inverse: the token grid of an
HxW image becomes H/16 x W/16) or by resizing the input by p/16 before the ViT (``patch_mode="resize"``).

**Input sizes.** H and W must be multiples of 32 (so that every level is exactly H/s x W/s and the
levels differ by exactly 2x, which SAM2's FPN neck relies on). Other sizes raise :class:`InputError`
naming the nearest valid sizes, unless ``pad=True``, which zero-pads bottom/right to the next multiple of
32; the maps then cover the padded image (``ceil(H/32) * 32 / s`` rows), and the caller crops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.backbones.vit import VisionTransformer
from vitkit.errors import ConfigError
from vitkit.layers import LayerNorm2d
from vitkit.models.pyramid import ENCODER_TYPES, STRIDE, ViTPyramid, build_vit, resample_to_patch, set_grid


class RefineBlock(nn.Module):
    """Residual depthwise-separable refinement: ``x + pw(GELU(LN(dw3x3(x))))``.

    Residual, so the upsampled ViT features pass through unchanged plus a learned correction (a plain
    dw->pw->norm stack would replace them with the output of a randomly initialised conv).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.act = nn.GELU()
        self.pw = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw(self.act(self.norm(self.dw(x))))


def _proj(cin: int, cout: int) -> nn.Module:
    return nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)


def _up2(cin: int, cout: int, mode: str, pre_norm: bool = False) -> nn.Module:
    """Exact x2 upsampling: ConvTranspose2d(k2, s2) (ViTDet), or bilinear x2 then a 1x1 projection."""
    if mode == "deconv":
        layers = [LayerNorm2d(cin, eps=1e-6), nn.GELU()] if pre_norm else []  # ViTDet's deconv-LN-GELU-deconv
        return nn.Sequential(*layers, nn.ConvTranspose2d(cin, cout, 2, stride=2))
    return nn.Sequential(nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False), _proj(cin, cout))


def _check_mode(upsample_mode: str) -> None:
    if upsample_mode not in ("bilinear", "deconv"):
        raise ConfigError(f"unknown upsample_mode {upsample_mode!r}; expected 'bilinear' or 'deconv'")


# -------------------------------------------------------------------------------- SAM2 trunk
class ViTTrunkMultiScale(ViTPyramid):
    """A ViT as a SAM2 trunk: four maps at exact strides 4, 8, 16, 32 from the stride-16 token grid.

    ``F16 = proj16(tokens)``, ``F32 = conv3x3_s2(F16)``, ``F8 = refine(up2(F16))``, ``F4 = refine(up2(F8))``,
    where ``proj16`` is a 1x1 conv (identity when ``C16`` equals the ViT width), ``up2`` a ConvTranspose2d(k2, s2)
    (``upsample_mode="deconv"``; the second one after LayerNorm2d + GELU, as ViTDet) or bilinear x2 + 1x1
    conv, and ``refine`` a residual depthwise-separable block (``refine_highres=True``).

    Args:
        backbone: a vitkit preset name (``"dinov2_vits14_reg"``), a checkpoint (file, HF-style directory or
            HF model id; its weights are always loaded), a :class:`VisionTransformer` (adapted in place: patch
            embedding resampled to 16, position table resized to ``img_size``), or a mapping of ViTConfig
            fields. None: ``pretrained`` is the checkpoint, as in the DINO/JEPA SAM2 fork.
        pretrained: None/False (random init), True (the preset's official weights) or a checkpoint path,
            always loaded strictly through vitkit's loader.
        encoder_type: which backbone families are expected: ``"dino"`` (DINO v1 / DINOv2 / DINOv3),
            ``"dinov2"``, ``"dinov3"``, ``"ijepa"``, ``"clip"``, ``"vit"``, ``"deit"`` or ``"auto"``. A backbone of
            another family raises :class:`ConfigError` (explicit ``family="custom"`` configs always pass).
        out_dims: ``[C32, C16, C8, C4]`` (Hiera's order, lowest resolution first), or one int for all four;
            None uses the ViT width everywhere.
        upsample_mode: ``"deconv"`` (learned ConvTranspose2d) or ``"bilinear"`` (bilinear x2 + 1x1 conv).
        refine_highres: residual depthwise-separable refinement of F8 and F4.
        freeze_vit: no gradients for the ViT, which also stays in eval mode and runs under ``no_grad``.
        force_dtype: run the ViT in ``"bf16"`` / ``"fp16"`` / ``"fp32"`` (frozen ViT: weights cast once;
            trainable ViT: autocast, fp32 master weights) and, as in the DINO/JEPA SAM2 fork ("force output
            dtype"), return the four maps in that dtype (unless ``output_dtype`` says otherwise). A SAM2 neck
            with fp32 weights then has to run under autocast, as SAM2's trainer does with AMP; without autocast
            pass ``output_dtype="input"``.
        output_dtype: dtype of the returned maps: None (default) follows ``force_dtype`` (and, without it, the
            maps keep the dtype they were computed in), ``"input"`` returns them in the input's dtype (low
            precision inside the ViT only), ``"bf16"`` / ``"fp16"`` / ``"fp32"`` that dtype.
        img_size: the usual input size (a multiple of 32); the position table is stored for its grid.
        in_chans: input channels (1 for detector images: RGB weights folded by summing).
        patch_mode: ``"resample"`` (patch embedding resampled to 16) or ``"resize"`` (input resized by p/16).
        pad: zero-pad inputs whose size is not a multiple of 32 instead of raising.
        verbose: print the four map shapes for every new input shape.
        **backbone_config: ViTConfig fields for a preset name or an explicit config (e.g. ``depth=2``).

    ``forward(x [B, C, H, W]) -> [F4, F8, F16, F32]`` with ``F_s`` of shape [B, C_s, H/s, W/s].
    """

    def __init__(self, backbone: str | Path | VisionTransformer | Mapping[str, Any] | None = None,
                 pretrained: bool | str | Path | None = None, encoder_type: str = "dino",
                 out_dims: int | Sequence[int] | None = None, upsample_mode: str = "bilinear",
                 refine_highres: bool = True, freeze_vit: bool = False,
                 force_dtype: str | torch.dtype | None = None, img_size: int | Sequence[int] | None = None,
                 in_chans: int | None = None, patch_mode: str = "resample", pad: bool = False,
                 verbose: bool = False, output_dtype: str | torch.dtype | None = None, **backbone_config: Any):
        _check_mode(upsample_mode)
        dims = self._parse_out_dims(out_dims)
        super().__init__(backbone, pretrained, encoder_type, img_size, in_chans, patch_mode, freeze_vit,
                         force_dtype, pad, verbose, 32, backbone_config, output_dtype)
        D = self.embed_dim
        c32, c16, c8, c4 = dims if dims is not None else [D] * 4
        self.channel_list = [c32, c16, c8, c4]  # SAM2: lowest resolution first, like Hiera
        self.strides = [4, 8, 16, 32]  # forward's order: highest resolution first
        self.out_dims = list(self.channel_list)
        self.upsample_mode = upsample_mode
        self.proj16 = _proj(D, c16)
        self.down32 = nn.Conv2d(c16, c32, 3, stride=2, padding=1)
        self.up8 = _up2(c16, c8, upsample_mode)
        self.up4 = _up2(c8, c4, upsample_mode, pre_norm=True)
        self.refine8 = RefineBlock(c8) if refine_highres else nn.Identity()
        self.refine4 = RefineBlock(c4) if refine_highres else nn.Identity()

    @staticmethod
    def _parse_out_dims(out_dims) -> list[int] | None:
        if out_dims is None:
            return None
        if isinstance(out_dims, int):
            dims = [out_dims] * 4
        elif isinstance(out_dims, str):
            raise ConfigError(f"out_dims must be [C32, C16, C8, C4] or one int, got the string {out_dims!r}")
        else:
            dims = [int(c) for c in out_dims]
            if len(dims) != 4:
                raise ConfigError(f"out_dims must list 4 channel counts [C32, C16, C8, C4] (lowest resolution "
                                  f"first, as SAM2's backbone_channel_list), got {len(dims)}: {dims}")
        if any(c <= 0 for c in dims):
            raise ConfigError(f"out_dims must be positive, got {dims}")
        return dims

    def pyramid(self, fmap: torch.Tensor) -> list[torch.Tensor]:
        """Build ``[F4, F8, F16, F32]`` from the ViT map [B, D, h, w]."""
        f16 = self.proj16(fmap)
        f32 = self.down32(f16)
        f8 = self.refine8(self.up8(f16))
        f4 = self.refine4(self.up4(f8))
        return [f4, f8, f16, f32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args: x [B, C, H, W], H and W multiples of 32 (or ``pad=True``).

        Returns: ``[F4, F8, F16, F32]``, ``F_s`` [B, C_s, H/s, W/s] (SAM2's order, highest resolution first).
        """
        return self._run(x, self.pyramid)

    def extra_repr(self) -> str:
        return (f"encoder_type={self.encoder_type!r}, channel_list={self.channel_list}, "
                f"upsample_mode={self.upsample_mode!r}, freeze_vit={self.freeze_vit}, "
                f"force_dtype={self.force_dtype}, output_dtype={self.output_dtype}, patch_mode={self.patch_mode!r}")


# ------------------------------------------------------------------------------- ViTDet pyramid
_SCALES = (4.0, 2.0, 1.0, 0.5)


class SimpleFeaturePyramid(ViTPyramid):
    """ViTDet's simple feature pyramid: every level straight from the last ViT map (stride 16).

    Per scale: 4 -> ConvT(D, D/2) + LayerNorm2d + GELU + ConvT(D/2, D/4); 2 -> ConvT(D, D/2); 1 -> identity;
    0.5 -> max-pool 2x2 (``upsample_mode="bilinear"`` replaces the deconvs by bilinear x4 / x2). Each branch
    then gets a 1x1 conv to ``out_channels`` and a 3x3 conv, each followed by LayerNorm2d (``norm="LN"``; with
    ``norm=None`` the convs carry biases instead).

    Args:
        backbone, pretrained, encoder_type, freeze_vit, force_dtype, output_dtype, img_size, in_chans,
            patch_mode, pad, verbose, **backbone_config: as :class:`ViTTrunkMultiScale` (outputs in
            ``force_dtype`` unless ``output_dtype`` says otherwise).
        out_channels: channels of every level.
        scale_factors: a contiguous run of ``(4.0, 2.0, 1.0, 0.5)`` (each level 2x the next).
        norm: ``"LN"`` or None.
        upsample_mode: ``"deconv"`` (ViTDet) or ``"bilinear"``.

    ``forward(x)`` returns the maps highest resolution first; ``channel_list`` is ``[out_channels] * n`` and
    ``strides`` ``[16 / s for s in scale_factors]``, so it also works as a SAM2 trunk.
    """

    def __init__(self, backbone: str | Path | VisionTransformer | Mapping[str, Any] | None = None,
                 pretrained: bool | str | Path | None = None, encoder_type: str = "auto", out_channels: int = 256,
                 scale_factors: Sequence[float] = _SCALES, norm: str | None = "LN",
                 upsample_mode: str = "deconv", freeze_vit: bool = False,
                 force_dtype: str | torch.dtype | None = None, img_size: int | Sequence[int] | None = None,
                 in_chans: int | None = None, patch_mode: str = "resample", pad: bool = False,
                 verbose: bool = False, output_dtype: str | torch.dtype | None = None, **backbone_config: Any):
        _check_mode(upsample_mode)
        scales = sorted({float(s) for s in scale_factors}, reverse=True)
        if (not scales or any(s not in _SCALES for s in scales) or len(scales) != len(list(scale_factors))
                or any(a != 2 * b for a, b in zip(scales, scales[1:]))):
            raise ConfigError(f"scale_factors must be distinct values from {_SCALES}, each 2x the next "
                              f"(log2-contiguous), got {list(scale_factors)}")
        if norm not in ("LN", None, ""):
            raise ConfigError(f"unknown norm {norm!r}; expected 'LN' or None")
        if int(out_channels) <= 0:
            raise ConfigError(f"out_channels must be positive, got {out_channels}")
        div = int(STRIDE / min(scales)) if min(scales) < 1 else STRIDE
        super().__init__(backbone, pretrained, encoder_type, img_size, in_chans, patch_mode, freeze_vit,
                         force_dtype, pad, verbose, div, backbone_config, output_dtype)
        D, C = self.embed_dim, int(out_channels)
        self.scale_factors = scales
        self.strides = [int(STRIDE / s) for s in scales]
        self.channel_list = [C] * len(scales)
        self.upsample_mode = upsample_mode
        use_norm = norm == "LN"
        branches = []
        for s in scales:
            layers: list[nn.Module] = []
            dim = D
            if s == 4.0 and upsample_mode == "deconv":
                layers += [nn.ConvTranspose2d(D, D // 2, 2, stride=2), LayerNorm2d(D // 2, eps=1e-6), nn.GELU(),
                           nn.ConvTranspose2d(D // 2, D // 4, 2, stride=2)]
                dim = D // 4
            elif s == 2.0 and upsample_mode == "deconv":
                layers.append(nn.ConvTranspose2d(D, D // 2, 2, stride=2))
                dim = D // 2
            elif s > 1.0:
                layers.append(nn.Upsample(scale_factor=s, mode="bilinear", align_corners=False))
            elif s == 0.5:
                layers.append(nn.MaxPool2d(2, stride=2))
            layers += [nn.Conv2d(dim, C, 1, bias=not use_norm), LayerNorm2d(C, eps=1e-6) if use_norm else nn.Identity(),
                       nn.Conv2d(C, C, 3, padding=1, bias=not use_norm),
                       LayerNorm2d(C, eps=1e-6) if use_norm else nn.Identity()]
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)

    def pyramid(self, fmap: torch.Tensor) -> list[torch.Tensor]:
        return [branch(fmap) for branch in self.branches]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args: x [B, C, H, W], H and W multiples of ``16 / min(scale_factors)`` (or ``pad=True``).

        Returns: one map per scale, highest resolution first, [B, out_channels, H*s/16, W*s/16].
        """
        return self._run(x, self.pyramid)

    def extra_repr(self) -> str:
        return (f"scale_factors={self.scale_factors}, channel_list={self.channel_list}, "
                f"upsample_mode={self.upsample_mode!r}, freeze_vit={self.freeze_vit}")


# ------------------------------------------------------------------------------------ SAM2 glue
def sam2_image_predictor(sam_model: nn.Module, **kwargs: Any):
    """A ``sam2.sam2_image_predictor.SAM2ImagePredictor`` that works at any ``image_size``.

    SAM2's predictor hard-codes the feature sizes of 1024-px inputs (``_bb_feat_sizes``, sam2 issue #138);
    at another ``model.image_size`` it silently reshapes the features wrongly. This sets them from the model's
    image size and its trunk's strides (4, 8, 16 after SAM2's scalp). ``kwargs`` go to the predictor.
    """
    from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: PLC0415 - optional dependency

    predictor = SAM2ImagePredictor(sam_model, **kwargs)
    size = int(sam_model.image_size)
    encoder = sam_model.image_encoder
    strides = list(getattr(encoder.trunk, "strides", [4, 8, 16, 32]))
    strides = strides[:len(strides) - encoder.scalp] if encoder.scalp else strides
    if any(size % s for s in strides):
        raise ConfigError(f"image_size {size} is not a multiple of the trunk strides {strides}")
    # a private attribute of sam2's: the predictor has no public way to set the sizes (sam2 issue #138), and
    # without this it reshapes the features of any other image size wrongly; test_trunk pins the behaviour
    predictor._bb_feat_sizes = [(size // s, size // s) for s in strides[:3]]
    return predictor


__all__ = ["ENCODER_TYPES", "RefineBlock", "SimpleFeaturePyramid", "ViTTrunkMultiScale", "build_vit",
           "resample_to_patch", "sam2_image_predictor", "set_grid"]
