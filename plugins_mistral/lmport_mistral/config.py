"""The Mistral config: transformers' ``MistralConfig`` fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmport.config import MAX_POSITIONS, Size
from lmport.modeling import RopeDecoderConfig


@dataclass(kw_only=True)
class MistralConfig(RopeDecoderConfig):
    """Mistral hyper-parameters; ``sliding_window`` (or ``None``) bounds how far back a query sees.

    Every default is transformers' ``MistralConfig``'s (Mistral-7B's sizes). It derives from
    :class:`~lmport.modeling.RopeDecoderConfig`, not from ``lmport_llama.LlamaConfig``, so that
    ``lmport-mistral`` installs without ``lmport-llama``; what the two share lives in the core.
    """

    model_type: ClassVar[str] = "mistral"
    hf_architecture: ClassVar[str] = "MistralForCausalLM"
    field_checks = {"sliding_window": Size(MAX_POSITIONS)}

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    sliding_window: int | None = 4096
