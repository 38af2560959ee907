"""Strict, loud loading of any supported checkpoint into a vitkit model.

Pipeline: read (safe) -> detect format -> convert keys (pure table) -> adapt shapes to the model
(position-embedding grid, input channels, patch size) -> strict check -> ``load_state_dict(strict=True)``.
Every missing, unexpected or mis-shaped key is listed in the exception; nothing falls back to
random weights.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from vitkit.errors import CheckpointError, CheckpointMismatchError, ConfigError
from vitkit.layers import fold_in_chans, resample_patch_embed, resample_pos_embed
from vitkit.weights.formats import FORMATS, Format, convert, detect_format
from vitkit.weights.io import read_state_dict

log = logging.getLogger("vitkit")

StateDict = dict[str, torch.Tensor]


@dataclass
class LoadReport:
    """What happened while loading: the format, keys dropped by design, and shape adaptations."""

    format: str
    source: str
    dropped: list[tuple[str, str]] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    kept_from_model: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {self.source} (format {self.format})"]
        lines += [f"  adapted: {a}" for a in self.adapted]
        if self.dropped:
            reasons = sorted({r for _, r in self.dropped})
            lines.append(f"  dropped {len(self.dropped)} key(s) by design: " + "; ".join(reasons))
        lines += [f"  kept model value for {k}: {r}" for k, r in self.kept_from_model]
        return "\n".join(lines)


class Converted(NamedTuple):
    """A checkpoint read and converted into vitkit's layout (what :func:`read_and_convert` returns); pass it to
    :func:`load_weights` / :func:`infer_config` so that the file is read once."""

    state_dict: StateDict
    format: Format
    dropped: list[tuple[str, str]]
    stored_config: dict[str, Any] | None
    source: str


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def read_and_convert(source: str | Path | StateDict, format: str | None = None) -> Converted:
    """Read a checkpoint and convert it into vitkit's layout.

    Returns a :class:`Converted`: ``(state_dict, format, dropped, vitkit_config_or_None, source_name)``.
    """
    if isinstance(source, dict):
        sd, meta, name = source, {}, "<state dict>"
    else:
        sd, meta = read_state_dict(source)
        name = str(source)
    stored_cfg = json.loads(meta["vitkit_config"]) if "vitkit_config" in meta else None
    if format is not None:
        if format not in FORMATS:
            raise CheckpointError(f"unknown format {format!r}; known: {sorted(FORMATS)}")
        fmt = FORMATS[format]
    elif stored_cfg is not None:
        fmt = FORMATS["vitkit"]
    else:
        fmt = detect_format(sd)
    converted, dropped = convert(sd, fmt)
    return Converted(converted, fmt, dropped, stored_cfg, name)


def adapt_to_model(sd: StateDict, model: nn.Module, fmt: Format, source_grid: tuple[int, int] | None,
                   report: LoadReport) -> None:
    """Make checkpoint tensors fit the model's grid, channels and patch size (in place)."""
    c = model.config
    if "pos_embed" in sd and getattr(model, "pos_embed", None) is not None:
        pos = sd["pos_embed"]
        npp = c.num_pos_prefix
        n = pos.shape[1]
        if npp and fmt.patch_tokens_only_pos and _is_square(n) and not _is_square(n - npp):
            # timm reg4 layout: no CLS slot, the CLS position is already folded into cls_token
            pos = torch.cat([pos.new_zeros(1, npp, pos.shape[2]), pos], dim=1)
            report.adapted.append("pos_embed: added a zero CLS slot (CLS position folded into cls_token)")
        n_grid = pos.shape[1] - npp
        if source_grid is None:
            if not _is_square(n_grid):
                raise CheckpointMismatchError(
                    f"pos_embed has {n_grid} patch positions, which is not a square grid, and the checkpoint "
                    f"does not record its grid; expected {c.grid_size[0] * c.grid_size[1]} for {c.grid_size}",
                    mismatched=[("pos_embed", tuple(pos.shape), tuple(model.pos_embed.shape))])
            source_grid = (math.isqrt(n_grid),) * 2
        if tuple(source_grid) != c.grid_size:
            patch = resample_pos_embed(pos[:, npp:], source_grid, c.grid_size, c.interpolate_offset,
                                       c.interpolate_antialias)
            pos = torch.cat([pos[:, :npp], patch], dim=1)
            report.adapted.append(f"pos_embed: grid {tuple(source_grid)} -> {c.grid_size} (bicubic, offset "
                                  f"{c.interpolate_offset}, antialias {c.interpolate_antialias})")
        sd["pos_embed"] = pos
    # SwiGLU models: checkpoints name the FFN projections fc1/fc2 (timm packed SwiGLU, or plain renames of
    # HF/timm DINOv3 down projections next to a fused gate/up); vitkit's fused SwiGLU calls them w12/w3
    if any(k.endswith("mlp.w12.weight") for k in model.state_dict()):
        renamed = False
        for k in [k for k in sd if re.search(r"\.mlp\.fc[12]\.", k)]:
            if ".mlp.fc1." in k and k.replace(".fc1.", ".w12.") in sd:
                continue
            sd[k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")] = sd.pop(k)
            renamed = True
        if renamed:
            report.adapted.append("SwiGLU FFN: fc1/fc2 -> w12/w3")
    key = "patch_embed.proj.weight"
    if key in sd:
        w = sd[key]
        if w.shape[1] != c.in_chans:
            try:
                w = fold_in_chans(w, c.in_chans)
            except ValueError as e:
                raise CheckpointMismatchError(str(e), mismatched=[(key, tuple(sd[key].shape), None)]) from None
            report.adapted.append(f"{key}: {sd[key].shape[1]} input channels folded to {c.in_chans} by summing")
        if w.shape[-1] != c.patch_size or w.shape[-2] != c.patch_size:
            old = tuple(w.shape[-2:])
            w = resample_patch_embed(w, c.patch_size)
            report.adapted.append(f"{key}: patch {old} resampled to {c.patch_size} (FlexiViT pseudo-inverse)")
        sd[key] = w


def check_and_load(model: nn.Module, sd: StateDict, fmt: Format, report: LoadReport) -> None:
    """Strictly load ``sd`` into ``model``; raise listing every problem."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    allowed = []
    for k in list(missing):
        reason = next((r for pat, r in fmt.zero_missing if re.search(pat, k)), None)
        if reason:
            missing.remove(k)
            sd[k] = torch.zeros_like(own[k])
            report.adapted.append(f"{k}: zero-filled ({reason})")
            continue
        if k == "rope_embed.periods":
            allowed.append((k, "not stored by this format: periods regenerated in float32"))
        else:
            reason = next((r for pat, r in fmt.optional_missing if re.search(pat, k)), None)
            if reason:
                allowed.append((k, reason))
    for k, _ in allowed:
        missing.remove(k)
        sd[k] = own[k]
    report.kept_from_model += allowed
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sd
                  if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        c = getattr(model, "config", None)
        what = (f"{type(model).__name__}(family={c.family}, embed_dim={c.embed_dim}, depth={c.depth}, "
                f"patch_size={c.patch_size}, registers={c.num_register_tokens})" if c is not None
                else type(model).__name__)
        parts = [f"checkpoint {report.source} (format {fmt.name}) does not fit {what}:"]
        if missing:
            parts.append(f"  missing {len(missing)} key(s): {missing[:12]}" + (" ..." if len(missing) > 12 else ""))
        if unexpected:
            parts.append(f"  unexpected {len(unexpected)} key(s): {unexpected[:12]}"
                         + (" ..." if len(unexpected) > 12 else ""))
        if mismatched:
            parts.append("  shape mismatches: " + "; ".join(f"{k}: checkpoint {a} vs model {b}"
                                                           for k, a, b in mismatched[:12]))
        parts.append("  Check that the model name / config matches the checkpoint (vitkit.weights.inspect(path) "
                     "shows its format and architecture). vitkit never loads partially.")
        raise CheckpointMismatchError("\n".join(parts), missing, unexpected, mismatched)
    model.load_state_dict(sd, strict=True)


def load_weights(model: nn.Module, source: str | Path | StateDict | Converted, format: str | None = None,
                 keep_config: tuple[str, ...] | set[str] = ()) -> LoadReport:
    """Load a checkpoint of any supported format into a vitkit VisionTransformer.

    ``source``: a path, a state dict, or a checkpoint already read by :func:`read_and_convert` (its tensors are
    adapted in place). The format's numerics (e.g. how its source resizes position embeddings) are recorded in
    ``model.config``, except for the fields named in ``keep_config`` (set explicitly by the caller).
    Returns a :class:`LoadReport`; raises :class:`CheckpointMismatchError` on any missing, unexpected
    or mis-shaped key.
    """
    sd, fmt, dropped, stored_cfg, name = source if isinstance(source, Converted) else read_and_convert(source, format)
    report = LoadReport(format=fmt.name, source=name, dropped=dropped)
    c = model.config
    if fmt.family and c.family not in (fmt.family, "custom"):
        raise CheckpointMismatchError(
            f"checkpoint {name} is a {fmt.family} checkpoint ({fmt.description}) but the model is family "
            f"{c.family!r}; build the matching model (e.g. create_backbone with a {fmt.family}_* name)")
    source_numerics = {k: v for k, v in fmt.config.items() if k not in keep_config}
    saved = {k: getattr(c, k) for k in source_numerics}
    for k, v in source_numerics.items():  # the source's numerics also drive the load-time resize
        setattr(c, k, v)
    source_grid = None
    if stored_cfg is not None:
        p, img = stored_cfg["patch_size"], stored_cfg["img_size"]
        source_grid = (-(-img[0] // p), -(-img[1] // p))
    try:
        adapt_to_model(sd, model, fmt, source_grid, report)
        check_and_load(model, sd, fmt, report)
    except Exception:
        for k, v in saved.items():  # a refused checkpoint leaves the model as it was
            setattr(c, k, v)
        raise
    if fmt.name != "vitkit":  # a native file keeps the provenance recorded in its own config
        c.extra["weights_format"] = fmt.name
    log.info(report.summary())
    return report


def inspect(source: str | Path | StateDict) -> dict[str, Any]:
    """What a checkpoint is: its format, number of tensors, keys dropped by design and the
    architecture inferred from it (as ViTConfig fields)."""
    sd, fmt, dropped, stored_cfg, name = read_and_convert(source)
    return {"source": name, "format": fmt.name, "description": fmt.description, "num_tensors": len(sd),
            "num_params": sum(v.numel() for v in sd.values()), "dropped": dropped,
            "config": infer_config(sd, fmt, stored_cfg)}


# ------------------------------------------------------------------------------- config inference
_HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1408: 16, 1536: 24, 4096: 32}


def infer_config(sd: StateDict, fmt: Format, stored_cfg: dict[str, Any] | None = None,
                 num_heads: int | None = None) -> dict[str, Any]:
    """Architecture of a converted state dict, as ViTConfig keyword arguments.

    ``num_heads`` cannot be read from weights; unless given, it is taken from the standard size for the width
    (384 -> 6, 768 -> 12, 1024 -> 16, 1280 -> 20 for DINOv3 and 16 otherwise, 1536 -> 24, 4096 -> 32).
    """
    if stored_cfg is not None:
        return dict(stored_cfg)
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError("cannot infer an architecture: no patch_embed.proj.weight in the checkpoint")
    w = sd["patch_embed.proj.weight"]
    D, C, p = w.shape[0], w.shape[1], w.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    family = fmt.family or ("ijepa" if "cls_token" not in sd else "vit")
    if fmt.name == "hf_vit" and "dist_token" in sd:
        family = "deit"
    heads = num_heads or (20 if (D == 1280 and family == "dinov3") else _HEADS_BY_DIM.get(D, 16 if D == 1280 else None))
    if heads is None:
        raise ConfigError(f"cannot infer num_heads for embed_dim {D}; pass num_heads explicitly")
    cfg: dict[str, Any] = dict(family=family, embed_dim=D, in_chans=C, patch_size=p, depth=depth, num_heads=heads,
                               patch_bias="patch_embed.proj.bias" in sd, class_token="cls_token" in sd,
                               dist_token="dist_token" in sd, mask_token="mask_token" in sd,
                               num_register_tokens=sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
                               qkv_bias="blocks.0.attn.qkv.bias" in sd, proj_bias="blocks.0.attn.proj.bias" in sd,
                               pre_norm="norm_pre.weight" in sd)
    if "blocks.0.ls1.gamma" in sd:
        cfg["layer_scale_init"] = 1e-5
    if "blocks.0.mlp.w12.weight" in sd:
        cfg.update(ffn_layer="swiglu", mlp_hidden_dim=sd["blocks.0.mlp.w12.weight"].shape[0] // 2,
                   ffn_bias="blocks.0.mlp.w12.bias" in sd)
    else:
        cfg.update(mlp_hidden_dim=sd["blocks.0.mlp.fc1.weight"].shape[0], ffn_bias="blocks.0.mlp.fc1.bias" in sd)
    if "pos_embed" in sd:
        n = sd["pos_embed"].shape[1] - int(cfg["class_token"]) - int(cfg["dist_token"])
        if fmt.patch_tokens_only_pos and _is_square(sd["pos_embed"].shape[1]):
            n = sd["pos_embed"].shape[1]
        g = math.isqrt(n)
        cfg["img_size"] = (g * p, g * p)
    else:
        cfg["pos_embed"] = "none"
    if "proj.weight" in sd:
        cfg["proj_dim"] = sd["proj.weight"].shape[0]
    if family == "dinov3":
        cfg.update(rope=True, norm_eps=1e-5, mask_k_bias=cfg["qkv_bias"], rope_rescale_coords=2.0, img_size=224)
    elif family == "clip":
        cfg.update(act="quick_gelu", norm_eps=1e-5)
    elif family == "ijepa":
        cfg.update(pos_embed="sincos")
    elif fmt.name == "hf_vit":
        cfg.update(norm_eps=1e-12)
    return cfg
