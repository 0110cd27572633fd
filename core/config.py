"""Typed model configs: the base dataclass that every architecture's config extends.

The value checks and bounds (:mod:`lmport.config_checks`) and the reading of ``config.json``
(:mod:`lmport.config_json`) are re-exported here, where plugins import them from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from .config_checks import (
    COMPUTE_DTYPES,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_HIDDEN_SIZE,
    MAX_INTERMEDIATE_SIZE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB_SIZE,
    Advisory,
    Check,
    FloatDtype,
    InstanceOf,
    Integer,
    OneOf,
    Positive,
    Probability,
    Real,
    Size,
    TokenId,
)
from .config_checks import _as_float_field, _matches, _short, _type_name, _warned
from .config_files import ConfigFilesMixin
from .config_json import CONFIG_NAME, MAX_CONFIG_BYTES, MAX_INT_DIGITS, MAX_JSON_DEPTH, read_config_json
from .errors import ArgumentError, ConfigError

C = TypeVar("C", bound="PretrainedConfig")

logger = logging.getLogger("lmport")


@dataclasses.dataclass(kw_only=True)
class PretrainedConfig(ConfigFilesMixin):
    """Fields every causal LM shares; subclasses add their own as dataclass fields.

    The core sets no architecture's defaults: ``vocab_size``, ``hidden_size`` and
    ``num_hidden_layers`` are required here, and each architecture's subclass gives them
    transformers' defaults for that architecture, so a ``config.json`` that omits a key reads
    as transformers reads it. Fields are keyword-only (``kw_only=True``), so a subclass may add
    required fields after the defaulted ones; a key that stays without a value raises
    :class:`ConfigError` naming it.

    Keys of ``config.json`` that are not fields are kept in :attr:`extra` and
    written back by :meth:`to_dict`, so a load/save round trip loses nothing.

    Validation, at construction and after :meth:`update`, runs in two steps:

    1. :attr:`field_checks`, declared per key: each value's type is checked against the
       field's hint when read from ``config.json``, then its check (range, finiteness,
       membership) runs. A subclass declares only its own keys; the dicts of all base
       classes are merged (a subclass's entry replaces its base's, ``None`` removes it).
       ``None`` values (unset optional fields) are not checked.
    2. :meth:`validate`, for what spans several fields (divisibility, derived defaults),
       called once every field passed its check.

    A failure is a ``ValueError`` naming the ``config.json`` key; parsing ``config.json``
    turns it into :class:`ConfigError` naming the file, overrides into :class:`ArgumentError`.
    """

    model_type: ClassVar[str] = ""
    #: The Hugging Face class name written to ``architectures`` on save.
    hf_architecture: ClassVar[str] = ""
    #: Field name → the key ``config.json`` uses for it, where they differ (GPT-2's ``n_embd``).
    json_names: ClassVar[dict[str, str]] = {}
    #: Fields of a base class that this architecture does not have (Mistral's config derives from Llama's,
    #: which has ``pretraining_tp``): ``config.json`` keys of these names stay in :attr:`extra` like unknown
    #: keys (written back from there, never checked, not settable by :meth:`update`); the attribute reads
    #: the key's value when ``config.json`` has it, else the base class's default.
    omitted_fields: ClassVar[frozenset[str]] = frozenset()
    #: Key → check of its value (see :data:`Check`); keys are field names, or ``config.json``
    #: keys kept in :attr:`extra`. Merged with the base classes' dicts.
    field_checks: ClassVar[Mapping[str, Check | None]] = {
        "vocab_size": Size(MAX_VOCAB_SIZE),
        "hidden_size": Size(MAX_HIDDEN_SIZE),
        "num_hidden_layers": Size(MAX_LAYERS),
        "bos_token_id": TokenId(),
        "eos_token_id": TokenId(),
        "pad_token_id": TokenId(),
        "initializer_range": Real(0.0),
        "dtype": FloatDtype,
        "attn_implementation": InstanceOf((str,), "the name of an attention kernel (a string)"),
    }

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    dtype: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # --- construction ---------------------------------------------------------------

    @classmethod
    def from_dict(cls: type[C], raw: dict[str, Any], source: str = CONFIG_NAME) -> C:
        """Build a config from a decoded ``config.json``; wrong types raise :class:`ConfigError`."""
        try:
            raw = cls._upgrade_legacy(dict(raw))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        names = {f.name for f in cls._fields() if f.init}
        for key, value in raw.items():
            if key in names:
                if not _matches(value, hints[key]):
                    raise ConfigError(
                        f"{source}: key {key!r} must be {_type_name(hints[key])}, "
                        f"got {type(value).__name__} {value!r}"
                    )
                kwargs[key] = _as_float_field(value, hints[key])
            elif key != "model_type":
                extra[key] = value
        missing = [cls.key_repr(name) for name in sorted(cls.required_fields()) if name not in kwargs]
        if missing:
            raise ConfigError(f"{source}: key(s) {', '.join(missing)} required: {cls.__name__} has no default for them")
        try:
            config = cls(**kwargs, extra=extra)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        return config

    @classmethod
    def _upgrade_legacy(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Rewrite older spellings of fields into current ones (subclasses extend)."""
        key = "dtype"
        if raw.get("dtype") is None and "torch_dtype" in raw:
            key, raw["dtype"] = "torch_dtype", raw.pop("torch_dtype")
        if isinstance(raw.get("dtype"), str):
            raw["dtype"] = raw["dtype"].removeprefix("torch.")
        if raw.get("dtype") is not None and (problem := FloatDtype(raw["dtype"], None)):
            raise ValueError(f"key {key!r} {problem}, got {_short.repr(raw['dtype'])}")
        for name, key in cls.json_names.items():
            if key in raw:
                if name in raw and raw[name] != raw[key]:  # transformers would take one, lmport the other
                    raise ValueError(
                        f"keys {key!r} ({raw[key]!r:.40}) and {name!r} ({raw[name]!r:.40}) are two spellings of one "
                        "setting and disagree; keep one of them"
                    )
                raw[name] = raw.pop(key)
        return raw

    def __post_init__(self) -> None:
        for name in sorted(self.omitted_fields):
            if name in self.extra:
                setattr(self, name, self.extra[name])  # reads config.json's key, as any key kept in extra
            elif getattr(self, name) != self.field_default(name):
                raise TypeError(f"{type(self).__name__} has no field {name!r}")
        self.check_fields()
        self.validate()

    @classmethod
    def all_field_checks(cls) -> dict[str, Check]:
        """:attr:`field_checks` of this class and its bases, merged (the most derived class wins)."""
        merged: dict[str, Check | None] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("field_checks", {}))
        return {key: check for key, check in merged.items() if check is not None and key not in cls.omitted_fields}

    def check_fields(self) -> None:
        """Run every declared field check; raise ``ValueError`` naming the first key at fault."""
        names = {f.name for f in dataclasses.fields(self)}
        for name, check in self.all_field_checks().items():
            if name in names:
                value = getattr(self, name)
            elif name in self.extra:
                value = self.extra[name]
            else:
                continue
            if value is None:
                continue
            problem = check(value, self)
            if isinstance(problem, Advisory):
                seen = (type(self).__name__, name, f"{_short.repr(value)} {problem}")
                if seen not in _warned:  # once per process, as transformers' warning_once
                    _warned.add(seen)
                    logger.warning("%s: key %s = %s", type(self).__name__, self.key_repr(name), seen[2])
            elif problem:
                raise ValueError(f"key {self.key_repr(name)} {problem}, got {_short.repr(value)}")

    @classmethod
    def key_repr(cls, name: str) -> str:
        """``'key'`` as ``config.json`` spells field ``name``, for messages (``'n_embd' (hidden_size)``)."""
        key = cls.json_names.get(name)
        return f"{key!r} ({name})" if key else repr(name)

    def validate(self) -> None:
        """Cross-field checks and derived defaults, run after every field passed :attr:`field_checks`.

        Subclasses extend it (calling ``super().validate()`` first) and raise ``ValueError``
        naming the ``config.json`` keys at fault.
        """

    # --- access --------------------------------------------------------------------

    def update(self, overrides: dict[str, Any]) -> None:
        """Set fields from keyword overrides (``from_pretrained(..., hidden_act=...)``).

        Raises:
            ArgumentError: an override names no field, has the wrong type, or leaves the
                config inconsistent (the overrides are arguments, not ``config.json``).
        """
        hints = typing.get_type_hints(type(self))
        for key, value in overrides.items():
            if not self.has_field(key):
                raise ArgumentError(f"{type(self).__name__} has no field {key!r}")
            if not _matches(value, hints[key]):
                raise ArgumentError(f"override {key}={value!r} must be {_type_name(hints[key])}")
            setattr(self, key, _as_float_field(value, hints[key]))
        try:
            self.check_fields()
            self.validate()
        except ValueError as exc:
            raise ArgumentError(f"after overrides {sorted(overrides)}: {exc}") from exc

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        """The config of the text model: this config itself, as transformers returns for text-only models.

        ``decoder``/``encoder`` select a side of composite (multimodal, encoder-decoder)
        configs in transformers; a causal LM has one side, so both give this config.
        """
        return self

    @classmethod
    def required_fields(cls) -> frozenset[str]:
        """Names of the fields without a default: ``config.json`` must give them."""
        missing = dataclasses.MISSING
        return frozenset(
            f.name
            for f in cls._fields()
            if f.init and f.default is missing and f.default_factory is missing  # type: ignore[misc]
        )

    @classmethod
    def field_default(cls, name: str) -> Any:
        """The default of field ``name``, or ``None`` where it has none (a required field)."""
        for f in dataclasses.fields(cls):
            if f.name == name:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                    return f.default_factory()  # type: ignore[misc]
                return None
        raise KeyError(name)

    @classmethod
    def has_field(cls, name: str) -> bool:
        """Whether ``name`` is a settable field of this config."""
        return name in {f.name for f in cls._fields()}

    @classmethod
    def _fields(cls) -> list[dataclasses.Field[Any]]:
        """The dataclass fields that are keys of this config: all but :attr:`extra` and :attr:`omitted_fields`."""
        return [f for f in dataclasses.fields(cls) if f.name != "extra" and f.name not in cls.omitted_fields]

    def __getattr__(self, name: str) -> Any:
        # Keys carried over from config.json read as attributes, as in transformers.
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        for field_name, key in type(self).json_names.items():
            if key == name:
                return getattr(self, field_name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # --- serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config in the Hugging Face ``config.json`` form."""
        out: dict[str, Any] = dict(self.extra)
        for f in self._fields():
            out[f.name] = getattr(self, f.name)
        for name, key in self.json_names.items():
            out[key] = out.pop(name)
        out["model_type"] = self.model_type
        if self.hf_architecture:
            out["architectures"] = [self.hf_architecture]
        out.pop("torch_dtype", None)  # written once, as "dtype" (transformers 5 reads both)
        if out.get("dtype") is not None and not isinstance(out["dtype"], str):  # a torch.dtype set by user code
            out["dtype"] = str(out["dtype"]).removeprefix("torch.")
        return dict(sorted(out.items()))

    # --- transformers aliases ------------------------------------------------------------

    @property
    def torch_dtype(self) -> Any:
        """``dtype`` as a ``torch.dtype`` (``None`` if unset): transformers 5 keeps this alias of ``dtype``.

        Setting it (a ``torch.dtype`` or its name) sets ``dtype``; ``config.json`` holds ``dtype`` only.
        """
        if self.dtype is None:
            return None
        import torch

        value = self.dtype if not isinstance(self.dtype, str) else getattr(torch, self.dtype, None)
        if not isinstance(value, torch.dtype):
            raise ConfigError(f"{type(self).__name__}.dtype {self.dtype!r} is not a torch dtype")
        return value

    @torch_dtype.setter
    def torch_dtype(self, value: Any) -> None:
        import torch

        if value is None:
            self.dtype = None
            return
        name = str(value).removeprefix("torch.")
        if not isinstance(value, (str, torch.dtype)) or not isinstance(getattr(torch, name, None), torch.dtype):
            raise ArgumentError(f"torch_dtype must be a torch.dtype or its name, got {value!r}")
        self.dtype = name
