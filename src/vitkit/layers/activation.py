"""Activations by name: the one table the blocks (``act="gelu"``) and the heads (``activation="relu"``) share."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from vitkit.errors import ConfigError

__all__ = ["ACTIVATIONS", "QuickGELU", "get_act_layer", "make_activation"]


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation of OpenAI CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# name -> a factory of a fresh module; ``gelu`` is the exact erf form, ``gelu_tanh`` the tanh approximation
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "mish": nn.Mish,
}


def get_act_layer(name: str) -> nn.Module:
    """A fresh activation module by name (any case); an unknown name raises :class:`ConfigError` listing them."""
    key = name.lower() if isinstance(name, str) else name
    if key not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}, an nn.Module class "
                          f"or an nn.Module instance")
    return ACTIVATIONS[key]()


def make_activation(activation: str | nn.Module | type[nn.Module]) -> nn.Module:
    """A fresh activation module from a name (``"gelu"``...), a module class, or a module instance (copied,
    so that activations with parameters, e.g. ``nn.PReLU()``, are not shared between layers)."""
    if isinstance(activation, str):
        return get_act_layer(activation)
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation()
    if isinstance(activation, nn.Module):
        return copy.deepcopy(activation)
    raise ConfigError(f"activation must be a name ({sorted(ACTIVATIONS)}), an nn.Module class or an nn.Module "
                      f"instance, got {activation!r}")
