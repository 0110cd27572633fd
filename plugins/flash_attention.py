"""Builtin attention kernel ``flash_attention_2``: the ``flash_attn`` package (CUDA, fp16/bf16).

Padding and packed documents run through ``flash_attn_varlen_func`` on the real
tokens only; plain causal batches through ``flash_attn_func``. Install with
``pip install 'lmport[flash]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from lmport.attention import AttentionMask
from lmport.errors import AttentionKernelError

NAME = "flash_attention_2"


def availability(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why flash attention cannot run here, or ``None`` when it can."""
    if importlib.util.find_spec("flash_attn") is None:
        return "needs the flash-attn package: pip install 'lmport[flash]' (CUDA only)"
    if device.type != "cuda":
        return f"runs on CUDA devices only, not {device.type!r}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16 weights, not {str(dtype).removeprefix('torch.')}"
    return None


def _window(mask: AttentionMask) -> tuple[int, int]:
    if mask.window_applies:
        assert mask.sliding_window is not None
        return (mask.sliding_window - 1, mask.sliding_window - 1)
    return (-1, -1)


def _unpad(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Rows of ``x`` (b, s, h, d) where ``keep`` (b, s) is True, with cumulative lengths per batch row."""
    index = keep.flatten().nonzero().flatten()
    lengths = keep.sum(-1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return x.flatten(0, 1)[index], index, cu, int(lengths.max())


class FlashAttention2:
    """``flash_attn`` 2.x kernels; grouped KV heads are passed as they are."""

    name = NAME

    def __init__(self) -> None:
        self._fa: Any = importlib.import_module("flash_attn")

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        mask: AttentionMask,
        scaling: float,
        dropout: float,
        num_kv_groups: int,
    ) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (b, s, h, d)
        batch, q_len, heads, dim = q.shape
        common = dict(dropout_p=dropout, softmax_scale=scaling, causal=True, window_size=_window(mask))
        if mask.padding is None and mask.segments is None:
            return self._fa.flash_attn_func(q, k, v, **common)
        if mask.segments is not None:
            if mask.padding is not None:
                raise AttentionKernelError("flash_attention_2: packed documents cannot also be padded")
            # Each (row, document) is one sequence; tokens are already contiguous per document.
            ids = (mask.segments + torch.arange(batch, device=q.device)[:, None] * (int(mask.segments.max()) + 1)).flatten()
            lengths = torch.unique_consecutive(ids, return_counts=True)[1].to(torch.int32)
            cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            out = self._fa.flash_attn_varlen_func(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, int(lengths.max()), int(lengths.max()), **common
            )
            return out.view(batch, q_len, heads, dim)
        padding = mask.padding.to(device=q.device, dtype=torch.bool)
        q_u, q_index, cu_q, max_q = _unpad(q, padding[:, -q_len:])
        k_u, _, cu_k, max_k = _unpad(k, padding)
        v_u = v.flatten(0, 1)[padding.flatten().nonzero().flatten()]
        out_u = self._fa.flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, max_q, max_k, **common)
        out = torch.zeros(batch * q_len, heads, dim, dtype=out_u.dtype, device=out_u.device)
        out[q_index] = out_u
        return out.view(batch, q_len, heads, dim)


def load(device: torch.device, dtype: torch.dtype) -> FlashAttention2:
    """The kernel, or :class:`AttentionKernelError` saying what is missing."""
    reason = availability(device, dtype)
    if reason is not None:
        raise AttentionKernelError(f"attn_implementation={NAME!r} {reason}")
    return FlashAttention2()
