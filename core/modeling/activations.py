"""Activation functions by their ``config.json`` names, computing what transformers computes."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import OneOf

Activation = Callable[[torch.Tensor], torch.Tensor]


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def gelu_python(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_fast": gelu_fast,
    "gelu_python": gelu_python,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python_tanh": gelu_new,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "relu2": relu2,
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


#: The field check of a key naming an activation (``hidden_act``, ``activation_function``): one of
#: :data:`ACTIVATIONS`, read when the check runs (so :func:`register_activation` extends it).
KnownActivation = OneOf(lambda: ACTIVATIONS, "activation")


def register_activation(name: str, fn: Activation) -> None:
    """Make ``name`` a known activation (``hidden_act`` in ``config.json``), computing ``fn``.

    Raises:
        ValueError: ``name`` is already registered to another function.
    """
    if ACTIVATIONS.get(name, fn) is not fn:
        raise ValueError(f"activation {name!r} is already registered")
    ACTIVATIONS[name] = fn


def get_activation(name: str) -> Activation:
    """The activation called ``name`` in ``config.json``; ``ValueError`` lists the known ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}") from None
