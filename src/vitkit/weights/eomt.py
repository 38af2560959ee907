"""EoMT checkpoints: Hugging Face ``Eomt*ForUniversalSegmentation`` directories, official tue-mps
Lightning checkpoints and vitkit's own. The backbone part goes through the backbone formats; the head
part is one small rename table."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from vitkit.backbones.config import ViTConfig
from vitkit.errors import CheckpointError, CheckpointMismatchError, ConfigError
from vitkit.weights.io import find_weights_file, read_state_dict
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
              (r"pixel_(mean|std)$", "input normalisation: build EoMT with pixel_mean/pixel_std to match it"))


def split_eomt_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, list[tuple[str, str]], str]:
    """Split into (backbone dict, head dict in vitkit names, dropped, layout name)."""
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
    return backbone, head, dropped, layout


def _backbone_format(backbone: dict[str, torch.Tensor], layout: str) -> str | None:
    if layout == "hf":
        if any(re.match(r"layers\.0\.attention\.o_proj", k) for k in backbone):
            return "hf_eomt_dinov3"
        return "hf_eomt"
    return None  # detect (official DINOv2 backbones are timm, DINOv3 ones HF)


def load_eomt_weights(model, source: str | Path | dict) -> LoadReport:
    """Strictly load any EoMT checkpoint (HF, official Lightning, vitkit) into ``model``."""
    sd = source if isinstance(source, dict) else read_state_dict(source)[0]
    backbone, head, dropped, layout = split_eomt_state_dict(sd)
    report = load_weights(model.encoder, backbone, format=_backbone_format(backbone, layout))
    report.source = str(source) if not isinstance(source, dict) else "<state dict>"
    report.dropped += dropped
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
    return report


def _hf_eomt_configs(doc: dict[str, Any]) -> tuple[ViTConfig, dict[str, Any]]:
    mt = doc["model_type"]
    common = dict(embed_dim=doc["hidden_size"], depth=doc["num_hidden_layers"], num_heads=doc["num_attention_heads"],
                  img_size=doc.get("image_size", 640), patch_size=doc.get("patch_size", 16),
                  in_chans=doc.get("num_channels", 3), norm_eps=doc.get("layer_norm_eps", 1e-6),
                  layer_scale_init=doc.get("layerscale_value", 1.0),
                  num_register_tokens=doc.get("num_register_tokens", 4),
                  drop_path_rate=doc.get("drop_path_rate", 0.0) or 0.0, mask_token=False,
                  act=doc.get("hidden_act", "gelu"))
    if mt == "eomt":
        vit = ViTConfig(family="dinov2", mlp_ratio=doc.get("mlp_ratio", 4),
                        ffn_layer="swiglu" if doc.get("use_swiglu_ffn") else "mlp",
                        interpolate_offset=0.0, interpolate_antialias=True, **common)
    elif mt == "eomt_dinov3":
        qb, kb, vb = doc.get("query_bias", True), doc.get("key_bias", False), doc.get("value_bias", True)
        rope = doc.get("rope_parameters") or {}
        vit = ViTConfig(family="dinov3", mlp_hidden_dim=doc["intermediate_size"],
                        ffn_layer="swiglu" if doc.get("use_gated_mlp") else "mlp", qkv_bias=qb or vb,
                        mask_k_bias=(qb or vb) and not kb, proj_bias=doc.get("proj_bias", True),
                        ffn_bias=doc.get("mlp_bias", True), pos_embed="none", rope=True,
                        rope_base=rope.get("rope_theta", doc.get("rope_theta", 100.0)),
                        rope_shift_coords=doc.get("pos_embed_shift"), rope_jitter_coords=doc.get("pos_embed_jitter"),
                        rope_rescale_coords=doc.get("pos_embed_rescale"), **common)
    else:
        raise ConfigError(f"model_type {mt!r} is not an EoMT config")
    p, n_up = vit.patch_size, doc.get("num_upscale_blocks", 2)
    from vitkit.models.eomt import num_upscale_blocks

    if n_up == num_upscale_blocks(p, None):
        stride = None
    elif p % (2 ** n_up) == 0:
        stride = p // 2 ** n_up
    else:
        raise ConfigError(f"{n_up} upscale blocks with patch {p} give no integer mask stride")
    # transformers omits num_labels/id2label at its default of 2 labels
    num_labels = len(doc.get("id2label") or {}) or doc.get("num_labels", 2)
    head = dict(num_classes=num_labels, num_q=doc["num_queries"], num_blocks=doc["num_blocks"], mask_stride=stride)
    return vit, head


def load_eomt_dir(directory: Path, **overrides: Any):
    """Build and load an EoMT from an HF or vitkit directory."""
    from vitkit.backbones.vit import VisionTransformer
    from vitkit.models.eomt import EoMT

    doc = json.loads((directory / "config.json").read_text())
    if doc.get("architecture") == "EoMT":
        vit, head = ViTConfig.from_dict(doc["backbone"]), dict(doc["eomt"])
    else:
        vit, head = _hf_eomt_configs(doc)
    backbone_over = {k: v for k, v in overrides.items() if k in ViTConfig.__dataclass_fields__}
    head.update({k: v for k, v in overrides.items() if k not in backbone_over})
    if backbone_over:
        vit = vit.replace(**backbone_over)
    model = EoMT(VisionTransformer(vit), **head)
    load_eomt_weights(model, find_weights_file(directory))
    return model.eval()
