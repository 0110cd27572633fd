"""The Llama config: transformers' ``LlamaConfig`` fields and defaults (legacy RoPE keys read too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmport.config import MAX_HEADS, Size
from lmport.modeling import RopeDecoderConfig


@dataclass
class LlamaConfig(RopeDecoderConfig):
    """Llama (1, 2, 3, 3.1+) hyper-parameters as ``config.json`` spells them."""

    model_type: ClassVar[str] = "llama"
    hf_architecture: ClassVar[str] = "LlamaForCausalLM"
    field_checks = {"pretraining_tp": Size(MAX_HEADS)}

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    intermediate_size: int = 11008
    max_position_embeddings: int = 2048
    pretraining_tp: int | None = 1
    attention_bias: bool = False
    mlp_bias: bool = False
