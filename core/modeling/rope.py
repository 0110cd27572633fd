"""Rotary position embeddings: default, linear, dynamic (NTK), llama3 and yarn, as transformers computes them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

RopeFn = Callable[[dict[str, Any], int, int, int | None], tuple[torch.Tensor, float]]

_SCALED_WITH_ORIGINAL = ("llama3", "yarn", "longrope")


def standardize_rope_parameters(
    rope_parameters: dict[str, Any] | None,
    rope_scaling: dict[str, Any] | None,
    rope_theta: float | None,
    max_position_embeddings: int,
    default_theta: float = 10_000.0,
) -> dict[str, Any]:
    """Merge the legacy ``rope_scaling`` + ``rope_theta`` and the new ``rope_parameters`` into one dict."""
    params = dict(rope_scaling or rope_parameters or {})
    params.setdefault("rope_theta", rope_theta if rope_theta is not None else default_theta)
    rope_type = params.pop("type", None)
    params.setdefault("rope_type", rope_type or "default")
    if params["rope_type"] in _SCALED_WITH_ORIGINAL:
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return params


def validate_rope_parameters(params: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the key when a RoPE type lacks what it needs."""
    rope_type = params["rope_type"]
    required = {
        "default": (),
        "linear": ("factor",),
        "dynamic": ("factor",),
        "yarn": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    }
    if rope_type not in required:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(required)}")
    for key in required[rope_type]:
        if not isinstance(params.get(key), (int, float)) or isinstance(params.get(key), bool):
            raise ValueError(f"rope_parameters[{key!r}] must be a number for rope_type {rope_type!r}")
    if rope_type in ("linear", "dynamic", "llama3") and params["factor"] < 1.0:
        raise ValueError(f"rope_parameters['factor'] must be >= 1, got {params['factor']}")


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
