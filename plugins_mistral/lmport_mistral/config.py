"""The Mistral config: transformers' ``MistralConfig`` fields and defaults, derived from Llama's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmport.config import MAX_POSITIONS, Size
from lmport_llama import LlamaConfig


@dataclass(kw_only=True)
class MistralConfig(LlamaConfig):
    """Mistral hyper-parameters; ``sliding_window`` (or ``None``) bounds how far back a query sees.

    Mistral is Llama with grouped KV heads and a sliding window: this class derives from
    ``lmport_llama.LlamaConfig`` and changes only what transformers' ``MistralConfig`` does
    differently (Mistral-7B's sizes, the window). Llama's ``pretraining_tp``, ``attention_bias``
    and ``mlp_bias`` are not Mistral's keys (:attr:`omitted_fields`): ``config.json`` is read and
    written exactly as transformers' ``MistralConfig`` reads and writes it.
    """

    model_type: ClassVar[str] = "mistral"
    hf_architecture: ClassVar[str] = "MistralForCausalLM"
    omitted_fields: ClassVar[frozenset[str]] = frozenset({"pretraining_tp", "attention_bias", "mlp_bias"})
    field_checks = {"sliding_window": Size(MAX_POSITIONS)}

    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    sliding_window: int | None = 4096
