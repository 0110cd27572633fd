"""Shared building blocks: norms, attention that calls the selected kernel, MLPs, the pre-norm decoder layer."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import AttentionKernel, AttentionMask
from ..cache import KVCache
from .activations import get_activation
from .rope import apply_rotary


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled by a learned weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads, rotary positions and a pluggable kernel.

    Args:
        hidden_size: model width.
        num_heads: query heads.
        num_kv_heads: key/value heads (``num_heads`` for MHA, fewer for GQA).
        head_dim: per-head width (may differ from ``hidden_size // num_heads``).
        bias: bias on the q/k/v/o projections.
        dropout: attention-probability dropout while training.
        scaling: the factor applied to ``q @ k.T``; ``head_dim ** -0.5`` by default.
        resid_dropout: dropout on the output projection while training.
        rotary: rotate queries and keys by the rotary embedding (False for
            learned absolute positions).

    Queries and keys are rotated by :meth:`apply_rotary` between the projections and the
    cache; override it to rotate differently (interleaved pairs, a fused kernel).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        bias: bool = False,
        dropout: float = 0.0,
        layer_idx: int = 0,
        scaling: float | None = None,
        resid_dropout: float = 0.0,
        rotary: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_kv_groups = num_heads // num_kv_heads
        self.scaling = head_dim**-0.5 if scaling is None else scaling
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.rotary = rotary
        self.layer_idx = layer_idx
        self.kernel: AttentionKernel | None = None
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        mask: AttentionMask,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        shape = (batch, seq, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.rotary:
            if position_embeddings is None:
                raise ValueError("rotary attention needs (cos, sin) position embeddings")
            q, k = self.apply_rotary(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.kernel is None:
            raise RuntimeError("no attention kernel set; call model.set_attention_kernel(...)")
        out = self.kernel(
            q,
            k,
            v,
            mask=mask,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
            num_kv_groups=self.num_kv_groups,
        )
        return self.resid_dropout(self.o_proj(out.reshape(batch, seq, -1)))

    def apply_rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``(batch, heads, seq, head_dim)`` queries and keys by the ``(batch, seq, rotary_dim)`` tables.

        The default is :func:`~lmport.modeling.apply_rotary`: the first ``rotary_dim`` dimensions of
        each head are rotated (all of them unless the rotary embedding was built partial), in halves
        as transformers' ``rotate_half``.
        """
        return apply_rotary(q, k, cos, sin)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` (SwiGLU and relatives)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """``down(act(up(x)))``, then dropout while training (GPT-2 style)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = get_activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(self.act_fn(self.up_proj(x))))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module, post_attention_layernorm: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        mask: AttentionMask,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, mask, cache)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states
