"""Reading and writing checkpoint files safely.

:func:`read_checkpoint` is the one place vitkit opens a checkpoint file. Every way a read can fail (a
missing path, an empty or truncated file, a corrupt archive, a file of another kind under a checkpoint's
name, a pickle that needs code to load) raises a :class:`~vitkit.errors.CheckpointError` that names the
file, says what it found and what to do; a missing path raises
:class:`~vitkit.errors.CheckpointNotFoundError` (also a ``FileNotFoundError``).

Which reader opens a file is decided by its name (``.safetensors`` -> safetensors, ``.pth``/``.pt``/``.bin``/
``.ckpt``/``.tar`` -> ``torch.load(weights_only=True)``); a file whose content contradicts its name is
refused, not guessed. The content is looked at only to explain a failure, and to open files with some
other suffix (``weights.model``) when they are plainly safetensors or PyTorch files.
"""

from __future__ import annotations

import codecs
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from vitkit.atomic import atomic_path
from vitkit.errors import CheckpointError, CheckpointNotFoundError

# Containers that wrap a state dict in training checkpoints, tried in this order.
# I-JEPA checkpoints hold both "encoder" and "target_encoder": take "encoder", as HF and timm do
_CONTAINER_KEYS = ("state_dict", "model", "teacher", "encoder", "target_encoder", "module")

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
ACCEPTED = ("vitkit reads .safetensors files, PyTorch .pth/.pt/.bin/.ckpt/.tar files (torch.load with "
            "weights_only=True), sharded *.safetensors.index.json / *.bin.index.json, and model directories "
            "holding model.safetensors or pytorch_model.bin")

# what _sniff found, in words
_KINDS = {"empty": "an empty file (0 bytes)", "safetensors": "a safetensors file",
          "torch-zip": "a PyTorch zip checkpoint (torch.save)", "pickle": "a pickle (legacy torch.save format)",
          "broken-zip": "a zip archive whose directory cannot be read (truncated or corrupt)",
          "npz": "a NumPy .npz archive", "zip": "a zip archive that is not a PyTorch checkpoint",
          "hdf5": "an HDF5 file", "npy": "a NumPy .npy array", "json": "a JSON text file", "text": "a text file",
          "lfs": "a Git LFS pointer, not the weights (run `git lfs pull` in the repository it came from)",
          "html": "an HTML page (a failed download saves the server's error page)",
          "unknown": "not a checkpoint format vitkit knows"}


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
                          f"{sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__}). Expected a dict "
                          f"of tensors, or one under {', '.join(map(repr, _CONTAINER_KEYS))}; extract the model's "
                          f"state dict and save that.")


# ------------------------------------------------------------------------------------------- diagnosis
def _sniff(path: Path) -> str:
    """What a file is, from its first bytes (one of the keys of ``_KINDS``)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return "broken-zip"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch-zip"
        return "npz" if names and all(n.endswith(".npy") for n in names) else "zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    # safetensors: little-endian u64 header length, then the JSON header
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    # an incremental decoder keeps a multi-byte character cut at the end of the 64 bytes for later
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    if "\ufffd" in text or not all(c.isprintable() or c.isspace() for c in text):
        return "unknown"
    if text.startswith("version https://git-lfs"):
        return "lfs"
    if text.lstrip().lower().startswith(("<!doctype html", "<html")):
        return "html"
    return "json" if text.lstrip().startswith(("{", "[")) else "text"


def _safetensors_damage(path: Path) -> str | None:
    """Why a safetensors file cannot be read, when its own header tells (truncation); else None."""
    size = path.stat().st_size
    if size < 8:
        return f"only {size} bytes, shorter than the 8-byte header length"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 + n:
            return f"the header says it is {n} bytes long, but the file has only {size} bytes"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its JSON header is corrupt"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{size} bytes, the header describes {expected}"
    return None


def _redo(path: Path) -> str:
    """What to do about a damaged file: fetch it again (delete it first when it is in a download cache)."""
    from vitkit.weights.hub import hf_cache_dir, torch_hub_dir, vitkit_home

    where = path.resolve()
    for cache in (vitkit_home(), torch_hub_dir(), hf_cache_dir()):
        if not where.is_relative_to(Path(cache).resolve()):
            continue
        return (f"It is in the download cache {cache}: delete it and load again to download it again (or copy "
                f"a good copy there).")
    return "Download or copy it again (an interrupted download or copy leaves such a file)."


def _damaged(path: Path, what: str, cause: BaseException | None = None) -> CheckpointError:
    why = f"; reader said: {type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200].rstrip('.')}" \
        if cause is not None else ""
    return CheckpointError(f"{path} is {what}{why}. {_redo(path)} {ACCEPTED}.")


# --------------------------------------------------------------------------------------------- readers
def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        sd = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                sd[k] = f.get_tensor(k)
        return sd, meta
    except PermissionError as e:
        raise _unreadable(path, e) from e
    except Exception as e:  # safetensors raises SafetensorError (naming no file) for every damage
        damage = _safetensors_damage(path)
        raise _damaged(path, "a truncated or corrupt safetensors file" + (f" ({damage})" if damage else ""),
                       e) from e


def read_safetensors_keys(path: str | Path) -> list[str]:
    """Tensor names of a safetensors file, read from its header (no tensors loaded); errors as
    :func:`read_checkpoint`."""
    from safetensors import safe_open

    path = _existing_file(Path(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except PermissionError as e:
        raise _unreadable(path, e) from e
    except Exception as e:  # noqa: BLE001 - see _read_safetensors
        damage = _safetensors_damage(path)
        raise _damaged(path, "a truncated or corrupt safetensors file" + (f" ({damage})" if damage else ""),
                       e) from e


def _zip_crc_error(path: Path, kind: str) -> bool:
    """Whether a PyTorch zip has a member that fails its CRC (damage can look like an unsafe pickle)."""
    if kind != "torch-zip":
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is not None
    except Exception:  # noqa: BLE001 - unreadable is damaged too
        return True


def _read_torch(path: Path, kind: str) -> Any:
    what = (f"a truncated or corrupt PyTorch checkpoint ({_KINDS[kind]})" if kind in ("torch-zip", "pickle") else
            "not a readable PyTorch checkpoint (its first bytes match no format vitkit knows)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise _unreadable(path, e) from e
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e) or _zip_crc_error(path, kind):
            raise _damaged(path, what, e) from e
        raise CheckpointError(
            f"{path} is a pickle that needs code to load, and vitkit only opens pickles with "
            f"torch.load(weights_only=True). If you trust the file, load it yourself "
            f"(torch.load(path, weights_only=False)), take its state dict and save it with "
            f"safetensors, or pass the state dict directly. Original error: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - torch reports damage as RuntimeError, OSError, EOFError, KeyError...
        raise _damaged(path, what, e) from e


def _read_index(path: Path) -> dict[str, torch.Tensor]:
    """A sharded checkpoint: ``*.index.json`` with a ``weight_map`` of tensor name -> shard file."""
    try:
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    except PermissionError as e:
        raise _unreadable(path, e) from e
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise _damaged(path, "not a valid sharded-checkpoint index (expected JSON with a weight_map of tensor "
                             "name -> shard file)", e) from e
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (path.parent / shard).is_file():
            raise CheckpointNotFoundError(f"shard {path.parent / shard} listed in {path} does not exist. Download "
                                          f"or copy every shard the index lists next to it.")
        sd.update(read_state_dict(path.parent / shard)[0])
    return sd


def _unreadable(path: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"{path} cannot be read ({e.strerror or e}); check the file's permissions.")


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise CheckpointNotFoundError(
            f"checkpoint {path} does not exist" + ("" if path.is_absolute() else f" (relative to {os.getcwd()})")
            + f". Check the path. {ACCEPTED}.")
    if path.is_dir():
        return find_weights_file(path)
    return path


def read_checkpoint(path: str | Path) -> tuple[Any, dict[str, str]]:
    """Open one checkpoint: the object it stores and its safetensors metadata (``{}`` for pickles).

    Safetensors files and sharded indexes give a dict of tensors; PyTorch files whatever ``torch.load``
    (``weights_only=True``: a file that needs code to unpickle is refused) returns, e.g. a Lightning
    checkpoint dict. A directory is read through its ``model.safetensors`` / ``pytorch_model.bin``.

    Raises:
        CheckpointNotFoundError: the path does not exist, or a directory has no weights file.
        CheckpointError: anything else that keeps the file from being read; the message names the file.
    """
    path = _existing_file(Path(path))
    try:
        kind = _sniff(path)
    except OSError as e:
        raise _unreadable(path, e) from e
    suffix = path.suffix.lower()
    if kind == "empty":
        raise _damaged(path, "empty (0 bytes), so it holds no weights")
    if path.name.endswith(".index.json"):
        return _read_index(path), {}
    if suffix == ".safetensors":
        if kind in ("torch-zip", "pickle"):
            raise CheckpointError(f"{path} is named .safetensors but is {_KINDS[kind]}; rename it to "
                                  f"{path.with_suffix('.pth').name} so vitkit opens it with torch.load.")
        if kind not in ("safetensors", "unknown"):  # unknown: a damaged header reads as bytes of no format
            raise CheckpointError(f"{path} is named .safetensors but is {_KINDS[kind]}. Pass the weights "
                                  f"file itself. {ACCEPTED}.")
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        if kind == "safetensors":
            raise CheckpointError(f"{path} is named {suffix} but is {_KINDS[kind]}; rename it to "
                                  f"{path.with_suffix('.safetensors').name} so vitkit opens it as safetensors.")
        if kind == "broken-zip":
            raise _damaged(path, f"a truncated or corrupt PyTorch checkpoint ({_KINDS[kind]})")
        if kind in ("npz", "zip", "hdf5", "npy", "json", "text", "lfs", "html"):
            raise CheckpointError(f"{path} is named {suffix} but is {_KINDS[kind]}, not a PyTorch checkpoint. "
                                  f"Pass the weights file itself. {ACCEPTED}.")
        return _read_torch(path, kind), {}
    if kind == "safetensors":  # another suffix: open what is plainly a checkpoint
        return _read_safetensors(path)
    if kind in ("torch-zip", "pickle"):
        return _read_torch(path, kind), {}
    if kind == "broken-zip":
        raise _damaged(path, _KINDS[kind])
    raise CheckpointError(f"{path} is {_KINDS[kind]}, not a checkpoint. {ACCEPTED}.")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors from ``.safetensors``, ``.pth``/``.pt``/``.bin``/``.ckpt``/``.tar``, or an HF directory.

    Returns ``(state_dict, metadata)``; metadata is the safetensors header metadata. Training checkpoints
    are unwrapped (Lightning ``state_dict``, DINOv2 ``teacher``, I-JEPA ``encoder``...). Errors: see
    :func:`read_checkpoint`.
    """
    obj, meta = read_checkpoint(path)
    return _unwrap(obj, Path(path)), meta


def read_json(path: str | Path) -> dict[str, Any]:
    """A model directory's ``config.json`` (or another JSON file that is part of a checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} does not exist. Check the path; a model directory needs its "
                                      f"config.json next to the weights.")
    try:
        doc = json.loads(path.read_text())
    except PermissionError as e:
        raise _unreadable(path, e) from e
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}). Download or copy it again.") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} holds a JSON {type(doc).__name__}, expected an object of config fields. "
                              f"Download or copy it again.")
    return doc


def find_weights_file(directory: Path) -> Path:
    """The weights file of a Hugging Face style directory (safetensors first)."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if (directory / name).exists():
            return directory / name
    found = sorted(p.name for p in directory.iterdir())
    raise CheckpointNotFoundError(
        f"{directory} has no model.safetensors or pytorch_model.bin (found: {found[:10]}). Pass the weights "
        f"file itself, or a directory that holds one. {ACCEPTED}.")


def save_safetensors(sd: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors, atomically (:mod:`vitkit.atomic`)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp), metadata=metadata)
