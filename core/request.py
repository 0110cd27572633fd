"""Every argument of ``from_pretrained`` (and ``AutoConfig.from_pretrained``), parsed once into a typed request."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch

from .caller import warn_user
from .config import PretrainedConfig
from .errors import ArgumentError, UnsupportedFeatureError
from .options import LoadOptions, SourceOptions
from .placement import PlacementOptions, is_single_device, resolve_device
from .quantization import BitsAndBytesConfig
from .weights import COMPUTE_DTYPES

Caller = Literal["from_pretrained", "AutoConfig"]

#: transformers arguments that have no effect here: accepted, with a warning (``from_pretrained`` only:
#: transformers' ``AutoConfig`` ignores them too, silently).
IGNORED_ARGUMENTS = frozenset(
    {"low_cpu_mem_usage", "_fast_init", "offload_state_dict", "resume_download", "mirror", "from_tf", "from_flax",
     "_from_auto", "_from_pipeline", "use_kernels", "key_mapping_strict", "adapter_kwargs", "output_attentions",
     "output_hidden_states", "return_unused_kwargs", "_commit_hash"}
)  # fmt: skip
#: transformers arguments this version does not serve: refused clearly rather than ignored.
NOT_YET_SUPPORTED = frozenset({"state_dict", "key_mapping", "adapter_name"})
#: Arguments of distributed loading: fields of the request, served by :mod:`lmport.distributed`.
DISTRIBUTED_ARGUMENTS = ("distributed_config", "tp_plan", "tp_size", "device_mesh")
#: Loading arguments ``AutoConfig.from_pretrained`` refuses: a config cannot carry them, and transformers'
#: AutoConfig would drop them (or, for a quantized checkpoint, overwrite its stored settings).
CONFIG_REFUSES = ("quantization_config", "load_in_4bit", "load_in_8bit")
_PATH = (str, os.PathLike)
#: Arguments checked for NUL characters (they become file names).
_PATH_ARGUMENTS = ("subfolder", "cache_dir", "offload_folder", "variant", "revision", "gguf_file")
_BOOL = ((bool,), "True or False")
#: from_pretrained arguments (not config overrides) → (accepted types, what to say), checked before anything runs.
ARGUMENT_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "output_loading_info": _BOOL,
    "ignore_mismatched_sizes": _BOOL,
    "local_files_only": _BOOL,
    "force_download": _BOOL,
    "offload_buffers": _BOOL,
    "use_flash_attention_2": _BOOL,
    "load_in_4bit": _BOOL,
    "load_in_8bit": _BOOL,
    "trust_remote_code": ((bool, type(None)), "True, False or None"),
    "use_safetensors": ((bool, type(None)), "True, False or None"),
    "plugin": ((str, type(None)), "a distribution name (a string) or None"),
    "revision": ((str, type(None)), "a branch, tag or commit id (a string) or None"),
    "variant": ((str, type(None)), "a variant name such as 'fp16', or None"),
    "gguf_file": ((*_PATH, type(None)), "a file name inside the checkpoint (a string) or None"),
    "attn_implementation": ((str, type(None)), "an attention kernel's name (a string) or None"),
    "subfolder": ((*_PATH, type(None)), "a relative path (a string) or None"),
    "cache_dir": ((*_PATH, type(None)), "a folder path or None"),
    "offload_folder": ((*_PATH, type(None)), "a folder path or None"),
    "token": ((str, bool, type(None)), "a token string, True, False or None"),
    "use_auth_token": ((str, bool, type(None)), "a token string, True, False or None"),
    "proxies": ((dict, type(None)), "a dict or None"),
    "max_memory": ((dict, type(None)), "a dict of device → size, or None"),
}

@dataclass(frozen=True)
class LoadRequest:
    """What a ``from_pretrained`` (or ``AutoConfig.from_pretrained``) call asks for, every argument parsed.

    Built only by :meth:`parse`, which checks types, resolves aliases (``torch_dtype``,
    ``use_flash_attention_2``, ``use_auth_token``), warns about arguments without effect and
    refuses those this version does not serve.
    """

    name_or_path: str
    caller: Caller
    source: SourceOptions
    weights: LoadOptions
    #: The floating dtype asked for; ``None``: "auto" (the config's, then the checkpoint's).
    dtype: torch.dtype | None
    attn_implementation: str | None
    device_map: Any
    #: The device of a single-device ``device_map`` (``None`` for a planned map, or for AutoConfig).
    device: torch.device | None
    placement: PlacementOptions
    #: Normalised quantization settings (a :class:`BitsAndBytesConfig`, another plugin's object, or ``None``).
    quantization: Any
    plugin: str | None
    trust_remote_code: bool | None
    config: PretrainedConfig | None
    generation_config: Any
    #: Remaining keyword arguments: config fields to override (read-only).
    config_overrides: Mapping[str, Any]
    output_loading_info: bool
    ignore_mismatched_sizes: bool
    #: AutoConfig: return ``(config, unused arguments)``, as transformers does.
    return_unused_kwargs: bool
    #: Loading arguments AutoConfig accepted without effect (returned with ``return_unused_kwargs``).
    unused: Mapping[str, Any]
    distributed_config: Any = None
    tp_plan: Any = None
    tp_size: int | None = None
    device_mesh: Any = None

    @property
    def gguf_file(self) -> str | None:
        """The GGUF file to read, inside the checkpoint (carried in :attr:`weights`)."""
        return self.weights.gguf_file

    @property
    def label(self) -> str:
        """The call, as error messages name it."""
        return "from_pretrained" if self.caller == "from_pretrained" else "AutoConfig.from_pretrained"

    @classmethod
    def parse(cls, name_or_path: Any, kwargs: Mapping[str, Any], caller: Caller = "from_pretrained") -> LoadRequest:
        """Check and parse the arguments of ``caller``.

        Raises:
            ArgumentError: an argument of the wrong type, contradicting aliases, or (AutoConfig)
                a loading argument a config cannot carry.
            UnsupportedFeatureError: an argument this version refuses (``state_dict``, ...).
        """
        kwargs = dict(kwargs)
        label = "from_pretrained" if caller == "from_pretrained" else "AutoConfig.from_pretrained"
        check_argument_types(name_or_path, kwargs, label)
        loading = caller == "from_pretrained"
        pop = kwargs.pop

        dtype = parse_dtype(pop("dtype", None))
        torch_dtype = parse_dtype(pop("torch_dtype", None))
        if dtype is None:
            dtype = torch_dtype
        elif torch_dtype is not None and torch_dtype != dtype:
            raise ArgumentError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype")
        attn_implementation = pop("attn_implementation", None)
        if pop("use_flash_attention_2", False):
            if attn_implementation not in (None, "flash_attention_2"):
                raise ArgumentError("use_flash_attention_2=True contradicts attn_implementation; pass only the latter")
            attn_implementation = "flash_attention_2"
        token = pop("token", None)
        if "use_auth_token" in kwargs:
            warn_user("use_auth_token is deprecated; use token", FutureWarning)
            token = token or pop("use_auth_token")
        weights = LoadOptions(
            variant=pop("variant", None),
            use_safetensors=pop("use_safetensors", None),
            gguf_file=_path(pop("gguf_file", None)),
        )
        source = SourceOptions(
            revision=pop("revision", None),
            cache_dir=_path(pop("cache_dir", None)),
            token=token,
            local_files_only=pop("local_files_only", False),
            subfolder=_path(pop("subfolder", "")) or "",
            force_download=pop("force_download", False),
            proxies=pop("proxies", None),
            variant=weights.variant,
            use_safetensors=weights.use_safetensors,
            config_only=not loading,
            gguf_file=weights.gguf_file,
        )
        device_map = pop("device_map", None)
        placement = PlacementOptions(
            max_memory=pop("max_memory", None),
            offload_folder=_path(pop("offload_folder", None)),
            offload_buffers=pop("offload_buffers", False),
        )
        quantization = (pop("quantization_config", None), pop("load_in_4bit", False), pop("load_in_8bit", False))
        if not loading and (quantization[0] is not None or any(quantization[1:])):
            given = [n for n, v in zip(CONFIG_REFUSES, quantization, strict=True) if v not in (None, False)]
            raise ArgumentError(
                f"{label}: {', '.join(given)} is an argument of AutoModelForCausalLM.from_pretrained; a config does "
                "not carry quantization settings (a checkpoint's own stay in config.json's quantization_config)"
            )
        device = None
        if loading:
            quantization = quantization_settings(*quantization)
            if is_single_device(device_map):
                device = resolve_device(device_map)
                if placement.max_memory is not None or placement.offload_folder is not None:
                    warn_user("max_memory / offload_folder only apply with a device map such as device_map='auto'")
        else:
            quantization = None

        config = pop("config", None)
        if config is not None and not isinstance(config, PretrainedConfig):
            raise ArgumentError(f"config must be an lmport config object, got {type(config).__name__}")
        if config is not None and not loading:
            raise ArgumentError(f"{label}: config= is an argument of AutoModelForCausalLM.from_pretrained")
        distributed = {name: pop(name, None) for name in DISTRIBUTED_ARGUMENTS}
        plugin, trust_remote_code = pop("plugin", None), pop("trust_remote_code", None)
        output_loading_info, ignore = pop("output_loading_info", False), pop("ignore_mismatched_sizes", False)
        generation_config = pop("generation_config", None)
        return_unused = not loading and bool(pop("return_unused_kwargs", False))
        unused: dict[str, Any] = {}
        if loading:
            for name in sorted(set(kwargs) & IGNORED_ARGUMENTS):
                warn_user(f"from_pretrained: {name} has no effect in lmport and is ignored")
                pop(name)
            for name in sorted(set(kwargs) & NOT_YET_SUPPORTED):
                if kwargs[name] not in (None, False):
                    raise UnsupportedFeatureError(f"from_pretrained: {name} is not supported by this lmport version")
                pop(name)
        else:  # loading arguments transformers' AutoConfig accepts and drops: they change no config
            if "output_attentions" in kwargs:
                warn_user(f"{label}: output_attentions has no effect in lmport and is ignored")
                pop("output_attentions")
            unused = {k: pop(k) for k in list(kwargs) if k in IGNORED_ARGUMENTS | NOT_YET_SUPPORTED}
            unused |= _loading_only(output_loading_info, ignore, generation_config, device_map, placement, weights,
                                    distributed)  # fmt: skip
            distributed = {}
        if config is not None and kwargs:
            raise ArgumentError(f"{label} got unknown arguments {sorted(kwargs)} (config= was given)")
        return cls(
            name_or_path=os.fspath(name_or_path),
            caller=caller,
            source=source,
            weights=weights,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device_map=device_map,
            device=device,
            placement=placement,
            quantization=quantization,
            plugin=plugin,
            trust_remote_code=trust_remote_code,
            config=config,
            generation_config=generation_config,
            config_overrides=MappingProxyType(kwargs),
            output_loading_info=output_loading_info,
            ignore_mismatched_sizes=ignore,
            return_unused_kwargs=return_unused,
            unused=MappingProxyType(unused),
            **distributed,
        )


def _loading_only(
    output_loading_info: bool,
    ignore: bool,
    generation_config: Any,
    device_map: Any,
    placement: PlacementOptions,
    weights: LoadOptions,
    distributed: dict[str, Any],
) -> dict[str, Any]:
    """The loading arguments given to AutoConfig (not at their defaults), by name."""
    given = {
        "output_loading_info": output_loading_info or None,
        "ignore_mismatched_sizes": ignore or None,
        "generation_config": generation_config,
        "device_map": device_map,
        "max_memory": placement.max_memory,
        "offload_folder": placement.offload_folder,
        "offload_buffers": placement.offload_buffers or None,
        "variant": weights.variant,
        "use_safetensors": weights.use_safetensors,
        **distributed,
    }
    return {k: v for k, v in given.items() if v is not None}


def parse_dtype(value: Any) -> torch.dtype | None:
    """A ``dtype`` argument as a floating ``torch.dtype`` lmport computes in; ``None`` for "auto" (or unset).

    Raises:
        ArgumentError: not a dtype, its name or ``"auto"``; or a dtype lmport cannot compute in.
    """
    if value is None or (isinstance(value, str) and value == "auto"):
        return None
    if isinstance(value, str):
        candidate = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(candidate, torch.dtype):
            value = candidate
    if not isinstance(value, torch.dtype):
        raise ArgumentError(f"dtype must be a torch dtype, its name (e.g. 'bfloat16') or 'auto', got {value!r}")
    if not value.is_floating_point:
        raise ArgumentError(f"dtype must be a floating dtype, got {value}")
    if value not in COMPUTE_DTYPES:
        raise ArgumentError(
            f"dtype {value} is a storage format lmport cannot compute in; pass float32, bfloat16, float16 or "
            "float64 (a quantized load takes quantization_config)"
        )
    return value


def quantization_settings(quantization_config: Any, load_in_4bit: bool, load_in_8bit: bool) -> Any:
    """Normalise ``quantization_config`` and the legacy ``load_in_4bit``/``load_in_8bit`` shortcuts."""
    if load_in_4bit or load_in_8bit:
        if quantization_config is not None:
            raise ArgumentError("pass either quantization_config or load_in_4bit/load_in_8bit, not both")
        warn_user(
            "load_in_4bit/load_in_8bit are deprecated shortcuts; pass quantization_config=BitsAndBytesConfig(...)",
            FutureWarning,
        )
        return BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    if quantization_config is None:
        return None
    if isinstance(quantization_config, BitsAndBytesConfig | dict) or (
        type(quantization_config).__name__ == "BitsAndBytesConfig"  # transformers' (duck-typed, never imported)
    ):
        return BitsAndBytesConfig.from_any(quantization_config)
    return quantization_config  # another quantizer plugin's settings


def _path(value: Any) -> str | None:
    return None if value is None else os.fspath(value)


def check_argument_types(name_or_path: Any, kwargs: Mapping[str, Any], label: str = "from_pretrained") -> None:
    """Refuse an argument of the wrong type before it reaches code that would misuse it.

    Raises:
        ArgumentError: naming the argument, the value and what it accepts.
    """
    if not isinstance(name_or_path, _PATH) or isinstance(name_or_path, bytes):
        raise ArgumentError(
            f"{label}: pretrained_model_name_or_path must be a folder path or a hub repo id (a string), got "
            f"{type(name_or_path).__name__} {name_or_path!r}"[:300]
        )
    paths = {"pretrained_model_name_or_path": name_or_path}
    for name, value in kwargs.items():
        accepted = ARGUMENT_TYPES.get(name)
        if accepted is None:
            continue
        types, says = accepted
        if not isinstance(value, types):
            raise ArgumentError(f"{label}: {name} must be {says}, got {type(value).__name__} {value!r}"[:300])
        if name in _PATH_ARGUMENTS and value is not None:
            paths[name] = value
    for name, value in paths.items():
        text = os.fspath(value)
        if isinstance(text, bytes) or "\x00" in text:
            raise ArgumentError(f"{label}: {name} must not contain NUL characters, got {value!r}"[:300])
    if kwargs.get("plugin") == "":
        raise ArgumentError(f"{label}: plugin must name a distribution, got ''")
    variant = kwargs.get("variant")
    if variant is not None and (not variant or "/" in variant or "\\" in variant or len(variant) > 64):
        raise ArgumentError(
            f"{label}: variant must be a short name such as 'fp16' (no path separators), got {variant!r}"[:300]
        )
