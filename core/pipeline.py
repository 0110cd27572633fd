"""The load pipeline, stage by stage.

Folder → config → class → weight map → weights → dtype → meta model → size check → quantizer and
placement → kernel → stream → finalize → generation config; each stage a short function.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from . import formats, hooks
from .distributed import load as distributed_stage
from .atomic import note_folder
from .attention import AttentionKernel
from .config import CONFIG_NAME, PretrainedConfig
from .config_loading import auto_config, load_config, load_generation_config, requested_config
from .errors import AttentionKernelError, UnsupportedFeatureError
from .modeling.base import build_on_meta
from .options import SourceOptions
from .placement import Placement, SingleDevice
from .quantization import Quantizer, finish_quantization, resolve_quantization
from .request import LoadRequest, parse_dtype
from .size_check import check_size_against_checkpoint
from .streaming import load_weights
from .weights import COMPUTE_DTYPES, TensorInfo, WeightMap, WeightSource

__all__ = ["auto_config", "config_from_pretrained", "from_pretrained", "load_config", "resolve_folder"]

logger = logging.getLogger("lmport")


def from_pretrained(request: LoadRequest) -> Any:
    """Load the model ``request`` describes (see :meth:`lmport.AutoModelForCausalLM.from_pretrained`)."""
    refuse_unserved(request)
    distributed = distributed_stage.from_request(request)  # None: a single-process load
    folder = resolve_folder(request.name_or_path, request.source)
    config, overrides = requested_config(request, folder)
    quantizer = choose_quantizer(request, config, folder)
    model_class = hooks.model_class_for(config, request.plugin if request.config is not None else None)
    weight_map = hooks.weight_map_for(config, model_class)
    source = hooks.open_weights(folder, request.weights)
    try:
        infos = list(source.infos())
        dtype = request.dtype or auto_dtype(config, infos)
        if request.config is None and "tie_word_embeddings" not in overrides:  # an explicit choice is honoured
            untie_if_stored_apart(config, model_class, weight_map, source, infos)
        model = build_on_meta(model_class, config)
        # A config that lies about the model's size fails here, on the meta device, not in the allocator.
        origin = "the config= argument" if request.config is not None else str(folder / CONFIG_NAME)
        origin += f" (with overrides {sorted(overrides)})" if overrides else ""
        check_size_against_checkpoint(model, infos, dtype, origin=origin, tied=model.tied_parameter_names())
        if quantizer is not None:
            quantizer.prepare(model)
        if distributed is not None and quantizer is not None:  # stored quantized: config.json asked for it
            raise UnsupportedFeatureError(
                f"{folder / CONFIG_NAME}: the checkpoint is stored quantized, and quantized models cannot be loaded "
                "with distributed_config / tp_plan / device_mesh in this lmport version"
            )
        if distributed is not None:  # laid out over the mesh on meta; each rank reads only its shards
            placement: Placement = SingleDevice(distributed_stage.shard_model(model, distributed, dtype).device)
            kernel = choose_kernel(request, config, folder, placement, dtype)
            report = distributed_stage.load_sharded(
                model, source, weight_map, infos, dtype, ignore_mismatched_sizes=request.ignore_mismatched_sizes
            ).report
        else:
            placement = place(request, model, dtype, quantizer)
            kernel = choose_kernel(request, config, folder, placement, dtype)
            report = load_weights(
                model,
                source,
                weight_map,
                dtype=dtype,
                placement=placement,
                quantizer=quantizer,
                ignore_mismatched_sizes=request.ignore_mismatched_sizes,
                infos=infos,
            )
    finally:
        source.close()
    finalize(model, placement, quantizer, kernel, dtype)
    model.name_or_path = request.name_or_path
    model.generation_config = load_generation_config(folder, model.config, request.generation_config, overrides)
    model.eval()
    logger.info("loaded %s from %s with attention kernel %r", type(model).__name__, folder, kernel.name)
    if request.output_loading_info:
        return model, report.as_dict()
    return model


def config_from_pretrained(request: LoadRequest) -> PretrainedConfig | tuple[PretrainedConfig, dict[str, Any]]:
    """The config ``request`` (an ``AutoConfig`` one) describes; see :func:`lmport.config_loading.auto_config`."""
    refuse_unserved(request)
    return auto_config(request, resolve_folder(request.name_or_path, request.source))


# --- stages ------------------------------------------------------------------------------------


def refuse_unserved(request: LoadRequest) -> None:
    """Refuse arguments the request carries that no stage serves yet (never silently ignored).

    Raises:
        UnsupportedFeatureError: ``gguf_file`` was given.
    """
    if request.gguf_file is not None and not formats.requested_formats(request.weights):
        raise UnsupportedFeatureError(
            f"{request.label}: gguf_file was given, but no installed weight-format plugin reads GGUF files"
        )


def resolve_folder(name_or_path: str | os.PathLike[str], options: SourceOptions) -> Path:
    """The local checkpoint folder (``resolve_source``), noted so that a load a save raced is run again."""
    folder = hooks.resolve_source(str(name_or_path), options)
    note_folder(folder)  # see lmport.atomic.load_attempts
    return folder


def choose_quantizer(request: LoadRequest, config: PretrainedConfig, folder: Path) -> Quantizer | None:
    """The quantizer: the checkpoint's own stored quantization (never ignored), else the argument's."""
    source = str(folder / CONFIG_NAME) if request.config is None else "the config= argument"
    settings, pre_quantized, method = resolve_quantization(request.quantization, config, source)
    return hooks.quantizer_for(settings, config, pre_quantized=pre_quantized, method=method, source=source)


def auto_dtype(config: PretrainedConfig, infos: list[TensorInfo]) -> torch.dtype:
    """``dtype="auto"``: the config's ``dtype``, else the first checkpoint tensor's compute dtype, else the default."""
    name = config.dtype
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        parsed = parse_dtype(name)
        assert parsed is not None
        return parsed
    for info in infos:
        if info.dtype in COMPUTE_DTYPES:  # not float8: a stored format, not one to compute in
            return info.dtype
    return torch.get_default_dtype()


def untie_if_stored_apart(
    config: PretrainedConfig, model_class: Any, weight_map: WeightMap, source: WeightSource, infos: list[TensorInfo]
) -> None:
    """Set ``config.tie_word_embeddings = False`` when the checkpoint stores a tied parameter and its source with
    different values, as transformers does: the config contradicts the checkpoint, and the checkpoint's weights win
    (tying would silently drop the stored head). Equal copies (``.bin`` files store both) stay tied."""
    if not config.tie_word_embeddings:
        return
    tied: dict[str, str] = dict(getattr(model_class, "tied_weights", {}) or {})
    stored: dict[str, TensorInfo] = {}
    for info in infos:
        for module_name, _ in weight_map.plan(info.name, info.shape):
            if module_name in tied or module_name in tied.values():
                stored.setdefault(module_name, info)
    for target, origin in tied.items():
        if target not in stored or origin not in stored:
            continue
        a, b = stored[target], stored[origin]
        same = a.shape == b.shape and a.dtype == b.dtype
        if same:
            parts = [dict(weight_map.to_module(i.name, source.read(i))).get(n) for i, n in ((a, target), (b, origin))]
            same = all(p is not None for p in parts) and torch.equal(parts[0], parts[1])
        if not same:
            logger.warning(
                "%s: the config ties %s to %s (tie_word_embeddings), but the checkpoint stores both with different "
                "values: loading them untied, as transformers does. Set tie_word_embeddings to false in config.json "
                "to silence this.", a.file, target, origin,
            )
            config.tie_word_embeddings = False
            return


def place(request: LoadRequest, model: Any, dtype: torch.dtype, quantizer: Quantizer | None) -> Placement:
    """Where each tensor lands: the request's single device, or a placement plugin's plan for its device map."""
    if request.device is not None:
        return SingleDevice(request.device)
    options = dataclasses.replace(request.placement, quantized=quantizer is not None)
    return hooks.placement_for(request.device_map, model, dtype, options)


def choose_kernel(
    request: LoadRequest, config: PretrainedConfig, folder: Path, placement: Placement, dtype: torch.dtype
) -> AttentionKernel:
    """The attention kernel: the argument's, else ``config.json``'s (an error then names the file), else the best."""
    requested = request.attn_implementation or config.extra.get("attn_implementation")
    try:
        return hooks.select_attention(requested, config, placement.main_device, dtype)
    except AttentionKernelError as exc:
        if request.attn_implementation or request.config is not None:
            raise
        raise AttentionKernelError(f"{folder / CONFIG_NAME}: key 'attn_implementation': {exc}") from exc


def finalize(
    model: Any, placement: Placement, quantizer: Quantizer | None, kernel: AttentionKernel, dtype: torch.dtype
) -> None:
    """Buffers computed on their devices, weights tied, kernel set, quantizer and placement finished."""
    for name, module in model.named_modules():
        if name and hasattr(module, "init_buffers"):  # rotary tables and the like (nn.Module convention)
            device = placement.device_for(name)
            module.init_buffers(placement.main_device if device == "disk" else torch.device(device))
    model.tie_weights()
    model.set_attention_kernel(kernel)
    if quantizer is not None:
        model.quantization_state = finish_quantization(quantizer, model)
    placement.finalize(model)
    model.config.dtype = str(dtype).removeprefix("torch.")
