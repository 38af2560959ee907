"""VGGT-style multi-frame aggregator on vitkit's backbone and block.

``Aggregator`` follows facebookresearch/vggt's ``vggt/models/aggregator.py`` in behaviour and key names
(``patch_embed``, ``camera_token``, ``register_token``, ``frame_blocks.{i}``, ``global_blocks.{i}``):

1. images ``[B, S, 3, H, W]`` in [0, 1] are normalised with ImageNet mean/std inside the model;
2. every frame goes through the patch embedding: a whole vitkit backbone (as VGGT runs DINOv2's
   ``forward_features`` and keeps ``x_norm_patchtokens``: all blocks, the final norm, patch tokens only;
   the backbone's own CLS/register tokens are dropped) or a plain strided conv (``"conv"``);
3. each frame gets a camera token and ``R`` register tokens in front of its patches, from one learned set
   for frame 0 (the reference frame) and another shared by all other frames;
4. ``depth`` steps alternate frame attention (tokens ``[B*S, P, C]``: each frame alone) and global
   attention (``[B, S*P, C]``: all frames of a sequence together), with 2-D RoPE on patch tokens only;
5. output ``k`` concatenates the frame-block and global-block outputs of step ``k`` on channels:
   ``[B, S, P, 2C]`` with ``P = 1 + R + H/p * W/p``; ``patch_start_idx = 1 + R``.

Differences from VGGT, on purpose: vitkit's RoPE (DINOv3's: patch-centre coordinates normalised to
[-1, 1], ``rope_freq`` as the period base) instead of VGGT's integer-position RoPE2D; special tokens are
left unrotated (VGGT puts them at position 0, which is also no rotation); ``intermediate_layers`` keeps
only the outputs asked for; nothing is downloaded unless asked and a missing weight is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.backbones import hub_functions
from vitkit.backbones.presets import PRESETS
from vitkit.backbones.resolve import resolve_backbone
from vitkit.backbones.vit import VisionTransformer
from vitkit.errors import ConfigError, InputError, WeightsNotFoundError
from vitkit.layers import Block, PatchEmbed, RopeEmbedding

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _frame_tokens(tokens: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """[1, 2, X, C] learned tokens -> [B*S, X, C]: index 0 for frame 0, index 1 for frames 1..S-1."""
    X, C = tokens.shape[2:]
    first = tokens[:, :1].expand(B, 1, X, C)
    others = tokens[:, 1:].expand(B, S - 1, X, C)
    return torch.cat([first, others], dim=1).reshape(B * S, X, C)


class Aggregator(nn.Module):
    """Alternating frame/global attention over image sequences (VGGT's aggregator).

    Args:
        img_size: nominal input size (int or (H, W)); a backbone patch embedding is built for it (its
            position embeddings are resized to this grid at load time). Inputs of any size divisible by the
            patch size are accepted.
        patch_size: patch size. A backbone preset with another patch size has its patch embedding
            resampled (FlexiViT) when weights are loaded.
        embed_dim: token width ``C``; must equal the backbone's width.
        depth: number of frame blocks (= number of global blocks = number of outputs).
        num_heads: attention heads of the aggregator blocks.
        mlp_ratio: FFN hidden width / ``embed_dim``.
        n_storage_tokens: register tokens per frame ``R`` (``num_register_tokens`` is VGGT's name for it).
        qkv_bias, proj_bias, ffn_bias: biases of the aggregator blocks.
        patch_embed: a vitkit preset name (``"dinov2_vitl14_reg"``, ``"dinov3_vitl16"``, ... see
            ``vitkit.list_models()``), ``"conv"`` for a plain strided conv, or a ready
            :class:`~vitkit.VisionTransformer`.
        aa_order: order of the two attention kinds within a step: ``["frame", "global"]`` or
            ``["global", "frame"]``. Outputs always put the frame channels first.
        aa_block_size: blocks of one kind run before switching to the other; ``depth`` must be a multiple.
        qk_norm: LayerNorm on each head's queries and keys (VGGT-1B uses True).
        rope_freq: RoPE period base; ``None`` or <= 0 disables RoPE.
        rope_normalize_coords: how patch coordinates are normalised (``"separate"``, ``"max"``, ``"min"``).
        init_values: LayerScale init of the aggregator blocks (None or 0: no LayerScale).
        intermediate_layers: indices (negative allowed) of the outputs to keep; the output list then holds
            exactly these, in this order, and no other output is stored. Blocks after the last requested
            output are not run (their parameters get no gradient: request the last layer when training them).
            None keeps all ``depth`` outputs.
        pretrained_patch_embed: False (random init, the default: nothing is loaded unless asked), True (the
            preset's official weights from vitkit's cache; an error says where to put a missing file), or a
            checkpoint path.
        patch_embed_kwargs: extra :func:`vitkit.create_backbone` arguments for a preset patch embedding
            (e.g. ``depth`` or ``drop_path_rate``).
        in_chans: input channels.
        pixel_mean, pixel_std: per-channel normalisation applied inside (VGGT: ImageNet statistics, inputs
            in [0, 1]); None for both leaves inputs as they are. Required explicitly when ``in_chans != 3``.

    ``forward(images [B, S, in_chans, H, W]) -> (output_list, patch_start_idx)``.
    """

    def __init__(self, img_size: int | tuple[int, int] = 518, patch_size: int = 14, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0, n_storage_tokens: int | None = None,
                 *, num_register_tokens: int | None = None, qkv_bias: bool = True, proj_bias: bool = True,
                 ffn_bias: bool = True, patch_embed: str | VisionTransformer = "dinov2_vitl14_reg",
                 aa_order: Sequence[str] = ("frame", "global"), aa_block_size: int = 1, qk_norm: bool = False,
                 rope_freq: float | None = 100, rope_normalize_coords: str = "separate",
                 init_values: float | None = 0.01, intermediate_layers: Sequence[int] | None = None,
                 pretrained_patch_embed: bool | str | Path = False, patch_embed_kwargs: dict[str, Any] | None = None,
                 in_chans: int = 3, pixel_mean: Sequence[float] | None = IMAGENET_MEAN,
                 pixel_std: Sequence[float] | None = IMAGENET_STD, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        R = self._check_arguments(img_size, patch_size, embed_dim, depth, num_heads, n_storage_tokens,
                                  num_register_tokens, aa_order, aa_block_size, rope_freq, in_chans, pixel_mean,
                                  pixel_std)
        aa_order = list(aa_order)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        use_rope = rope_freq is not None and rope_freq > 0

        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_size, self.in_chans = patch_size, in_chans
        self.num_register_tokens = R
        self.aa_order, self.aa_block_size = aa_order, aa_block_size
        self.patch_start_idx = 1 + R
        self.intermediate_layers = None if intermediate_layers is None else list(intermediate_layers)
        _ = self.output_layers  # validates intermediate_layers now rather than at the first forward
        self.grad_checkpointing = False

        self.patch_embed = self._build_patch_embed(patch_embed, pretrained_patch_embed, patch_embed_kwargs or {}, dd)

        self.rope_embed = (RopeEmbedding(embed_dim // num_heads, base=float(rope_freq),
                                         normalize_coords=rope_normalize_coords, device=device)
                           if use_rope else None)

        def block() -> Block:
            # LayerNorm eps 1e-5 (torch's default) as VGGT's blocks and qk-norms
            return Block(embed_dim, num_heads, int(embed_dim * mlp_ratio), qkv_bias=qkv_bias, proj_bias=proj_bias,
                         ffn_bias=ffn_bias, qk_norm=qk_norm, layer_scale_init=init_values or None,
                         norm_eps=1e-5, **dd)

        self.frame_blocks = nn.ModuleList([block() for _ in range(depth)])
        self.global_blocks = nn.ModuleList([block() for _ in range(depth)])
        # index 0: the first (reference) frame; index 1: every other frame
        self.camera_token = nn.Parameter(torch.empty(1, 2, 1, embed_dim, **dd))
        self.register_token = nn.Parameter(torch.empty(1, 2, R, embed_dim, **dd)) if R else None
        if pixel_mean is not None:
            self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32, device=device)
                                 .view(1, 1, -1, 1, 1), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32, device=device)
                                 .view(1, 1, -1, 1, 1), persistent=False)
        else:
            self.pixel_mean = self.pixel_std = None
        self.init_weights()

    @staticmethod
    def _check_arguments(img_size, patch_size, embed_dim, depth, num_heads, n_storage_tokens, num_register_tokens,
                         aa_order, aa_block_size, rope_freq, in_chans, pixel_mean, pixel_std) -> int:
        """Refuse inconsistent arguments (before anything is built); returns the register tokens per frame."""
        if n_storage_tokens is not None and num_register_tokens is not None and n_storage_tokens != num_register_tokens:
            raise ConfigError(f"n_storage_tokens={n_storage_tokens} and num_register_tokens={num_register_tokens} "
                              f"name the same thing (register tokens per frame); pass one")
        R = next((v for v in (n_storage_tokens, num_register_tokens) if v is not None), 4)
        if R < 0:
            raise ConfigError(f"n_storage_tokens must be >= 0, got {R}")
        if sorted(aa_order) != ["frame", "global"]:
            raise ConfigError(f"aa_order must hold 'frame' and 'global' once each, e.g. ['frame', 'global']; "
                              f"got {list(aa_order)}")
        if depth < 1 or aa_block_size < 1 or depth % aa_block_size:
            raise ConfigError(f"depth ({depth}) must be a positive multiple of aa_block_size ({aa_block_size})")
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if size[0] % patch_size or size[1] % patch_size:
            raise ConfigError(f"img_size {size} is not divisible by patch_size {patch_size}")
        use_rope = rope_freq is not None and rope_freq > 0
        if use_rope and (embed_dim // num_heads) % 4:
            raise ConfigError(f"RoPE needs a head width divisible by 4; embed_dim/num_heads = "
                              f"{embed_dim // num_heads}. Change num_heads or pass rope_freq=None")
        if (pixel_mean is None) != (pixel_std is None):
            raise ConfigError("give both pixel_mean and pixel_std, or neither")
        if pixel_mean is not None and not len(pixel_mean) == len(pixel_std) == in_chans:
            raise ConfigError(f"pixel_mean/pixel_std need {in_chans} values for in_chans={in_chans}, got "
                              f"{len(pixel_mean)}/{len(pixel_std)}; pass statistics of your data, or None for "
                              f"inputs that are already normalised")
        return R

    # ------------------------------------------------------------------------------------------ build
    def _build_patch_embed(self, patch_embed: str | nn.Module, pretrained: bool | str | Path,
                           kwargs: dict[str, Any], dd: dict[str, Any]) -> nn.Module:
        if isinstance(patch_embed, VisionTransformer):
            if pretrained not in (False, None) or kwargs:
                raise ConfigError("pretrained_patch_embed / patch_embed_kwargs apply to a preset name; load weights "
                                  "into the VisionTransformer you pass yourself")
            module = patch_embed
        elif not isinstance(patch_embed, str):
            raise ConfigError(f"patch_embed must be a vitkit preset name, 'conv' or a VisionTransformer; got "
                              f"{type(patch_embed).__name__}")
        elif patch_embed == "conv":
            if pretrained not in (False, None) or kwargs:
                raise ConfigError("patch_embed='conv' is a randomly initialised strided conv: it takes no "
                                  "pretrained_patch_embed or patch_embed_kwargs")
            return PatchEmbed(self.patch_size, self.in_chans, self.embed_dim, **dd)
        else:
            if patch_embed not in PRESETS:
                raise ConfigError(self._unknown_preset(patch_embed))
            where = f"Aggregator(patch_embed={patch_embed!r}, pretrained_patch_embed={pretrained!r})"
            if pretrained is True and patch_embed in hub_functions.__all__:
                # DINOv3's gated files: the hub functions' search (incl. a cached HF snapshot) and wording
                pretrained = hub_functions.official_weights(
                    patch_embed.removeprefix("dinov3_"), fn=where,
                    alternative="pretrained_patch_embed='<path of the file>'",
                    no_weights="pretrained_patch_embed=False")
            try:
                module = resolve_backbone(patch_embed, pretrained=pretrained, img_size=self.img_size,
                                          in_chans=self.in_chans, patch_size=self.patch_size, **kwargs)
            except WeightsNotFoundError as e:
                msg = str(e).replace("pretrained=<path>", "pretrained_patch_embed=<path>")
                raise WeightsNotFoundError(f"{where}: " + msg.replace("pretrained=False", "pretrained_patch_embed="
                                                                      "False")) from e
            if dd["device"] is not None or dd["dtype"] is not None:
                module = module.to(**{k: v for k, v in dd.items() if v is not None})
        if module.embed_dim != self.embed_dim:
            raise ConfigError(f"patch_embed gives {module.embed_dim}-dim tokens but embed_dim={self.embed_dim}; "
                              f"set embed_dim={module.embed_dim} (and a num_heads that divides it) or pick a "
                              f"backbone of width {self.embed_dim}")
        if module.patch_size != self.patch_size:
            raise ConfigError(f"patch_embed has patch size {module.patch_size} but patch_size={self.patch_size}")
        if module.config.in_chans != self.in_chans:
            raise ConfigError(f"patch_embed takes {module.config.in_chans} channels but in_chans={self.in_chans}")
        if module.mask_token is not None:  # never used here: keep it out of the optimiser and DDP
            module.mask_token.requires_grad_(False)
        return module

    @staticmethod
    def _unknown_preset(name: str) -> str:
        import difflib

        msg = f"unknown patch_embed {name!r}: expected 'conv', a VisionTransformer or a vitkit preset name"
        if name.startswith("dinov3_"):
            msg += (". DINOv3 models have patch size 16 and always 4 storage (register) tokens, so their names "
                    "have no '_reg' suffix and there is no /14 DINOv3")
        close = difflib.get_close_matches(name.replace("14_reg", "16").replace("_reg", ""), PRESETS, n=3)
        if close:
            msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
        return msg + " (vitkit.list_models() lists them)"

    def init_weights(self) -> None:
        """Truncated-normal linear weights and zero biases in the aggregator blocks, std 1e-6 special
        tokens (as VGGT). The patch embedding keeps its own (possibly pretrained) weights."""
        for m in [*self.frame_blocks.modules(), *self.global_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.camera_token, std=1e-6)
        if self.register_token is not None:
            nn.init.normal_(self.register_token, std=1e-6)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block (aggregator and backbone) in the backward pass instead of storing its
        activations (VGGT does this whenever it trains)."""
        self.grad_checkpointing = enable
        if isinstance(self.patch_embed, VisionTransformer):
            self.patch_embed.set_grad_checkpointing(enable)

    # ---------------------------------------------------------------------------------------- helpers
    @property
    def output_layers(self) -> list[int]:
        """The non-negative indices of the outputs ``forward`` returns, in order."""
        if self.intermediate_layers is None:
            return list(range(self.depth))
        idx = [int(i) for i in self.intermediate_layers]
        bad = [i for i in idx if not -self.depth <= i < self.depth]
        if bad or not idx:
            raise ConfigError(f"intermediate_layers {self.intermediate_layers} must be a non-empty list of indices "
                              f"in [-{self.depth}, {self.depth}) for depth {self.depth}")
        idx = [i % self.depth for i in idx]
        if len(set(idx)) != len(idx):
            raise ConfigError(f"intermediate_layers {self.intermediate_layers} name a layer twice")
        return idx

    def check_input(self, images: torch.Tensor) -> tuple[int, int, int, int]:
        """Validate a batch of sequences and return ``(B, S, H, W)``."""
        if not isinstance(images, torch.Tensor):
            raise InputError(f"expected a torch.Tensor [B, S, {self.in_chans}, H, W], got {type(images).__name__}")
        if images.ndim != 5:
            hint = {3: "a single image [C, H, W] needs images[None, None]",
                    4: "one sequence [S, C, H, W] needs images[None]; single images [B, C, H, W] need "
                       "images[:, None]"}.get(images.ndim, "")
            raise InputError(f"expected images [B, S, {self.in_chans}, H, W] (batch, frames, channels, height, "
                             f"width), got a {images.ndim}-D tensor of shape {tuple(images.shape)}"
                             + (f"; {hint}" if hint else ""))
        if not images.is_floating_point():
            raise InputError(f"expected floating-point images in [0, 1], got dtype {images.dtype}; convert with "
                             f"images.float() / 255 (the aggregator normalises with pixel_mean/pixel_std inside)")
        B, S, C, H, W = images.shape
        if B == 0 or S == 0:
            raise InputError(f"empty batch or sequence: images of shape {tuple(images.shape)}")
        if C != self.in_chans:
            raise InputError(f"expected {self.in_chans} channels at dim 2 of [B, S, C, H, W], got {C} (shape "
                             f"{tuple(images.shape)}); build the Aggregator with in_chans={C} or fix the layout")
        p = self.patch_size
        if H % p or W % p:
            raise InputError(f"image size {H}x{W} is not divisible by the patch size {p}; crop to "
                             f"{H // p * p}x{W // p * p} or pad to {-(-H // p) * p}x{-(-W // p) * p}")
        return B, S, H, W

    def rope_tables(self, grid: tuple[int, int], S: int):
        """``(frame_rope, global_rope)``: ``(sin, cos)`` pairs for the frame layout (the ``H*W`` patch rows;
        ``apply_rope`` leaves the leading camera/register tokens alone) and for the global layout ``S * P``
        rows, where each frame's camera/register rows are sin 0, cos 1 (no rotation). None without RoPE."""
        if self.rope_embed is None:
            return None, None
        sin, cos = self.rope_embed(*grid)
        n = self.patch_start_idx
        g_sin = torch.cat([sin.new_zeros(n, sin.shape[1]), sin]).repeat(S, 1)
        g_cos = torch.cat([cos.new_ones(n, cos.shape[1]), cos]).repeat(S, 1)
        return (sin, cos), (g_sin, g_cos)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise, patch-embed and prepend the special tokens: ``[B*S, P, C]`` tokens."""
        B, S, H, W = self.check_input(images)
        x = images
        if self.pixel_mean is not None:
            x = (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        x = x.reshape(B * S, self.in_chans, H, W)
        pe = self.patch_embed
        if isinstance(pe, VisionTransformer):
            # the backbone's forward_features, keeping only the normed patch tokens
            t, grid = pe.prepare_tokens(x)
            rope = pe.rope(grid)
            for i in range(len(pe.blocks)):
                t = pe.run_block(i, t, grid, rope)
            patches = pe.final_norm(t)[:, pe.num_prefix_tokens:]
        else:
            patches = pe(x)
        special = [_frame_tokens(self.camera_token, B, S)]
        if self.register_token is not None:
            special.append(_frame_tokens(self.register_token, B, S))
        return torch.cat([t.to(patches.dtype) for t in special] + [patches], dim=1)

    def _run(self, blk: nn.Module, x: torch.Tensor, rope) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, rope, None, use_reentrant=False)
        return blk(x, rope)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """Args:
            images: ``[B, S, in_chans, H, W]`` in [0, 1] (normalised inside with pixel_mean/pixel_std);
                H and W divisible by the patch size, any aspect ratio.

        Returns:
            ``(output_list, patch_start_idx)``: one ``[B, S, P, 2C]`` tensor per kept layer (all ``depth``
            layers, or exactly ``intermediate_layers`` in their order), channels ``[:C]`` from the frame
            block and ``[C:]`` from the global block of that layer; tokens ``[0]`` camera,
            ``[1:patch_start_idx]`` registers, ``[patch_start_idx:]`` patches in row-major order.
        """
        wanted = self.output_layers
        keep, last = set(wanted), max(wanted)
        tokens = self.embed(images)
        B, S = images.shape[:2]
        P, C = tokens.shape[1:]
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        frame_rope, global_rope = self.rope_tables(grid, S)
        kept: dict[int, torch.Tensor] = {}
        bs = self.aa_block_size
        for step in range(self.depth // bs):
            first = step * bs
            if first > last:  # nothing asked for beyond this point
                break
            outs: dict[str, list[torch.Tensor | None]] = {}
            for kind in self.aa_order:
                if kind == "frame":
                    tokens = tokens.reshape(B * S, P, C)
                    blocks, rope = self.frame_blocks, frame_rope
                else:
                    tokens = tokens.reshape(B, S * P, C)
                    blocks, rope = self.global_blocks, global_rope
                outs[kind] = []
                for i in range(first, first + bs):
                    tokens = self._run(blocks[i], tokens, rope)
                    outs[kind].append(tokens if i in keep else None)  # only asked-for outputs stay alive
            for j, (f, g) in enumerate(zip(outs["frame"], outs["global"])):
                if f is not None:
                    kept[first + j] = torch.cat([f.reshape(B, S, P, C), g.reshape(B, S, P, C)], dim=-1)
            del outs
        return [kept[i] for i in wanted], self.patch_start_idx

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, depth={self.depth}, heads={self.num_heads}, "
                f"registers={self.num_register_tokens}, aa_order={self.aa_order}, aa_block_size={self.aa_block_size}, "
                f"rope={self.rope_embed is not None}, intermediate_layers={self.intermediate_layers}")


# ------------------------------------------------------------------------------- seed-compatible API
class DINOv3IntegratedModel(nn.Module):
    """Seed-compatible wrapper (the DINOv3 + VGGT-aggregator integration README): a DINOv3 backbone for
    single images, or an :class:`Aggregator` on it for frame sequences.

    Args:
        dinov3_model: a DINOv3 hub name (``"dinov3_vitb16"``, ``"dinov3_vitl16"``, ...).
        use_aggregator: False: ``forward(images [B, 3, H, W])`` returns ``{"cls_token" [B, D],
            "storage_tokens" [B, R, D], "patch_tokens" [B, HW, D]}``. True: ``forward(video [B, S, 3, H, W])``
            returns ``{"features" [B, S, P, 2D] (the last aggregator layer), "patch_start_idx"}``.
        pretrained, weights: as the hub functions (``vitkit.dinov3_vitl16(pretrained=..., weights=...)``).
        aa_order: the aggregator's attention order.
        backbone_kwargs: extra hub-function / :func:`vitkit.create_backbone` arguments.
        **aggregator_kwargs: extra :class:`Aggregator` arguments (``depth``, ``qk_norm``, ...); its width and
            heads follow the backbone.

    Inputs are in [0, 1] in both modes and normalised with ImageNet mean/std inside. Built in eval mode.
    """

    def __init__(self, dinov3_model: str = "dinov3_vitl16", use_aggregator: bool = False, pretrained: bool = True,
                 weights: Any = None, aa_order: Sequence[str] = ("frame", "global"),
                 backbone_kwargs: dict[str, Any] | None = None, **aggregator_kwargs: Any):
        super().__init__()
        if dinov3_model not in hub_functions.__all__:
            raise ConfigError(f"unknown DINOv3 model {dinov3_model!r}; known: "
                              f"{', '.join(n for n in hub_functions.__all__)}")
        backbone = getattr(hub_functions, dinov3_model)(pretrained=pretrained, weights=weights,
                                                        **(backbone_kwargs or {}))
        self.use_aggregator = use_aggregator
        if use_aggregator:
            c = backbone.config
            kw = dict(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, num_heads=c.num_heads,
                      in_chans=c.in_chans, aa_order=aa_order, intermediate_layers=[-1])
            kw.update(aggregator_kwargs)
            self.aggregator = Aggregator(patch_embed=backbone, **kw)
        else:
            if aggregator_kwargs:
                raise ConfigError(f"aggregator arguments {sorted(aggregator_kwargs)} given with use_aggregator=False")
            self.backbone = backbone
            self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()  # ready for inference, as the hub functions; .train() to fine-tune

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        if self.use_aggregator:
            outputs, start = self.aggregator(images)
            return {"features": outputs[-1], "patch_start_idx": start}
        if images.ndim == 5:
            raise InputError(f"got a sequence batch {tuple(images.shape)} but use_aggregator=False; build with "
                             f"use_aggregator=True for [B, S, C, H, W], or flatten frames with images.flatten(0, 1)")
        self.backbone.check_input(images)
        x = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        f = self.backbone.forward_features(x)
        return {"cls_token": f["x_norm_clstoken"], "storage_tokens": f["x_norm_regtokens"],
                "patch_tokens": f["x_norm_patchtokens"]}
