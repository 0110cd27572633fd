"""The RoPE type registry: what a ``rope_type`` computes and which keys it reads (plugins add types with
:func:`register_rope`), and the merging and validation of a config's RoPE settings against it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..config import MAX_POSITIONS, Check
from ..config_checks import _as_real as _real  # a finite float, or None
from ..errors import PluginConflictError

if TYPE_CHECKING:
    from .rope import RotaryEmbedding

#: ``compute(params, dim, max_position_embeddings, seq_len) -> (inv_freq, attention_scaling)``: the
#: ``dim // 2`` inverse frequencies (float32, CPU) of a RoPE type and the factor applied to cos and sin.
#: ``dim`` is the rotary dimension, ``seq_len`` the sequence length a frequency update asks for
#: (``None`` at construction).
RopeFn = Callable[[dict[str, Any], int, int, "int | None"], tuple[torch.Tensor, float]]
#: ``validate(params, dim, key)``: cross-key checks of a RoPE type; raises ``ValueError`` naming
#: ``key[...]`` (``dim``, the rotary dimension, is ``None`` when not known yet).
RopeValidator = Callable[[dict[str, Any], "int | None", str], None]
#: ``update(rotary, position_ids, device)``: called by :class:`RotaryEmbedding` before each forward for
#: RoPE types whose frequencies depend on the sequence length; sets ``rotary.inv_freq`` (and
#: ``rotary.attention_scaling``) for these positions.
RopeUpdate = Callable[["RotaryEmbedding", torch.Tensor, torch.device], None]

logger = logging.getLogger("lmport")


def _rule(test: Callable[[Any], bool], words: str) -> Check:
    def check(value: Any, config: Any = None) -> str | None:
        return None if test(value) else f"must be {words}"

    return check


def _positive(value: Any) -> bool:
    number = _real(value)
    return number is not None and number > 0


def _non_negative(value: Any) -> bool:
    number = _real(value)
    return number is not None and number >= 0


def _position_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_POSITIONS


def _positive_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_positive(v) for v in value)


#: A finite number > 0 (RoPE factors).
POSITIVE: Check = _rule(_positive, "a finite number > 0")
#: A finite number >= 0, or null.
NON_NEGATIVE_OR_NULL: Check = _rule(lambda v: v is None or _non_negative(v), "a finite number >= 0 or null")
#: A non-empty list of finite numbers > 0 (LongRoPE's per-frequency factors).
POSITIVE_LIST: Check = _rule(_positive_list, "a non-empty list of finite numbers > 0")

#: Checks of the keys every RoPE type may read; a type's own ``checks`` replace these for its keys.
COMMON_KEY_CHECKS: dict[str, Check] = {
    "rope_type": _rule(lambda v: isinstance(v, str), "a string"),
    "rope_theta": _rule(lambda v: (_real(v) or 0) > 1, "a finite number > 1"),
    "factor": POSITIVE,
    "original_max_position_embeddings": _rule(_position_count, f"a positive integer of at most {MAX_POSITIONS:,}"),
    "attention_factor": _rule(lambda v: v is None or _positive(v), "a finite number > 0 or null"),
    "partial_rotary_factor": _rule(
        lambda v: (_real(v) or 0) > 0 and _real(v) <= 1, "a finite number in (0, 1]"  # type: ignore[operator]
    ),
}


@dataclass(frozen=True)
class RopeType:
    """A RoPE type as :func:`register_rope` records it (see there for the fields)."""

    name: str
    compute: RopeFn
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    checks: Mapping[str, Check] = field(default_factory=dict)
    validate: RopeValidator | None = None
    update: RopeUpdate | None = None


#: ``rope_type`` → its :class:`RopeType`. Read it; add to it with :func:`register_rope`.
ROPE_TYPES: dict[str, RopeType] = {}


def register_rope(
    name: str,
    compute: RopeFn,
    *,
    required: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
    checks: Mapping[str, Check] | None = None,
    validate: RopeValidator | None = None,
    update: RopeUpdate | None = None,
    override: bool = False,
) -> RopeType:
    """Make ``name`` a ``rope_type`` that configs may name and :class:`RotaryEmbedding` computes.

    Args:
        name: the ``rope_type`` value in ``rope_parameters`` / ``rope_scaling``.
        compute: a :data:`RopeFn` giving the inverse frequencies and the attention scaling.
        required: keys the type needs besides ``rope_type``, ``rope_theta`` and
            ``partial_rotary_factor`` (missing: the config is refused). A type that requires
            ``original_max_position_embeddings`` gets ``max_position_embeddings`` when it is absent,
            as transformers does.
        optional: keys it may read (any other key is logged as ignored).
        checks: key → :data:`~lmport.config.Check` of its value, for keys of this type
            (:data:`COMMON_KEY_CHECKS` cover the shared ones).
        validate: a :data:`RopeValidator` for checks across keys (and against the rotary dimension).
        update: a :data:`RopeUpdate` when the frequencies depend on the sequence length
            (:func:`grow_with_length`, :func:`switch_at_original_length`, or your own).
        override: replace an existing registration of ``name``.

    Returns:
        The registered :class:`RopeType`.

    Raises:
        PluginConflictError: ``name`` is registered with another ``compute`` and ``override`` is false
            (registering the same function again, as a re-imported module does, is allowed).
    """
    current = ROPE_TYPES.get(name)
    if current is not None and not override and not _same_function(current.compute, compute):
        raise PluginConflictError(
            f"rope_type {name!r} is already registered (computed by {_qualname(current.compute)}); "
            "pass override=True to replace it"
        )
    spec = RopeType(name, compute, tuple(required), tuple(optional), dict(checks or {}), validate, update)
    ROPE_TYPES[name] = spec
    return spec


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _same_function(a: Any, b: Any) -> bool:
    return a is b or _qualname(a) == _qualname(b)


def get_rope_type(name: Any, key: str = "rope_parameters") -> RopeType:
    """The registered :class:`RopeType` called ``name``; ``ValueError`` naming ``key`` lists the known ones."""
    spec = ROPE_TYPES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"{key}['rope_type'] {name!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    return spec


def rotary_dim(head_dim: int, params: Mapping[str, Any]) -> int:
    """How many leading dimensions of each head are rotated: ``int(head_dim * partial_rotary_factor)``."""
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def _int64_or_float(value: Any) -> Any:
    """``value`` with integers past int64 (which torch cannot take: ``2**64``) as floats, lists included."""
    if isinstance(value, list):
        return [_int64_or_float(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        try:
            return float(value)
        except OverflowError:
            return value  # past float range too: the key's check refuses it
    return value


def standardize_rope_parameters(
    rope_parameters: dict[str, Any] | None,
    rope_scaling: dict[str, Any] | None,
    rope_theta: float | None,
    max_position_embeddings: int,
    default_theta: float | None = None,
    *,
    original_max_position_embeddings: int | None = None,
    partial_rotary_factor: float | None = None,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Merge the legacy ``rope_scaling`` + ``rope_theta`` and the new ``rope_parameters`` into one dict.

    Args:
        default_theta: the ``rope_theta`` when neither the dict nor ``rope_theta`` gives one (the
            architecture's default: the core has none).
        original_max_position_embeddings: a top-level config value that, when given, replaces the
            dict's for types that require it (transformers' rule for Phi-3's field).
        partial_rotary_factor: a top-level config value, used when the dict has none.
        aliases: ``rope_type`` spellings read as another type (Phi-3 reads ``"yarn"`` as ``"longrope"``).

    Raises:
        ValueError: ``rope_scaling`` or ``rope_parameters`` is not a dict (naming the key), or no
            ``rope_theta`` is given and there is no ``default_theta``.
    """
    for key, value in (("rope_parameters", rope_parameters), ("rope_scaling", rope_scaling)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"key {key!r} must be an object (a dict of RoPE settings) or null, got {value!r:.60}")
    params = {k: _int64_or_float(v) for k, v in (rope_scaling or rope_parameters or {}).items()}
    if "rope_theta" not in params:
        if rope_theta is None and default_theta is None:
            raise ValueError("key 'rope_theta' required (top-level or in rope_parameters): no default_theta for it")
        params["rope_theta"] = _int64_or_float(rope_theta) if rope_theta is not None else default_theta
    rope_type = params.pop("type", None)
    params.setdefault("rope_type", rope_type or "default")
    if aliases and isinstance(params["rope_type"], str):
        params["rope_type"] = aliases.get(params["rope_type"], params["rope_type"])
    if partial_rotary_factor is not None:
        params.setdefault("partial_rotary_factor", partial_rotary_factor)
    spec = ROPE_TYPES.get(params["rope_type"]) if isinstance(params["rope_type"], str) else None
    if spec is not None and "original_max_position_embeddings" in spec.required:
        if original_max_position_embeddings is not None:
            params["original_max_position_embeddings"] = original_max_position_embeddings
        else:
            params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return params


def validate_rope_parameters(
    params: dict[str, Any],
    *,
    key: str = "rope_parameters",
    head_dim: int | None = None,
    warn: bool = True,
    partial_rotary: bool = False,
) -> None:
    """Raise ``ValueError`` naming the key when RoPE settings are unknown, missing, mistyped or out of range.

    Args:
        params: a standardized dict (see :func:`standardize_rope_parameters`).
        key: the ``config.json`` key they came from, for messages.
        head_dim: the head dimension, checked against what the RoPE type needs.
        warn: log keys the RoPE type does not read (as transformers does).
        partial_rotary: the architecture rotates part of each head (``partial_rotary_factor`` < 1 accepted).
    """
    spec = get_rope_type(params.get("rope_type"), key)
    for name in spec.required:
        if params.get(name) is None:
            raise ValueError(f"{key}[{name!r}] is required for rope_type {spec.name!r}")
    for name, value in params.items():
        check = spec.checks.get(name) or COMMON_KEY_CHECKS.get(name)
        problem = check(value, None) if check is not None else None
        if problem:
            raise ValueError(f"{key}[{name!r}] {problem}, got {value!r:.60}")
    factor = params.get("partial_rotary_factor", 1.0)
    if factor != 1.0 and not partial_rotary:
        raise ValueError(
            f"{key}['partial_rotary_factor'] must be 1.0 (this architecture rotates whole heads; "
            f"partial rotation is not supported), got {factor!r:.60}"
        )
    dim = None if head_dim is None else rotary_dim(head_dim, params)
    if dim is not None and factor != 1.0 and (dim < 2 or dim % 2):
        raise ValueError(
            f"{key}['partial_rotary_factor'] ({factor}) rotates {dim} of head_dim ({head_dim}) dimensions; "
            "the rotary dimension must be even and at least 2"
        )
    if spec.validate is not None:
        spec.validate(params, dim, key)
    known = {"rope_type", "rope_theta", "partial_rotary_factor", *spec.required, *spec.optional}
    unknown = sorted(set(params) - known)
    if unknown and warn:
        logger.warning("%s: keys %s are not read by rope_type %r and are ignored", key, unknown, spec.name)
