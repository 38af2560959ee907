"""Where pretrained weights live: vitkit's cache, the torch-hub and Hugging Face caches, downloads.

Search order for a preset's file: ``$VITKIT_HOME`` (default ``~/.cache/vitkit``), the torch hub
checkpoint directory, then the Hugging Face cache for the preset's repository. Downloads happen only
when online (``VITKIT_OFFLINE``/``HF_HUB_OFFLINE`` unset) and a public URL exists; otherwise the error
names the file and the directory to put it in.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vitkit.errors import WeightsNotFoundError


def vitkit_home() -> Path:
    return Path(os.environ.get("VITKIT_HOME", Path.home() / ".cache" / "vitkit")).expanduser()


def torch_hub_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_dir() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return hf_home / "hub"


def offline() -> bool:
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes")
               for v in ("VITKIT_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_snapshot(repo_id: str) -> Path | None:
    """A cached snapshot directory for ``repo_id`` (vitkit cache first, then the HF cache)."""
    own = vitkit_home() / "hf" / repo_id
    if (own / "config.json").exists():
        return own
    repo_dir = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snaps = repo_dir / "snapshots"
    if snaps.is_dir():
        ref = repo_dir / "refs" / "main"
        if ref.exists() and (snaps / ref.read_text().strip() / "config.json").exists():
            return snaps / ref.read_text().strip()
        for snap in sorted(snaps.iterdir()):
            if (snap / "config.json").exists():
                return snap
    return None


_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hf_id(name: str | Path) -> bool:
    """Whether ``name`` is shaped like a Hugging Face model id (``org/name``), the one check vitkit makes. A
    path that exists on disk is a path, never an id."""
    return isinstance(name, str) and bool(_HF_ID.match(name)) and not Path(name).exists()


def resolve_hf(repo_id: str) -> Path:
    """Local directory of a Hugging Face model id, downloading it when online."""
    found = hf_snapshot(repo_id)
    if found is not None:
        return found
    if not offline():
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            snapshot_download = None
        if snapshot_download is not None:
            try:
                return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
            except Exception as e:  # network, auth (gated repos), missing repo: report with the cache hint
                raise WeightsNotFoundError(_hf_hint(repo_id, f"download failed: {type(e).__name__}: {e}")) from e
    raise WeightsNotFoundError(_hf_hint(repo_id, "offline and not cached"))


def _hf_hint(repo_id: str, why: str) -> str:
    return (f"Hugging Face model {repo_id!r} is not available ({why}). Put a copy of the repository "
            f"(config.json + model.safetensors) into {vitkit_home() / 'hf' / repo_id}, or into the HF cache "
            f"{hf_cache_dir()} (e.g. `huggingface-cli download {repo_id}` on a machine with internet).")


def _file_candidates(filename: str, hf_id: str | None) -> list[Path]:
    candidates = [vitkit_home() / filename, torch_hub_dir() / filename]
    snap = hf_snapshot(hf_id) if hf_id else None
    if snap is not None:
        candidates.append(snap / filename)
    return candidates


def local_file(filename: str, hf_id: str | None = None) -> Path | None:
    """A local copy of an official checkpoint file (``$VITKIT_HOME``, the torch hub directory, the Hugging Face
    snapshot of ``hf_id``), or None: never downloads."""
    return next((c for c in _file_candidates(filename, hf_id) if c.exists()), None)


def resolve_file(filename: str, url: str | None, hf_id: str | None = None) -> Path:
    """Local path of an official checkpoint file, downloading from ``url`` when online."""
    found = local_file(filename, hf_id)
    if found is not None:
        return found
    candidates = _file_candidates(filename, hf_id)
    if url and not offline():
        import torch.hub

        dst = vitkit_home() / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(dst), progress=True)
            return dst
        except Exception as e:  # network errors: report with the cache hint
            raise WeightsNotFoundError(
                f"could not download {url} ({type(e).__name__}: {e}). Download {filename} yourself and put "
                f"it into {vitkit_home()} (or set VITKIT_HOME).") from e
    where = f"from {url} " if url else ""
    raise WeightsNotFoundError(
        f"pretrained weights {filename} not found in {', '.join(str(c.parent) for c in candidates)}"
        + (" and vitkit is offline" if url else "")
        + f". Download the file {where}and put it into {vitkit_home()} (or set VITKIT_HOME), "
        f"or pass pretrained=<path>, or pretrained=False for random weights.")
