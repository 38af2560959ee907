"""The zoo's classifier: a pretrained vitkit backbone, a pooling and a head, built by one call.

This is the "Vision Transformer Zoo" API (``build_model``), running on vitkit's one verified
:class:`~vitkit.VisionTransformer` and vitkit's loader and cache instead of transformers::

    import vitkit
    model = vitkit.build_model("dinov2_reg_vit", head=10, freeze_backbone=True)
    logits = model(images)                                         # [B, 10]
    out = model(images, output_attentions=True, output_embeddings=True)
    out["predictions"], out["attentions"], out["embeddings"]       # per-layer [B, heads, N, N]; [B, D]

Embeddings are each family's pretrained pooling, never transformers' untrained ``pooler`` (dense + tanh):

=================================  ===========================================================
family                             embedding (``pooling=None``)
=================================  ===========================================================
DINO, DINOv2 (+registers), DINOv3  CLS token after the final norm (HF ``pooler_output``)
CLIP                               ``post_layernorm(CLS)`` (HF ``pooler_output``); ``pooling="projection"``
                                   applies the visual projection (HF ``image_embeds``)
ViT, DeiT                          CLS token after the final norm (``last_hidden_state[:, 0]``); DeiT's
                                   distillation token is left out (as in transformers'
                                   ``DeiTForImageClassification``); ``pooling="cls_dist"`` averages the two
I-JEPA (no CLS token)              mean of the normed patch tokens (the I-JEPA paper's linear probe and
                                   transformers' ``IJepaForImageClassification``)
=================================  ===========================================================

Other poolings: ``"mean"`` (any family), ``"cls_mean"`` (CLS concatenated with the patch mean, DINOv2's
linear-probe features, 2 x embed_dim).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.backbones.config import ViTConfig
from vitkit.backbones.registry import backbone_class, list_models, lookup
from vitkit.backbones.resolve import resolve_backbone
from vitkit.backbones.vit import VisionTransformer
from vitkit.errors import ConfigError, InputError, WeightsNotFoundError
from vitkit.models.heads import BaseHead, IdentityHead, LinearHead

__all__ = ["POOLINGS", "ZooModel", "build_model", "default_pooling", "set_backbone_dropout"]


# ----------------------------------------------------------------------------------------- config_kwargs
_HF_CONFIG_NAMES = {"image_size": "img_size", "num_channels": "in_chans"}
_DROPOUT_NAMES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")
_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")


def _translate_config_kwargs(config_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config_kwargs`` -> :class:`ViTConfig` overrides (HF spellings ``image_size``/``num_channels`` accepted).

    ``attn_implementation`` (transformers' switch for attention maps) is accepted and has nothing to switch:
    vitkit always runs fused SDPA and computes attention maps only for calls with ``output_attentions=True``.
    """
    if config_kwargs is None:
        return {}
    if not isinstance(config_kwargs, Mapping):
        raise ConfigError(f"config_kwargs must be a dict of ViTConfig fields, got {type(config_kwargs).__name__}")
    fields = set(ViTConfig.__dataclass_fields__)
    out: dict[str, Any] = {}
    for k, v in config_kwargs.items():
        if k == "attn_implementation":
            if v is not None and v not in _ATTN_IMPLEMENTATIONS:
                raise ConfigError(f"attn_implementation={v!r}; expected one of {_ATTN_IMPLEMENTATIONS} (vitkit always "
                                  f"uses fused SDPA and computes attention maps when output_attentions=True)")
            continue
        if k in _DROPOUT_NAMES:
            raise ConfigError(f"config_kwargs[{k!r}]: vitkit blocks have no dropout fields; use "
                              f"build_model(..., backbone_dropout={v}) (and drop_path_rate for stochastic depth)")
        key = _HF_CONFIG_NAMES.get(k, k)
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise ConfigError(f"unknown config_kwargs key {k!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; config_kwargs override vitkit ViTConfig fields: {sorted(fields)} "
                              f"(HF spellings {sorted(_HF_CONFIG_NAMES)} and attn_implementation are accepted too)")
        if key in out:
            raise ConfigError(f"config_kwargs set {key!r} twice (as {k!r} and under another spelling)")
        out[key] = v
    return out


# ------------------------------------------------------------------------------------------- loading
def _load_backbone(name: str | Path, cls: type[VisionTransformer], load_pretrained: bool,
                   overrides: dict[str, Any]) -> VisionTransformer:
    """The registry's / user's checkpoint through the one resolver: its weights (``load_pretrained``), or its
    architecture with random weights from the locally available config.json, else from vitkit's preset."""
    hint = " To build the architecture with random weights instead, pass load_pretrained=False."
    try:
        model = resolve_backbone(name, pretrained=bool(load_pretrained), **overrides)
    except FileNotFoundError as e:  # WeightsNotFoundError is one too
        if not load_pretrained:
            raise
        if isinstance(e, WeightsNotFoundError):
            raise WeightsNotFoundError(str(e) + hint) from e
        raise WeightsNotFoundError(f"pretrained weights for {str(name)!r} were requested but not found: {e}."
                                   + hint) from e
    if cls is not VisionTransformer:  # a user subclass: same architecture, same tensors, strictly
        sub = cls(model.config)
        sub.load_state_dict(model.state_dict(), strict=True)
        model = sub
    return model


# ----------------------------------------------------------------------------------------------- model
POOLINGS = ("cls", "mean", "cls_mean", "cls_dist", "projection")


class _ResidualDropout(nn.Module):
    """Dropout on a block's residual branch before its drop path (transformers' ``hidden_dropout_prob`` on the
    attention and MLP outputs). Holds no parameters, so state-dict keys do not change."""

    def __init__(self, p: float, drop_path: nn.Module):
        super().__init__()
        self.dropout = nn.Dropout(p)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.dropout(x))


def set_backbone_dropout(backbone: VisionTransformer, p: float) -> None:
    """Set the residual-branch dropout of every block (0 removes it)."""
    if isinstance(p, bool) or not 0.0 <= float(p) < 1.0:
        raise ConfigError(f"backbone_dropout must be in [0, 1), got {p!r}")
    for blk in backbone.blocks:
        for attr in ("drop_path1", "drop_path2"):
            mod = getattr(blk, attr)
            base = mod.drop_path if isinstance(mod, _ResidualDropout) else mod
            setattr(blk, attr, _ResidualDropout(float(p), base) if p > 0 else base)


def default_pooling(backbone: VisionTransformer) -> str:
    """The family's pretrained pooling: mean of patch tokens without a CLS token (I-JEPA), else the CLS token."""
    return "cls" if backbone.cls_token is not None else "mean"


class ZooModel(nn.Module):
    """A vitkit backbone, a pooling and a head (what :func:`build_model` returns).

    ``forward(pixel_values)`` returns the head's predictions; with ``output_attentions`` or
    ``output_embeddings`` a dict with ``predictions`` and the requested ``attentions`` / ``embeddings``.

    A frozen backbone (``freeze_backbone``) has ``requires_grad=False`` and stays in eval mode when the
    model is put in train mode (no dropout, drop path or RoPE augmentation in it).
    """

    def __init__(self, backbone: VisionTransformer, head: BaseHead | None = None, pooling: str | None = None,
                 freeze_backbone: bool = False):
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise ConfigError(f"backbone must be a vitkit VisionTransformer, got {type(backbone).__name__}")
        self.backbone = backbone
        self.pooling = pooling or default_pooling(backbone)
        self._check_pooling()
        self.head = _make_head(head, self.embedding_dim, self._describe())
        self.freeze_backbone(bool(freeze_backbone))

    # --------------------------------------------------------------------------------------- set-up
    def _describe(self) -> str:
        c = self.backbone.config
        return f"{c.family} backbone, embed_dim={c.embed_dim}, pooling={self.pooling!r}"

    def _check_pooling(self) -> None:
        bb, p = self.backbone, self.pooling
        if p not in POOLINGS:
            raise ConfigError(f"unknown pooling {p!r}; expected one of {POOLINGS}")
        if p in ("cls", "cls_mean", "cls_dist", "projection") and bb.cls_token is None:
            raise ConfigError(f"pooling={p!r} needs a CLS token, and this {bb.config.family} backbone has none "
                              f"(I-JEPA); use pooling='mean'")
        if p == "cls_dist" and bb.dist_token is None:
            raise ConfigError("pooling='cls_dist' needs a distillation token (DeiT distilled checkpoints)")
        if p == "projection" and bb.proj is None:
            raise ConfigError("pooling='projection' needs CLIP's visual projection, which this checkpoint does not "
                              "have (transformers' CLIPVisionModel); use a CLIPModel or "
                              "CLIPVisionModelWithProjection checkpoint, or pooling='cls'")

    @property
    def embedding_dim(self) -> int:
        """Size of the pooled embedding fed to the head."""
        c = self.backbone.config
        if self.pooling == "projection":
            return int(c.proj_dim)
        return 2 * c.embed_dim if self.pooling == "cls_mean" else c.embed_dim

    def freeze_backbone(self, freeze: bool = True) -> ZooModel:
        """Freeze (or unfreeze) the backbone (:meth:`VisionTransformer.freeze`: ``requires_grad`` off and eval
        mode kept under ``.train()``)."""
        self.backbone.freeze(freeze)
        self.backbone.train(self.training)
        return self

    @property
    def backbone_frozen(self) -> bool:
        return self.backbone.frozen

    # -------------------------------------------------------------------------------------- forward
    def forward_features(self, pixel_values: torch.Tensor, output_attentions: bool = False
                         ) -> tuple[dict[str, Any], tuple[torch.Tensor, ...] | None]:
        """The backbone's ``forward_features`` dict and, on request, each block's attention probabilities
        [B, heads, N, N] (N counts CLS, distillation and register tokens first, then the patches)."""
        if not output_attentions:
            return self.backbone.forward_features(pixel_values), None
        # The backbone runs its ordinary fused-SDPA forward; for this call only, a pre-hook on each attention
        # module also computes the softmax map from the very input (and RoPE) the block's attention receives.
        # The hooks are removed before returning, so no state outlives the call.
        probs: list[torch.Tensor] = []

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["x"]
            rope = args[1] if len(args) > 1 else kwargs.get("rope")
            mask = args[2] if len(args) > 2 else kwargs.get("attn_mask")
            probs.append(module.attention_probs(x, rope, mask))

        bb = self.backbone
        checkpointing = bb.grad_checkpointing
        handles = [blk.attn.register_forward_pre_hook(capture, with_kwargs=True) for blk in bb.blocks]
        try:
            # the maps leave the blocks, so a recomputed (checkpointed) block could not reproduce them
            bb.grad_checkpointing = False
            feats = bb.forward_features(pixel_values)
        finally:
            bb.grad_checkpointing = checkpointing
            for h in handles:
                h.remove()
        return feats, tuple(probs)

    def pool(self, feats: dict[str, Any]) -> torch.Tensor:
        """Pooled embedding [B, embedding_dim] from ``forward_features`` outputs."""
        p = self.pooling
        if p == "cls":
            return feats["x_norm_clstoken"]
        if p == "mean":
            return feats["x_norm_patchtokens"].mean(dim=1)
        if p == "cls_mean":
            return torch.cat([feats["x_norm_clstoken"], feats["x_norm_patchtokens"].mean(dim=1)], dim=-1)
        if p == "cls_dist":
            return (feats["x_norm_clstoken"] + feats["x_norm_disttoken"]) / 2
        return feats["x_projected"]

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled embeddings [B, embedding_dim] alone."""
        return self.pool(self.backbone.forward_features(pixel_values))

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False,
                output_embeddings: bool = False) -> torch.Tensor | dict[str, Any]:
        """Args:
            pixel_values: images [B, in_chans, H, W] (normalised as the weights expect).
            output_attentions: also return ``attentions``, a tuple with one [B, heads, N, N] softmax map per
                block (computed for this call only; ordinary calls run fused SDPA).
            output_embeddings: also return ``embeddings`` [B, embedding_dim], the head's input.

        Returns:
            The predictions tensor, or, when a flag is set, a dict with ``predictions`` and the requested keys.
            ``embeddings`` is the family's pretrained pooling (module docstring): for ViT and DeiT it is the CLS
            token after the final LayerNorm (transformers' ``last_hidden_state[:, 0]``), **not** transformers'
            ``pooler_output`` (``tanh(dense(CLS))``) that vit_zoo returned for them: that pooler is not part of
            the pretrained weights of the registry's checkpoints (``google/vit-base-patch16-224`` and the distilled
            DeiT ones are classification checkpoints without it, so transformers initialises it at random). For
            DINO(v2/v3) and CLIP the two agree
            (``pooler_output`` is the normed CLS token there); I-JEPA has no CLS token (mean of the patch tokens).
        """
        if not isinstance(pixel_values, torch.Tensor):
            raise InputError(f"pixel_values must be a torch.Tensor [B, C, H, W], got {type(pixel_values).__name__}")
        feats, attentions = self.forward_features(pixel_values, output_attentions)
        embeddings = self.pool(feats)
        predictions = self.head(embeddings)
        if not (output_attentions or output_embeddings):
            return predictions
        out: dict[str, Any] = {"predictions": predictions}
        if output_attentions:
            out["attentions"] = attentions
        if output_embeddings:
            out["embeddings"] = embeddings
        return out

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, embedding_dim={self.embedding_dim}, frozen_backbone={self.backbone_frozen}"


def _make_head(head: Any, dim: int, what: str) -> BaseHead:
    if head is None:
        return IdentityHead(dim)
    if isinstance(head, bool):
        raise ConfigError(f"head must be an int (number of outputs), a vitkit.heads.BaseHead or None, got {head!r}")
    if isinstance(head, int):
        if head <= 0:
            raise ConfigError(f"head={head}: the number of outputs must be positive")
        return LinearHead(dim, head)
    if isinstance(head, BaseHead):
        if head.input_dim != dim:
            raise ConfigError(f"head {type(head).__name__} has input_dim={head.input_dim}, but the {what} produces "
                              f"{dim}-dim embeddings; build the head with input_dim={dim}")
        return head
    if isinstance(head, nn.Module):
        raise ConfigError(f"head {type(head).__name__} is an nn.Module but not a vitkit.heads.BaseHead; subclass "
                          f"BaseHead and implement the input_dim property so its size can be checked against the "
                          f"{what}")
    raise ConfigError(f"head must be an int (number of outputs), a vitkit.heads.BaseHead or None, got "
                      f"{type(head).__name__}")


# ----------------------------------------------------------------------------------------------- build
def build_model(model_type: str | None = None, model_name: str | Path | None = None, backbone_cls: Any = None,
                head: int | BaseHead | None = None, freeze_backbone: bool = False, load_pretrained: bool = True,
                backbone_dropout: float = 0.0, config_kwargs: Mapping[str, Any] | None = None, *,
                pooling: str | None = None, backbone: VisionTransformer | None = None) -> ZooModel:
    """Build a backbone + head model (the Vision Transformer Zoo's ``build_model``).

    Args:
        model_type: a registry key (``list_models()``: vanilla_vit, deit_vit, dino_vit, dino_v2_vit,
            dinov2_reg_vit, dinov3_vit, clip_vit, ijepa_vit), giving the default checkpoint and its family.
        model_name: overrides the registry's checkpoint, or names one without ``model_type``: a Hugging Face id
            (resolved through vitkit's cache, downloaded only when online), a local HF / vitkit directory or
            checkpoint file, or a vitkit preset (``dinov2_vits14_reg``...). With ``model_type`` the checkpoint
            must be of that key's family.
        backbone_cls: ``vitkit.VisionTransformer`` or a subclass of it (built instead), or a transformers class
            such as ``ViTModel`` / ``CLIPVisionModelWithProjection``, used only as a family check (and, for the
            CLIP classes with projection, to default to ``pooling="projection"``); transformers never runs.
        head: an int (a :class:`~vitkit.heads.LinearHead` with that many outputs), a
            :class:`~vitkit.heads.BaseHead` (its ``input_dim`` must equal the embedding size), or None
            (an :class:`~vitkit.heads.IdentityHead`: predictions are the embeddings).
        freeze_backbone: no gradients for the backbone, which also stays in eval mode under ``.train()``.
        load_pretrained: load the checkpoint's weights (strictly; an unavailable checkpoint raises
            :class:`~vitkit.WeightsNotFoundError`, never falls back to random weights). False builds the
            architecture with random weights from the locally available config.json, else from vitkit's preset.
        backbone_dropout: dropout on each block's attention and MLP residual branches (transformers'
            ``hidden_dropout_prob``); active in train mode only.
        config_kwargs: :class:`~vitkit.ViTConfig` overrides applied before the weights are loaded, e.g.
            ``img_size`` (position embeddings resized), ``in_chans`` (RGB weights folded), ``drop_path_rate``.
            HF's ``image_size`` / ``num_channels`` are accepted, and ``attn_implementation`` has no effect
            (attention maps are computed whenever ``output_attentions=True``).
        pooling: embedding pooling (see the module docstring); None takes the family's pretrained pooling.
        backbone: an already built vitkit backbone, used as it is (instead of model_type / model_name).

    Returns:
        A :class:`ZooModel` in eval mode (call ``.train()`` to train; Lightning does it).
    """
    overrides = _translate_config_kwargs(config_kwargs)
    if isinstance(backbone_dropout, bool) or not isinstance(backbone_dropout, (int, float)) \
            or not 0.0 <= backbone_dropout < 1.0:
        raise ConfigError(f"backbone_dropout must be a probability in [0, 1), got {backbone_dropout!r}")
    if pooling is not None and pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    if isinstance(backbone_cls, nn.Module):  # an instance passed where the class goes
        if backbone is not None:
            raise ConfigError("pass one backbone instance, as backbone=...")
        backbone, backbone_cls = backbone_cls, None
    hint_pooling = None
    if backbone is not None:
        if model_type is not None or model_name is not None or backbone_cls is not None:
            raise ConfigError("backbone=<instance> is used as it is; do not also pass model_type, model_name or "
                              "backbone_cls")
        if overrides:
            raise ConfigError("config_kwargs cannot change an already built backbone; build it with that config")
        if not isinstance(backbone, VisionTransformer):
            raise ConfigError(f"backbone must be a vitkit VisionTransformer, got {type(backbone).__name__}")
        bb = backbone
    else:
        family = None
        registry_cls = None
        if model_type is not None:
            entry = lookup(model_type)
            name, family, registry_cls = model_name or entry.model_name, entry.family, entry.backbone_cls
        elif model_name is not None:
            name = model_name
        else:
            raise ConfigError(f"build_model needs model_type (one of {', '.join(list_models())}) or model_name "
                              f"(an HF id, a local directory or checkpoint, or a vitkit preset), or backbone=")
        cls, hint_family, hint_pooling = backbone_class(backbone_cls if backbone_cls is not None else registry_cls)
        if family and hint_family and family != hint_family:
            raise ConfigError(f"model_type {model_type!r} is a {family} model but backbone_cls="
                              f"{getattr(backbone_cls, '__name__', backbone_cls)} is {hint_family}")
        family = family or hint_family
        bb = _load_backbone(name, cls, load_pretrained, overrides)
        if family and bb.config.family not in (family, "custom"):
            what = f"model_type {model_type!r}" if model_type else f"backbone_cls {backbone_cls.__name__}"
            raise ConfigError(f"{what} expects a {family} checkpoint, but {str(name)!r} is a {bb.config.family} "
                              f"model; use the matching model_type, or pass only model_name")
    if backbone_dropout:
        set_backbone_dropout(bb, backbone_dropout)
    if pooling is None and hint_pooling is not None:
        pooling = hint_pooling  # CLIP...WithProjection: image_embeds (an error if the checkpoint has no projection)
    return ZooModel(bb, head, pooling=pooling, freeze_backbone=freeze_backbone).eval()
