"""``save_pretrained``: module tensors → weight map backwards → (sharded) safetensors + ``config.json``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .errors import ArgumentError, UnsupportedFeatureError
from .shards import add_variant

if TYPE_CHECKING:
    from .modeling.base import PreTrainedCausalLM

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``"5GB"`` → 5_000_000_000, ``"2GiB"`` → 2 * 2**30; ints pass through."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ArgumentError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise ArgumentError(f"max_shard_size {size!r} is not a size like '5GB', '500MB' or an int of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _shard(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_atomic(path: Path, write: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)  # type: ignore[operator]
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_model(
    model: PreTrainedCausalLM,
    folder: Path,
    *,
    max_shard_size: int | str,
    safe_serialization: bool,
    variant: str | None,
    state_dict: dict[str, torch.Tensor] | None,
    is_main_process: bool,
) -> Path:
    """Write ``model`` to ``folder`` (see :meth:`PreTrainedCausalLM.save_pretrained`)."""
    from .registry import get_registry

    limit = parse_size(max_shard_size)
    if getattr(model, "is_quantized", False):
        raise UnsupportedFeatureError(
            f"save_pretrained: {type(model).__name__} is quantized ({model.quantization_method}); saving quantized "
            "weights is not supported. Save the peft adapter (peft_model.save_pretrained), or load the base "
            "model unquantized, merge, and save that."
        )
    if not is_main_process:
        return folder
    if folder.exists() and not folder.is_dir():
        raise ArgumentError(f"save_pretrained: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)

    weight_map = get_registry().hook.lmport_weight_mapping(config=model.config, model_class=type(model))
    tied = model.tied_parameter_names()
    if state_dict is None:
        state_dict = dict(model.named_checkpoint_tensors())
    else:
        state_dict = {k: v for k, v in state_dict.items() if k not in tied}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weight_map.to_checkpoint(state_dict).items()}

    single, index_name = (
        ("model.safetensors", "model.safetensors.index.json")
        if safe_serialization
        else ("pytorch_model.bin", "pytorch_model.bin.index.json")
    )
    single, index_name = add_variant(single, variant), add_variant(index_name, variant)
    stem, ext = single.rsplit(".", 1)
    shards = _shard(tensors, limit)

    def write_shard(path: Path, shard: dict[str, torch.Tensor]) -> None:
        if safe_serialization:
            _write_atomic(path, lambda tmp: save_file(shard, str(tmp), metadata={"format": "pt"}))
        else:
            _write_atomic(path, lambda tmp: torch.save(shard, str(tmp)))

    written: set[str] = set()
    if len(shards) == 1:
        write_shard(folder / single, shards[0])
        written.add(single)
    else:
        weight_index: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
            write_shard(folder / name, shard)
            written.add(name)
            weight_index.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_index.items()))}
        _write_atomic(folder / index_name, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))
        written.add(index_name)

    # Weight files of an earlier save in this format would make the folder ambiguous.
    stale = re.compile(rf"{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.{re.escape(ext)}|{re.escape(index_name)}")
    for path in folder.iterdir():
        if path.name not in written and stale.fullmatch(path.name):
            path.unlink()

    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.save_pretrained(folder)
    return folder
