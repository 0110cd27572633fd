"""``save_pretrained`` of a sharded model: the Hugging Face format, gathered one tensor at a time.

Every rank takes part in gathering each tensor (``DTensor.full_tensor()``, in the same order on every
rank); rank 0 writes it and drops it. A safetensors file is streamed: its header is computed from the
shapes up front, then each tensor's bytes are appended as it is gathered, so no rank ever holds more than
the tensors of one checkpoint entry (a fused one such as GPT-2's ``c_attn`` needs its parts together).
A ``.bin`` file is a pickle written whole: with ``safe_serialization=False`` rank 0 holds one file's tensors.
Rank 0 writes the index and the configs; the folder is replaced atomically (:mod:`lmport.atomic`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import DistributedError
from ..shards import add_variant

_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}  # fmt: skip


def is_sharded(model: Any, state_dict: Mapping[str, Any] | None = None) -> bool:
    """Whether ``state_dict`` (default: ``model``'s parameters and buffers) holds ``DTensor`` shards."""
    import sys

    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist; importing it costs about a second
        return False
    from torch.distributed.tensor import DTensor

    if state_dict is not None:
        return any(isinstance(t, DTensor) for t in state_dict.values())
    return any(isinstance(t, DTensor) for t in (*model.parameters(), *model.buffers()))


class Entry:
    """One checkpoint tensor to write: its name, shape, dtype, and the module tensors it is made of."""

    def __init__(self, name: str, meta: torch.Tensor, parts: list[str]) -> None:
        self.name = name
        self.shape = tuple(meta.shape)
        self.dtype = meta.dtype
        self.parts = parts
        self.nbytes = meta.numel() * meta.element_size()


def plan_entries(state: Mapping[str, torch.Tensor], weight_map: Any) -> list[Entry]:
    """The checkpoint tensors ``state`` (module names) becomes, in the weight map's order, each with its parts.

    Raises:
        DistributedError: a checkpoint tensor whose parts cannot be told (a weight map that is not reversible).
    """
    meta = {n: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for n, t in state.items()}
    entries = []
    for name, tensor in weight_map.to_checkpoint(meta).items():
        parts = [n for n, _ in weight_map.plan(name, tuple(tensor.shape))]
        if not parts or any(p not in state for p in parts):
            raise DistributedError(
                f"save_pretrained: cannot tell which module tensors make checkpoint tensor {name!r} (got {parts})"
            )
        entries.append(Entry(name, tensor, parts))
    return entries


def gathered(entries: list[Entry], state: Mapping[str, torch.Tensor], weight_map: Any) -> Iterator[torch.Tensor]:
    """Each entry's full tensor (CPU, contiguous), gathered from the shards; every rank must iterate it whole."""
    from torch.distributed.tensor import DTensor

    for entry in entries:
        full = {}
        for part in entry.parts:
            tensor = state[part].detach()
            full[part] = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).cpu()
        out = weight_map.to_checkpoint(full)
        yield out[entry.name].contiguous()


def save_sharded(
    model: Any,
    folder: Path,
    *,
    state_dict: Mapping[str, torch.Tensor] | None,
    weight_map: Any,
    limit: int,
    variant: str | None,
    writer: Any,
    save_function: Callable[[Any, str], Any] | None,
    replace_folder: Callable[..., list[str]],
    owned: Callable[[str], bool],
    write_configs: Callable[[Path], None],
) -> list[str]:
    """Write ``model`` (parameters as ``DTensor`` shards) to ``folder``; every rank must call it.

    Returns the names rank 0 wrote ([] on the other ranks).
    """
    import torch.distributed as dist

    tied = model.tied_parameter_names()
    if state_dict is None:
        state_dict = model.state_dict()
    state = {k: v for k, v in state_dict.items() if k not in tied}
    entries = plan_entries(state, weight_map)
    files = _files(entries, limit)
    writing = not dist.is_initialized() or dist.get_rank() == 0
    stream = gathered(entries, state, weight_map)
    if not writing:
        for _ in stream:
            pass
        dist.barrier()
        return []

    names = [writer.shard_name(variant, i + 1, len(files)) for i in range(len(files))]
    if len(files) == 1:
        names = [add_variant(writer.single, variant)]

    def write(staging: Path) -> None:
        for name, group in zip(names, files):
            if writer.safetensors:
                _stream_safetensors(staging / name, group, stream)
            else:
                writer.write({e.name: next(stream) for e in group}, staging / name, save_function=save_function)
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in entries)},
                "weight_map": dict(sorted((e.name, n) for n, group in zip(names, files) for e in group)),
            }
            (staging / add_variant(writer.index, variant)).write_text(json.dumps(index, indent=2) + "\n", "utf-8")
        write_configs(staging)

    try:
        written = replace_folder(folder, write, owned)
    finally:
        for _ in stream:  # the other ranks wait in the gathers of what rank 0 did not reach
            pass
        if dist.is_initialized():
            dist.barrier()
    return written


def _files(entries: list[Entry], limit: int) -> list[list[Entry]]:
    files: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if files[-1] and size + entry.nbytes > limit:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += entry.nbytes
    return files


def _stream_safetensors(path: Path, entries: list[Entry], stream: Iterator[torch.Tensor]) -> None:
    """Write a safetensors file whose tensors arrive one at a time from ``stream`` (in ``entries``' order)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        if entry.dtype not in _NAMES:
            raise DistributedError(f"save_pretrained: {entry.name!r} is {entry.dtype}, which safetensors cannot hold")
        header[entry.name] = {"dtype": _NAMES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}  # fmt: skip
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for entry in entries:
            tensor = next(stream)
            if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:  # pragma: no cover - plan bug
                raise DistributedError(f"save_pretrained: {entry.name!r} gathered as {tuple(tensor.shape)}")
            if tensor.numel():
                f.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))


def save_model_sharded(
    model: Any,
    folder: Path,
    state_dict: Mapping[str, torch.Tensor] | None,
    *,
    limit: int,
    variant: str | None,
    safe_serialization: bool,
    save_function: Callable[[Any, str], Any] | None,
) -> list[str]:
    """:func:`save_sharded` with ``save_pretrained``'s writer, configs and atomic folder replacement."""
    from .. import formats
    from ..atomic import replace_folder
    from ..config import CONFIG_NAME
    from ..hooks import weight_map_for
    from ..saving import checkpoint_files, save_generation_config

    def write_configs(staging: Path) -> None:
        model.config.save_pretrained(staging)
        save_generation_config(model, staging)

    model.config.dtype = str(model.dtype).removeprefix("torch.")
    return save_sharded(
        model,
        folder,
        state_dict=state_dict,
        weight_map=weight_map_for(model.config, type(model)),
        limit=limit,
        variant=variant,
        writer=formats.writer(safe_serialization),
        save_function=save_function,
        replace_folder=lambda target, write, owned: replace_folder(target, write, owned, marker=CONFIG_NAME),
        owned=checkpoint_files(variant),
        write_configs=write_configs,
    )
