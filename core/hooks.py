"""One typed wrapper per hook of :mod:`lmport.hookspecs`: the only code in core that asks the hooks.

Each wrapper has one policy for a ``None`` answer ("no plugin serves this"): it raises the typed
error that names what was asked and what is installed. Wrappers of the architecture hooks
(``parse_config``, ``resolve_model_class``, ``weight_mapping``) first make the registry load the
plugin serving the ``model_type`` (:meth:`~lmport.registry.Registry.ensure`), so its hooks answer
however the model was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import CONFIG_NAME
from . import formats
from .errors import (
    AttentionKernelError,
    ConfigError,
    PluginError,
    RemoteCodeError,
    SourceError,
    UnknownModelTypeError,
    UnsupportedFeatureError,
)
from .quantization import StoredQuantizer, unsupported_stored_quantization
from .registry import get_registry

if TYPE_CHECKING:
    import torch

    from .attention import AttentionKernel
    from .gguf_spec import GGUFArchitecture
    from .config import PretrainedConfig
    from .options import LoadOptions, SourceOptions
    from .placement import Placement, PlacementOptions
    from .quantization import Quantizer
    from .weights import WeightMap, WeightSource


def resolve_source(name_or_path: str, options: SourceOptions) -> Path:
    """``lmport_resolve_source``: the local folder holding the checkpoint.

    Raises:
        SourceError: no source plugin resolves ``name_or_path`` (or a typed subclass a source raises).
    """
    folder = get_registry().hook.lmport_resolve_source(name_or_path=name_or_path, options=options)
    if folder is None:
        raise SourceError(
            f"{name_or_path!r} is not a checkpoint folder on this machine, and no installed source plugin "
            "resolves it"
        )
    return Path(folder)


def parse_config(raw: dict[str, Any], model_type: str, *, path: Path, choose: str | None = None) -> PretrainedConfig:
    """``lmport_parse_config``, the plugin serving ``model_type`` loaded first (``choose`` picks one).

    Raises:
        ConfigError: the plugin refused ``raw`` (the message names ``path``).
        RemoteCodeError: only the repository's own code (``auto_map``) could provide ``model_type``.
        UnknownModelTypeError: no installed or registered plugin provides it.
        PluginError: the plugin providing it returned nothing.
    """
    registry = get_registry()
    provided = registry.ensure(model_type, choose) is not None  # an explicit choice is honoured or refused
    try:
        config = registry.hook.lmport_parse_config(raw=raw, model_type=model_type)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {str(exc).removeprefix(CONFIG_NAME + ': ')}") from exc
    if config is not None:
        return config
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


def model_class_for(config: PretrainedConfig, choose: str | None = None) -> type:
    """``lmport_resolve_model_class``: the model class implementing ``config``, its architecture loaded first.

    Raises:
        UnknownModelTypeError: no plugin provides ``config.model_type``.
        PluginError: the plugin providing it resolves no class (or as :meth:`Registry.architecture`).
    """
    registry = get_registry()
    provider = registry.ensure(config.model_type, choose)
    model_class = registry.hook.lmport_resolve_model_class(config=config)
    if model_class is None:
        if provider is None:
            raise registry.unknown(config.model_type)
        raise PluginError(
            f"no plugin resolves a model class for {type(config).__name__} ({config.model_type!r}; "
            f"provided by {registry.provider(config.model_type)!r})"
        )
    return model_class


def weight_map_for(config: PretrainedConfig, model_class: type) -> WeightMap:
    """``lmport_weight_mapping``: the rules between ``model_class``'s modules and ``config``'s checkpoint layout.

    The architecture of ``config.model_type`` is loaded first, so a ``weight_mapping`` hook it
    implements answers whether the model came from ``from_pretrained``, ``from_config`` or its
    class; a model whose ``model_type`` no plugin provides gets ``model_class.weight_map``.

    Raises:
        PluginError: no plugin answers and the class has no ``weight_map``.
    """
    registry = get_registry()
    registry.ensure(config.model_type, model_class=model_class)
    weight_map = registry.hook.lmport_weight_mapping(config=config, model_class=model_class)
    if weight_map is None:
        raise PluginError(
            f"no weight map for {model_class.__name__} ({config.model_type!r}): no plugin answered the "
            "weight_mapping hook and the class has no weight_map attribute"
        )
    return weight_map


def gguf_architecture(name: str, path: Path | str) -> GGUFArchitecture:
    """``lmport_gguf_architecture``: the declaration of the installed plugin that reads GGUF architecture ``name``.

    The plugin whose ``model_type`` is ``name`` is loaded first (entry points are lazy); only when it
    does not read such files is every installed architecture loaded (the registry's
    :meth:`~lmport.registry.Registry.load_all`) and the hook asked once more.

    Raises:
        UnknownModelTypeError: no installed plugin reads ``name`` (lists the GGUF names installed plugins read).
        PluginError: a plugin answered with something other than a :class:`~lmport.GGUFArchitecture`.
    """
    from .gguf_spec import GGUFArchitecture

    registry = get_registry()
    registry.ensure(name)
    found = registry.hook.lmport_gguf_architecture(name=name)
    if found is None:
        registry.load_all()
        found = registry.hook.lmport_gguf_architecture(name=name)
    if found is None:
        readable = sorted({g.name for p in registry.pm.get_plugins() for g in getattr(p, "gguf", ()) or ()})
        raise UnknownModelTypeError(
            f"{path}: GGUF architecture {name!r} (general.architecture): no installed lmport plugin reads GGUF "
            f"files of it (installed plugins read: {', '.join(readable) or 'none'}). An architecture plugin "
            "declares the GGUF names it reads with Architecture(..., gguf=[lmport.GGUFArchitecture(...)]); see "
            "docs/plugins.md"
        )
    if not isinstance(found, GGUFArchitecture) or not found.model_type:
        raise PluginError(
            f"lmport_gguf_architecture({name!r}) returned {found!r}, not a GGUFArchitecture with a model_type"
        )
    return found


def open_weights(folder: Path, options: LoadOptions) -> WeightSource:
    """``lmport_open_weights``: the checkpoint's tensors, read lazily.

    Raises:
        WeightsNotFoundError: no installed format finds its files in ``folder`` (names the files looked for,
            from :func:`lmport.formats.not_found`).
    """
    source = get_registry().hook.lmport_open_weights(folder=folder, options=options)
    if source is None:
        raise formats.not_found(folder, options)
    return source


def select_attention(
    requested: str | None, config: PretrainedConfig, device: torch.device, dtype: torch.dtype
) -> AttentionKernel:
    """``lmport_select_attention``: the kernel for ``requested`` (``None``: the best available).

    Raises:
        AttentionKernelError: no installed kernel serves ``requested`` (names the installed ones).
    """
    kernel = get_registry().hook.lmport_select_attention(requested=requested, config=config, device=device, dtype=dtype)
    if kernel is None:
        raise AttentionKernelError(
            f"unknown attn_implementation {requested!r}; installed kernels: {', '.join(kernel_names())}"
        )
    return kernel


def kernel_names() -> list[str]:
    """``lmport_attention_kernels``: every installed attention kernel's name, once each."""
    names: list[str] = []
    for group in get_registry().hook.lmport_attention_kernels():
        names.extend(n for n in group if n not in names)
    return names


def quantizer_for(
    settings: Any, config: PretrainedConfig, *, pre_quantized: bool, method: str | None, source: str
) -> Quantizer | None:
    """``lmport_quantizer``: the plan for ``settings`` (``None`` without settings).

    ``pre_quantized``: the checkpoint stores its weights quantized with ``method`` (said by ``source``).

    Raises:
        UnsupportedQuantizationError: a stored quantization no plugin loads as stored.
        UnsupportedFeatureError: no plugin serves ``settings``.
    """
    if settings is None:
        return None
    quantizer = get_registry().hook.lmport_quantizer(
        quantization_config=settings, config=config, pre_quantized=pre_quantized
    )
    if pre_quantized:
        if quantizer is None:
            raise unsupported_stored_quantization(source, str(method))
        if not (isinstance(quantizer, StoredQuantizer) and quantizer.pre_quantized is True):
            reason = f"the plugin serving it ({type(quantizer).__name__}) only quantizes weights as they load"
            raise unsupported_stored_quantization(source, str(method), reason)
    if quantizer is None:
        raise UnsupportedFeatureError(f"no installed plugin serves quantization_config={settings!r}")
    return quantizer


def placement_for(device_map: Any, model: Any, dtype: torch.dtype, options: PlacementOptions) -> Placement:
    """``lmport_placement``: where each tensor of ``model`` lands for a planned ``device_map``.

    Raises:
        UnsupportedFeatureError: no installed plugin serves ``device_map``.
    """
    placement = get_registry().hook.lmport_placement(device_map=device_map, model=model, dtype=dtype, options=options)
    if placement is None:
        raise UnsupportedFeatureError(f"no installed plugin serves device_map={device_map!r}")
    return placement
