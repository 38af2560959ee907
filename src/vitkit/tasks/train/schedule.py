"""Learning-rate schedules and layer-wise learning-rate decay."""

from __future__ import annotations

import math
import re

from torch import nn


def warmup_decay_lambda(total_steps: int, warmup_steps: int = 0, kind: str = "poly", power: float = 0.9,
                        min_factor: float = 0.0):
    """``LambdaLR`` factor: linear warm-up, then polynomial (``(1 - t) ** power``) or cosine decay to
    ``min_factor``, where t runs from 0 at the end of warm-up to 1 at ``total_steps``."""
    if kind not in ("poly", "cosine", "constant"):
        raise ValueError(f"unknown schedule {kind!r}; expected 'poly', 'cosine' or 'constant'")
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = (1 - t) ** power if kind == "poly" else 0.5 * (1 + math.cos(math.pi * t))
        return min_factor + (1 - min_factor) * decay

    return factor


def layerwise_param_groups(model: nn.Module, lr: float, weight_decay: float, llrd: float = 1.0,
                           backbone_prefix: str = "encoder.") -> list[dict]:
    """Parameter groups with layer-wise LR decay for a model holding a vitkit backbone.

    Block ``i`` of a depth-``L`` backbone gets ``lr * llrd ** (L - 1 - i)``; patch embedding, position
    embedding and prefix tokens get block 0's rate; the backbone's final norm and everything outside the
    backbone (heads, queries) get ``lr``. Biases, norms, tokens and position embeddings get no weight decay.
    """
    depth = sum(1 for n, _ in model.named_modules() if re.fullmatch(re.escape(backbone_prefix) + r"blocks\.\d+", n))
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if name.startswith(backbone_prefix) and depth:
            m = re.match(re.escape(backbone_prefix) + r"blocks\.(\d+)\.", name)
            if m:
                scale = llrd ** (depth - 1 - int(m.group(1)))
            elif not name.startswith(backbone_prefix + "norm"):
                scale = llrd ** (depth - 1)
        no_decay = p.ndim <= 1 or name.endswith(("token", "tokens", "pos_embed")) or ".q." in f".{name}"
        wd = 0.0 if no_decay else weight_decay
        groups.setdefault((scale, wd), []).append(p)
    return [{"params": ps, "lr": lr * s, "weight_decay": wd, "lr_scale": s} for (s, wd), ps in groups.items()]
