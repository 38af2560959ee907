"""Heads that turn a backbone's pooled embedding [B, D] into predictions (used by :func:`vitkit.build_model`;
public as :mod:`vitkit.heads`).

Every head derives from :class:`BaseHead` and states its ``input_dim``, so :func:`vitkit.build_model` can
check it against the backbone's embedding size before anything runs::

    from vitkit.heads import MLPHead
    head = MLPHead(input_dim=768, hidden_dims=[512, 256], output_dim=100, dropout=0.1, activation="gelu")
    model = vitkit.build_model("dino_v2_vit", head=head)

A custom head subclasses :class:`BaseHead`, implements the ``input_dim`` property and ``forward(embeddings)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from vitkit.errors import ConfigError, InputError
from vitkit.layers.activation import ACTIVATIONS, make_activation

__all__ = ["ACTIVATIONS", "BaseHead", "IdentityHead", "LinearHead", "MLPHead", "make_activation"]

def _check_dim(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


class BaseHead(nn.Module, ABC):
    """A head: ``forward(embeddings [B, input_dim]) -> predictions``.

    Subclasses implement the ``input_dim`` property (checked against the backbone's embedding size by
    :func:`vitkit.build_model`) and ``forward``.
    """

    @property
    @abstractmethod
    def input_dim(self) -> int:
        """Size of the embeddings this head expects."""

    @abstractmethod
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Map embeddings [B, input_dim] to predictions."""

    def _check_input(self, embeddings: torch.Tensor) -> None:
        if embeddings.shape[-1] != self.input_dim:
            raise InputError(f"{type(self).__name__} expects embeddings of size {self.input_dim}, got a tensor "
                              f"of shape {tuple(embeddings.shape)}")


class LinearHead(BaseHead):
    """One linear layer ``input_dim -> output_dim`` (what ``build_model(..., head=int)`` creates)."""

    def __init__(self, input_dim: int, output_dim: int, bias: bool = True):
        super().__init__()
        self._input_dim = _check_dim("input_dim", input_dim)
        self.output_dim = _check_dim("output_dim", output_dim)
        self.fc = nn.Linear(input_dim, output_dim, bias=bias)

    @property
    def input_dim(self) -> int:
        return self._input_dim

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        self._check_input(embeddings)
        return self.fc(embeddings)


class MLPHead(BaseHead):
    """``Linear -> activation -> Dropout`` for each hidden size, then ``Linear -> output_dim``.

    Args:
        input_dim: embedding size (must match the backbone's).
        hidden_dims: hidden layer sizes, e.g. ``[512, 256]`` (an int means one hidden layer; ``[]`` gives a
            plain linear head).
        output_dim: number of outputs.
        dropout: dropout probability after each hidden activation.
        activation: a name (``"relu"``, ``"gelu"``, ``"tanh"``, ``"silu"``... see ``ACTIVATIONS``), an nn.Module
            class (instantiated per layer) or an instance (copied per layer).
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] | int, output_dim: int, dropout: float = 0.0,
                 activation: str | nn.Module | type[nn.Module] = "gelu"):
        super().__init__()
        self._input_dim = _check_dim("input_dim", input_dim)
        self.output_dim = _check_dim("output_dim", output_dim)
        if isinstance(hidden_dims, int) and not isinstance(hidden_dims, bool):
            hidden_dims = [hidden_dims]
        if isinstance(hidden_dims, (str, bytes)) or not isinstance(hidden_dims, Sequence):
            raise ConfigError(f"hidden_dims must be a list of positive ints, got {hidden_dims!r}")
        self.hidden_dims = [_check_dim(f"hidden_dims[{i}]", h) for i, h in enumerate(hidden_dims)]
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = input_dim
        for h in self.hidden_dims:
            layers += [nn.Linear(width, h), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, output_dim))
        self.mlp = nn.Sequential(*layers)

    @property
    def input_dim(self) -> int:
        return self._input_dim

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        self._check_input(embeddings)
        return self.mlp(embeddings)


class IdentityHead(BaseHead):
    """Returns the embeddings unchanged (``build_model(..., head=None)``: embedding extraction)."""

    def __init__(self, input_dim: int):
        super().__init__()
        self._input_dim = _check_dim("input_dim", input_dim)
        self.output_dim = self._input_dim

    @property
    def input_dim(self) -> int:
        return self._input_dim

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        self._check_input(embeddings)
        return embeddings
