"""EoMT: the encoder-only mask transformer ("Your ViT is secretly an image segmentation model").

Learned queries join the token sequence before the last ``num_blocks`` blocks of a plain ViT; a class
head and a mask head read them out, with a ScaleBlock upscaler turning patch tokens into per-pixel
mask embeddings. During training, query->patch attention in those blocks is restricted to each
query's current mask (Mask2Former-style masked attention), and the restriction is annealed away so
that inference runs a plain ViT.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.backbones.config import ViTConfig
from vitkit.backbones.factory import create_dinov2_encoder, legacy_dinov2_config
from vitkit.backbones.resolve import resolve_backbone
from vitkit.backbones.vit import VisionTransformer
from vitkit.errors import ConfigError
from vitkit.kernels import bmm, fusable_activation, linear
from vitkit.layers.norm import LayerNorm2d
from vitkit.weights.eomt import eomt_configs, load_eomt_weights
from vitkit.weights.export import write_model_dir
from vitkit.weights.io import find_weights_file, read_json

# sparse-token decoding runs this many tiles at a time: enough to spread the per-call work, few enough that a stage's
# maps stay in cache (a 2-core EPYC: 7.5 us per tile at 2450 tiles, 10.4 at 4977)
TILE_CHUNK = 2048


class ScaleBlock(nn.Module):
    """x2 upsampling: ConvTranspose2d(k2, s2) -> GELU -> depthwise 3x3 conv -> LayerNorm2d, from ``dim`` to
    ``out_dim`` channels (default ``dim``, as the official EoMT)."""

    def __init__(self, dim: int, out_dim: int | None = None, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        out = dim if out_dim is None else out_dim
        self.conv1 = nn.ConvTranspose2d(dim, out, kernel_size=2, stride=2, **dd)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(out, out, kernel_size=3, padding=1, groups=out, bias=False, **dd)
        self.norm = LayerNorm2d(out, eps=1e-6, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


def mask_products(mask_embed: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """``einsum("bqc,bchw->bqhw")``: each query's mask logit at every pixel (:func:`vitkit.kernels.bmm`: in CPU
    inference possibly one oneDNN GEMM per image against the pixels-major features, which the upscaler's
    LayerNorm2d leaves channels-last, so no copy is made)."""
    return bmm(mask_embed, feats.flatten(2)).unflatten(-1, feats.shape[-2:])


def mask_stride_for(patch_size: int, n_blocks: int) -> int | None:
    """The ``mask_stride`` that gives ``n_blocks`` ScaleBlocks (the inverse of :func:`num_upscale_blocks`;
    None: the official rule's own count)."""
    if n_blocks == num_upscale_blocks(patch_size, None):
        return None
    if patch_size % (2 ** n_blocks):
        raise ConfigError(f"{n_blocks} upscale blocks with patch {patch_size} give no integer mask stride")
    return patch_size // 2 ** n_blocks


def num_upscale_blocks(patch_size: int, mask_stride: int | None) -> int:
    """ScaleBlocks needed: the official rule ``max(1, int(log2(p)) - 2)`` when ``mask_stride`` is None
    (patch 16 -> 2 blocks, masks at 1/4), else enough x2 steps to reach ``patch / mask_stride``."""
    if mask_stride is None:
        return max(1, int(math.log2(patch_size)) - 2)
    if mask_stride < 1 or mask_stride > patch_size:
        raise ConfigError(f"mask_stride must be between 1 and the patch size {patch_size}, got {mask_stride}")
    return max(0, math.ceil(math.log2(patch_size / mask_stride) - 1e-9))


class EoMT(nn.Module):
    """EoMT on any vitkit backbone (DINOv2 with learned position embeddings, DINOv3 with RoPE).

    Two ways to build it (both work as Hydra ``_target_: vitkit.EoMT``):

    * ``EoMT(backbone="dinov3_vits16" | checkpoint | VisionTransformer, num_classes=2, num_q=100, num_blocks=4,
      img_size=(512, 512), in_chans=1, mask_stride=4, pretrained=False)``
    * PeakNet EoMT's explicit DINOv2 form: ``EoMT(patch_size=14, embed_dim=1024, depth=24, num_heads=16,
      mlp_ratio=4.0, num_register_tokens=4, ffn_layer="mlp", img_size=(518, 518), num_classes=150,
      num_q=100, pretrained=True, drop_path_rate=0.0)``.

    Deprecated: PeakNet EoMT's old ``EoMT(encoder_name="vit_large_patch14_reg4_dinov2", ...)`` (timm-style DINOv2
    names, ``vit_{small,base,large,giant}_patch14[_reg4]_dinov2``) still works with a ``DeprecationWarning`` naming
    the explicit spelling (``EoMT(**vitkit.vit_large_config(num_register_tokens=4), ...)``); it builds exactly that
    model. Other keyword arguments (e.g. ``depth=...``) override the name's dimensions.

    Args:
        num_classes: classes without the no-object class (the class head has ``num_classes + 1`` outputs).
        num_q: number of learned queries.
        num_blocks: the last ``num_blocks`` blocks see the queries (and masked attention).
        mask_stride: output mask resolution as input / mask_stride (1 = full resolution); None keeps the
            official rule (1/4 for patch 16, 1/7 for patch 14).
        masked_attn_enabled: False never computes intermediate masks (pure inference model).
        upscale_dims: channels after each ScaleBlock (one per block), e.g. ``[64, 32, 16]`` for patch 8 at
            full resolution: a tapered upscaler like a U-Net decoder's, whose full-resolution levels cost a
            fraction of the official one's (the mask head then embeds queries in the last width). None: the
            embedding width throughout (official EoMT; its checkpoints need it).
        pixel_mean, pixel_std: optional per-channel input normalisation done inside the model
            (official checkpoints use ImageNet statistics); None leaves inputs untouched.

    ``forward(x)`` returns ``(mask_logits_per_layer, class_logits_per_layer)``: lists with one entry per
    masked block that was evaluated plus the final prediction (last). Masks are ``[B, Q, H/s, W/s]``,
    classes ``[B, Q, num_classes + 1]``.
    """

    def __init__(self, backbone: str | VisionTransformer | None = None, num_classes: int = 150, num_q: int = 100,
                 num_blocks: int = 4, img_size: int | tuple[int, int] | None = None, in_chans: int = 3,
                 mask_stride: int | None = None, masked_attn_enabled: bool = True,
                 pretrained: bool | str | Path = False, pixel_mean: list[float] | None = None,
                 pixel_std: list[float] | None = None, upscale_dims: list[int] | None = None,
                 **backbone_config: Any):
        super().__init__()
        if backbone_config.pop("token_scorer_block", None) is not None:  # runs saved before the pixel scorer
            warnings.warn("EoMT(token_scorer_block=...) is ignored: sparse-token inference now takes the kept tokens "
                          "from the caller (EoMT.forward_sparse(x, keep)); the learned scorer's weights are not loaded",
                          DeprecationWarning, stacklevel=2)
        if "encoder_name" in backbone_config:  # PeakNet EoMT's old spelling: the same model as the explicit one
            name = backbone_config.pop("encoder_name")
            if backbone is not None:
                raise ConfigError(f"encoder_name={name!r} and backbone={backbone!r} both name an encoder; pass one")
            explicit, spelling = legacy_dinov2_config(name)
            warnings.warn(
                f"EoMT(encoder_name={name!r}) is deprecated; spell the encoder out: EoMT(**vitkit.{spelling}, ...), "
                f"i.e. EoMT({', '.join(f'{k}={v!r}' for k, v in explicit.items())}, ...)",
                DeprecationWarning, stacklevel=2)
            backbone_config = {**explicit, **backbone_config}  # keyword arguments override the name's dimensions
        if isinstance(backbone, (str, Path, VisionTransformer)):  # a module is used as it is
            sizes = {} if isinstance(backbone, VisionTransformer) else dict(img_size=img_size, in_chans=in_chans)
            # pretrained=False: a name starts random; a checkpoint's weights are always loaded
            encoder = resolve_backbone(backbone, pretrained=None if pretrained is False else pretrained, **sizes,
                                       **backbone_config)
        elif backbone is None and "embed_dim" in backbone_config:
            cfg = dict(backbone_config)
            init_values = cfg.pop("init_values", None)  # seed API: only affects initialisation
            if init_values is not None:
                cfg["layer_scale_init"] = init_values
            encoder = create_dinov2_encoder(img_size=img_size or 518, in_chans=in_chans, pretrained=pretrained,
                                            pretrained_path=cfg.pop("pretrained_path", None), **cfg)
        else:
            raise ConfigError("EoMT needs backbone=<name or VisionTransformer>, or explicit ViT dimensions "
                              "(patch_size=..., embed_dim=..., depth=..., num_heads=...)")
        if num_blocks < 1 or num_blocks > len(encoder.blocks):
            raise ConfigError(f"num_blocks={num_blocks} must be between 1 and the backbone depth {len(encoder.blocks)}")
        if num_classes < 1 or num_q < 1:
            raise ConfigError(f"num_classes ({num_classes}) and num_q ({num_q}) must be positive")
        self.encoder = encoder
        if encoder.mask_token is not None:  # EoMT never masks patches: keep it out of the optimiser and DDP
            encoder.mask_token.requires_grad_(False)
        D = encoder.embed_dim
        self.num_classes, self.num_q, self.num_blocks = num_classes, num_q, num_blocks
        self.mask_stride = mask_stride
        self.masked_attn_enabled = masked_attn_enabled
        self.register_buffer("attn_mask_probs", torch.ones(num_blocks))
        self.q = nn.Embedding(num_q, D)
        self.class_head = nn.Linear(D, num_classes + 1)
        n_up = num_upscale_blocks(encoder.patch_size, mask_stride)
        if upscale_dims is not None:
            upscale_dims = [int(c) for c in upscale_dims]
            if len(upscale_dims) != n_up or min(upscale_dims, default=1) < 1:
                raise ConfigError(f"upscale_dims={upscale_dims} needs one positive width per ScaleBlock; this "
                                  f"patch size and mask_stride give {n_up} blocks")
        dims = [D] + (upscale_dims if upscale_dims is not None else [D] * n_up)
        self.mask_head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D), nn.GELU(), nn.Linear(D, dims[-1]))
        self.upscale = nn.Sequential(*[ScaleBlock(a, b) for a, b in zip(dims[:-1], dims[1:])])
        if (pixel_mean is None) != (pixel_std is None):
            raise ConfigError("give both pixel_mean and pixel_std, or neither")
        if pixel_mean is not None:
            self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), persistent=False)
        else:
            self.pixel_mean = self.pixel_std = None
        self.grad_checkpointing = False
        self.init_config = dict(num_classes=num_classes, num_q=num_q, num_blocks=num_blocks, mask_stride=mask_stride,
                                masked_attn_enabled=masked_attn_enabled, pixel_mean=pixel_mean, pixel_std=pixel_std)
        if upscale_dims is not None:  # official models' config.json stays as it was
            self.init_config["upscale_dims"] = upscale_dims
        self.sparse_group = 64  # forward_sparse runs this many windows (of similar kept counts) together

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone blocks and the upscaler in the backward pass (less training memory)."""
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    # -------------------------------------------------------------------------------------- helpers
    @property
    def img_size(self) -> tuple[int, int]:
        return self.encoder.config.img_size

    def mask_size(self, H: int, W: int) -> tuple[int, int]:
        """Output mask size for an input of H x W."""
        gh, gw = -(-H // self.encoder.patch_size), -(-W // self.encoder.patch_size)
        if self.mask_stride is None:
            f = 2 ** len(self.upscale)
            return gh * f, gw * f
        return -(-H // self.mask_stride), -(-W // self.mask_stride)

    def predict(self, x: torch.Tensor, grid: tuple[int, int], out_size: tuple[int, int]):
        """Mask and class logits from normed tokens ``[Q | prefix | patches]``."""
        B = x.shape[0]
        q = x[:, :self.num_q]
        class_logits = self.class_head(q)
        patches = x[:, self.num_q + self.encoder.num_prefix_tokens:]
        feats = patches.transpose(1, 2).reshape(B, patches.shape[-1], *grid)  # NLC -> NCHW view of channels-last memory
        if self.grad_checkpointing and torch.is_grad_enabled():
            feats = checkpoint(self.upscale, feats, use_reentrant=False)
        else:
            feats = self.upscale(feats)
        mask_logits = mask_products(self.mask_head(q), feats)
        if tuple(mask_logits.shape[-2:]) != tuple(out_size):
            mask_logits = F.interpolate(mask_logits, size=out_size, mode="bilinear", align_corners=False)
        return mask_logits, class_logits

    def attn_mask(self, mask_logits: torch.Tensor, grid: tuple[int, int], num_tokens: int, prob: float
                  ) -> torch.Tensor:
        """Boolean mask for the query rows only: [B, 1, Q, N], True = may attend.

        Queries see all queries and prefix tokens; a query sees a patch where its mask logit (bilinearly
        resized to the patch grid) is > 0. With probability ``1 - prob`` a query drops its mask.
        """
        B, Q = mask_logits.shape[:2]
        start = Q + self.encoder.num_prefix_tokens
        mask = torch.ones(B, Q, num_tokens, dtype=torch.bool, device=mask_logits.device)
        small = F.interpolate(mask_logits.detach(), size=grid, mode="bilinear")
        mask[:, :, start:] = small.flatten(2) > 0
        if prob < 1:
            drop = torch.rand(B, Q, device=mask.device) > prob
            mask[drop] = True
        return mask[:, None]

    # ------------------------------------------------------------------------------------- forward
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the model's input normalisation applied (unchanged when it has none)."""
        if self.pixel_mean is None:
            return x
        self.encoder.check_input(x)
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Args:
            x: images [B, in_chans, H, W] (any size the backbone accepts).

        Returns:
            ``(mask_logits_per_layer, class_logits_per_layer)``; the last entries are the final prediction.
        """
        enc = self.encoder
        x = self.normalise(x)
        tokens, grid = enc.prepare_tokens(x)
        out_size = self.mask_size(x.shape[-2], x.shape[-1])
        rope = enc.rope(grid)
        depth = len(enc.blocks)
        first = depth - self.num_blocks
        masks_per_layer: list[torch.Tensor] = []
        classes_per_layer: list[torch.Tensor] = []
        for i in range(depth):
            attn_mask = None
            if i == first:
                tokens = torch.cat([self.q.weight[None].expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], 1)
            if i >= first and self.masked_attn_enabled:
                prob = float(self.attn_mask_probs[i - first])
                if self.training or prob > 0:  # inference with masks annealed away skips this entirely
                    mask_logits, class_logits = self.predict(enc.norm(tokens), grid, out_size)
                    masks_per_layer.append(mask_logits)
                    classes_per_layer.append(class_logits)
                    if prob > 0:
                        attn_mask = self.attn_mask(mask_logits, grid, tokens.shape[1], prob)
            tokens = enc.run_block(i, tokens, grid, rope, attn_mask)
        mask_logits, class_logits = self.predict(enc.norm(tokens), grid, out_size)
        masks_per_layer.append(mask_logits)
        classes_per_layer.append(class_logits)
        return masks_per_layer, classes_per_layer

    def forward_sparse(self, x: torch.Tensor, keep: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sparse-token EoMT: only the patch tokens ``keep`` (bool ``[B, gh, gw]``) of each image go through the
        blocks and the mask decoder; the others are never computed.

        Each image's kept tokens, its prefix tokens and (in the last ``num_blocks`` blocks) the queries attend
        among themselves, exactly as a dense image of those tokens would (positions keep their embeddings; images
        run in groups of ``sparse_group`` of similar kept counts, shorter ones padded with keys masked out). The
        upscaler then runs on the kept tokens' tiles only (:meth:`upscale_tiles`: the dense upscaler with the
        tokens not computed taken as zero features, up to a pixel where computed and other tokens meet), and each
        tile's mask logits come from its own image's queries. So the cost follows the number of kept tokens; with
        every token kept the masks are the dense model's. With few kept tokens a densely trained model loses the
        context it was trained with: a model fine-tuned through this path
        (:func:`vitkit.apps.peaks.sparse.fine_tune_sparse`) is what it is for. Images with no kept token are not
        computed at all (in training they still run their prefix and queries, so their class loss counts).
        Needs masked attention annealed away (attn_mask_probs all 0), as after training.

        Returns ``(tiles, class_logits, where)``: mask logits ``[T, Q, s, s]`` of the ``T`` kept tokens (``s`` =
        ``tile_size``), class logits ``[B, Q, num_classes + 1]`` (zeros for images with no kept token) and
        ``where`` ``[T, 3]`` (image, patch row, patch column) of each tile, images in order.
        """
        if self.masked_attn_enabled and bool((self.attn_mask_probs > 0).any()):
            raise ConfigError("forward_sparse needs masked attention annealed away (attn_mask_probs all 0), as "
                              "after training")
        enc = self.encoder
        x = self.normalise(x)
        B = x.shape[0]
        keep = keep.to(device=x.device, dtype=torch.bool)
        counts = keep.flatten(1).sum(1)
        live = torch.arange(B, device=x.device) if self.training else torch.nonzero(counts > 0).flatten()
        live = live[torch.argsort(counts[live], stable=True)]  # groups of similar counts: little padding
        tokens, grid = enc.prepare_tokens(x[live])
        if tuple(keep.shape) != (B, *grid):
            raise ConfigError(f"forward_sparse: keep has shape {tuple(keep.shape)}, expected {(B, *grid)} (images, "
                              f"patch rows, patch columns)")
        D = tokens.shape[-1]
        rope = enc.rope(grid)
        P, Q, first = enc.num_prefix_tokens, self.num_q, len(enc.blocks) - self.num_blocks
        keep, counts = keep[live].flatten(1), counts[live]
        classes = tokens.new_zeros(B, Q, self.num_classes + 1)
        embeds = tokens.new_zeros(B, Q, self.mask_head[-1].out_features)
        feats, image, pos = [], [], []
        for start in range(0, len(live), self.sparse_group):
            group = torch.arange(start, min(start + self.sparse_group, len(live)), device=x.device)
            n, K = len(group), int(counts[group].max())
            # each image's kept tokens first (in grid order), then padding (other tokens, masked as keys)
            order = torch.argsort((~keep[group]).to(torch.uint8), dim=1, stable=True)[:, :K]
            valid = torch.arange(K, device=x.device)[None] < counts[group][:, None]
            sub = torch.cat([tokens[group, :P], tokens[group, P:].gather(1, order[..., None].expand(-1, -1, D))], 1)
            sub_rope = None if rope is None else tuple(t[order][:, None] for t in rope)  # [n, 1, K, d] per image
            padded = not bool(valid.all())
            for i in range(len(enc.blocks)):
                if i == first:
                    sub = torch.cat([self.q.weight[None].expand(n, -1, -1).to(sub.dtype), sub], 1)
                mask = None
                if padded:  # [n, 1, L, L]: every token may attend to the real ones only
                    keys = torch.cat([valid.new_ones(n, sub.shape[1] - K), valid], 1)
                    mask = keys[:, None, None, :].expand(n, 1, sub.shape[1], sub.shape[1])
                sub = enc.run_block(i, sub, grid, sub_rope, mask)
            sub = enc.norm(sub)
            q = sub[:, :Q]
            classes = classes.index_copy(0, live[group], self.class_head(q).to(classes.dtype))
            embeds = embeds.index_copy(0, live[group], self.mask_head(q).to(embeds.dtype))
            feats.append(sub[:, Q + P:][valid])
            image.append(live[group][:, None].expand(-1, K)[valid])
            pos.append(order[valid])
        s = self.tile_size
        if sum(len(f) for f in feats) == 0:
            return tokens.new_zeros(0, Q, s, s), classes, torch.zeros(0, 3, dtype=torch.long, device=x.device)
        image, pos = torch.cat(image), torch.cat(pos)
        by_image = torch.argsort(image * (grid[0] * grid[1]) + pos)  # tiles in image, then grid order
        image, pos = image[by_image], pos[by_image]
        feats = torch.cat(feats)[by_image]
        # decoded in chunks of whole images (a tile's halo comes from its image's tiles) of about TILE_CHUNK tiles
        per = torch.bincount(image, minlength=B).tolist()
        bounds, start = [0], 0
        for count in per:
            if count and start - bounds[-1] >= TILE_CHUNK:
                bounds.append(start)
            start += count
        bounds.append(start)
        up = torch.cat([self.upscale_tiles(feats[a:b], image[a:b], pos[a:b], B, grid)
                        for a, b in zip(bounds[:-1], bounds[1:])])  # [t, s, s, C]
        logits = torch.matmul(up.flatten(1, 2), embeds[image].transpose(1, 2))  # [t, s * s, Q]
        where = torch.stack([image, pos // grid[1], pos % grid[1]], 1)
        return logits.transpose(1, 2).unflatten(-1, (s, s)), classes, where

    def upscale_tiles(self, feats: torch.Tensor, image: torch.Tensor, pos: torch.Tensor, n: int,
                      grid: tuple[int, int]) -> torch.Tensor:
        """The upscaler on the tiles of some patch tokens only: ``feats`` ``[t, D]`` of tokens at flat grid
        positions ``pos`` of images ``image`` (of ``n``) -> ``[t, s, s, C]`` (channels last).

        Every ScaleBlock runs on the tiles alone (its transposed convolution, GELU and LayerNorm2d are per tile)
        except the 3 x 3 convolution, whose 1-pixel halo comes from the neighbouring tiles: a computed neighbour's
        own values, zeros outside the grid (as the dense convolution's padding), and for a token not computed the
        values a token with zero features has amid such tokens (:meth:`empty_tiles`). With every token computed
        this is the dense upscaler exactly; otherwise it is the dense upscaler on the grid with the tokens not
        computed taken as zero features, except within a pixel of where computed and other tokens meet."""
        gh, gw = grid
        t = len(pos)
        lookup = torch.full((n, gh + 2, gw + 2), -2, dtype=torch.long, device=feats.device)  # -2: outside
        lookup[:, 1:-1, 1:-1] = -1  # -1: not computed
        r, c = pos // gw + 1, pos % gw + 1
        lookup[image, r, c] = torch.arange(t, device=feats.device)
        nb = {(dy, dx): lookup[image, r + dy, c + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx}
        nb = {k: torch.where(v < 0, t - 1 - v, v) for k, v in nb.items()}  # -1 -> t (empty), -2 -> t + 1 (zeros)
        y = feats[:, None, None, :]  # channels last throughout: [t, h, h, C]
        for blk, empty in zip(self.upscale, self.empty_tiles()):
            w = blk.conv1.weight  # [C_in, C_out, 2, 2]: each input pixel -> a 2 x 2 block of outputs
            h, C = y.shape[1], w.shape[1]
            act = fusable_activation(blk.act)
            y = linear(y, w.permute(2, 3, 1, 0).reshape(4 * C, -1), blk.conv1.bias.repeat(4), act)
            if act is None:
                y = blk.act(y)
            # the tiles with a 1-pixel halo, and two more: a token not computed (t) and zeros (t + 1)
            pad = y.new_empty(t + 2, 2 * h + 2, 2 * h + 2, C)
            pad[t + 1] = 0
            pad[:t, 1:-1, 1:-1].unflatten(1, (h, 2)).unflatten(3, (h, 2)).copy_(
                y.view(t, h, h, 2, 2, C).permute(0, 1, 3, 2, 4, 5))
            pad[t, 1:-1, 1:-1] = empty.permute(1, 2, 0)
            h = 2 * h
            pad[:t, 0, 1:-1] = pad[nb[-1, 0], h, 1:-1]  # the last row of the tile above
            pad[:t, -1, 1:-1] = pad[nb[1, 0], 1, 1:-1]
            pad[:t, 1:-1, 0] = pad[nb[0, -1], 1:-1, h]
            pad[:t, 1:-1, -1] = pad[nb[0, 1], 1:-1, 1]
            pad[:t, 0, 0] = pad[nb[-1, -1], h, h]
            pad[:t, 0, -1] = pad[nb[-1, 1], h, 1]
            pad[:t, -1, 0] = pad[nb[1, -1], 1, h]
            pad[:t, -1, -1] = pad[nb[1, 1], 1, 1]
            y = F.conv2d(pad[:t].permute(0, 3, 1, 2), blk.conv2.weight, blk.conv2.bias, groups=C).permute(0, 2, 3, 1)
            y = F.layer_norm(y, (C,), blk.norm.weight, blk.norm.bias, blk.norm.eps)
        return y

    def empty_tiles(self) -> list[torch.Tensor]:
        """Per ScaleBlock, the tile ``[C, s, s]`` before its 3 x 3 convolution of a token with zero features amid
        such tokens (from the dense upscaler on a 3 x 3 grid of zeros: the middle token's tile)."""
        y = self.q.weight.new_zeros(1, self.encoder.embed_dim, 3, 3)
        out = []
        for blk in self.upscale:
            y = blk.act(blk.conv1(y))
            s = y.shape[-1] // 3
            out.append(y[0, :, s:2 * s, s:2 * s])
            y = blk.norm(blk.conv2(y))
        return out

    @property
    def tile_size(self) -> int:
        """Side of a patch token's mask tile after the upscaler (``patch_size`` at full resolution)."""
        return 2 ** len(self.upscale)

    # ----------------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` (backbone + head config) and ``model.safetensors``."""
        doc = {"model_type": "vitkit", "architecture": "EoMT", "backbone": self.encoder.config.to_dict(),
               "eomt": self.init_config}
        return write_model_dir(directory, doc, self.state_dict(), metadata={"format": "vitkit_eomt"})

    def load_weights(self, source: str | Path | dict):
        """Strictly load an EoMT checkpoint: HF directory weights, an official tue-mps Lightning
        ``.ckpt`` (``network.encoder.backbone.*`` timm/HF keys, ``network.q.weight``, ...) or vitkit's.

        The checkpoint's input normalisation (official checkpoints: ImageNet ``pixel_mean``/``pixel_std``)
        is adopted when the model was built without one (a warning and a line in the returned report say
        so); other values than the model's for the same channels raise ``CheckpointMismatchError``."""
        return load_eomt_weights(self, source)

    def set_pixel_normalisation(self, pixel_mean: list[float] | None, pixel_std: list[float] | None) -> None:
        """Normalise inputs as ``(x - pixel_mean) / pixel_std`` per channel inside ``forward`` (None, None:
        not at all). Recorded in ``init_config``, so :meth:`save_pretrained` keeps it."""
        if (pixel_mean is None) != (pixel_std is None):
            raise ConfigError("give both pixel_mean and pixel_std, or neither")
        for name in ("pixel_mean", "pixel_std"):  # a buffer, or a plain None attribute
            self._buffers.pop(name, None)
            self.__dict__.pop(name, None)
        if pixel_mean is None:
            self.pixel_mean = self.pixel_std = None
        else:
            c = self.encoder.config.in_chans
            if not len(pixel_mean) == len(pixel_std) == c:
                raise ConfigError(f"pixel_mean/pixel_std need {c} values for in_chans={c}, got "
                                  f"{len(pixel_mean)}/{len(pixel_std)}")
            dev = self.q.weight.device
            for name, v in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
                t = torch.tensor([float(x) for x in v], dtype=torch.float32, device=dev).view(1, -1, 1, 1)
                self.register_buffer(name, t, persistent=False)
        self.init_config.update(pixel_mean=None if pixel_mean is None else [float(x) for x in pixel_mean],
                                pixel_std=None if pixel_std is None else [float(x) for x in pixel_std])

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> EoMT:
        """Load an EoMT from a vitkit EoMT directory or an HF ``EomtForUniversalSegmentation`` /
        ``EomtDinov3ForUniversalSegmentation`` directory (strict). ``overrides``: ViTConfig fields of the
        encoder (e.g. ``img_size``) or EoMT arguments (e.g. ``masked_attn_enabled``)."""
        directory = Path(directory)
        vit, head = eomt_configs(read_json(directory / "config.json"))
        if "num_upscale_blocks" in head:  # transformers' config: the mask stride those blocks give
            head["mask_stride"] = mask_stride_for(vit["patch_size"], head.pop("num_upscale_blocks"))
        fields = ViTConfig.__dataclass_fields__
        vit.update({k: v for k, v in overrides.items() if k in fields})
        head.update({k: v for k, v in overrides.items() if k not in fields})
        model = cls(VisionTransformer(ViTConfig.from_dict(vit)), **head)
        model.load_weights(find_weights_file(directory))
        return model.eval()
