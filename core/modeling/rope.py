"""Rotary position embeddings: a registry of RoPE types (default, linear, dynamic, yarn, llama3, longrope
built in, as transformers computes them; plugins add their own with :func:`register_rope`), the module that
computes ``(cos, sin)``, and the rotation of queries and keys (full or partial).

The registry lives in :mod:`lmport.modeling.rope_types`, the builtin types in
:mod:`lmport.modeling.rope_builtins`; both are re-exported here."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .rope_builtins import grow_with_length, switch_at_original_length
from .rope_types import (
    COMMON_KEY_CHECKS,
    NON_NEGATIVE_OR_NULL,
    POSITIVE,
    POSITIVE_LIST,
    ROPE_TYPES,
    RopeFn,
    RopeType,
    RopeUpdate,
    RopeValidator,
    get_rope_type,
    register_rope,
    rotary_dim,
    standardize_rope_parameters,
    validate_rope_parameters,
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


__all__ = [
    "COMMON_KEY_CHECKS",
    "NON_NEGATIVE_OR_NULL",
    "POSITIVE",
    "POSITIVE_LIST",
    "ROPE_TYPES",
    "RopeFn",
    "RopeType",
    "RopeUpdate",
    "RopeValidator",
    "RotaryEmbedding",
    "apply_rotary",
    "get_rope_type",
    "grow_with_length",
    "register_rope",
    "rotary_dim",
    "rotate_half",
    "standardize_rope_parameters",
    "switch_at_original_length",
    "validate_rope_parameters",
]
