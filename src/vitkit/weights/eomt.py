"""EoMT checkpoints: Hugging Face ``Eomt*ForUniversalSegmentation`` directories, official tue-mps
Lightning checkpoints and vitkit's own. The backbone part goes through the backbone formats; the head
part is one small rename table."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from vitkit.errors import CheckpointError, CheckpointMismatchError, ConfigError
from vitkit.weights.io import read_state_dict
from vitkit.weights.loading import LoadReport, load_weights

# EoMT head keys (vitkit names follow the official repository)
HEAD_RENAMES = (
    (r"^query\.weight$", "q.weight"),
    (r"^class_predictor\.", "class_head."),
    (r"^mask_head\.fc1\.", "mask_head.0."),
    (r"^mask_head\.fc2\.", "mask_head.2."),
    (r"^mask_head\.fc3\.", "mask_head.4."),
    (r"^upscale_block\.block\.(\d+)\.layernorm2d\.", r"upscale.\1.norm."),
    (r"^upscale_block\.block\.(\d+)\.", r"upscale.\1."),
)
HEAD_KEYS = r"^(q\.|class_head\.|mask_head\.|upscale\.|attn_mask_probs$)"
HEAD_DROPS = ((r"^criterion\.", "loss buffers"),
              (r"^(token_scorer\.|token_threshold$)", "the learned token scorer of runs before the pixel evidence"))
# input normalisation buffers (official tue-mps checkpoints: network.encoder.pixel_mean/pixel_std, [1, C, 1, 1]);
# not weights: they are checked against, or adopted by, the model's pixel_mean/pixel_std (see _normalisation)
NORM_KEY = r"(^|\.)pixel_(mean|std)$"


def split_eomt_state_dict(sd: dict[str, torch.Tensor]
                          ) -> tuple[dict, dict, dict[str, tuple[str, torch.Tensor]], list[tuple[str, str]], str]:
    """Split into (backbone dict, head dict in vitkit names, normalisation, dropped, layout name).

    ``normalisation`` maps ``"pixel_mean"`` / ``"pixel_std"`` to ``(checkpoint key, tensor)``.
    """
    norm = {f"pixel_{m.group(2)}": (k, v) for k, v in sd.items() if (m := re.search(NORM_KEY, k))}
    sd = {k: v for k, v in sd.items() if not re.search(NORM_KEY, k)}
    keys = list(sd)
    if any(k.startswith("network.") for k in keys):  # official Lightning checkpoint
        layout = "official"
        sd = {k[len("network."):]: v for k, v in sd.items() if k.startswith("network.")}
        backbone = {k[len("encoder.backbone."):]: v for k, v in sd.items() if k.startswith("encoder.backbone.")}
        rest = {k: v for k, v in sd.items() if not k.startswith("encoder.backbone.")}
    elif any(k.startswith("encoder.") for k in keys) and "q.weight" in sd:  # vitkit
        layout = "vitkit"
        backbone = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        rest = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
    elif "query.weight" in sd:  # Hugging Face
        layout = "hf"
        head_src = r"^(query\.|class_predictor\.|mask_head\.|upscale_block\.|attn_mask_probs$|criterion\.)"
        backbone = {k: v for k, v in sd.items() if not re.match(head_src, k)}
        rest = {k: v for k, v in sd.items() if re.match(head_src, k)}
    else:
        raise CheckpointError(f"not an EoMT checkpoint: no query weights among {sorted(keys)[:10]}")
    head, dropped = {}, []
    for k, v in rest.items():
        reason = next((r for pat, r in HEAD_DROPS if re.search(pat, k)), None)
        if reason:
            dropped.append((k, reason))
            continue
        new = next((re.sub(p, r, k) for p, r in HEAD_RENAMES if re.search(p, k)), k)
        head[new] = v
    return backbone, head, norm, dropped, layout


def _backbone_format(backbone: dict[str, torch.Tensor], layout: str) -> str | None:
    if layout == "hf":
        if any(re.match(r"layers\.0\.attention\.o_proj", k) for k in backbone):
            return "hf_eomt_dinov3"
        return "hf_eomt"
    return None  # detect (official DINOv2 backbones are timm, DINOv3 ones HF)


def _values(t: torch.Tensor) -> list[float]:
    return t.detach().float().flatten().tolist()


def _show(v: list[float]) -> list[float]:
    return [round(x, 6) for x in v]


def _normalisation(model, norm: dict[str, tuple[str, torch.Tensor]], name: str
                   ) -> tuple[tuple[list[float], list[float]] | None, list[tuple[str, str]], str | None]:
    """Decide what the checkpoint's input normalisation means for ``model``, before anything is loaded.

    Returns ``(adopt, dropped, warning)``: the ``(mean, std)`` the model should take over (it was built
    without normalisation), the buffers left unused with the reason, and a warning to show. Raises
    :class:`CheckpointMismatchError` when the model normalises with other values for the same channels.
    """
    if not norm:
        return None, [], None
    if len(norm) == 1 or norm["pixel_mean"][1].numel() != norm["pixel_std"][1].numel():
        reason = "incomplete input normalisation (pixel_mean and pixel_std of equal length are needed)"
        return None, [(k, reason) for k, _ in norm.values()], (
            f"{name} carries an incomplete input normalisation ({', '.join(k for k, _ in norm.values())}); "
            f"it is not used and the model normalises as it was built ("
            + (f"pixel_mean={_show(_values(model.pixel_mean))}, pixel_std={_show(_values(model.pixel_std))})"
               if model.pixel_mean is not None else "not at all)"))
    mean, std = _values(norm["pixel_mean"][1]), _values(norm["pixel_std"][1])
    theirs = f"pixel_mean={_show(mean)}, pixel_std={_show(std)}"
    in_chans = model.encoder.config.in_chans
    has = model.pixel_mean is not None
    own = (_values(model.pixel_mean), _values(model.pixel_std)) if has else None
    if len(mean) != in_chans:  # e.g. ImageNet RGB statistics and a 1-channel detector model: they do not apply
        reason = f"input normalisation of {len(mean)} channels ({theirs}) does not apply to {in_chans}-channel inputs"
        dropped = [(k, reason) for k, _ in norm.values()]
        if has:
            return None, dropped, None  # the model was given statistics for its own channels on purpose
        return None, dropped, (
            f"{name} was trained on inputs normalised with {theirs} ({len(mean)} channels), which does not apply to "
            f"this {in_chans}-channel model; the model does not normalise its inputs. Build EoMT with pixel_mean=/"
            f"pixel_std= of your data ({in_chans} values each) if it needs normalising.")
    if has:
        if all(abs(a - b) <= 1e-6 for a, b in zip(own[0] + own[1], mean + std)):
            return None, [], None
        raise CheckpointMismatchError(
            f"{name} was trained on inputs normalised with {theirs}, but the model normalises with "
            f"pixel_mean={_show(own[0])}, pixel_std={_show(own[1])}. Build EoMT with the checkpoint's values (or with "
            f"pixel_mean=None, pixel_std=None to take them from the checkpoint); to fine-tune on other statistics on "
            f"purpose, read the state dict (vitkit.weights.read_state_dict), delete its pixel_mean/pixel_std entries "
            f"and pass the dict to load_weights.")
    return (mean, std), [], (
        f"{name} carries input normalisation {theirs}; the model was built without normalisation and now "
        f"normalises its inputs with these values inside forward (as the checkpoint was trained). Pass them to "
        f"EoMT(pixel_mean=..., pixel_std=...) to make this explicit.")


def load_eomt_weights(model, source: str | Path | dict) -> LoadReport:
    """Strictly load any EoMT checkpoint (HF, official Lightning, vitkit) into ``model``.

    Input normalisation buffers in the checkpoint (official tue-mps checkpoints carry ImageNet
    ``pixel_mean``/``pixel_std``) are adopted by a model built without normalisation (with a warning and a
    line in the report), accepted when equal to the model's, and refused with
    :class:`CheckpointMismatchError` when the model normalises the same channels differently.
    """
    sd = source if isinstance(source, dict) else read_state_dict(source)[0]
    name = str(source) if not isinstance(source, dict) else "<state dict>"
    backbone, head, norm, dropped, layout = split_eomt_state_dict(sd)
    adopt, norm_dropped, warning = _normalisation(model, norm, name)
    report = load_weights(model.encoder, backbone, format=_backbone_format(backbone, layout))
    report.source = name
    report.dropped += dropped + norm_dropped
    own = {k: v for k, v in model.state_dict().items() if re.match(HEAD_KEYS, k)}
    missing = [k for k in own if k not in head]
    unexpected = [k for k in head if k not in own]
    mismatched = [(k, tuple(head[k].shape), tuple(own[k].shape)) for k in head
                  if k in own and head[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"EoMT head of {report.source} ({layout} layout) does not fit the model "
            f"(num_q={model.num_q}, num_classes={model.num_classes}, upscale blocks={len(model.upscale)}): "
            f"missing {missing}, unexpected {unexpected}, shape mismatches {mismatched}. For new classes, "
            f"load the backbone only: vitkit.load_weights(model.encoder, ...)", missing, unexpected, mismatched)
    model.load_state_dict({**{f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}, **head},
                          strict=True)
    if adopt is not None:
        model.set_pixel_normalisation(*adopt)
        report.adapted.append(f"input normalisation adopted from the checkpoint: pixel_mean={_show(adopt[0])}, "
                              f"pixel_std={_show(adopt[1])}")
    elif norm and not norm_dropped:
        report.adapted.append("input normalisation: the checkpoint's pixel_mean/pixel_std equal the model's")
    if warning:
        warnings.warn(warning, UserWarning, stacklevel=3)
    return report


def eomt_configs(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An EoMT directory's ``config.json`` (vitkit's, or transformers' ``eomt`` / ``eomt_dinov3``) as
    ``(ViTConfig fields of the encoder, EoMT head arguments)``. A transformers config gives the head's
    ``num_upscale_blocks`` (the model turns it into its ``mask_stride``)."""
    if doc.get("architecture") == "EoMT":  # vitkit's own
        return dict(doc["backbone"]), dict(doc["eomt"])
    mt = doc.get("model_type")
    common = dict(embed_dim=doc["hidden_size"], depth=doc["num_hidden_layers"], num_heads=doc["num_attention_heads"],
                  img_size=doc.get("image_size", 640), patch_size=doc.get("patch_size", 16),
                  in_chans=doc.get("num_channels", 3), norm_eps=doc.get("layer_norm_eps", 1e-6),
                  layer_scale_init=doc.get("layerscale_value", 1.0),
                  num_register_tokens=doc.get("num_register_tokens", 4),
                  drop_path_rate=doc.get("drop_path_rate", 0.0) or 0.0, mask_token=False,
                  act=doc.get("hidden_act", "gelu"))
    if mt == "eomt":
        vit = dict(family="dinov2", mlp_ratio=doc.get("mlp_ratio", 4),
                   ffn_layer="swiglu" if doc.get("use_swiglu_ffn") else "mlp",
                   interpolate_offset=0.0, interpolate_antialias=True, **common)
    elif mt == "eomt_dinov3":
        qb, kb, vb = doc.get("query_bias", True), doc.get("key_bias", False), doc.get("value_bias", True)
        rope = doc.get("rope_parameters") or {}
        vit = dict(family="dinov3", mlp_hidden_dim=doc["intermediate_size"],
                   ffn_layer="swiglu" if doc.get("use_gated_mlp") else "mlp", qkv_bias=qb or vb,
                   mask_k_bias=(qb or vb) and not kb, proj_bias=doc.get("proj_bias", True),
                   ffn_bias=doc.get("mlp_bias", True), pos_embed="none", rope=True,
                   rope_base=rope.get("rope_theta", doc.get("rope_theta", 100.0)),
                   rope_shift_coords=doc.get("pos_embed_shift"), rope_jitter_coords=doc.get("pos_embed_jitter"),
                   rope_rescale_coords=doc.get("pos_embed_rescale"), **common)
    else:
        raise ConfigError(f"model_type {mt!r} is not an EoMT config")
    # transformers omits num_labels/id2label at its default of 2 labels
    num_labels = len(doc.get("id2label") or {}) or doc.get("num_labels", 2)
    head = dict(num_classes=num_labels, num_q=doc["num_queries"], num_blocks=doc["num_blocks"],
                num_upscale_blocks=doc.get("num_upscale_blocks", 2))
    return vit, head


def is_eomt_config(doc: dict[str, Any]) -> bool:
    """Whether a ``config.json`` describes an EoMT segmenter (vitkit's or transformers')."""
    return doc.get("model_type") in ("eomt", "eomt_dinov3") or doc.get("architecture") == "EoMT"
