"""One VisionTransformer for DINOv2, DINOv3, I-JEPA, CLIP vision, ViT and DeiT."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.backbones.config import ViTConfig
from vitkit.errors import InputError
from vitkit.layers import Block, PatchEmbed, RopeEmbedding, make_norm, resample_pos_embed, sincos_2d_pos_embed


class VisionTransformer(nn.Module):
    """A plain pre-norm ViT whose family is entirely decided by its :class:`ViTConfig`.

    Parameter names follow Meta's DINOv2/DINOv3 checkpoints (``cls_token``, ``pos_embed``,
    ``register_tokens``, ``mask_token``, ``patch_embed.proj``, ``blocks.{i}.*``, ``norm``), so the
    Meta format is the identity and every other format is a short rename table.

    Build it with :func:`vitkit.create_backbone` or :func:`vitkit.from_pretrained`, or directly:
    ``VisionTransformer(ViTConfig(...))`` or ``VisionTransformer(embed_dim=384, depth=12, ...)``.
    """

    def __init__(self, config: ViTConfig | None = None, *, device=None, dtype=None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = ViTConfig(**kwargs)
        elif kwargs:
            config = config.replace(**kwargs)
        self.config = c = config
        dd = {"device": device, "dtype": dtype}
        D = c.embed_dim
        self.embed_dim = D
        self.patch_size = c.patch_size
        self.num_register_tokens = c.num_register_tokens
        self.num_prefix_tokens = c.num_prefix_tokens
        self.grad_checkpointing = False
        self.frozen = False
        self._trainable: dict[str, bool] = {}

        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, D, bias=c.patch_bias, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D, **dd)) if c.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D, **dd)) if c.dist_token else None
        self.register_tokens = (nn.Parameter(torch.zeros(1, c.num_register_tokens, D, **dd))
                                if c.num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, D, **dd)) if c.mask_token else None
        gh, gw = c.grid_size
        if c.pos_embed == "none":
            self.pos_embed = None
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, c.num_pos_prefix + gh * gw, D, **dd),
                                          requires_grad=c.pos_embed == "learned")
        self.rope_embed = (RopeEmbedding(c.head_dim, c.rope_base, c.rope_min_period, c.rope_max_period,
                                         c.rope_normalize_coords, c.rope_shift_coords, c.rope_jitter_coords,
                                         c.rope_rescale_coords, device=device)
                           if c.rope else None)
        self.norm_pre = make_norm(c.norm, D, c.norm_eps, **dd) if c.pre_norm else nn.Identity()
        dpr = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]  # linear decay rule
        self.blocks = nn.ModuleList([
            Block(D, c.num_heads, c.ffn_hidden_dim, ffn_layer=c.ffn_layer, act=c.act, qkv_bias=c.qkv_bias,
                  mask_k_bias=c.mask_k_bias, proj_bias=c.proj_bias, ffn_bias=c.ffn_bias, qk_norm=c.qk_norm,
                  layer_scale_init=c.layer_scale_init, norm=c.norm, norm_eps=c.norm_eps, drop_path=dpr[i], **dd)
            for i in range(c.depth)])
        self.norm = make_norm(c.norm, D, c.norm_eps, **dd)
        self.cls_norm = make_norm(c.norm, D, c.norm_eps, **dd) if c.untie_cls_and_patch_norms else None
        self.proj = nn.Linear(D, c.proj_dim, bias=False, **dd) if c.proj_dim else None
        self.init_weights()

    # ------------------------------------------------------------------------------------------- init
    def init_weights(self) -> None:
        """Truncated-normal linear weights, zero biases, small random tokens (as DINOv2/timm)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for t in (self.cls_token, self.dist_token, self.register_tokens):
            if t is not None:
                nn.init.normal_(t, std=1e-6)
        if self.pos_embed is not None:
            with torch.no_grad():
                if self.config.pos_embed == "sincos":
                    table = sincos_2d_pos_embed(self.embed_dim, self.config.grid_size)
                    self.pos_embed[:, self.config.num_pos_prefix:] = table.to(self.pos_embed)
                    self.pos_embed[:, :self.config.num_pos_prefix] = 0
                else:
                    nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------------------------------ freeze
    def freeze(self, frozen: bool = True) -> VisionTransformer:
        """Freeze (or unfreeze) the backbone, the one way every model does it: no gradients, and eval mode
        kept under ``.train()`` (no dropout, drop path or RoPE augmentation in a frozen backbone). Unfreezing
        gives each parameter back the trainability it had (a fixed sin-cos table stays fixed)."""
        if frozen and not self.frozen:
            self._trainable = {n: p.requires_grad for n, p in self.named_parameters()}
            self.requires_grad_(False)
        elif not frozen and self.frozen:
            for n, p in self.named_parameters():
                p.requires_grad_(self._trainable.get(n, True))
        self.frozen = bool(frozen)
        if self.frozen:
            self.eval()
        return self

    def train(self, mode: bool = True) -> VisionTransformer:
        """As ``nn.Module.train``; a frozen backbone stays in eval mode."""
        return super().train(mode and not self.frozen)

    # ------------------------------------------------------------------------------------ input check
    def check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """Validate an image batch and return its patch grid ``(H/p, W/p)``."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a torch.Tensor image batch [B, C, H, W], got {type(x).__name__}")
        if x.ndim != 4:
            hint = {2: "a single [H, W] frame needs x[None, None]",
                    3: "a single [C, H, W] image needs x[None] (or [B, H, W] frames x[:, None])",
                    5: "fold extra axes into the batch, e.g. x.flatten(0, 1) for [B, S, C, H, W]"}.get(x.ndim, "")
            raise InputError(f"expected a 4-D image batch [B, C, H, W], got a {x.ndim}-D tensor of shape "
                             f"{tuple(x.shape)}" + (f"; {hint}" if hint else ""))
        if not x.is_floating_point():
            raise InputError(f"expected a floating-point image batch, got dtype {x.dtype}; convert with "
                             f"x.float() and normalise (e.g. per-frame mean/std) before the model")
        C, H, W = x.shape[1:]
        if H == 0 or W == 0:
            raise InputError(f"image size {H}x{W} has no pixels (input shape {tuple(x.shape)}); every image "
                             f"needs at least one pixel in each direction")
        if C != self.config.in_chans:
            raise InputError(f"model expects in_chans={self.config.in_chans} channels, got {C} "
                             f"(input shape {tuple(x.shape)}); build it with in_chans={C}"
                             + (" (RGB weights are folded to 1 channel by summing)" if C == 1 else ""))
        p = self.patch_size
        if (H % p or W % p) and not self.config.dynamic_pad:
            lo = (H // p * p, W // p * p)
            hi = (-(-H // p) * p, -(-W // p) * p)
            crop = f"crop to {lo[0]}x{lo[1]}, " if lo[0] and lo[1] else ""  # no crop hint below one patch
            raise InputError(f"image size {H}x{W} is not divisible by the patch size {p}; {crop}pad to "
                             f"{hi[0]}x{hi[1]}, or build the model with dynamic_pad=True")
        return -(-H // p), -(-W // p)

    # -------------------------------------------------------------------------------------- embedding
    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings [1, prefix + gh*gw, D] for a patch grid, resampled on the fly if the
        grid differs from the stored one (in the way the weights' source does it)."""
        c = self.config
        n = c.num_pos_prefix
        stored = c.grid_size
        if tuple(grid) == stored:
            return self.pos_embed
        patch = resample_pos_embed(self.pos_embed[:, n:], stored, grid, c.interpolate_offset,
                                   c.interpolate_antialias)
        return torch.cat([self.pos_embed[:, :n], patch], dim=1)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch-embed, mask, add position embeddings and prepend prefix tokens.

        Returns tokens [B, prefix + HW, D] and the patch grid.
        """
        grid = self.check_input(x)
        B = x.shape[0]
        pad_h, pad_w = grid[0] * self.patch_size - x.shape[2], grid[1] * self.patch_size - x.shape[3]
        if pad_h or pad_w:  # dynamic_pad: zero-pad bottom/right
            x = F.pad(x, (0, pad_w, 0, pad_h))
        w = self.patch_embed.proj.weight
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)  # a model cast for low-precision inference takes fp32 images
        x = self.patch_embed(x)
        if masks is not None:
            if self.mask_token is None:
                raise InputError("masks were given but this model has no mask token (config mask_token=False)")
            if masks.shape != x.shape[:2] or masks.dtype != torch.bool:
                raise InputError(f"masks must be a bool tensor of shape {tuple(x.shape[:2])} "
                                 f"[B, num_patches], got {masks.dtype} {tuple(masks.shape)}")
            x = torch.where(masks[..., None], self.mask_token.to(x.dtype)[None], x)
        prefix = []
        if self.pos_embed is not None:
            pos = self.interpolate_pos_encoding(grid).to(x.dtype)
            n = self.config.num_pos_prefix
            x = x + pos[:, n:]
            for i, tok in enumerate(t for t in (self.cls_token, self.dist_token) if t is not None):
                prefix.append((tok + pos[:, i:i + 1]).expand(B, -1, -1))
        else:
            prefix += [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(B, -1, -1))
        if prefix:
            x = torch.cat([p.to(x.dtype) for p in prefix] + [x], dim=1)
        return self.norm_pre(x), grid

    def rope(self, grid: tuple[int, int]):
        """``(sin, cos)`` for a grid, or None for models without RoPE."""
        return None if self.rope_embed is None else self.rope_embed(*grid)

    # ------------------------------------------------------------------------------------------ blocks
    def run_block(self, i: int, x: torch.Tensor, grid: tuple[int, int], rope=None,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run block ``i``. ``rope`` is reused across blocks unless train-time RoPE augmentation is on
        (Meta draws new coordinates for every block)."""
        if self.rope_embed is not None and (rope is None or self.rope_embed.augments):
            rope = self.rope(grid)
        blk = self.blocks[i]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, rope, attn_mask, use_reentrant=False)
        return blk(x, rope, attn_mask)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_norm is None:
            return self.norm(x)
        n = self.num_prefix_tokens
        return torch.cat([self.cls_norm(x[:, :n]), self.norm(x[:, n:])], dim=1)

    def split_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Split [B, N, D] tokens into CLS [B, D], distillation [B, D], registers [B, R, D], patches."""
        i = 0
        out: dict[str, torch.Tensor | None] = {"cls": None, "dist": None}
        if self.cls_token is not None:
            out["cls"] = x[:, 0]
            i = 1
        if self.dist_token is not None:
            out["dist"] = x[:, i]
            i += 1
        out["reg"] = x[:, i:i + self.num_register_tokens]
        out["patch"] = x[:, self.num_prefix_tokens:]
        return out

    # ----------------------------------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, Any]:
        """Run the backbone.

        Args:
            x: images [B, in_chans, H, W], H and W divisible by the patch size.
            masks: optional bool [B, H/p * W/p]; True patches are replaced by the mask token.

        Returns:
            Meta's keys: ``x_norm_clstoken`` [B, D] (None without a CLS token), ``x_norm_regtokens``
            [B, R, D], ``x_norm_patchtokens`` [B, HW, D], ``x_prenorm`` [B, N, D] (all tokens before the
            final norm), ``masks``; plus ``x_norm_disttoken`` for DeiT and ``x_projected`` [B, P] for
            CLIP models with a projection.
        """
        x, grid = self.prepare_tokens(x, masks)
        rope = self.rope(grid)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, grid, rope)
        x_norm = self.final_norm(x)
        parts = self.split_tokens(x_norm)
        out: dict[str, Any] = {
            "x_norm_clstoken": parts["cls"],
            "x_norm_regtokens": parts["reg"],
            "x_norm_patchtokens": parts["patch"],
            "x_prenorm": x,
            "masks": masks,
        }
        if parts["dist"] is not None:
            out["x_norm_disttoken"] = parts["dist"]
        if self.proj is not None and parts["cls"] is not None:
            out["x_projected"] = self.proj(parts["cls"])
        return out

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, Any]:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x, masks)

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True,
                                return_extra_tokens: bool = False) -> tuple:
        """Outputs of selected blocks, as Meta's DINOv2/DINOv3 ``get_intermediate_layers``.

        Args:
            x: images [B, C, H, W].
            n: the last ``n`` blocks (int) or explicit 0-based block indices (negative allowed), returned
                in block order.
            reshape: patch tokens as [B, D, H/p, W/p] instead of [B, HW, D].
            return_class_token: also return the CLS token [B, D] of each layer.
            norm: apply the final norm to each output.
            return_extra_tokens: also return the register tokens [B, R, D] of each layer.

        Returns:
            A tuple with one entry per selected layer: the patch tokens, or a tuple
            ``(patch_tokens, cls_token[, register_tokens])``.

        Raises:
            InputError: ``n`` is an int outside ``1..depth``, an empty sequence, or holds a block index
                outside ``-depth..depth-1``; ``return_class_token=True`` on a model without a CLS token;
                or ``x`` fails :meth:`check_input`.
        """
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise InputError(f"n={n} must be between 1 and the depth {depth} (the last n blocks)")
            indices = list(range(depth - n, depth))
        else:
            n = list(n)
            if not n:
                raise InputError(f"block indices [] select no block; give at least one index in "
                                 f"{-depth}..{depth - 1} or an int n")
            bad = [i for i in n if not -depth <= i < depth]
            if bad:
                raise InputError(f"block indices {bad} out of range for depth {depth} (allowed "
                                 f"{-depth}..{depth - 1})")
            indices = sorted({i + depth if i < 0 else i for i in n})  # block order, as Meta returns them
        if return_class_token and self.cls_token is None:
            raise InputError("this model has no CLS token (e.g. I-JEPA); call with return_class_token=False")
        tokens, grid = self.prepare_tokens(x)
        rope = self.rope(grid)
        wanted, outputs = set(indices), {}
        for i in range(max(indices) + 1):
            tokens = self.run_block(i, tokens, grid, rope)
            if i in wanted:
                outputs[i] = self.final_norm(tokens) if norm else tokens
        results = []
        B = x.shape[0]
        for i in indices:
            parts = self.split_tokens(outputs[i])
            patch = parts["patch"]
            if reshape:
                patch = patch.reshape(B, grid[0], grid[1], patch.shape[-1]).permute(0, 3, 1, 2).contiguous()
            extras = []
            if return_class_token:
                extras.append(parts["cls"])
            if return_extra_tokens:
                extras.append(parts["reg"])
            results.append((patch, *extras) if extras else patch)
        return tuple(results)

    # ------------------------------------------------------------------------------------------ utils
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.config
        return (f"family={c.family}, img_size={c.img_size}, patch_size={c.patch_size}, "
                f"in_chans={c.in_chans}, embed_dim={c.embed_dim}, depth={c.depth}, heads={c.num_heads}")

