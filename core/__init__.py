"""lmport: load pretrained causal language models through plugins, ready for fine-tuning.

``lmport.AutoModelForCausalLM.from_pretrained(path, **kwargs)`` is a drop-in for the
transformers call of the same name. Architectures, weight formats, sources and
attention kernels are pluggy plugins (see :mod:`lmport.hookspecs`).
"""

from __future__ import annotations

from typing import Any

from .architecture import Architecture
from .attention import AttentionKernel, AttentionMask
from .auto import AutoConfig, AutoModelForCausalLM
from .config import PretrainedConfig
from .distributed import DistributedConfig
from .generation_config import GenerationConfig
from .gguf_spec import GGUFArchitecture
from .gguf_tokenizer import GGUFTokenizer
from .errors import (
    ArgumentError,
    AuthenticationError,
    GatedRepoError,
    HubError,
    HubFileNotFoundError,
    OfflineError,
    RepoNotFoundError,
    RevisionNotFoundError,
    AttentionKernelError,
    ConfigError,
    CorruptWeightsError,
    DistributedError,
    DuplicateTensorError,
    FolderChangedError,
    GenerationSettingError,
    LmportError,
    MissingShardError,
    MissingWeightsError,
    ModelSizeError,
    OffloadError,
    PluginConflictError,
    PluginError,
    PluginImportError,
    RemoteCodeError,
    SaveError,
    ShapeMismatchError,
    SourceError,
    UnknownModelTypeError,
    UnsafePathError,
    UnsafePickleError,
    UnsupportedFeatureError,
    UnsupportedQuantizationError,
    UnsupportedTensorError,
    WeightsChangedError,
    WeightsError,
    WeightsNotFoundError,
)
from .hookspecs import hookimpl, hookspec
from . import integrations as _integrations
from .quantization import BitsAndBytesConfig
from .registry import get_registry
from .weights import Rename, Split, Transpose, WeightMap

__version__ = "0.1.0"

# Post-import patches for transformers' Trainer and peft (see lmport.integrations).
_integrations.install()


def register(plugin: Any, *, name: str | None = None, override: bool = False) -> Any:
    """Register plugin code at run time, as an installed entry point would.

    Args:
        plugin: an :class:`Architecture` (serves its ``model_type``) or any object or
            module with ``@lmport.hookimpl`` functions (a capability plugin).
        name: the name pluggy records it under.
        override: let an :class:`Architecture` replace an installed plugin of the
            same ``model_type`` instead of raising :class:`PluginConflictError`.

    Returns:
        ``plugin``, so ``register`` can be used as a decorator on classes.
    """
    return get_registry().register(plugin, name=name, override=override)


def unregister(plugin: Any) -> None:
    """Undo :func:`register`."""
    get_registry().unregister(plugin)


__all__ = [
    "Architecture",
    "ArgumentError",
    "AuthenticationError",
    "GatedRepoError",
    "HubError",
    "HubFileNotFoundError",
    "OfflineError",
    "RepoNotFoundError",
    "RevisionNotFoundError",
    "AttentionKernel",
    "AttentionKernelError",
    "AttentionMask",
    "AutoConfig",
    "AutoModelForCausalLM",
    "BitsAndBytesConfig",
    "ConfigError",
    "CorruptWeightsError",
    "DistributedConfig",
    "DistributedError",
    "DuplicateTensorError",
    "FolderChangedError",
    "GenerationConfig",
    "GenerationSettingError",
    "GGUFArchitecture",
    "GGUFTokenizer",
    "LmportError",
    "MissingShardError",
    "MissingWeightsError",
    "ModelSizeError",
    "OffloadError",
    "PluginConflictError",
    "PluginError",
    "PluginImportError",
    "PretrainedConfig",
    "RemoteCodeError",
    "Rename",
    "SaveError",
    "ShapeMismatchError",
    "SourceError",
    "Split",
    "Transpose",
    "UnknownModelTypeError",
    "UnsafePathError",
    "UnsafePickleError",
    "UnsupportedFeatureError",
    "UnsupportedQuantizationError",
    "UnsupportedTensorError",
    "WeightMap",
    "WeightsChangedError",
    "WeightsError",
    "WeightsNotFoundError",
    "__version__",
    "hookimpl",
    "hookspec",
    "register",
    "unregister",
]
