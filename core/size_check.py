"""The model a config describes, weighed against the checkpoint's tensors before anything is allocated."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import torch
from torch import nn

from .errors import ModelSizeError
from .weights import TensorInfo

#: A model may hold this much more than the checkpoint (new rows of a resized vocabulary,
#: heads re-initialised with ``ignore_mismatched_sizes=True``)...
SIZE_SLACK_RATIO = 1.25
#: ... plus this many elements (64 MiB in float32), so tiny models may grow a little too.
SIZE_SLACK_ELEMENTS = 1 << 24


def model_elements(
    model: nn.Module, tied: Collection[str] = frozenset()
) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    """Elements of ``model``'s checkpoint tensors (``tied`` copies counted once), and the largest three."""
    shapes = [(name, tuple(t.shape)) for name, t in model.state_dict(keep_vars=True).items() if name not in tied]
    largest = sorted(shapes, key=lambda item: math.prod(item[1]), reverse=True)[:3]
    return sum(math.prod(shape) for _, shape in shapes), largest


def checkpoint_capacity(infos: Iterable[TensorInfo]) -> int:
    """How many model elements the checkpoint's tensors can fill.

    A floating tensor fills its own element count, whatever its dtype; a non-floating one
    may pack several elements per byte (quantized weights), so it counts one element per bit.
    """
    total = 0
    for info in infos:
        count = math.prod(info.shape)
        if info.dtype.is_floating_point:
            total += count
        else:
            total += count * info.dtype.itemsize * 8
    return total


def check_size_against_checkpoint(
    model: nn.Module, infos: list[TensorInfo], dtype: torch.dtype, *, origin: str, tied: Collection[str] = frozenset()
) -> None:
    """Refuse a model (built on the meta device) far larger than the checkpoint's tensors could fill.

    Args:
        model: the model, on the meta device (nothing allocated).
        infos: the checkpoint's tensors, as listed by the weight source.
        dtype: the dtype the model would be materialised in (for the message).
        origin: what described the model, for the message (``.../config.json``).
        tied: names of tensors tied to another (counted once).

    Raises:
        ModelSizeError: (a ``ConfigError`` and a ``ShapeMismatchError``) the model has more
            than :data:`SIZE_SLACK_RATIO` times the elements the checkpoint holds, plus
            :data:`SIZE_SLACK_ELEMENTS`.
    """
    wanted, largest = model_elements(model, tied)
    capacity = checkpoint_capacity(infos)
    if wanted <= capacity * SIZE_SLACK_RATIO + SIZE_SLACK_ELEMENTS:
        return
    size = wanted * dtype.itemsize
    files = sorted({str(info.file) for info in infos})
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    biggest = ", ".join(f"{name} {shape}" for name, shape in largest)
    raise ModelSizeError(
        f"{origin}: describes a model of {wanted:,} parameters ({size / 2**30:,.1f} GiB in "
        f"{str(dtype).removeprefix('torch.')}), but the checkpoint's weights ({shown}) hold only {capacity:,} "
        f"values; refused before allocating anything. Its largest tensors would be {biggest}: fix the sizes "
        "(vocab_size, hidden_size, num_hidden_layers, intermediate_size, ...) to match the checkpoint."
    )
