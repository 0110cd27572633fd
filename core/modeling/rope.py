"""Rotary position embeddings: a registry of RoPE types (default, linear, dynamic, yarn, llama3, longrope
built in, as transformers computes them; plugins add their own with :func:`register_rope`), the module that
computes ``(cos, sin)``, and the rotation of queries and keys (full or partial)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import MAX_POSITIONS, Check
from ..config import _as_real as _real  # a finite float, or None
from ..errors import PluginConflictError

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
    default_theta: float = 10_000.0,
    *,
    original_max_position_embeddings: int | None = None,
    partial_rotary_factor: float | None = None,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Merge the legacy ``rope_scaling`` + ``rope_theta`` and the new ``rope_parameters`` into one dict.

    Args:
        original_max_position_embeddings: a top-level config value that, when given, replaces the
            dict's for types that require it (transformers' rule for Phi-3's field).
        partial_rotary_factor: a top-level config value, used when the dict has none.
        aliases: ``rope_type`` spellings read as another type (Phi-3 reads ``"yarn"`` as ``"longrope"``).

    Raises:
        ValueError: ``rope_scaling`` or ``rope_parameters`` is not a dict (naming the key).
    """
    for key, value in (("rope_parameters", rope_parameters), ("rope_scaling", rope_scaling)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"key {key!r} must be an object (a dict of RoPE settings) or null, got {value!r:.60}")
    params = {k: _int64_or_float(v) for k, v in (rope_scaling or rope_parameters or {}).items()}
    params.setdefault("rope_theta", _int64_or_float(rope_theta) if rope_theta is not None else default_theta)
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


# --- the builtin types ------------------------------------------------------------------------------

def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _default(p: dict[str, Any], dim: int, max_pos: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    return 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


def _linear(p: dict[str, Any], dim: int, max_pos: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    inv_freq = _base_inv_freq(p["rope_theta"], dim)
    inv_freq /= p["factor"]
    return inv_freq, 1.0


def _dynamic(p: dict[str, Any], dim: int, max_pos: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    factor = p["factor"]
    seq_len = max_pos if seq_len is None else max(seq_len, max_pos)
    base = p["rope_theta"] * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim), 1.0


def _yarn(p: dict[str, Any], dim: int, max_pos: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    base = p["rope_theta"]
    factor = p.get("factor")
    original = p["original_max_position_embeddings"]
    if factor is None:
        factor = max_pos / original
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def _llama3(p: dict[str, Any], dim: int, max_pos: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    inv_freq = _base_inv_freq(p["rope_theta"], dim)
    factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low_ff, old_context / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0



def _longrope(p: dict[str, Any], dim: int, max_pos: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    base = p["rope_theta"]
    original = p["original_max_position_embeddings"]
    factor = p.get("factor")
    if factor is None:  # Phi-3: the ratio of the extended to the pretrained length
        factor = max_pos / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    factors = p["long_factor"] if seq_len and seq_len > original else p["short_factor"]
    ext_factors = torch.tensor(factors, dtype=torch.float32)
    inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext_factors * base**inv_freq_shape), attention_factor


def _factor_at_least_one(p: dict[str, Any], dim: int | None, key: str) -> None:
    if p["factor"] < 1.0:
        raise ValueError(f"{key}['factor'] must be >= 1 for rope_type {p['rope_type']!r}, got {p['factor']}")


def _validate_dynamic(p: dict[str, Any], dim: int | None, key: str) -> None:
    _factor_at_least_one(p, dim, key)
    if dim is not None and dim <= 2:
        raise ValueError(f"rope_type 'dynamic' needs head_dim > 2, got {dim}")


def _validate_llama3(p: dict[str, Any], dim: int | None, key: str) -> None:
    _factor_at_least_one(p, dim, key)
    if p["high_freq_factor"] <= p["low_freq_factor"]:
        raise ValueError(
            f"{key}['high_freq_factor'] ({p['high_freq_factor']}) must be greater than "
            f"{key}['low_freq_factor'] ({p['low_freq_factor']})"
        )


def _validate_longrope(p: dict[str, Any], dim: int | None, key: str) -> None:
    if dim is None:
        return
    for name in ("short_factor", "long_factor"):
        if len(p[name]) != dim // 2:
            raise ValueError(
                f"{key}[{name!r}] must hold one factor per rotary frequency ({dim // 2} for a rotary "
                f"dimension of {dim}), got {len(p[name])}"
            )


def grow_with_length(rotary: RotaryEmbedding, position_ids: torch.Tensor, device: torch.device) -> None:
    """:data:`RopeUpdate` of ``dynamic`` (NTK): recompute past the longest length seen, back to the
    original frequencies once a sequence fits the trained length again (as transformers does)."""
    seq_len = int(torch.max(position_ids)) + 1
    if seq_len > rotary.max_seq_len_cached:
        inv_freq, rotary.attention_scaling = rotary.compute(seq_len)
        rotary.inv_freq = inv_freq.to(device)
        rotary.max_seq_len_cached = seq_len
    if seq_len < rotary.original_max_seq_len and rotary.max_seq_len_cached > rotary.original_max_seq_len:
        rotary.inv_freq = rotary.original_inv_freq.to(device)
        rotary.max_seq_len_cached = rotary.original_max_seq_len


def switch_at_original_length(rotary: RotaryEmbedding, position_ids: torch.Tensor, device: torch.device) -> None:
    """:data:`RopeUpdate` of ``longrope``: the frequencies computed for ``seq_len`` past
    ``original_max_position_embeddings`` (the long factors) when the positions reach beyond it, the
    original ones (the short factors) otherwise, chosen without a host sync (as transformers does)."""
    original = rotary.rope_parameters["original_max_position_embeddings"]
    long_inv_freq = rotary.frequency_cache.get("long")
    if long_inv_freq is None:
        long_inv_freq = rotary.frequency_cache["long"] = rotary.compute(original + 1)[0]
    long_inv_freq = rotary.frequency_cache["long"] = long_inv_freq.to(device)
    seq_len = torch.max(position_ids) + 1
    inv_freq = torch.where(seq_len > original, long_inv_freq, rotary.original_inv_freq.to(device))
    rotary.inv_freq.copy_(inv_freq)


_YARN_CHECKS: dict[str, Check] = {
    "beta_fast": NON_NEGATIVE_OR_NULL,
    "beta_slow": NON_NEGATIVE_OR_NULL,
    "mscale": NON_NEGATIVE_OR_NULL,
    "mscale_all_dim": NON_NEGATIVE_OR_NULL,
    "truncate": _rule(lambda v: isinstance(v, bool), "true or false"),
}

register_rope("default", _default)
register_rope("linear", _linear, required=("factor",), validate=_factor_at_least_one)
register_rope("dynamic", _dynamic, required=("factor",), validate=_validate_dynamic, update=grow_with_length)
register_rope(
    "yarn",
    _yarn,
    required=("factor", "original_max_position_embeddings"),
    optional=("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    checks=_YARN_CHECKS,
)
register_rope(
    "llama3",
    _llama3,
    required=("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    checks={"low_freq_factor": POSITIVE, "high_freq_factor": POSITIVE},
    validate=_validate_llama3,
)
register_rope(
    "longrope",
    _longrope,
    required=("short_factor", "long_factor", "original_max_position_embeddings"),
    optional=("attention_factor", "factor"),
    checks={"short_factor": POSITIVE_LIST, "long_factor": POSITIVE_LIST},
    validate=_validate_longrope,
    update=switch_at_original_length,
)


class RotaryEmbedding(nn.Module):
    """Computes ``(cos, sin)`` for positions, by the registered RoPE type of ``rope_parameters``.

    Types registered with an ``update`` (``dynamic``, ``longrope``) adapt their frequencies to the
    positions of each forward.

    Args:
        dim: rotary dimension (the head dimension for full rotation; see :func:`rotary_dim`).
        max_position_embeddings: the length the model was configured for.
        rope_parameters: a standardized dict (see :func:`standardize_rope_parameters`).

    Attributes:
        inv_freq, original_inv_freq: the frequencies in use and those computed at construction
            (non-persistent buffers, recomputed by :meth:`init_buffers`).
        attention_scaling: the factor applied to cos and sin.
        frequency_cache: scratch tensors a :data:`RopeUpdate` keeps between calls (emptied by
            :meth:`init_buffers`).
    """

    def __init__(self, dim: int, max_position_embeddings: int, rope_parameters: dict[str, Any]) -> None:
        super().__init__()
        self.dim = dim
        self.rope_parameters = rope_parameters
        self.rope_type = rope_parameters["rope_type"]
        self.frequency_update = get_rope_type(self.rope_type).update
        self.max_position_embeddings = max_position_embeddings
        self.max_seq_len_cached = max_position_embeddings
        self.original_max_seq_len = max_position_embeddings
        self.frequency_cache: dict[str, torch.Tensor] = {}
        inv_freq, self.attention_scaling = self.compute(None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    def compute(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        """The RoPE type's ``(inv_freq, attention_scaling)`` for ``seq_len`` (``None``: at construction), on CPU."""
        with torch.device("cpu"):
            compute = get_rope_type(self.rope_type).compute
            return compute(self.rope_parameters, self.dim, self.max_position_embeddings, seq_len)

    def init_buffers(self, device: torch.device) -> None:
        """(Re)compute the non-persistent buffers on ``device`` (after building on the meta device)."""
        inv_freq, self.attention_scaling = self.compute(None)
        self.inv_freq = inv_freq.to(device)
        self.original_inv_freq = inv_freq.clone().to(device)
        self.max_seq_len_cached = self.original_max_seq_len
        self.frequency_cache = {}

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frequency_update is not None:
            self.frequency_update(self, position_ids, x.device)
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``(b, heads, s, d)`` queries and keys by ``(b, s, r)`` cos/sin.

    With ``r < d`` (partial rotary) only the first ``r`` dimensions of each head are rotated and the
    rest pass through, as transformers' Phi-3 and relatives compute it.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if r == q.shape[-1]:
        return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
    q_rot, q_pass = q[..., :r], q[..., r:]
    k_rot, k_pass = k[..., :r], k[..., r:]
    q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed
