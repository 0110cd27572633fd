"""The Llama config: transformers' ``LlamaConfig`` fields and defaults (legacy RoPE keys read too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmport.config import MAX_HEADS, Size
from lmport.modeling import RopeDecoderConfig


@dataclass(kw_only=True)
class LlamaConfig(RopeDecoderConfig):
    """Llama (1, 2, 3, 3.1+) hyper-parameters as ``config.json`` spells them.

    Every default is transformers' ``LlamaConfig``'s (Llama-7B's sizes), so a key that
    ``config.json`` omits reads as transformers reads it.
    """

    model_type: ClassVar[str] = "llama"
    hf_architecture: ClassVar[str] = "LlamaForCausalLM"
    field_checks = {"pretraining_tp": Size(MAX_HEADS)}
    default_theta: ClassVar[float] = 10_000.0

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pretraining_tp: int | None = 1
    attention_bias: bool = False
    mlp_bias: bool = False
