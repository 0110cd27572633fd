"""Declarative checks of config values, and the bounds they enforce on what ``config.json`` may declare."""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Union

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


#: Advisories already logged (once per process, as transformers' ``warning_once``).
_warned: set[tuple[str, str, str]] = set()

#: A value shortened for messages.
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
