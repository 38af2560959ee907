"""Writing vitkit models: native safetensors + config.json, and Meta's layout for round trips."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vitkit.atomic import write_json
from vitkit.weights.io import save_safetensors


def write_model_dir(directory: str | Path, config: dict, state_dict: dict[str, torch.Tensor],
                    metadata: dict[str, str]) -> Path:
    """A model directory: ``config.json`` and ``model.safetensors``, each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "config.json", config)
    save_safetensors(state_dict, directory / "model.safetensors", metadata=metadata)
    return directory


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (the config is also in the file's metadata)."""
    cfg = model.config.to_dict()
    doc = {"model_type": "vitkit", "architecture": type(model).__name__, "config": cfg}
    return write_model_dir(directory, doc, model.state_dict(),
                           metadata={"format": "vitkit", "vitkit_config": json.dumps(cfg)})


def to_meta_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with Meta's key names (DINOv2 layout is vitkit's; DINOv3 renames
    ``register_tokens`` -> ``storage_tokens``, splits ``w12`` into ``w1``/``w2`` and adds ``bias_mask``)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.family != "dinov3":
        return sd
    out = {}
    for k, v in sd.items():
        if k == "register_tokens":
            out["storage_tokens"] = v
        elif k.endswith("mlp.w12.weight") or k.endswith("mlp.w12.bias"):
            w1, w2 = v.chunk(2, dim=0)
            out[k.replace("w12", "w1")], out[k.replace("w12", "w2")] = w1.clone(), w2.clone()
        else:
            out[k] = v
        if k.endswith("attn.qkv.bias") and model.config.mask_k_bias:
            mask = torch.ones_like(v)
            mask[v.shape[0] // 3: 2 * v.shape[0] // 3] = 0
            out[k + "_mask"] = mask
    return out
