"""Atomic Lightning checkpoints through Lightning's public plugin API.

A checkpoint is written to a hidden temporary next to its target and renamed onto it when complete
(:mod:`vitkit.atomic`), so a run killed while saving leaves the previous ``last.ckpt`` intact, never half a
file. :class:`AtomicCheckpointIO` does this for every strategy that writes through its ``CheckpointIO`` (single
device, DDP, and FSDP2 with full checkpoints): ``Trainer(plugins=[AtomicCheckpointIO()])``. Sharded FSDP2
checkpoints are folders written by every rank; :class:`~vitkit.tasks.train.distributed.FSDP2Strategy` swaps them
into place the same way (:func:`save_sharded_atomically`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from vitkit.atomic import atomic_path, commit, temp_path

__all__ = ["AtomicCheckpointIO", "save_sharded_atomically"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing each file to a temporary renamed onto the target when done
    (remote ``fsspec`` URLs are written as Lightning writes them)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, str(tmp), storage_options)
        return None


def save_sharded_atomically(strategy: Any, save: Any, filepath: Any) -> None:
    """Write a checkpoint folder that every rank contributes to under one temporary name, then move it onto
    ``filepath`` on rank 0.

    Args:
        strategy: the Lightning strategy (its public ``broadcast``, ``barrier`` and ``global_rank``).
        save: ``save(path)`` writes the checkpoint to ``path`` (collective).
        filepath: the target folder (replaced if it exists).
    """
    target = Path(strategy.broadcast(str(filepath)))
    tmp = temp_path(target) if strategy.global_rank == 0 else None  # also deletes a killed run's temporaries
    tmp = Path(strategy.broadcast(None if tmp is None else str(tmp)))
    save(tmp)
    strategy.barrier("vitkit.checkpoint.written")  # every shard is on disk before the folder moves
    if strategy.global_rank == 0:
        commit(tmp, target)
    strategy.barrier("vitkit.checkpoint.committed")
