"""The load pipeline: source → config → class → kernel → meta model → streamed weights → model."""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import note_folder
from .attention import AttentionKernel
from .config import CONFIG_NAME, PretrainedConfig, read_config_json
from .modeling.base import build_on_meta
from .size_check import check_size_against_checkpoint
from .generation_config import GenerationConfig, read_generation_config
from .errors import (
    ArgumentError,
    AttentionKernelError,
    ConfigError,
    CorruptWeightsError,
    MissingWeightsError,
    PluginError,
    RemoteCodeError,
    ShapeMismatchError,
    SourceError,
    UnknownModelTypeError,
    UnsupportedFeatureError,
    UnsupportedQuantizationError,
    WeightsChangedError,
    WeightsNotFoundError,
)
from .options import LoadOptions, SourceOptions
from .placement import Placement, PlacementOptions, SingleDevice, is_single_device
from .quantization import (
    BitsAndBytesConfig,
    Quantizer,
    StoredQuantizer,
    resolve_quantization,
    unsupported_stored_quantization,
)
from .registry import get_registry
from .shards import add_variant
from .weights import (
    COMPUTE_DTYPES,
    CastingWeightSource,
    TensorInfo,
    WeightMap,
    WeightSource,
    check_loadable,
    check_unique,
)

logger = logging.getLogger("lmport")

#: transformers arguments that have no effect here: accepted, with a warning.
IGNORED_ARGUMENTS = frozenset(
    {"low_cpu_mem_usage", "_fast_init", "offload_state_dict", "resume_download", "mirror", "from_tf", "from_flax",
     "_from_auto", "_from_pipeline", "use_kernels", "tp_plan", "tp_size", "device_mesh", "key_mapping_strict",
     "adapter_kwargs", "output_attentions", "output_hidden_states", "return_unused_kwargs",
     "_commit_hash"}
)  # fmt: skip
#: transformers arguments this version does not serve: refused clearly rather than ignored.
NOT_YET_SUPPORTED = frozenset({"gguf_file", "state_dict", "key_mapping", "adapter_name"})


@dataclass
class LoadReport:
    """What a load found: returned as a dict with ``output_loading_info=True``."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    error_msgs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[Any]]:
        return {
            "missing_keys": self.missing_keys,
            "unexpected_keys": self.unexpected_keys,
            "mismatched_keys": self.mismatched_keys,
            "error_msgs": self.error_msgs,
        }


# --- argument handling -----------------------------------------------------------------


def resolve_dtype(dtype: Any, config: PretrainedConfig | None, infos: list[TensorInfo] | None) -> torch.dtype:
    """The dtype to materialise floating weights in: explicit, or "auto" (config, then checkpoint)."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ArgumentError(f"dtype must be a floating dtype, got {dtype}")
        if dtype not in COMPUTE_DTYPES:
            raise ArgumentError(
                f"dtype {dtype} is a storage format lmport cannot compute in; pass float32, bfloat16, float16 or "
                "float64 (a quantized load takes quantization_config)"
            )
        return dtype
    if dtype is None or dtype == "auto":
        name = getattr(config, "dtype", None) if config is not None else None
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return resolve_dtype(getattr(torch, name), None, None)
        for info in infos or []:
            if info.dtype in COMPUTE_DTYPES:  # not float8: a stored format, not one to compute in
                return info.dtype
        return torch.get_default_dtype()
    if isinstance(dtype, str):
        candidate = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(candidate, torch.dtype):
            return resolve_dtype(candidate, None, None)
    raise ArgumentError(f"dtype must be a torch dtype, its name (e.g. 'bfloat16') or 'auto', got {dtype!r}")


def resolve_device(device_map: Any) -> torch.device:
    """The single device of ``device_map`` (None, "cpu", "cuda:0", an int, a torch.device or {"": dev})."""
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if device_map is None:
        return torch.device("cpu")
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError) as exc:
        raise ArgumentError(f"device_map {device_map!r} is not a device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedFeatureError(f"device_map={device_map!r} asks for CUDA, but no CUDA device is available")
    if device.type == "meta":
        raise ArgumentError("device_map='meta' would load no weights; build with torch.device('meta') instead")
    return device


def select_attention(
    requested: str | None, config: PretrainedConfig, device: torch.device, dtype: torch.dtype
) -> AttentionKernel:
    """Ask the ``select_attention`` hook; an unknown name lists the installed kernels."""
    registry = get_registry()
    kernel = registry.hook.lmport_select_attention(requested=requested, config=config, device=device, dtype=dtype)
    if kernel is None:
        raise AttentionKernelError(
            f"unknown attn_implementation {requested!r}; installed kernels: {', '.join(registry.kernel_names())}"
        )
    return kernel


# --- the pipeline ------------------------------------------------------------------------


def resolve_folder(name_or_path: str | os.PathLike[str], options: SourceOptions) -> Path:
    folder = get_registry().hook.lmport_resolve_source(name_or_path=str(name_or_path), options=options)
    if folder is None:
        raise SourceError(
            f"{str(name_or_path)!r} is not a checkpoint folder on this machine, and no installed source plugin "
            "resolves it"
        )
    note_folder(folder)  # a load that a save raced is run again (lmport.atomic.load_attempts)
    return Path(folder)


def load_config(
    folder: Path,
    *,
    plugin: str | None = None,
    trust_remote_code: bool | None = None,
    overrides: dict[str, Any] | None = None,
) -> PretrainedConfig:
    """Read ``folder/config.json`` and parse it with the plugin that provides its ``model_type``."""
    registry = get_registry()
    raw = read_config_json(folder)
    path = folder / CONFIG_NAME
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(f"{path}: no 'model_type' key; lmport chooses the architecture plugin by it")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"{path}: 'model_type' must be a non-empty string, got {model_type!r}")
    provided = registry.ensure(model_type, plugin) is not None  # an explicit choice is honoured or refused
    try:
        config = registry.hook.lmport_parse_config(raw=raw, model_type=model_type)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {str(exc).removeprefix(CONFIG_NAME + ': ')}") from exc
    if config is None:
        auto_map = raw.get("auto_map")
        if not provided and auto_map:
            raise RemoteCodeError(
                f"{path}: model_type {model_type!r} is implemented only by code inside the checkpoint repository "
                f"(auto_map: {auto_map}). lmport never runs repository code, trust_remote_code or not. Install an "
                f"lmport plugin that provides {model_type!r}, or write one (see docs/plugins.md) and register it "
                "with an entry point or lmport.register(...)."
            )
        if not provided:
            raise UnknownModelTypeError(f"{path}: {registry.unknown(model_type)}") from None
        raise PluginError(f"{path}: plugin {registry.provider(model_type)!r} returned no config for {model_type!r}")
    if trust_remote_code:
        warnings.warn(
            f"trust_remote_code=True is ignored: model_type {model_type!r} is provided by the installed plugin "
            f"{registry.provider(model_type) or 'registered through a hook'}; no repository code is run.",
            UserWarning,
            stacklevel=4,
        )
    if overrides:
        config.update(overrides)
    config._source_folder = folder  # noqa: SLF001 - not a field: never serialised
    return config


def open_weights(folder: Path, options: LoadOptions) -> WeightSource:
    source = get_registry().hook.lmport_open_weights(folder=folder, options=options)
    if source is None:
        looked = []
        if options.use_safetensors is not False:
            looked += [add_variant("model.safetensors", options.variant), "model.safetensors.index.json"]
        if options.use_safetensors is not True:
            looked += [add_variant("pytorch_model.bin", options.variant), "pytorch_model.bin.index.json"]
        raise WeightsNotFoundError(f"{folder}: no weight files found (looked for {', '.join(looked)})")
    return source


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
    else:
        owner._buffers[attr] = tensor


def untie_if_stored_apart(
    config: PretrainedConfig, model_class: Any, weight_map: WeightMap, source: WeightSource, infos: list[TensorInfo]
) -> None:
    """Set ``config.tie_word_embeddings = False`` when the checkpoint stores a tied parameter and its source with
    different values, as transformers does: the config contradicts the checkpoint, and the checkpoint's weights win
    (tying would silently drop the stored head). Equal copies (``.bin`` files store both) stay tied."""
    if not getattr(config, "tie_word_embeddings", False):
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


def load_weights(
    model: Any,
    source: WeightSource,
    weight_map: WeightMap,
    *,
    dtype: torch.dtype,
    placement: Placement,
    quantizer: Quantizer | None = None,
    ignore_mismatched_sizes: bool = False,
    infos: list[TensorInfo] | None = None,
) -> LoadReport:
    """Stream every checkpoint tensor into ``model`` (built on the meta device).

    Each tensor is read once, mapped, cast to ``dtype`` (floating tensors only),
    and lands where ``placement`` says (a device, or the offload folder), quantized
    on the way when ``quantizer`` claims it; nothing is initialised first. ``infos``
    is ``source.infos()`` when the caller has listed them already.
    """
    report = LoadReport()
    expected = {name: (t.shape, t.dtype) for name, t in model.state_dict(keep_vars=True).items()}
    tied = model.tied_parameter_names()
    infos = list(source.infos()) if infos is None else infos
    check_unique(infos, getattr(source, "index", None))

    wanted: dict[str, TensorInfo] = {}  # module name -> where it comes from
    skip: set[str] = set()
    stored: dict[str, _StoredWeight] = {}  # checkpoint weight name -> its stored quantized parts
    for info in infos:
        if getattr(quantizer, "pre_quantized", False) and _group_stored(quantizer, weight_map, info, tied, stored):
            continue
        targets = weight_map.plan(info.name, info.shape)
        for module_name, shape in targets:
            if module_name in tied:
                continue
            if module_name not in expected:
                report.unexpected_keys.append(info.name)
                continue
            model_shape = tuple(expected[module_name][0])
            if tuple(shape) != model_shape:
                if not ignore_mismatched_sizes:
                    raise ShapeMismatchError(
                        f"{info.file}: tensor {info.name!r} has shape {tuple(info.shape)}, but {module_name!r} in "
                        f"{type(model).__name__} needs {model_shape}. Fix config.json or pass "
                        "ignore_mismatched_sizes=True to initialise it afresh."
                    )
                report.mismatched_keys.append((module_name, tuple(shape), model_shape))
                skip.add(module_name)
                continue
            if quantizer is None or not quantizer.claims(module_name):
                check_loadable(info, module_name, expected[module_name][1])
            wanted[module_name] = info

    grouped = {n for group in stored.values() for n in group.module_names}
    missing = [n for n in expected if n not in wanted and n not in tied and n not in skip and n not in grouped]
    if missing:
        files = ", ".join(str(f) for f in source.files)
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise MissingWeightsError(
            f"{files}: {len(missing)} weight(s) of {type(model).__name__} are not in the checkpoint: {shown}"
        )

    read_as = source.read_as if isinstance(source, CastingWeightSource) else None

    def consumed(module_name: str) -> bool:
        """Whether the read tensor is dropped once used: quantized, offloaded, or copied to another device."""
        device = placement.device_for(module_name)
        if device == "disk" or (quantizer is not None and quantizer.claims(module_name)):
            return True
        return torch.device(device).type != "cpu"

    def materialise(info: TensorInfo) -> list[tuple[str, torch.Tensor]]:
        names = {n for n, _ in weight_map.plan(info.name, info.shape) if wanted.get(n) is info}
        try:
            if read_as is None:
                tensor = source.read(info)
            elif weight_map.rewrites_layout(info.name) or all(consumed(n) for n in names):
                # Only copies of it are kept (transposed, split, quantized, moved): read it into memory
                # that is released as soon as it is dropped, not into a view of the mapped file.
                tensor = read_as(info, dtype, transient=True)
            else:
                tensor = read_as(info, dtype)
        except OSError as exc:  # a source that lets the file system's error through (file gone, I/O error)
            if not os.path.exists(info.file):
                raise WeightsChangedError(f"{info.file}: vanished during the load (reading {info.name!r})") from exc
            raise CorruptWeightsError(f"{info.file}: cannot read tensor {info.name!r}: {exc}") from exc
        out = []
        for module_name, part in weight_map.to_module(info.name, tensor):
            if module_name not in names:
                continue
            device = placement.device_for(module_name)
            if device == "disk" or (quantizer is not None and quantizer.claims(module_name)):
                device = torch.device("cpu")  # finished on the main thread: offloaded or quantized
            part = part.to(device=device, dtype=dtype if part.is_floating_point() else part.dtype)
            if not part.is_contiguous() or part.untyped_storage().nbytes() != part.numel() * part.element_size():
                part = part.clone(memory_format=torch.contiguous_format)  # own storage, not a slice of a fused one
            out.append((module_name, part))
        return out

    needed = [info for info in infos if any(wanted.get(n) is info for n, _ in weight_map.plan(info.name, info.shape))]
    # Reading and casting run on a few threads (page faults and copies release the GIL);
    # at most `ahead` tensors are in flight, so the working set stays small.
    workers = max(1, min(4, os.cpu_count() or 1))
    ahead = 2 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmport-load") as pool:
        pending: deque[Future[list[tuple[str, torch.Tensor]]]] = deque()

        def read_stored(group: _StoredWeight) -> tuple[_StoredWeight, dict[str, torch.Tensor]]:
            read = source.read if read_as is None else (lambda info: read_as(info, None))
            return group, {key: read(info) for key, info in group.parts.items()}

        def land(future: Future[Any]) -> None:
            result = future.result()
            if isinstance(result, tuple):  # a stored quantized weight: its parts, as read
                group, parts = result
                device = placement.device_for(group.module_names[0])
                where = f"{group.parts.get('weight', next(iter(group.parts.values()))).file}: {group.name!r}"
                if device == "disk":
                    raise UnsupportedFeatureError(f"{where}: quantized modules cannot be offloaded to disk")
                assert isinstance(quantizer, StoredQuantizer)
                quantizer.materialize_stored(model, group.module_names, parts, torch.device(device), where)
                return
            for module_name, part in result:
                device = placement.device_for(module_name)
                if device == "disk":
                    placement.offload(module_name, part)
                elif quantizer is not None and quantizer.claims(module_name):
                    quantizer.materialize(model, module_name, part, torch.device(device))
                else:
                    _set_tensor(model, module_name, part)

        for info in needed:
            pending.append(pool.submit(materialise, info))
            if len(pending) >= ahead:
                land(pending.popleft())
        for group in stored.values():
            pending.append(pool.submit(read_stored, group))
            if len(pending) >= ahead:
                land(pending.popleft())
        while pending:
            land(pending.popleft())

    for module_name in skip:
        device = placement.device_for(module_name)
        if device == "disk" or (quantizer is not None and quantizer.claims(module_name)):
            raise UnsupportedFeatureError(
                f"ignore_mismatched_sizes cannot re-initialise {module_name!r}: it is offloaded or quantized"
            )
        generator = torch.Generator(device=device)
        fresh = torch.empty(expected[module_name][0], dtype=dtype, device=device)
        owner_name, _, attr = module_name.rpartition(".")
        model.init_parameter(model.get_submodule(owner_name), attr, fresh, generator)
        _set_tensor(model, module_name, fresh)
    report.missing_keys.extend(sorted(skip))
    if report.unexpected_keys:
        logger.warning(
            "%d checkpoint tensor(s) not used by %s: %s",
            len(report.unexpected_keys),
            type(model).__name__,
            ", ".join(report.unexpected_keys[:8]),
        )
    return report


@dataclass
class _StoredWeight:
    """The checkpoint tensors of one weight stored quantized: its data and statistics, by key."""

    name: str  # the weight's checkpoint name
    module_names: list[str]  # one, or several fused in the checkpoint
    parts: dict[str, TensorInfo] = field(default_factory=dict)


def _group_stored(
    quantizer: Any, weight_map: WeightMap, info: TensorInfo, tied: Any, stored: dict[str, _StoredWeight]
) -> bool:
    """File ``info`` under the stored quantized weight it belongs to; False when it belongs to none."""
    found = quantizer.stored_part(info.name)
    if found is None:
        return False
    name, key = found
    module_names = [n for n, _ in weight_map.plan(name, (0, 0)) if n not in tied]  # names only: shapes are packed
    claimed = [n for n in module_names if quantizer.claims(n)]
    if not claimed:
        return False
    if claimed != module_names:
        raise UnsupportedQuantizationError(
            f"{info.file}: {name!r} holds {module_names} together, but only {claimed} are quantized layers; "
            "check llm_int8_skip_modules in config.json's quantization_config"
        )
    group = stored.setdefault(name, _StoredWeight(name, module_names))
    if key in group.parts:
        raise CorruptWeightsError(
            f"{info.file}: tensor {info.name!r} is stored twice (also in {group.parts[key].file})"
        )
    group.parts[key] = info
    return True


def from_pretrained(name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """See :meth:`lmport.AutoModelForCausalLM.from_pretrained`."""
    kwargs = dict(kwargs)
    check_argument_types(name_or_path, kwargs)
    output_loading_info = bool(kwargs.pop("output_loading_info", False))
    ignore_mismatched_sizes = bool(kwargs.pop("ignore_mismatched_sizes", False))
    trust_remote_code = kwargs.pop("trust_remote_code", None)
    plugin = kwargs.pop("plugin", None)
    config_arg = kwargs.pop("config", None)
    generation_config_arg = kwargs.pop("generation_config", None)

    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    if dtype is None:
        dtype = torch_dtype
    elif torch_dtype is not None and torch_dtype != dtype:
        raise ArgumentError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype")

    attn_implementation = kwargs.pop("attn_implementation", None)
    if kwargs.pop("use_flash_attention_2", False):
        if attn_implementation not in (None, "flash_attention_2"):
            raise ArgumentError("use_flash_attention_2=True contradicts attn_implementation; pass only the latter")
        attn_implementation = "flash_attention_2"

    token = kwargs.pop("token", None)
    if "use_auth_token" in kwargs:
        warnings.warn("use_auth_token is deprecated; use token", FutureWarning, stacklevel=3)
        token = token or kwargs.pop("use_auth_token")
    variant = kwargs.pop("variant", None)
    use_safetensors = kwargs.pop("use_safetensors", None)
    source_options = SourceOptions(
        revision=kwargs.pop("revision", None),
        cache_dir=_str_or_none(kwargs.pop("cache_dir", None)),
        token=token,
        local_files_only=bool(kwargs.pop("local_files_only", False)),
        subfolder=kwargs.pop("subfolder", "") or "",
        force_download=bool(kwargs.pop("force_download", False)),
        proxies=kwargs.pop("proxies", None),
        variant=variant,
        use_safetensors=use_safetensors,
    )
    device_map = kwargs.pop("device_map", None)
    placement_options = PlacementOptions(
        max_memory=kwargs.pop("max_memory", None),
        offload_folder=_str_or_none(kwargs.pop("offload_folder", None)),
        offload_buffers=bool(kwargs.pop("offload_buffers", False)),
    )
    quantization = _quantization_settings(
        kwargs.pop("quantization_config", None), kwargs.pop("load_in_4bit", False), kwargs.pop("load_in_8bit", False)
    )
    if is_single_device(device_map):
        placement: Placement = SingleDevice(resolve_device(device_map))
        if placement_options.max_memory is not None or placement_options.offload_folder is not None:
            warnings.warn(
                "max_memory / offload_folder only apply with a device map such as device_map='auto'",
                UserWarning,
                stacklevel=3,
            )

    for name in sorted(set(kwargs) & IGNORED_ARGUMENTS):
        warnings.warn(f"from_pretrained: {name} has no effect in lmport and is ignored", UserWarning, stacklevel=3)
        kwargs.pop(name)
    for name in sorted(set(kwargs) & NOT_YET_SUPPORTED):
        if kwargs[name] not in (None, False):
            raise UnsupportedFeatureError(f"from_pretrained: {name} is not supported by this lmport version")
        kwargs.pop(name)

    folder = resolve_folder(name_or_path, source_options)
    if config_arg is None:
        config_overrides = {k: kwargs.pop(k) for k in list(kwargs) if k != "model_type"}
        config = load_config(folder, plugin=plugin, trust_remote_code=trust_remote_code, overrides=None)
        unknown = sorted(k for k in config_overrides if not config.has_field(k))
        if unknown:
            raise ArgumentError(
                f"from_pretrained got unknown arguments {unknown}: they are neither loading options nor fields "
                f"of {type(config).__name__}"
            )
        if config_overrides:
            config.update(config_overrides)
    else:
        if kwargs:
            raise ArgumentError(f"from_pretrained got unknown arguments {sorted(kwargs)} (config= was given)")
        if not isinstance(config_arg, PretrainedConfig):
            raise ArgumentError(f"config must be an lmport config object, got {type(config_arg).__name__}")
        config = config_arg

    registry = get_registry()
    # A checkpoint stored quantized is loaded with its own quantization_config, never ignored.
    quantization_source = str(folder / CONFIG_NAME) if config_arg is None else "the config= argument"
    quantization, pre_quantized, stored_method = resolve_quantization(quantization, config, quantization_source)
    quantizer = _quantizer(quantization, config, pre_quantized, stored_method, quantization_source)
    model_class = registry.model_class_for(config, plugin if config_arg is not None else None)  # load_config chose
    weight_map = registry.weight_map_for(config, model_class)

    source = open_weights(folder, LoadOptions(variant=variant, use_safetensors=use_safetensors))
    try:
        infos = list(source.infos())
        target_dtype = resolve_dtype(dtype, config, infos)
        if config_arg is None and "tie_word_embeddings" not in config_overrides:  # an explicit choice is honoured
            untie_if_stored_apart(config, model_class, weight_map, source, infos)
        model = build_on_meta(model_class, config)
        # A config that lies about the model's size fails here, on the meta device, not in the allocator.
        check_size_against_checkpoint(
            model,
            infos,
            target_dtype,
            origin="the config= argument" if config_arg is not None else str(folder / CONFIG_NAME)
            + (f" (with overrides {sorted(config_overrides)})" if config_overrides else ""),
        )
        if quantizer is not None:
            quantizer.prepare(model)
        if not is_single_device(device_map):
            options = dataclasses.replace(placement_options, quantized=quantizer is not None)
            placement = registry.hook.lmport_placement(
                device_map=device_map, model=model, dtype=target_dtype, options=options
            )
            if placement is None:
                raise UnsupportedFeatureError(f"no installed plugin serves device_map={device_map!r}")
        requested = attn_implementation or config.extra.get("attn_implementation")
        try:
            kernel = select_attention(requested, config, placement.main_device, target_dtype)
        except AttentionKernelError as exc:
            if attn_implementation or config_arg is not None:
                raise
            raise AttentionKernelError(f"{folder / CONFIG_NAME}: key 'attn_implementation': {exc}") from exc
        report = load_weights(
            model,
            source,
            weight_map,
            dtype=target_dtype,
            placement=placement,
            quantizer=quantizer,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            infos=infos,
        )
    finally:
        source.close()
    for name, module in model.named_modules():
        if name and hasattr(module, "init_buffers"):
            device = placement.device_for(name)
            module.init_buffers(placement.main_device if device == "disk" else torch.device(device))
    model.tie_weights()
    model.set_attention_kernel(kernel)
    if quantizer is not None:
        quantizer.finalize(model)
    placement.finalize(model)
    model.config.dtype = str(target_dtype).removeprefix("torch.")
    model.name_or_path = str(name_or_path)
    model.generation_config = load_generation_config(
        folder, model.config, generation_config_arg, config_overrides if config_arg is None else {}
    )
    model.eval()
    logger.info("loaded %s from %s with attention kernel %r", type(model).__name__, folder, kernel.name)
    if output_loading_info:
        return model, report.as_dict()
    return model


def load_generation_config(
    folder: Path, config: PretrainedConfig, given: Any, overrides: dict[str, Any]
) -> GenerationConfig:
    """The loaded model's generation config: ``given`` (lmport's or transformers'), else the folder's
    ``generation_config.json``, else derived from ``config``; token-id overrides of ``from_pretrained``
    (``eos_token_id=...``) apply to it too."""
    if given is not None:
        try:
            result = GenerationConfig.from_any(given)
        except TypeError as exc:
            raise ArgumentError(f"from_pretrained: generation_config: {exc}") from exc
        assert result is not None
        return result.copy()
    loaded = read_generation_config(folder)
    if loaded is None:
        return GenerationConfig.from_model_config(config)
    loaded.update(**{k: v for k, v in overrides.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    return loaded


def _quantizer(
    quantization: Any, config: PretrainedConfig, pre_quantized: bool, method: str | None, source: str
) -> Quantizer | None:
    """Ask the ``lmport_quantizer`` hook; a stored quantization no plugin loads as stored is refused."""
    if quantization is None:
        return None
    quantizer = get_registry().hook.lmport_quantizer(
        quantization_config=quantization, config=config, pre_quantized=pre_quantized
    )
    if pre_quantized:
        if quantizer is None:
            raise unsupported_stored_quantization(source, str(method))
        if not (getattr(quantizer, "pre_quantized", False) is True and isinstance(quantizer, StoredQuantizer)):
            reason = f"the plugin serving it ({type(quantizer).__name__}) only quantizes weights as they load"
            raise unsupported_stored_quantization(source, str(method), reason)
    if quantizer is None:
        raise UnsupportedFeatureError(f"no installed plugin serves quantization_config={quantization!r}")
    return quantizer


def _quantization_settings(quantization_config: Any, load_in_4bit: bool, load_in_8bit: bool) -> Any:
    """Normalise ``quantization_config`` and the legacy ``load_in_4bit``/``load_in_8bit`` shortcuts."""
    if load_in_4bit or load_in_8bit:
        if quantization_config is not None:
            raise ArgumentError("pass either quantization_config or load_in_4bit/load_in_8bit, not both")
        warnings.warn(
            "load_in_4bit/load_in_8bit are deprecated shortcuts; pass quantization_config=BitsAndBytesConfig(...)",
            FutureWarning,
            stacklevel=4,
        )
        return BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    if quantization_config is None:
        return None
    if isinstance(quantization_config, BitsAndBytesConfig) or isinstance(quantization_config, dict) or (
        type(quantization_config).__name__ == "BitsAndBytesConfig"
    ):
        return BitsAndBytesConfig.from_any(quantization_config)
    return quantization_config  # another quantizer plugin's settings


def _str_or_none(value: Any) -> str | None:
    return None if value is None else os.fspath(value)


_PATH = (str, os.PathLike)
#: from_pretrained arguments (not config overrides) → (accepted types, what to say), checked before anything runs.
ARGUMENT_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "output_loading_info": ((bool,), "True or False"),
    "ignore_mismatched_sizes": ((bool,), "True or False"),
    "local_files_only": ((bool,), "True or False"),
    "force_download": ((bool,), "True or False"),
    "offload_buffers": ((bool,), "True or False"),
    "use_flash_attention_2": ((bool,), "True or False"),
    "load_in_4bit": ((bool,), "True or False"),
    "load_in_8bit": ((bool,), "True or False"),
    "trust_remote_code": ((bool, type(None)), "True, False or None"),
    "use_safetensors": ((bool, type(None)), "True, False or None"),
    "plugin": ((str, type(None)), "a distribution name (a string) or None"),
    "revision": ((str, type(None)), "a branch, tag or commit id (a string) or None"),
    "variant": ((str, type(None)), "a variant name such as 'fp16', or None"),
    "attn_implementation": ((str, type(None)), "an attention kernel's name (a string) or None"),
    "subfolder": ((*_PATH, type(None)), "a relative path (a string) or None"),
    "cache_dir": ((*_PATH, type(None)), "a folder path or None"),
    "offload_folder": ((*_PATH, type(None)), "a folder path or None"),
    "token": ((str, bool, type(None)), "a token string, True, False or None"),
    "use_auth_token": ((str, bool, type(None)), "a token string, True, False or None"),
    "proxies": ((dict, type(None)), "a dict or None"),
    "max_memory": ((dict, type(None)), "a dict of device → size, or None"),
}


def check_argument_types(name_or_path: Any, kwargs: dict[str, Any]) -> None:
    """Refuse a ``from_pretrained`` argument of the wrong type before it reaches code that would misuse it.

    Raises:
        ArgumentError: naming the argument, the value and what it accepts.
    """
    if not isinstance(name_or_path, _PATH) or isinstance(name_or_path, bytes):
        raise ArgumentError(
            f"from_pretrained: pretrained_model_name_or_path must be a folder path or a hub repo id (a string), got "
            f"{type(name_or_path).__name__} {name_or_path!r}"[:300]
        )
    paths = {"pretrained_model_name_or_path": name_or_path}
    for name, value in kwargs.items():
        accepted = ARGUMENT_TYPES.get(name)
        if accepted is None:
            continue
        types, says = accepted
        if not isinstance(value, types):
            raise ArgumentError(f"from_pretrained: {name} must be {says}, got {type(value).__name__} {value!r}"[:300])
        if name in ("subfolder", "cache_dir", "offload_folder", "variant", "revision") and value is not None:
            paths[name] = value
    for name, value in paths.items():
        text = os.fspath(value)
        if isinstance(text, bytes) or "\x00" in text:
            raise ArgumentError(f"from_pretrained: {name} must not contain NUL characters, got {value!r}"[:300])
    if kwargs.get("plugin") == "":
        raise ArgumentError("from_pretrained: plugin must name a distribution, got ''")
    variant = kwargs.get("variant")
    if variant is not None and (not variant or "/" in variant or "\\" in variant or len(variant) > 64):
        raise ArgumentError(
            f"from_pretrained: variant must be a short name such as 'fp16' (no path separators), got {variant!r}"[:300]
        )
