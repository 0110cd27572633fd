"""``AutoModelForCausalLM`` and ``AutoConfig``: the drop-in entry points."""

from __future__ import annotations

import os
from typing import Any

from .config import PretrainedConfig
from .errors import ArgumentError
from .hooks import model_class_for
from .request import LoadRequest


class AutoConfig:
    """Parse a checkpoint's ``config.json`` with the plugin that provides its ``model_type``."""

    def __init__(self) -> None:
        raise TypeError("use AutoConfig.from_pretrained(...)")

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:
        """The typed config of a checkpoint; keyword arguments naming fields override them.

        Arguments are parsed as ``AutoModelForCausalLM.from_pretrained`` parses them, and, as in
        transformers: the source arguments (``revision``, ``cache_dir``, ``token``,
        ``local_files_only``, ``subfolder``, ...), ``trust_remote_code`` and ``plugin`` locate and
        parse the config; ``dtype`` (or ``torch_dtype``; ``"auto"`` changes nothing) and
        ``attn_implementation`` are recorded on it; loading arguments that cannot change a config
        (``device_map``, ``output_loading_info``, ``low_cpu_mem_usage``, ...) are accepted without
        effect; ``quantization_config``, ``load_in_4bit``/``load_in_8bit`` and ``config`` are refused
        (:class:`~lmport.errors.ArgumentError`: pass them to the model's ``from_pretrained``), as
        are names that are no field (unless ``return_unused_kwargs=True``, which returns
        ``(config, unused_kwargs)``).
        """
        from .pipeline import config_from_pretrained

        return config_from_pretrained(LoadRequest.parse(name_or_path, kwargs, caller="AutoConfig"))


class AutoModelForCausalLM:
    """Load any causal LM an installed plugin provides."""

    def __init__(self) -> None:
        raise TypeError("use AutoModelForCausalLM.from_pretrained(...) or .from_config(...)")

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | os.PathLike[str], *model_args: Any, **kwargs: Any) -> Any:
        """Load a pretrained causal LM, as ``transformers.AutoModelForCausalLM.from_pretrained`` does.

        Args:
            pretrained_model_name_or_path: a checkpoint folder (``config.json`` plus
                safetensors or ``pytorch_model.bin`` weights, single or sharded).
            dtype: ``torch.dtype``, its name, or ``"auto"`` (default: the checkpoint's
                own dtype). ``torch_dtype`` is accepted as an alias.
            device_map: ``None``, ``"cpu"``, ``"cuda:0"``, an index or a ``torch.device``.
            attn_implementation: ``"sdpa"``, ``"eager"`` or any installed kernel's name;
                ``None`` picks the best available for the device and dtype.
            output_loading_info: also return ``{"missing_keys", "unexpected_keys",
                "mismatched_keys", "error_msgs"}``.
            ignore_mismatched_sizes: initialise afresh tensors whose checkpoint shape differs.
            trust_remote_code: never runs repository code (warned about when set).
            variant, use_safetensors: which weight files to read.
            revision, cache_dir, token, local_files_only, subfolder: where the files are.
            plugin: the distribution to use when several provide the ``model_type``.
            **config_overrides: config fields to override (``rms_norm_eps=1e-5``).

        Returns:
            The model in eval mode (and the loading info when asked).

        Raises:
            lmport.LmportError: a subclass naming the file, key or plugin at fault
                (:class:`~lmport.errors.FolderChangedError` when saves kept replacing the folder
                during the load, which is otherwise run again).
        """
        if model_args:
            raise ArgumentError("positional model arguments are not supported; pass keyword arguments")
        from .atomic import load_attempts
        from .pipeline import from_pretrained

        request = LoadRequest.parse(pretrained_model_name_or_path, kwargs)
        # Loaded again when a save replaced the folder meanwhile: the model comes from one save.
        for attempt in load_attempts():
            with attempt:
                model = from_pretrained(request)
            if attempt.consistent:
                return model
        raise AssertionError("unreachable: load_attempts raises when it runs out")

    @staticmethod
    def from_config(config: PretrainedConfig, *, plugin: str | None = None, **kwargs: Any) -> Any:
        """A freshly initialised model for ``config`` (``dtype``, ``device``, ``attn_implementation``, ``seed``).

        ``plugin``: the distribution to use when several provide ``config.model_type`` (as in
        ``from_pretrained``; :data:`~lmport.registry.CHOICE_ENV` otherwise).
        """
        if not isinstance(config, PretrainedConfig):
            raise ArgumentError(f"from_config needs an lmport config object, got {type(config).__name__}")
        return model_class_for(config, plugin).from_config(config, **kwargs)
