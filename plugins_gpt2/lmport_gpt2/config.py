"""The GPT-2 config: transformers' ``GPT2Config`` fields, keys and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmport.config import (
    MAX_HEADS,
    MAX_INTERMEDIATE_SIZE,
    MAX_POSITIONS,
    Positive,
    PretrainedConfig,
    Probability,
    Size,
)
from lmport.modeling import KnownActivation


@dataclass
class GPT2Config(PretrainedConfig):
    """GPT-2 hyper-parameters. ``config.json`` spells the sizes ``n_embd``, ``n_layer``, ``n_head``, ``n_positions``."""

    model_type: ClassVar[str] = "gpt2"
    hf_architecture: ClassVar[str] = "GPT2LMHeadModel"
    json_names: ClassVar[dict[str, str]] = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
    }
    field_checks = {
        "num_attention_heads": Size(MAX_HEADS),
        "max_position_embeddings": Size(MAX_POSITIONS),
        "n_inner": Size(MAX_INTERMEDIATE_SIZE),
        "activation_function": KnownActivation,
        "resid_pdrop": Probability,
        "embd_pdrop": Probability,
        "attn_pdrop": Probability,
        "layer_norm_epsilon": Positive,
    }

    vocab_size: int = 50257
    hidden_size: int = 768
    num_hidden_layers: int = 12
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    num_attention_heads: int = 12
    max_position_embeddings: int = 1024
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.hidden_size

    def validate(self) -> None:
        super().validate()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"n_embd ({self.hidden_size}) must be a multiple of n_head ({self.num_attention_heads})")
        if self.add_cross_attention:
            raise ValueError("add_cross_attention=True (GPT-2 as an encoder-decoder's decoder) is not supported")
