"""``GenerationConfig``: the settings of ``generate()``, read from and written to ``generation_config.json``.

Field names, defaults and merge rules are transformers' (``transformers.GenerationConfig``), so a
checkpoint's file means the same in both libraries and transformers' own object is accepted
wherever lmport takes one (duck-typed through its ``to_dict()``; transformers is never imported).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from .atomic import write_text
from .errors import ConfigError, SourceError

GENERATION_CONFIG_NAME = "generation_config.json"

#: Every attribute of transformers' ``GenerationConfig``, in its order; ``None`` means "not set".
FIELDS: tuple[str, ...] = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "max_time", "stop_strings",
    "do_sample", "num_beams", "use_mtp", "use_cache", "cache_implementation", "cache_config", "max_cache_len",
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "encoder_repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
    "token_healing", "guidance_scale", "watermarking_config", "num_return_sequences", "output_attentions",
    "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate", "pad_token_id",
    "bos_token_id", "eos_token_id", "encoder_no_repeat_ngram_size", "decoder_start_token_id", "is_assistant",
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "prompt_lookup_num_tokens", "max_matching_ngram_size", "assistant_early_exit", "assistant_lookbehind",
    "target_lookbehind", "assistant_ensemble_weight", "speculation_type", "compile_config", "disable_compile",
    "continuous_batching_config", "low_memory", "penalty_alpha", "dola_layers", "diversity_penalty",
    "num_beam_groups", "constraints", "force_words_ids", "prefill_chunk_size",
)  # fmt: skip
#: Bookkeeping keys transformers writes into the file; kept and written back, never generation settings.
METADATA: tuple[str, ...] = ("_from_model_config", "transformers_version")
#: transformers' global defaults, applied where neither the call nor the model's config sets a value.
DEFAULTS: dict[str, Any] = {
    "max_length": 20, "min_length": 0, "do_sample": False, "use_cache": True, "early_stopping": False,
    "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0,
    "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "num_return_sequences": 1, "output_scores": False, "return_dict_in_generate": False,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0, "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.4, "assistant_lookbehind": 10,
    "target_lookbehind": 10, "num_beam_groups": 1, "diversity_penalty": 0.0,
}  # fmt: skip
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")
_FORGET = ("_commit_hash", "_original_object_hash", "_mask_length")  # transformers' transient attributes


class GenerationConfig:
    """Settings of :meth:`generate`, with transformers' field names; every field is ``None`` until set.

    Keys that are not fields (a newer transformers' settings, a model's own) are kept as
    attributes and written back. ``generate`` merges, in increasing priority: transformers'
    global defaults (:data:`DEFAULTS`), the model's ``generation_config``, the
    ``generation_config`` passed to the call, the call's keyword arguments.

    Main fields: ``max_new_tokens``/``max_length``, ``min_new_tokens``/``min_length``,
    ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
    ``no_repeat_ngram_size``, ``num_return_sequences``, ``eos_token_id`` (an id or a list),
    ``pad_token_id``, ``bos_token_id``, ``stop_strings``, ``use_cache``,
    ``return_dict_in_generate``, ``output_scores``, ``output_logits``, ``num_beams``.
    """

    max_length: int | None
    max_new_tokens: int | None
    min_length: int | None
    min_new_tokens: int | None
    max_time: float | None
    stop_strings: str | list[str] | None
    do_sample: bool | None
    num_beams: int | None
    use_cache: bool | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float | None
    no_repeat_ngram_size: int | None
    suppress_tokens: list[int] | None
    begin_suppress_tokens: list[int] | None
    num_return_sequences: int | None
    output_scores: bool | None
    output_logits: bool | None
    output_hidden_states: bool | None
    output_attentions: bool | None
    return_dict_in_generate: bool | None
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    _from_model_config: bool | None
    transformers_version: str | None

    def __init__(self, **kwargs: Any) -> None:
        for name in FIELDS + METADATA:
            setattr(self, name, kwargs.pop(name, None))
        for name in _FORGET:
            kwargs.pop(name, None)
        for key, value in kwargs.items():  # custom entries
            setattr(self, key, value)

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """A config from a ``generation_config.json``-style dict, ``kwargs`` overriding it.

        With ``return_unused_kwargs=True`` returns ``(config, {})``, as transformers does.
        """
        return_unused = bool(kwargs.pop("return_unused_kwargs", False))
        for name in ("_from_auto", "_from_pipeline"):
            kwargs.pop(name, None)
        config = cls(**copy.deepcopy({**config_dict, **kwargs}))
        return (config, {}) if return_unused else config

    @classmethod
    def from_any(cls, value: Any) -> GenerationConfig | None:
        """An lmport config from ``None``, an lmport config (returned as is), a dict, or any object with
        ``to_dict()`` such as transformers' ``GenerationConfig``."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        to_dict = getattr(value, "to_dict", None)
        if callable(to_dict):
            raw = to_dict()
            if isinstance(raw, dict):
                return cls.from_dict({k: v for k, v in raw.items() if not _is_transient(k)})
        raise TypeError(f"expected a GenerationConfig (lmport's or transformers'), got {type(value).__name__}")

    @classmethod
    def from_model_config(cls, model_config: Any) -> GenerationConfig:
        """The config transformers derives from a model config (an lmport or transformers config, or a
        ``config.json`` dict): its generation fields that are set (token ids, ``use_cache``, ...)."""
        raw = model_config if isinstance(model_config, dict) else model_config.to_dict()
        values = {k: copy.deepcopy(v) for k, v in raw.items() if k in FIELDS and v is not None}
        config = cls(**values, _from_model_config=True)
        if not config.return_dict_in_generate and any(getattr(config, f) for f in _OUTPUT_FLAGS):
            config.return_dict_in_generate = True
        return config

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name: str | os.PathLike[str],
        config_file_name: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Read ``generation_config.json`` (or ``config_file_name``) from a folder, ``kwargs`` overriding it.

        A hub repository id is fetched with huggingface_hub (``revision``, ``cache_dir``,
        ``token``, ``local_files_only``, ``subfolder``, ``force_download`` are passed on).

        Raises:
            ConfigError: the file is missing or is not a JSON object.
            SourceError: the repository or file could not be fetched.
        """
        name = os.fspath(config_file_name) if config_file_name is not None else GENERATION_CONFIG_NAME
        hub_args = {k: kwargs.pop(k) for k in _HUB_ARGS if k in kwargs}
        subfolder = hub_args.get("subfolder") or ""
        folder = Path(pretrained_model_name)
        if folder.is_dir():
            path = folder / subfolder / name
        elif folder.is_file():
            path = folder
        else:
            path = _hub_file(os.fspath(pretrained_model_name), name, hub_args)
        raw = read_json(path)
        if raw is None:
            raise ConfigError(f"{path}: no such file")
        return cls.from_dict(raw, **kwargs)

    # --- access ---------------------------------------------------------------------------

    def update(self, defaults_only: bool = False, allow_custom_entries: bool = False, **kwargs: Any) -> dict[str, Any]:
        """Set the attributes named in ``kwargs``; return the kwargs that name none (as transformers does).

        ``defaults_only``: only set attributes that are ``None``. ``allow_custom_entries``: a key
        that names no attribute becomes one instead of being returned.
        """
        unused: dict[str, Any] = {}
        for key, value in kwargs.items():
            if self._has_entry(key):
                if not defaults_only or getattr(self, key) is None:
                    setattr(self, key, value)
            elif allow_custom_entries and not key.startswith("__"):
                setattr(self, key, value)
            else:
                unused[key] = value
        return unused

    def _has_entry(self, key: str) -> bool:
        return key in FIELDS or key in METADATA or key in vars(self)

    def to_dict(self) -> dict[str, Any]:
        """Every field (``None`` where unset), the metadata, and the custom entries."""
        return copy.deepcopy({k: v for k, v in vars(self).items() if not _is_transient(k)})

    def to_diff_dict(self) -> dict[str, Any]:
        """What differs from ``GenerationConfig()``: the fields that are set, custom entries, and metadata."""
        return {k: v for k, v in self.to_dict().items() if v is not None or k not in FIELDS + METADATA}

    def to_json_string(self, use_diff: bool = True, ignore_metadata: bool = False) -> str:
        """The config as JSON (only what is set, with ``use_diff``), keys sorted."""
        raw = self.to_diff_dict() if use_diff else self.to_dict()
        if ignore_metadata:
            raw = {k: v for k, v in raw.items() if k not in METADATA}
        return json.dumps(_jsonable(raw), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike[str], use_diff: bool = True) -> None:
        """Write :meth:`to_json_string` to a file, leaving out ``compile_config`` (a run-time object, as
        transformers does)."""
        raw = json.loads(self.to_json_string(use_diff=use_diff))
        raw.pop("compile_config", None)
        write_text(json_file_path, json.dumps(raw, indent=2, sort_keys=True) + "\n")  # atomic and fsynced

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], config_file_name: str | os.PathLike[str] | None = None
    ) -> Path:
        """Write ``generation_config.json`` (what is set) into ``save_directory``; returns the file."""
        folder = Path(save_directory)
        if folder.is_file():
            raise ConfigError(f"{folder} is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (os.fspath(config_file_name) if config_file_name is not None else GENERATION_CONFIG_NAME)
        self.to_json_file(path)
        return path

    def copy(self) -> GenerationConfig:
        return copy.deepcopy(self)

    def __eq__(self, other: object) -> bool:
        other_config = GenerationConfig.from_any(other) if other is not None and hasattr(other, "to_dict") else other
        if not isinstance(other_config, GenerationConfig):
            return NotImplemented
        return self.to_json_string(use_diff=False, ignore_metadata=True) == other_config.to_json_string(
            use_diff=False, ignore_metadata=True
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string(ignore_metadata=True)}"


_HUB_ARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder", "force_download", "proxies")


def _is_transient(key: str) -> bool:
    return key in _FORGET or (key.startswith("_") and key.endswith("_tensor"))


def _jsonable(value: Any) -> Any:
    """Nested settings objects (a transformers watermarking config, ...) as their dicts."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and not isinstance(value, (str, bytes)):
        return _jsonable(to_dict())
    return value


def read_json(path: Path) -> dict[str, Any] | None:
    """Decode a generation config file; ``None`` when it does not exist."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def read_generation_config(folder: str | os.PathLike[str]) -> GenerationConfig | None:
    """The checkpoint folder's ``generation_config.json``, or ``None`` if it has none."""
    from .shards import checked_file  # the symlink policy (lmport.shards)

    path = Path(folder) / GENERATION_CONFIG_NAME
    raw = read_json(path) if checked_file(Path(folder), path, unreadable=ConfigError) is not None else None
    return None if raw is None else GenerationConfig.from_dict(raw)


def _hub_file(repo_id: str, name: str, hub_args: dict[str, Any]) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise SourceError(f"{repo_id!r} is not a folder, and huggingface_hub is not installed") from exc
    hub_args.pop("proxies", None)
    subfolder = hub_args.pop("subfolder", None) or None
    try:
        return Path(hf_hub_download(repo_id, name, subfolder=subfolder, **hub_args))
    except Exception as exc:
        if type(exc).__name__ in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            raise ConfigError(f"{repo_id}: the repository has no {name}") from exc
        raise SourceError(f"{repo_id}: could not fetch {name}: {type(exc).__name__}: {exc}") from exc
