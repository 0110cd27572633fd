"""Weight streams (and, re-exported from :mod:`lmport.weight_map`, weight maps).

A :class:`WeightSource` is what a weight format opens (:class:`lmport.formats.WeightFormat`,
``open_weights``): it lists the checkpoint's tensor names with their shapes and reads one tensor at a
time. A :class:`WeightMap` is plain data on a model class: the rules between the
checkpoint's names and layouts and the module's, run forward on load and
backward on save.

Patterns use ``*`` for one dotted segment and ``**`` for any run of segments;
the placeholders of a rule's two sides correspond in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .errors import DuplicateTensorError, UnsupportedTensorError

# --- weight sources --------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint says of one tensor before it is read."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


@runtime_checkable
class WeightSource(Protocol):
    """A lazily read checkpoint: names and shapes first, tensors on demand."""

    #: Every file the source reads, in reading order.
    files: list[Path]

    def infos(self) -> Iterator[TensorInfo]:
        """Every tensor's name, file, shape and dtype, grouped by file, in reading order."""
        ...

    def read(self, info: TensorInfo) -> torch.Tensor:
        """Read one tensor (CPU). Each tensor is read at most once per load, possibly from several threads."""
        ...

    def close(self) -> None:
        """Release open files and maps."""
        ...


@runtime_checkable
class CastingWeightSource(WeightSource, Protocol):
    """A :class:`WeightSource` that also reads a tensor straight into the dtype it will be cast to.

    The loader uses :meth:`read_as` instead of :meth:`~WeightSource.read` for every source
    that has it (the builtin safetensors source does).
    """

    def read_as(self, info: TensorInfo, dtype: torch.dtype | None, *, transient: bool = False) -> torch.Tensor:
        """Read one tensor, floating tensors cast to ``dtype`` (``None``: as stored).

        The source chooses how to read (zero-copy when no cast follows) or returns the
        tensor already cast. With ``transient=True`` the loader keeps only copies of the
        tensor (it is split, transposed, quantized, offloaded or moved to another device):
        read it into memory of its own rather than as a view into a file mapping, whose
        pages would stay counted in the process's RSS for as long as the file is mapped.
        """
        ...


@runtime_checkable
class SlicingWeightSource(WeightSource, Protocol):
    """A :class:`WeightSource` that reads part of a tensor: only the bytes of a box of its elements.

    A distributed load (:mod:`lmport.distributed`) asks each rank's source for the boxes of the
    shards that rank owns; a source without this method is read whole, once per tensor, and sliced.
    """

    def read_slice(
        self,
        info: TensorInfo,
        index: tuple[slice, ...],
        dtype: torch.dtype | None,
        *,
        out: torch.Tensor | None = None,
        mapped: bool = False,
    ) -> torch.Tensor:
        """Read the elements of ``info`` in ``index`` (one ``slice(start, stop)`` per dim, step 1).

        Returns the box as a C-contiguous CPU tensor (its shape the slices' lengths), floating tensors
        cast to ``dtype`` (``None``: as stored); written into ``out`` (contiguous, that shape and dtype)
        when given. Only the box's bytes are read from the file. With ``mapped=True`` (no ``out``, no
        cast) the source may return a writable, copy-on-write view of a file mapping instead (zero-copy;
        pages are read when touched): the caller keeps it as the tensor's storage.
        """
        ...


def box_runs(shape: Sequence[int], index: Sequence[slice]) -> tuple[list[int], int]:
    """The contiguous runs of a box ``index`` of a C-contiguous tensor of ``shape``: (start element of
    each run, in C order of the box; elements per run). Runs are as long as the layout allows."""
    n = len(shape)
    bounds = [(s.start or 0, shape[d] if s.stop is None else s.stop) for d, s in enumerate(index)]
    k = n - 1
    while k >= 0 and bounds[k] == (0, shape[k]):
        k -= 1
    if k < 0:
        total = 1
        for d in shape:
            total *= d
        return [0], total
    inner = 1
    for d in shape[k + 1 :]:
        inner *= d
    starts = torch.tensor([bounds[k][0] * inner], dtype=torch.int64)
    stride = inner * shape[k]
    for d in range(k - 1, -1, -1):
        lo, hi = bounds[d]
        starts = (torch.arange(lo, hi, dtype=torch.int64) * stride).unsqueeze(1) + starts.unsqueeze(0)
        starts = starts.reshape(-1)
        stride *= shape[d]
    return starts.tolist(), (bounds[k][1] - bounds[k][0]) * inner


#: The floating dtypes lmport computes in. A floating parameter loads only from a tensor of one of
#: these (cast to the load's dtype), unless a quantizer claims it.
COMPUTE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def check_unique(infos: Iterable[TensorInfo], index: Path | None = None) -> None:
    """Refuse a tensor name stored in two files: which copy the checkpoint means cannot be known.

    Raises:
        DuplicateTensorError: naming the tensor, both files and the index.
    """
    seen: dict[str, Path] = {}
    for info in infos:
        first = seen.setdefault(info.name, info.file)
        if first != info.file:
            listed = f" ({index} lists it in {_listed_in(index, info.name)})" if index is not None else ""
            raise DuplicateTensorError(
                f"{info.file}: tensor {info.name!r} is also stored in {first}{listed}; a checkpoint must hold each "
                "tensor once. Remove the stray copy or re-save the checkpoint"
            )


def _listed_in(index: Path, name: str) -> str:
    from .shards import read_weight_map

    try:
        return repr(read_weight_map(index).get(name, "no shard"))
    except Exception:  # only for the message
        return "an unreadable entry"


def check_loadable(info: TensorInfo, module_name: str, needed: torch.dtype) -> None:
    """Refuse ``info`` for a parameter of dtype ``needed`` when its dtype cannot serve it.

    A floating parameter needs a float16/bfloat16/float32/float64 tensor: integers,
    booleans, complex numbers and float8 (a quantized format, meaningless without its
    scales) are refused; so is a floating tensor for a non-floating parameter.

    Raises:
        UnsupportedTensorError: naming the file, the tensor and the parameter.
    """
    have = info.dtype
    label = str(have).removeprefix("torch.")
    where = f"{info.file}: tensor {info.name!r} is stored as {label}"
    if needed.is_floating_point:
        if have in COMPUTE_DTYPES:
            return
        if have.is_floating_point:  # float8 and narrower
            raise UnsupportedTensorError(
                f"{where}, a quantized format lmport cannot compute with, for {module_name!r}. Such a checkpoint "
                "loads only with a quantization_config (in config.json) that an installed quantizer plugin serves; "
                "otherwise load its unquantized original"
            )
        raise UnsupportedTensorError(
            f"{where}, but {module_name!r} holds floating-point weights: the checkpoint is damaged or stored "
            "quantized without a quantization_config in config.json"
        )
    if have.is_floating_point or have.is_complex or (have == torch.bool) != (needed == torch.bool):
        raise UnsupportedTensorError(
            f"{where}, but {module_name!r} is a {str(needed).removeprefix('torch.')} tensor"
        )


from .weight_map import IDENTITY, Rename, Split, Transpose, WeightMap, match, translate  # noqa: E402 - re-exported

def dtype_bytes(infos: Iterable[TensorInfo]) -> dict[str, int]:
    """Bytes per dtype over ``infos`` (for ``lmport inspect``)."""
    out: dict[str, int] = {}
    for info in infos:
        n = 1
        for d in info.shape:
            n *= d
        key = str(info.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + n * torch.empty((), dtype=info.dtype).element_size()
    return out


__all__ = [
    "IDENTITY",
    "Rename",
    "SlicingWeightSource",
    "Split",
    "TensorInfo",
    "Transpose",
    "COMPUTE_DTYPES",
    "WeightMap",
    "WeightSource",
    "check_loadable",
    "box_runs",
    "check_unique",
    "dtype_bytes",
    "match",
    "translate",
]
