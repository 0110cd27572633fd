"""Typed model configs: the base dataclass that every architecture's config extends."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

from .errors import ArgumentError, ConfigError

C = TypeVar("C", bound="PretrainedConfig")

CONFIG_NAME = "config.json"

logger = logging.getLogger("lmport")

# --- bounds on what config.json may declare ------------------------------------------------
# Far above any released model, low enough that a lying config.json is refused at parse time,
# before a model is built (a meta-device build costs about 1 ms and 35 KB per layer).

#: Most token embeddings (largest released vocabularies: about 262k).
MAX_VOCAB_SIZE = 1 << 24
#: Widest hidden state (largest released: 16,384-25,600).
MAX_HIDDEN_SIZE = 1 << 17
#: Widest MLP (largest released: about 100k).
MAX_INTERMEDIATE_SIZE = 1 << 20
#: Deepest stack (largest released: 126; 1,024 layers build on the meta device in about a second).
MAX_LAYERS = 1024
#: Most attention heads, query or key/value (largest released: 128).
MAX_HEADS = 1 << 14
#: Widest attention head (largest released: 256); bounds the rotary table built with the model.
MAX_HEAD_DIM = 1 << 14
#: Longest context (largest released: about 10M positions); also bounds windows.
MAX_POSITIONS = 1 << 30
#: Deepest JSON nesting in config.json (released configs nest 3-5 levels).
MAX_JSON_DEPTH = 64
#: Most digits of one JSON integer (an int64 has 19).
MAX_INT_DIGITS = 100
#: Largest config.json read (released configs are a few KB; label maps reach a few MB).
MAX_CONFIG_BYTES = 16 << 20


class _IntegerTooLong(Exception):
    def __init__(self, digits: str) -> None:
        self.digits = digits


def _parse_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise _IntegerTooLong(text)
    return int(text)


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


# A JSON string, possessive (linear time), also ending at the end of the text if unterminated.
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.S)
# Byte -> nesting step as int8: +1 for [ and {, -1 for ] and }, 0 otherwise.
_NESTING_STEP = bytes(1 if b in b"[{" else 255 if b in b"]}" else 0 for b in range(256))


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays/objects more than ``limit`` deep (brackets in strings ignored).

    Linear in the text's length (a running sum over 4 MiB chunks), so a large hostile file costs
    a fraction of a second, never a recursion.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    import torch

    data = bytearray(_JSON_STRING.sub("", text).encode("utf-8").translate(_NESTING_STEP))
    depth, chunk = 0, 1 << 22
    for start in range(0, len(data), chunk):
        steps = torch.frombuffer(data, dtype=torch.int8, offset=start, count=min(chunk, len(data) - start))
        running = steps.cumsum(0, dtype=torch.int32) + depth
        if int(running.max()) > limit:
            return True
        depth = int(running[-1])
    return False


def read_config_json(folder: Path) -> dict[str, Any]:
    """Read and decode ``folder/config.json``, raising :class:`ConfigError` naming the file.

    The file may be at most :data:`MAX_CONFIG_BYTES`, nest at most :data:`MAX_JSON_DEPTH`
    levels and hold integers of at most :data:`MAX_INT_DIGITS` digits.
    """
    from .shards import checked_file  # the symlink policy (lmport.shards)

    path = Path(folder) / CONFIG_NAME
    if checked_file(Path(folder), path, unreadable=ConfigError) is None:
        raise ConfigError(f"{path}: no {CONFIG_NAME} in checkpoint folder {folder}")
    try:
        with path.open("rb") as f:
            blob = f.read(MAX_CONFIG_BYTES + 1)
        if len(blob) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a model config")
        text = blob.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from exc
    text = text.removeprefix("\ufeff")
    if _nesting_exceeds(text, MAX_JSON_DEPTH):
        raise ConfigError(f"{path}: JSON nested more than {MAX_JSON_DEPTH} levels deep; not a model config")
    try:
        raw = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except _IntegerTooLong as exc:
        pos = max(text.find(exc.digits), 0)
        line, col = _line_col(text, pos)
        key = re.search(r'"((?:[^"\\]|\\.)*)"\s*:\s*$', text[max(0, pos - 1000) : pos])
        where = f"key {key.group(1)!r}" if key else "a value"
        raise ConfigError(
            f"{path}: {where} (line {line}, column {col}) is an integer of {len(exc.digits)} digits; "
            f"at most {MAX_INT_DIGITS} are accepted"
        ) from None
    except (RecursionError, ValueError) as exc:  # ValueError: a limit of the decoder itself
        raise ConfigError(f"{path}: cannot be decoded: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a decoded JSON value fits a type hint (ints fit floats, bools fit nothing else)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list or hint is list:
        args = typing.get_args(hint)
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _as_float_field(value: Any, hint: Any) -> Any:
    """An integer given for a field typed ``float`` (not ``int``) as a float: JSON writes ``1e-05`` and ``1``
    alike, and an integer past 64 bits (``2**64``) would fail inside torch, not here. Too large a one is left
    as it is, for the field's check to refuse."""
    if not isinstance(value, int) or isinstance(value, bool):
        return value
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    if float not in allowed or int in allowed or Any in allowed:
        return value
    try:
        return float(value)
    except OverflowError:
        return value


# --- declarative per-key checks ------------------------------------------------------------

#: A check of one config value: returns ``None`` when ``value`` is acceptable, else what it
#: must be (``"must be a positive integer"``); the config's key and value are added to the
#: message. Receives the whole config for checks relative to other fields (token ids).
#: Returning an :class:`Advisory` logs it as a warning instead.
Check = Callable[[Any, Any], Union[str, None]]


class Advisory(str):
    """What a :data:`Check` returns for a value it accepts with a logged warning."""


_warned: set[tuple[str, str, str]] = set()

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxdict = 8


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_real(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (not a number, a bool, NaN, infinite, too large)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


@dataclasses.dataclass(frozen=True)
class Integer:
    """An integer within ``[min, max]`` (bools refused)."""

    min: int = 1
    max: int | None = None

    def __call__(self, value: Any, config: Any) -> str | None:
        if _is_int(value) and value >= self.min and (self.max is None or value <= self.max):
            return None
        if self.max is None:
            return "must be a positive integer" if self.min == 1 else f"must be an integer >= {self.min}"
        lower = "a positive integer" if self.min == 1 else f"an integer >= {self.min}"
        return f"must be {lower} of at most {self.max:,}"


def Size(max: int) -> Integer:  # noqa: N802 - reads as a type in field_checks
    """A positive integer of at most ``max``: a dimension or a count."""
    return Integer(1, max)


@dataclasses.dataclass(frozen=True)
class Real:
    """A finite number (int or float) within the interval; NaN and infinities are refused."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def __call__(self, value: Any, config: Any) -> str | None:
        number = _as_real(value)
        ok = number is not None
        if ok and self.min is not None:
            ok = number > self.min if self.min_open else number >= self.min
        if ok and self.max is not None:
            ok = number < self.max if self.max_open else number <= self.max
        if ok:
            return None
        bounds = []
        if self.min is not None:
            bounds.append(f"{'>' if self.min_open else '>='} {self.min:g}")
        if self.max is not None:
            bounds.append(f"{'<' if self.max_open else '<='} {self.max:g}")
        return "must be a finite number" + (f" {' and '.join(bounds)}" if bounds else "")


#: A finite number > 0 (epsilons, scales).
Positive = Real(0.0, min_open=True)
#: A dropout probability: a finite number in [0, 1).
Probability = Real(0.0, 1.0, max_open=True)


@dataclasses.dataclass(frozen=True)
class OneOf:
    """A string among ``options`` (a collection, or a function returning one: a registry read at check time)."""

    options: Iterable[str] | Callable[[], Iterable[str]]
    what: str = "value"

    def __call__(self, value: Any, config: Any) -> str | None:
        options = self.options() if callable(self.options) else self.options
        if isinstance(value, str) and value in options:
            return None
        return f"must be a known {self.what} ({', '.join(sorted(options))})"


@dataclasses.dataclass(frozen=True)
class InstanceOf:
    """A value of one of ``types`` (for keys kept in :attr:`PretrainedConfig.extra`, which have no type hint)."""

    types: tuple[type, ...]
    what: str

    def __call__(self, value: Any, config: Any) -> str | None:
        return None if isinstance(value, self.types) and not isinstance(value, bool) else f"must be {self.what}"


@dataclasses.dataclass(frozen=True)
class TokenId:
    """A token id (or a list of them, for ``eos_token_id``): integers in ``[0, vocab_size)``.

    ``strict=False`` accepts ids at or above ``vocab_size`` with a logged warning, as
    transformers does: its own configs keep GPT-2's default ids (50256) when the vocabulary
    is shrunk, and an id the model never indexes (one only ``generate`` compares against)
    is harmless. Use ``strict=True`` for ids the model indexes (Llama's ``pad_token_id``
    is its embedding's padding row).
    """

    strict: bool = False

    def __call__(self, value: Any, config: Any) -> str | None:
        ids = value if isinstance(value, list) else [value]
        vocab = getattr(config, "vocab_size", None)
        if self.strict and _is_int(value) and _is_int(vocab) and -vocab <= value < 0:
            # torch.nn.Embedding counts a negative padding_idx from the end, as transformers' models do
            # with the pad_token_id -1 some hub configs carry.
            return Advisory(f"is negative: the embedding's padding row is {vocab + value} (counted from the end)")
        if not all(_is_int(i) and 0 <= i < 2**63 for i in ids):  # past int64, no tensor can hold it
            return "must be a non-negative integer token id below 2**63" + (
                " or a list of them" if isinstance(value, list) else ""
            )
        if _is_int(vocab) and any(i >= vocab for i in ids):
            if self.strict:
                return f"must be a token id below vocab_size ({vocab})"
            return Advisory(f"is outside the vocabulary (vocab_size {vocab}); generation can never produce it")
        return None


#: Floating dtypes lmport computes in, by the names ``config.json`` may give them.
COMPUTE_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "float", "half", "double"})


def FloatDtype(value: Any, config: Any) -> str | None:  # noqa: N802 - used like the classes above
    """``dtype``: a floating dtype lmport can compute in (not float8/float4, integers or complex), or ``"auto"``."""
    if isinstance(value, str) and (value in COMPUTE_DTYPES or value == "auto"):
        return None
    if type(value).__name__ == "dtype" and str(value).removeprefix("torch.") in COMPUTE_DTYPES:
        return None  # a torch.dtype set by user code
    return f"must be a floating dtype lmport computes in ({', '.join(sorted(COMPUTE_DTYPES))})"


@dataclasses.dataclass(kw_only=True)
class PretrainedConfig:
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
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
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
    def from_pretrained(cls: type[C], name_or_path: str | os.PathLike[str], **kwargs: Any) -> C:
        """A checkpoint's config, as transformers' config classes offer it (peft calls this).

        Takes the arguments of :meth:`lmport.AutoConfig.from_pretrained`; the checkpoint's
        ``model_type`` must be this class's (any type on the base class).
        """
        from .auto import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        if not isinstance(config, cls):
            raise ConfigError(
                f"{name_or_path}: its config is a {type(config).__name__} ({config.model_type!r}), not a {cls.__name__}"
            )
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
        self.check_fields()
        self.validate()

    @classmethod
    def all_field_checks(cls) -> dict[str, Check]:
        """:attr:`field_checks` of this class and its bases, merged (the most derived class wins)."""
        merged: dict[str, Check | None] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("field_checks", {}))
        return {key: check for key, check in merged.items() if check is not None}

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
            for f in dataclasses.fields(cls)
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
        return name != "extra" and name in {f.name for f in dataclasses.fields(cls)}

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
        for f in dataclasses.fields(self):
            if f.name != "extra":
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

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike[str], push_to_hub: bool = False, **kwargs: Any) -> Path:
        """Write ``config.json`` into ``save_directory`` (atomically); returns its path.

        ``push_to_hub=True`` then uploads it to ``repo_id`` (default: the folder's name), taking
        ``token`` and the hub arguments :meth:`PreTrainedCausalLM.save_pretrained` takes, as
        transformers' config does.
        """
        from .atomic import write_text
        from .hub_upload import HubUpload, default_commit_message, split_hub_kwargs

        folder = Path(save_directory)
        upload = upload_args = None
        if push_to_hub:
            token = kwargs.pop("token", None)
            upload_args, create_args = split_hub_kwargs(kwargs, f"{type(self).__name__}.save_pretrained")
            repo_id = upload_args.pop("repo_id", None) or folder.resolve().name
            upload = HubUpload(repo_id, token=token, create_repo_kwargs=create_args)
        elif kwargs:
            raise ArgumentError(f"{type(self).__name__}.save_pretrained got unexpected argument(s) {sorted(kwargs)}")
        folder.mkdir(parents=True, exist_ok=True)
        path = write_text(folder / CONFIG_NAME, self.to_json_string())  # atomic and fsynced (lmport.atomic)
        if upload is not None and upload_args is not None:
            message = upload_args.pop("commit_message", None) or default_commit_message(self)
            upload.commit(folder, [CONFIG_NAME], commit_message=message, model_card=False, **upload_args)
        return path

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: list[str] | str | None = None,
    ) -> Any:
        """Upload ``config.json`` (and a model card) to hub repository ``repo_id``, created if needed.

        As transformers' ``push_to_hub``; returns huggingface_hub's ``CommitInfo``. Offline
        (``HF_HUB_OFFLINE=1``) raises :class:`~lmport.errors.OfflineError`; hub failures raise
        other :class:`~lmport.errors.HubError` subclasses.
        """
        from .hub_upload import push

        return push(
            self,
            repo_id,
            self.save_pretrained,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            tags=tags,
        )

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
