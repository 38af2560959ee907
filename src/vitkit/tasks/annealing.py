"""Mask-annealing schedule for EoMT's masked attention (official recipe: per block, sequential, poly 0.9)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class MaskAnnealing:
    """Probability of keeping each block's attention mask as a function of the global step.

    For block ``i``: 1 before ``start_steps[i]``, 0 from ``end_steps[i]``, and
    ``(1 - (step - start) / (end - start)) ** power`` in between.
    """

    start_steps: Sequence[int]
    end_steps: Sequence[int]
    power: float = 0.9

    def __post_init__(self) -> None:
        if len(self.start_steps) != len(self.end_steps):
            raise ValueError("start_steps and end_steps need one entry per masked block")
        for s, e in zip(self.start_steps, self.end_steps):
            if e <= s:
                raise ValueError(f"annealing end step {e} must be after its start step {s}")

    @classmethod
    def sequential(cls, num_blocks: int, start: int, end: int, power: float = 0.9) -> MaskAnnealing:
        """Blocks annealed one after another, earliest block first, evenly over [start, end)."""
        if end <= start:
            raise ValueError(f"end ({end}) must be after start ({start})")
        span = (end - start) / num_blocks
        starts = [int(round(start + i * span)) for i in range(num_blocks)]
        ends = [int(round(start + (i + 1) * span)) for i in range(num_blocks)]
        return cls(starts, ends, power)

    def probs(self, step: int) -> list[float]:
        out = []
        for s, e in zip(self.start_steps, self.end_steps):
            if step < s:
                out.append(1.0)
            elif step >= e:
                out.append(0.0)
            else:
                out.append((1 - (step - s) / (e - s)) ** self.power)
        return out

    def apply(self, model: torch.nn.Module, step: int) -> list[float]:
        """Write the probabilities for ``step`` into ``model.attn_mask_probs``."""
        p = self.probs(step)
        if len(p) != model.attn_mask_probs.numel():
            raise ValueError(f"schedule has {len(p)} blocks, model has {model.attn_mask_probs.numel()}")
        with torch.no_grad():
            model.attn_mask_probs.copy_(torch.tensor(p, dtype=model.attn_mask_probs.dtype))
        return p
