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
from vitkit.kernels import bmm
from vitkit.layers.norm import LayerNorm, LayerNorm2d
from vitkit.weights.eomt import eomt_configs, load_eomt_weights
from vitkit.weights.export import write_model_dir
from vitkit.weights.io import find_weights_file, read_json


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
        token_scorer_block: give the model a per-token scorer read after this many blocks, for sparse-token
            inference (:meth:`forward_sparse`); its weights and threshold are fitted after training
            (:func:`vitkit.apps.peaks.sparse.fit_token_scorer`). None: no scorer (dense inference only).
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
                 token_scorer_block: int | None = None, **backbone_config: Any):
        super().__init__()
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
        self.token_scorer = None
        self.sparse_group = 8  # forward_sparse runs this many windows (of similar kept counts) together
        if token_scorer_block is not None:
            self.add_token_scorer(token_scorer_block)

    def add_token_scorer(self, block: int) -> None:
        """Give the model a (new, untrained) per-patch-token scorer read after ``block`` blocks, before the
        queries join, and a sparse-token threshold (logit; saved with the weights). :meth:`forward_sparse`
        keeps the tokens scored above it."""
        first = len(self.encoder.blocks) - self.num_blocks
        if not 0 <= int(block) <= first:
            raise ConfigError(f"token_scorer_block={block} must be between 0 (the patch embeddings) and {first} "
                              f"(the blocks before the queries join)")
        D = self.encoder.embed_dim
        dev, dt = self.q.weight.device, self.q.weight.dtype
        # vitkit's LayerNorm: it takes the bf16 tokens of a model cast for inference (cast_for_inference)
        self.token_scorer = nn.Sequential(LayerNorm(D, elementwise_affine=False),
                                          nn.Linear(D, 1, device=dev, dtype=dt))
        self.register_buffer("token_threshold", torch.zeros((), device=dev, dtype=torch.float32))
        self.token_scorer_block = int(block)
        self.init_config["token_scorer_block"] = int(block)

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
    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Args:
            x: images [B, in_chans, H, W] (any size the backbone accepts).

        Returns:
            ``(mask_logits_per_layer, class_logits_per_layer)``; the last entries are the final prediction.
        """
        enc = self.encoder
        if self.pixel_mean is not None:
            enc.check_input(x)
            x = (x - self.pixel_mean) / self.pixel_std
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

    def remove_token_scorer(self) -> None:
        """Drop the token scorer and its threshold (the model saves as one built without them)."""
        self.token_scorer = None
        self._buffers.pop("token_threshold", None)
        self.init_config.pop("token_scorer_block", None)

    def token_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], Any]:
        """Tokens ``[B, prefix + HW, D]`` after the scorer's first ``token_scorer_block`` blocks, the patch grid
        and the RoPE tables (what :meth:`forward_sparse` continues from, and what the scorer is fitted on)."""
        if self.token_scorer is None:
            raise ConfigError("this EoMT has no token scorer: build it with token_scorer_block=k (or call "
                              "add_token_scorer(k)) and fit it (vitkit.apps.peaks.sparse.fit_token_scorer)")
        enc = self.encoder
        if self.pixel_mean is not None:
            enc.check_input(x)
            x = (x - self.pixel_mean) / self.pixel_std
        tokens, grid = enc.prepare_tokens(x)
        rope = enc.rope(grid)
        for i in range(self.token_scorer_block):
            tokens = enc.run_block(i, tokens, grid, rope)
        return tokens, grid, rope

    def token_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scorer logits ``[B, HW]`` of the patch tokens in ``tokens`` (from :meth:`token_features`)."""
        return self.token_scorer(tokens[:, self.encoder.num_prefix_tokens:]).squeeze(-1).float()

    def forward_sparse(self, x: torch.Tensor, threshold: float | None = None, keep: torch.Tensor | None = None
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Sparse-token inference: the blocks after ``token_scorer_block`` and the mask decoder run only on patch
        tokens scored above ``threshold`` (default: the fitted ``token_threshold``) and their 8 neighbours, or on
        the tokens ``keep`` (bool ``[B, gh, gw]``) when given.

        Images none of whose tokens is kept skip the rest of the model. The others go on in groups of
        ``sparse_group`` images of similar kept counts, as ``[queries | prefix | K patches]`` with K the group's
        largest count: an image with fewer kept tokens fills its K with its next-best scored tokens (real tokens,
        so no attention mask and no padding; it only sees more of its context). The computed tokens are scattered
        back onto the patch grid (the others zero) for the upscaler; pixels of tokens not computed get mask logits
        of -1e4 for every query, i.e. no class at all (:func:`~vitkit.tasks.postprocess.semantic_probs` gives 0).
        Needs masked attention annealed away (an inference model). Returns ``([mask_logits], [class_logits],
        computed)`` with ``computed`` bool ``[B, gh, gw]``: the tokens that went through the whole model.
        """
        if self.training:
            raise ConfigError("forward_sparse is inference only (call .eval())")
        if self.masked_attn_enabled and bool((self.attn_mask_probs > 0).any()):
            raise ConfigError("forward_sparse needs masked attention annealed away (attn_mask_probs all 0), as "
                              "after training")
        enc = self.encoder
        tokens, grid, rope = self.token_features(x)
        B, N, D = tokens.shape
        P, Q, HW = enc.num_prefix_tokens, self.num_q, grid[0] * grid[1]
        scores = self.token_scores(tokens)
        if keep is None:
            thr = float(self.token_threshold) if threshold is None else float(threshold)
            keep = F.max_pool2d((scores > thr).view(B, 1, *grid).float(), 3, stride=1, padding=1)[:, 0] > 0
        elif tuple(keep.shape) != (B, *grid):
            raise ConfigError(f"forward_sparse: keep has shape {tuple(keep.shape)}, expected {(B, *grid)} (images, "
                              f"patch rows, patch columns)")
        keep = keep.to(torch.bool).flatten(1).clone()
        counts = keep.sum(1)
        live = torch.nonzero(counts > 0).flatten()
        out_size = self.mask_size(x.shape[-2], x.shape[-1])
        masks = tokens.new_full((B, Q, *out_size), -1e4)
        classes = tokens.new_zeros(B, Q, self.num_classes + 1)
        if len(live) == 0:
            return [masks], [classes], keep.view(B, *grid)
        first = len(enc.blocks) - self.num_blocks
        # images in order of kept-token count, in groups: one crowded image does not make every image of the
        # batch compute its token count
        live = live[torch.argsort(counts[live], stable=True)]
        for group in live.split(self.sparse_group):
            n, K = len(group), int(counts[group].max())
            # the kept tokens first, then the best-scored others
            order = torch.topk(scores[group].masked_fill(keep[group], float("inf")), K, dim=1).indices
            keep[group] = keep[group].scatter(1, order, True)
            sub = torch.cat([tokens[group, :P], tokens[group, P:].gather(1, order[..., None].expand(-1, -1, D))], 1)
            sub_rope = None if rope is None else tuple(t[order][:, None] for t in rope)  # [n, 1, K, d] per image
            for i in range(self.token_scorer_block, len(enc.blocks)):
                if i == first:
                    sub = torch.cat([self.q.weight[None].expand(n, -1, -1).to(sub.dtype), sub], 1)
                sub = enc.run_block(i, sub, grid, sub_rope)
            sub = enc.norm(sub)
            q = sub[:, :Q]
            feats = sub.new_zeros(n, HW, D).scatter_(1, order[..., None].expand(-1, -1, D), sub[:, Q + P:])
            logits = mask_products(self.mask_head(q), self.upscale(feats.transpose(1, 2).reshape(n, D, *grid)))
            if tuple(logits.shape[-2:]) != tuple(out_size):
                logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            px = F.interpolate(keep[group].view(n, 1, *grid).float(), size=out_size, mode="nearest")[:, 0] > 0
            masks[group] = logits.masked_fill(~px[:, None], -1e4).to(masks.dtype)
            classes[group] = self.class_head(q).to(classes.dtype)
        keep = keep.view(B, *grid)
        return [masks], [classes], keep

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
