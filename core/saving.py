"""``save_pretrained``: module tensors → weight map backwards → (sharded) weight files + ``config.json``.

The weight files are written by the format :func:`lmport.formats.writer` chooses (safetensors, or
PyTorch ``.bin`` with ``safe_serialization=False``), under its names.

The files are written into a fresh folder that replaces the target whole (:mod:`lmport.atomic`):
readers and crashes see the previous checkpoint or the new one, never a mix, and no weight
file of an earlier save survives to be preferred. Files in the folder that are not part of the
checkpoint (tokenizer, training state, README, subfolders) are kept (hard-linked). The old and
the new checkpoint are both on disk until the swap: a save needs free space for the whole new
one. With ``push_to_hub=True`` what the save wrote is then uploaded (:mod:`lmport.hub_upload`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import formats
from .atomic import replace_folder
from .config import CONFIG_NAME
from .errors import ArgumentError, UnsupportedFeatureError
from .generation_config import GENERATION_CONFIG_NAME
from .hub_upload import CREATE_REPO_ARGS, UPLOAD_ARGS, HubUpload, default_commit_message, split_hub_kwargs

if TYPE_CHECKING:
    from .modeling.base import PreTrainedCausalLM

#: transformers 5's default ``max_shard_size``.
DEFAULT_MAX_SHARD_SIZE = "50GB"
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


def checkpoint_files(variant: str | None) -> Callable[[str], bool]:
    """Whether a file name belongs to the checkpoint a save of ``variant`` replaces.

    That is weights of every registered format (:mod:`lmport.formats`), single or sharded
    with any shard count, their index files, ``config.json`` and ``generation_config.json``:
    a folder never keeps weights of an earlier save that a load could prefer. Other
    variants' weights and every other file stay.
    """
    return formats.checkpoint_files(variant, also=(CONFIG_NAME, GENERATION_CONFIG_NAME))


def save_model(
    model: PreTrainedCausalLM,
    folder: Path,
    *,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    push_to_hub: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    variant: str | None = None,
    token: str | bool | None = None,
    safe_serialization: bool = True,
    save_function: Callable[[Any, str], Any] | None = None,
    save_peft_format: bool = True,
    save_original_format: bool = True,
    distributed_checkpoint: bool = False,
    **hub_kwargs: Any,
) -> Path:
    """Write ``model`` to ``folder`` (see :meth:`PreTrainedCausalLM.save_pretrained`)."""
    from .hooks import weight_map_for

    limit = parse_size(max_shard_size)
    quantized = model.quantization_state
    if quantized is not None:
        raise UnsupportedFeatureError(
            f"save_pretrained: {type(model).__name__} is quantized ({quantized.method}); saving quantized "
            "weights is not supported. Save the peft adapter (peft_model.save_pretrained), or load the base "
            "model unquantized, merge, and save that."
        )
    if not save_original_format:
        raise UnsupportedFeatureError(
            "save_pretrained(save_original_format=False): lmport always saves in the checkpoint format (Hugging "
            "Face names and layouts), never in its own module names"
        )
    if distributed_checkpoint:
        raise UnsupportedFeatureError(
            "save_pretrained(distributed_checkpoint=True) is not supported: gather the state dict (e.g. "
            "torch.distributed.checkpoint's get_model_state_dict with full_state_dict=True) and pass it as state_dict"
        )
    if save_function is not None and not callable(save_function):
        raise ArgumentError(f"save_pretrained: save_function must be callable, got {type(save_function).__name__}")
    if save_function is not None and safe_serialization:
        warnings.warn(
            "save_pretrained: save_function is used for .bin weights only (safe_serialization=False), as in "
            "transformers; the safetensors files are written by safetensors",
            UserWarning,
            stacklevel=3,
        )
    upload_args: dict[str, Any] = {}
    create_args: dict[str, Any] = {}
    if push_to_hub:
        upload_args, create_args = split_hub_kwargs(hub_kwargs, "save_pretrained")
    elif hub_kwargs:
        hub_only = set(hub_kwargs) <= set(UPLOAD_ARGS + CREATE_REPO_ARGS)
        raise ArgumentError(
            f"save_pretrained got unexpected argument(s) {sorted(hub_kwargs)}"
            + (" (hub arguments need push_to_hub=True)" if hub_only else "")
        )
    from .distributed.save import is_sharded, save_model_sharded

    if is_sharded(model, state_dict):  # DTensor shards: every rank takes part in the gathers, rank 0 writes
        if push_to_hub:
            raise UnsupportedFeatureError(
                "save_pretrained(push_to_hub=True) of a sharded (distributed) model is not supported: save it, then "
                "upload the folder from rank 0 (huggingface_hub's upload_folder)"
            )
        save_model_sharded(model, folder, state_dict, limit=limit, variant=variant,
                           safe_serialization=safe_serialization, save_function=save_function)  # fmt: skip
        return folder
    if not is_main_process:
        return folder
    if folder.exists() and not folder.is_dir():
        raise ArgumentError(f"save_pretrained: {folder} exists and is not a folder")
    upload = None
    if push_to_hub:
        repo_id = upload_args.pop("repo_id", None) or folder.resolve().name
        upload = HubUpload(repo_id, token=token, create_repo_kwargs=create_args)

    weight_map = weight_map_for(model.config, type(model))  # the architecture's, however built
    tied = model.tied_parameter_names()
    if state_dict is None:
        state_dict = dict(model.named_checkpoint_tensors())
    else:
        state_dict = {k: v for k, v in state_dict.items() if k not in tied}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weight_map.to_checkpoint(state_dict).items()}

    writer = formats.writer(safe_serialization)
    shards = _shard(tensors, limit)

    def write(staging: Path) -> None:
        # Into a fresh folder that replace_folder then swaps in whole (see lmport.atomic).
        writer.save(shards, staging, variant, save_function=save_function)
        model.config.save_pretrained(staging)
        save_generation_config(model, staging)

    model.config.dtype = str(model.dtype).removeprefix("torch.")
    written = replace_folder(folder, write, checkpoint_files(variant), marker=CONFIG_NAME)

    if upload is not None:
        upload.commit(
            folder,
            written,
            commit_message=upload_args.pop("commit_message", None) or default_commit_message(model),
            tags=model.model_tags,
            **upload_args,
        )
    return folder


def save_generation_config(model: object, folder: Path) -> None:
    """Write ``generation_config.json`` beside ``config.json`` when the model has a generation config."""
    from .generation_config import GenerationConfig

    config = GenerationConfig.from_any(getattr(model, "generation_config", None))
    if config is not None:
        config.save_pretrained(folder)
