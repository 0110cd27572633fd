"""A checkpoint's configs: ``config.json`` parsed by its plugin, overrides applied, and its generation config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import formats, hooks
from .caller import warn_user
from .config import CONFIG_NAME, PretrainedConfig, read_config_json
from .errors import ArgumentError, ConfigError
from .generation_config import GenerationConfig, read_generation_config
from .options import LoadOptions
from .registry import get_registry
from .request import LoadRequest

#: ``from_pretrained`` overrides that also apply to the generation config.
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def load_config(
    folder: Path,
    *,
    plugin: str | None = None,
    trust_remote_code: bool | None = None,
    overrides: dict[str, Any] | None = None,
    weights: LoadOptions | None = None,
) -> PretrainedConfig:
    """Read ``folder/config.json`` and parse it with the plugin that provides its ``model_type``.

    The config comes from the weight files instead when they carry one (a GGUF file's metadata) and
    either ``weights`` asks for their format by name (``gguf_file=``) or the folder has no ``config.json``.

    Raises:
        ConfigError: no or an invalid ``model_type``, or the plugin refuses the file.
        RemoteCodeError, UnknownModelTypeError, PluginError: as :func:`lmport.hooks.parse_config`.
    """
    weights = weights or LoadOptions()
    embedded = None
    if formats.requested_formats(weights) or not (folder / CONFIG_NAME).exists():
        embedded = formats.embedded_config(folder, weights)
    raw, path = embedded if embedded is not None else (read_config_json(folder), folder / CONFIG_NAME)
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(f"{path}: no 'model_type' key; lmport chooses the architecture plugin by it")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"{path}: 'model_type' must be a non-empty string, got {model_type!r}")
    config = hooks.parse_config(raw, model_type, path=path, choose=plugin)
    if trust_remote_code:
        provider = get_registry().provider(model_type) or "registered through a hook"
        warn_user(
            f"trust_remote_code=True is ignored: model_type {model_type!r} is provided by the installed plugin "
            f"{provider}; no repository code is run."
        )
    if overrides:
        config.update(overrides)
    config._source_folder = folder  # noqa: SLF001 - not a field: never serialised
    return config


def requested_config(request: LoadRequest, folder: Path) -> tuple[PretrainedConfig, dict[str, Any]]:
    """The config a load uses (``config=``, else the folder's, with the request's overrides) and those overrides.

    Raises:
        ArgumentError: an override names no field of the config (or has the wrong type).
    """
    if request.config is not None:
        return request.config, {}
    overrides = {k: v for k, v in request.config_overrides.items() if k != "model_type"}
    config = load_config(
        folder, plugin=request.plugin, trust_remote_code=request.trust_remote_code, weights=request.weights
    )
    unknown = sorted(k for k in overrides if not config.has_field(k))
    if unknown:
        raise ArgumentError(
            f"from_pretrained got unknown arguments {unknown}: they are neither loading options nor fields "
            f"of {type(config).__name__}"
        )
    if overrides:
        config.update(overrides)
    return config, overrides


def auto_config(request: LoadRequest, folder: Path) -> PretrainedConfig | tuple[PretrainedConfig, dict[str, Any]]:
    """``AutoConfig.from_pretrained``: the folder's config with the request's overrides, ``dtype`` and
    ``attn_implementation`` recorded on it (as transformers records them); with ``return_unused_kwargs``,
    also the arguments that changed nothing.

    Raises:
        ArgumentError: an override names no field (unless ``return_unused_kwargs``) or has the wrong type.
    """
    config = load_config(
        folder, plugin=request.plugin, trust_remote_code=request.trust_remote_code, weights=request.weights
    )
    overrides = dict(request.config_overrides)
    unknown = {k: overrides.pop(k) for k in sorted(overrides) if not config.has_field(k)}
    if unknown and not request.return_unused_kwargs:
        raise ArgumentError(f"AutoConfig.from_pretrained got unknown arguments {sorted(unknown)}")
    if request.dtype is not None:
        overrides["dtype"] = str(request.dtype).removeprefix("torch.")
    if overrides:
        config.update(overrides)
    if request.attn_implementation is not None:
        config.extra["attn_implementation"] = request.attn_implementation  # from_pretrained(config=...) uses it
    if request.return_unused_kwargs:
        return config, {**request.unused, **unknown}
    return config


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
    loaded.update(**{k: v for k, v in overrides.items() if k in TOKEN_IDS})
    return loaded
