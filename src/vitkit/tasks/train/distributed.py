"""Fully sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``) through Lightning.

Every vitkit :class:`~vitkit.layers.block.Block` becomes one FSDP unit (its parameters are gathered
just before it runs and freed after), the rest of the model (patch embedding, queries, heads) is the
root unit. FSDP2 runs on CPU processes with gloo as well as on GPUs with NCCL, so the same recipe is
tested here on two CPU processes and used on many GPUs. Checkpoints are sharded directories written
by ``torch.distributed.checkpoint`` (every rank writes its own shard) and resume on the same or a
different number of ranks; :func:`load_full_state_dict` turns one into an ordinary state dict.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from vitkit.dtypes import parse_dtype
from vitkit.layers.block import Block
from vitkit.tasks.train.checkpoint import save_sharded_atomically


def shard_model(model: torch.nn.Module, mesh, param_dtype=None, reduce_dtype=None,
                activation_checkpointing: bool = False) -> torch.nn.Module:
    """Apply FSDP2 to ``model`` in place: one unit per vitkit Block, then the root.

    ``param_dtype`` (e.g. ``"bf16"``) is the dtype parameters are gathered and computed in, with fp32
    master weights kept sharded; ``reduce_dtype`` the dtype gradients are reduced in (default: fp32
    when computing in low precision). ``activation_checkpointing`` recomputes each block in backward
    (vitkit's own checkpointing, which composes with FSDP2).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        return model  # configure_model may run again (fit, then validate)
    param_dtype = parse_dtype(param_dtype, "param_dtype")
    reduce_dtype = parse_dtype(reduce_dtype, "reduce_dtype") or (torch.float32 if param_dtype is not None else None)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no vitkit Block to shard; FSDP here wraps vitkit models")
    if activation_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise TypeError(f"{type(model).__name__} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    # EoMT returns per-layer logits some of which are views; vitkit's loss never modifies them in place,
    # which is what FSDP2's warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for blk in blocks:
        fully_shard(blk, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for method in ("forward_features", "get_intermediate_layers"):  # entry points besides forward()
        if callable(getattr(model, method, None)):
            register_fsdp_forward_method(model, method)
    return model


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning strategy for fully sharded data parallel over all ranks (no tensor parallelism).

    Lightning's ``FSDPStrategy`` uses FSDP1, which refuses CPU devices; this one uses FSDP2 through
    Lightning's ``ModelParallelStrategy`` and shards in the module's ``configure_model`` hook
    (:class:`~vitkit.tasks.train.SegmentationModule` calls :meth:`shard`).

    Args:
        param_dtype, reduce_dtype: mixed precision of the sharded model (see :func:`shard_model`).
        activation_checkpointing: recompute every block in backward.
        sharded_checkpoint: save checkpoints as sharded directories (True) or as one full file gathered
            on rank 0 (False; needs the whole model in CPU memory).
    """

    def __init__(self, param_dtype: str | None = None, reduce_dtype: str | None = None,
                 activation_checkpointing: bool = False, sharded_checkpoint: bool = True, **kwargs: Any):
        super().__init__(save_distributed_checkpoint=sharded_checkpoint, **kwargs)
        self.param_dtype = parse_dtype(param_dtype, "param_dtype")
        self.reduce_dtype = parse_dtype(reduce_dtype, "reduce_dtype")
        self.activation_checkpointing = activation_checkpointing

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        # one data-parallel dimension over every rank (Lightning's "auto" would make it tensor parallel)
        self._data_parallel_size = self.world_size
        self._tensor_parallel_size = 1

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        return shard_model(model, self.device_mesh["data_parallel"], self.param_dtype, self.reduce_dtype,
                           self.activation_checkpointing)

    @property
    def sharded_checkpoint(self) -> bool:
        return self._save_distributed_checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """As Lightning's, atomically: a sharded folder under a temporary name renamed onto ``filepath`` when
        every rank wrote its shard; a full checkpoint through the ``CheckpointIO`` (``AtomicCheckpointIO``)."""
        if not self.sharded_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        save_sharded_atomically(self, lambda tmp: super(FSDP2Strategy, self).save_checkpoint(
            checkpoint, tmp, storage_options), filepath)
        return None


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of a sharded model, on CPU on rank 0 (empty on other ranks).
    Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory written by ``torch.distributed.checkpoint`` (Lightning puts its metadata in ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def load_full_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a sharded checkpoint directory in one process into a Lightning-style checkpoint dict:
    ``state_dict`` (full tensors) plus the metadata Lightning stored next to the shards."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from vitkit.weights.io import read_checkpoint

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint directory (no .metadata file)")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        ckpt = read_checkpoint(Path(tmp) / "full.pt")[0]
    meta = path / "meta.pt"
    if meta.is_file():
        ckpt.update(read_checkpoint(meta)[0])
    return ckpt
