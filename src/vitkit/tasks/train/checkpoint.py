"""Lightning checkpoints: written atomically through Lightning's public plugin API, carrying the run's provenance.

A checkpoint is written to a hidden temporary next to its target and renamed onto it when complete
(:mod:`vitkit.atomic`), so a run killed while saving leaves the previous ``last.ckpt`` intact, never half a
file. :class:`AtomicCheckpointIO` does this for every strategy that writes through its ``CheckpointIO`` (single
device, DDP, and FSDP2 with full checkpoints): ``Trainer(plugins=[AtomicCheckpointIO()])``. Sharded FSDP2
checkpoints are folders written by every rank; :class:`~vitkit.tasks.train.distributed.FSDP2Strategy` swaps them
into place the same way (:func:`save_sharded_atomically`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from vitkit.atomic import atomic_path, commit, temp_path

__all__ = ["AtomicCheckpointIO", "RunProvenance", "save_sharded_atomically"]


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


class RunProvenance(Callback):
    """Store ``extra`` (e.g. the model config) and every rank's RNG states in each checkpoint, and restore the
    states on resume (exact resume: ranks draw different amounts of randomness, e.g. the loss's point sampling
    depends on the data)."""

    def __init__(self, extra: dict[str, Any] | None = None):
        self.extra = dict(extra or {})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint.update(self.extra)
        state = {"torch": torch.get_rng_state(),
                 "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
        states = [state]
        if trainer.world_size > 1:  # collective: every rank saves (rank 0 writes the metadata)
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
        checkpoint["vitkit_rng"] = states

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("vitkit_rng")
        if not states:
            return
        if len(states) != trainer.world_size:
            warnings.warn(f"checkpoint has RNG states of {len(states)} ranks, resuming on {trainer.world_size}: "
                          f"the run continues but is not bit-identical", stacklevel=1)
        rng = states[trainer.global_rank % len(states)]
        torch.set_rng_state(rng["torch"])
        state = list(np.random.get_state())
        state[1] = rng["numpy"].numpy().astype(np.uint32)
        np.random.set_state(tuple(state))
