"""Builtin attention kernels ``eager`` (plain matmul + softmax) and ``sdpa`` (torch's fused kernel),
and the selection among them and ``flash_attention_2`` (see :mod:`.flash_attention`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmport.attention import AttentionKernel, AttentionMask, repeat_kv
from lmport.config import PretrainedConfig
from lmport.hookspecs import hookimpl

from . import flash_attention


class EagerAttention:
    """Reference attention: softmax in float32, works everywhere, returns no fused speed."""

    name = "eager"

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
        # Laid out as transformers' are (its cache concatenates them, even for one forward, before
        # repeat_kv): MKL's matmul over another layout can round differently in the last bit.
        key = repeat_kv(key.contiguous(), num_kv_groups)
        value = repeat_kv(value.contiguous(), num_kv_groups)
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        allowed = mask.to_bool(query.device)
        # Added, not filled, as transformers does: the same values, and the same gradients for a
        # query that sees no key at all (a left-padding position), whose uniform softmax passes
        # gradient to its scores through the addition (masked_fill would block it).
        bias = torch.zeros(allowed.shape, dtype=weights.dtype, device=weights.device)
        weights = weights + bias.masked_fill_(~allowed, torch.finfo(weights.dtype).min)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        if dropout:
            weights = F.dropout(weights, p=dropout, training=True)
        return torch.matmul(weights, value).transpose(1, 2).contiguous()


class SdpaAttention:
    """``torch.nn.functional.scaled_dot_product_attention``, causal flag when nothing is padded."""

    name = "sdpa"

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
        plain = mask.is_plain_causal
        extra = {}
        if num_kv_groups > 1:
            if plain:
                extra["enable_gqa"] = True
            else:
                key = repeat_kv(key, num_kv_groups)
                value = repeat_kv(value, num_kv_groups)
        q_len = query.shape[2]
        attn_mask = None if plain else mask.to_bool(query.device)
        is_causal = plain and q_len > 1
        if is_causal and key.shape[2] > q_len:
            attn_mask, is_causal = mask.to_bool(query.device), False
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal, **extra
        )
        return out.transpose(1, 2).contiguous()


KERNELS: dict[str, AttentionKernel] = {"eager": EagerAttention(), "sdpa": SdpaAttention()}


@hookimpl(trylast=True)
def lmport_select_attention(
    requested: str | None, config: PretrainedConfig, device: torch.device, dtype: torch.dtype
) -> AttentionKernel | None:
    if requested == flash_attention.NAME:
        return flash_attention.load(device, dtype)
    if requested is None:
        # Best available: flash attention where it can run, else torch's fused sdpa.
        if flash_attention.availability(device, dtype) is None:
            return flash_attention.load(device, dtype)
        return KERNELS["sdpa"]
    return KERNELS.get(requested)


@hookimpl
def lmport_attention_kernels() -> list[str]:
    return [*KERNELS, flash_attention.NAME]
