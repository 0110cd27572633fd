"""Builtin attention kernels: ``eager`` (plain matmul + softmax) and ``sdpa`` (torch's fused kernel)."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from lmport.attention import AttentionKernel, AttentionMask, repeat_kv
from lmport.config import PretrainedConfig
from lmport.errors import AttentionKernelError
from lmport.hookspecs import hookimpl


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
        key = repeat_kv(key, num_kv_groups)
        value = repeat_kv(value, num_kv_groups)
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        allowed = mask.to_bool(query.device)
        weights = weights.masked_fill(~allowed, torch.finfo(weights.dtype).min)
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
FLASH = "flash_attention_2"


def _refuse_flash(device: torch.device, dtype: torch.dtype) -> None:
    if importlib.util.find_spec("flash_attn") is None:
        raise AttentionKernelError(
            f"attn_implementation={FLASH!r} needs the flash-attn package: pip install 'lmport[flash]' (CUDA only)"
        )
    if device.type != "cuda":
        raise AttentionKernelError(f"attn_implementation={FLASH!r} runs on CUDA devices only, not {device}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise AttentionKernelError(f"attn_implementation={FLASH!r} needs float16 or bfloat16 weights, not {dtype}")
    raise AttentionKernelError(f"attn_implementation={FLASH!r} is not available in this lmport version")


@hookimpl(trylast=True)
def lmport_select_attention(
    requested: str | None, config: PretrainedConfig, device: torch.device, dtype: torch.dtype
) -> AttentionKernel | None:
    if requested is None:
        return KERNELS["sdpa"]
    if requested == FLASH:
        _refuse_flash(device, dtype)
    return KERNELS.get(requested)


@hookimpl
def lmport_attention_kernels() -> list[str]:
    return list(KERNELS)
