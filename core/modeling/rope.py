"""Rotary position embeddings: default, linear, dynamic (NTK), llama3 and yarn, as transformers computes them."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import MAX_POSITIONS

RopeFn = Callable[[dict[str, Any], int, int, int | None], tuple[torch.Tensor, float]]

_SCALED_WITH_ORIGINAL = ("llama3", "yarn", "longrope")

logger = logging.getLogger("lmport")


def _real(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _positive(value: Any) -> bool:
    number = _real(value)
    return number is not None and number > 0


def _non_negative(value: Any) -> bool:
    number = _real(value)
    return number is not None and number >= 0


def _position_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_POSITIONS


#: Each key a RoPE type may read: what its value must be, as a test and in words.
_ROPE_KEY_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "rope_type": (lambda v: isinstance(v, str), "a string"),
    "rope_theta": (lambda v: (_real(v) or 0) > 1, "a finite number > 1"),
    "factor": (_positive, "a finite number > 0"),
    "original_max_position_embeddings": (_position_count, f"a positive integer of at most {MAX_POSITIONS:,}"),
    "low_freq_factor": (_positive, "a finite number > 0"),
    "high_freq_factor": (_positive, "a finite number > 0"),
    "attention_factor": (lambda v: v is None or _positive(v), "a finite number > 0 or null"),
    "beta_fast": (lambda v: v is None or _non_negative(v), "a finite number >= 0 or null"),
    "beta_slow": (lambda v: v is None or _non_negative(v), "a finite number >= 0 or null"),
    "mscale": (lambda v: v is None or _non_negative(v), "a finite number >= 0 or null"),
    "mscale_all_dim": (lambda v: v is None or _non_negative(v), "a finite number >= 0 or null"),
    "truncate": (lambda v: isinstance(v, bool), "true or false"),
    "partial_rotary_factor": (lambda v: _real(v) == 1.0, "1.0 (partial rotation is not supported)"),
}

#: rope_type → (required keys, optional keys), besides ``rope_type``, ``rope_theta`` and
#: ``partial_rotary_factor`` (as transformers validates them).
ROPE_TYPE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
}


def standardize_rope_parameters(
    rope_parameters: dict[str, Any] | None,
    rope_scaling: dict[str, Any] | None,
    rope_theta: float | None,
    max_position_embeddings: int,
    default_theta: float = 10_000.0,
) -> dict[str, Any]:
    """Merge the legacy ``rope_scaling`` + ``rope_theta`` and the new ``rope_parameters`` into one dict.

    Raises:
        ValueError: ``rope_scaling`` or ``rope_parameters`` is not a dict (naming the key).
    """
    for key, value in (("rope_parameters", rope_parameters), ("rope_scaling", rope_scaling)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"key {key!r} must be an object (a dict of RoPE settings) or null, got {value!r:.60}")
    params = dict(rope_scaling or rope_parameters or {})
    params.setdefault("rope_theta", rope_theta if rope_theta is not None else default_theta)
    rope_type = params.pop("type", None)
    params.setdefault("rope_type", rope_type or "default")
    if params["rope_type"] in _SCALED_WITH_ORIGINAL:
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return params


def validate_rope_parameters(
    params: dict[str, Any], *, key: str = "rope_parameters", head_dim: int | None = None, warn: bool = True
) -> None:
    """Raise ``ValueError`` naming the key when RoPE settings are unknown, missing, mistyped or out of range.

    Args:
        params: a standardized dict (see :func:`standardize_rope_parameters`).
        key: the ``config.json`` key they came from, for messages.
        head_dim: the rotary dimension, checked against what the RoPE type needs.
        warn: log keys the RoPE type does not read (as transformers does).
    """
    rope_type = params.get("rope_type")
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPE_KEYS:
        raise ValueError(
            f"{key}['rope_type'] {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPE_KEYS)}"
        )
    required, optional = ROPE_TYPE_KEYS[rope_type]
    for name in required:
        if params.get(name) is None:
            raise ValueError(f"{key}[{name!r}] is required for rope_type {rope_type!r}")
    for name, value in params.items():
        rule = _ROPE_KEY_RULES.get(name)
        if rule is not None and not rule[0](value):
            raise ValueError(f"{key}[{name!r}] must be {rule[1]}, got {value!r:.60}")
    if rope_type in ("linear", "dynamic", "llama3") and params["factor"] < 1.0:
        raise ValueError(f"{key}['factor'] must be >= 1 for rope_type {rope_type!r}, got {params['factor']}")
    if rope_type == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise ValueError(
            f"{key}['high_freq_factor'] ({params['high_freq_factor']}) must be greater than "
            f"{key}['low_freq_factor'] ({params['low_freq_factor']})"
        )
    if head_dim is not None and rope_type == "dynamic" and head_dim <= 2:
        raise ValueError(f"rope_type 'dynamic' needs head_dim > 2, got {head_dim}")
    unknown = sorted(set(params) - {"rope_type", "rope_theta", "partial_rotary_factor", *required, *optional})
    if unknown and warn:
        logger.warning("%s: keys %s are not read by rope_type %r and are ignored", key, unknown, rope_type)


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


ROPE_FUNCTIONS: dict[str, RopeFn] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "llama3": _llama3,
}


class RotaryEmbedding(nn.Module):
    """Computes ``(cos, sin)`` for positions; ``dynamic`` grows its base past the trained length.

    Args:
        dim: rotary dimension (the head dimension for full rotation).
        max_position_embeddings: the length the model was configured for.
        rope_parameters: a standardized dict (see :func:`standardize_rope_parameters`).
    """

    def __init__(self, dim: int, max_position_embeddings: int, rope_parameters: dict[str, Any]) -> None:
        super().__init__()
        self.dim = dim
        self.rope_parameters = rope_parameters
        self.rope_type = rope_parameters["rope_type"]
        self.max_position_embeddings = max_position_embeddings
        self.max_seq_len_cached = max_position_embeddings
        self.original_max_seq_len = max_position_embeddings
        inv_freq, self.attention_scaling = self._compute(None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    def _compute(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        fn = ROPE_FUNCTIONS[self.rope_type]
        with torch.device("cpu"):
            return fn(self.rope_parameters, self.dim, self.max_position_embeddings, seq_len)

    def init_buffers(self, device: torch.device) -> None:
        """(Re)compute the non-persistent buffers on ``device`` (after building on the meta device)."""
        inv_freq, self.attention_scaling = self._compute(None)
        self.inv_freq = inv_freq.to(device)
        self.original_inv_freq = inv_freq.clone().to(device)
        self.max_seq_len_cached = self.original_max_seq_len

    def _dynamic_update(self, position_ids: torch.Tensor, device: torch.device) -> None:
        seq_len = int(torch.max(position_ids)) + 1
        if seq_len > self.max_seq_len_cached:
            inv_freq, self.attention_scaling = self._compute(seq_len)
            self.inv_freq = inv_freq.to(device)
            self.max_seq_len_cached = seq_len
        if seq_len < self.original_max_seq_len and self.max_seq_len_cached > self.original_max_seq_len:
            self.inv_freq = self.original_inv_freq.to(device)
            self.max_seq_len_cached = self.original_max_seq_len

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_type == "dynamic":
            self._dynamic_update(position_ids, x.device)
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
    """Rotate ``(b, heads, s, d)`` queries and keys by ``(b, s, d)`` cos/sin."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
