"""The builtin RoPE types, computed as transformers computes them: ``default``, ``linear``, ``dynamic``,
``yarn``, ``llama3`` and ``longrope``, with the two per-forward frequency updates."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..config import Check
from .rope_types import NON_NEGATIVE_OR_NULL, POSITIVE, POSITIVE_LIST, _rule, register_rope

if TYPE_CHECKING:
    from .rope import RotaryEmbedding


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
