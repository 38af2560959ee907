"""Reading and writing checkpoint files safely."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from vitkit.errors import CheckpointError

# Containers that wrap a state dict in training checkpoints, tried in this order.
# I-JEPA checkpoints hold both "encoder" and "target_encoder": take "encoder", as HF and timm do
_CONTAINER_KEYS = ("state_dict", "model", "teacher", "encoder", "target_encoder", "module")


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint object (Lightning ``state_dict``, DINOv2 ``teacher``,
    I-JEPA ``encoder``/``target_encoder``...)."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _CONTAINER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key], path)
    raise CheckpointError(f"{path}: no state dict of tensors found (top-level keys: "
                          f"{sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__})")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors from ``.safetensors``, ``.pth``/``.pt``/``.bin``/``.tar``, or an HF directory.

    Pickles are opened with ``torch.load(weights_only=True)``: a file that needs arbitrary code to
    unpickle is refused. Returns ``(state_dict, metadata)``; metadata is the safetensors header metadata.
    """
    path = Path(path)
    if path.is_dir():
        return read_state_dict(find_weights_file(path))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        sd, meta = {}, {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                sd[k] = f.get_tensor(k)
        return sd, meta
    if path.suffix == ".json" and path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        sd = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(read_state_dict(path.parent / shard)[0])
        return sd, {}
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} is a pickle that needs code to load, and vitkit only opens pickles with "
            f"torch.load(weights_only=True). If you trust the file, load it yourself "
            f"(torch.load(path, weights_only=False)), take its state dict and save it with "
            f"safetensors, or pass the state dict directly. Original error: {str(e).splitlines()[0]}") from None
    return _unwrap(obj, path), {}


def find_weights_file(directory: Path) -> Path:
    """The weights file of a Hugging Face style directory (safetensors first)."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if (directory / name).exists():
            return directory / name
    found = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(f"{directory} has no model.safetensors or pytorch_model.bin (found: {found[:10]})")


def save_safetensors(sd: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(path), metadata=metadata)
