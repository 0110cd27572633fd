"""Llama: pre-norm RMSNorm decoder, rotary attention with grouped KV heads, SwiGLU MLP."""

from __future__ import annotations

from torch import nn

from lmport.modeling import (
    Attention,
    DecoderLayer,
    DecoderModel,
    GatedMLP,
    PreTrainedCausalLM,
    RMSNorm,
    RotaryEmbedding,
)
from lmport.weights import WeightMap

from .config import LlamaConfig


class LlamaModel(DecoderModel):
    """The Llama decoder stack (names match transformers', so the weight map is nearly empty)."""

    def __init__(self, config: LlamaConfig) -> None:
        assert config.head_dim is not None and config.num_key_value_heads is not None
        layers = [
            DecoderLayer(
                self_attn=Attention(
                    config.hidden_size,
                    config.num_attention_heads,
                    config.num_key_value_heads,
                    config.head_dim,
                    bias=config.attention_bias,
                    dropout=config.attention_dropout,
                    layer_idx=i,
                ),
                mlp=GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias),
                input_layernorm=RMSNorm(config.hidden_size, config.rms_norm_eps),
                post_attention_layernorm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            )
            for i in range(config.num_hidden_layers)
        ]
        super().__init__(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id),
            layers=layers,
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            rotary_emb=RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_parameters or {}),
        )


class LlamaForCausalLM(PreTrainedCausalLM):
    """Llama with a language-model head."""

    config_class = LlamaConfig
    no_split_modules = ("DecoderLayer",)
    # Old checkpoints carry the rotary tables; they are recomputed, never loaded.
    weight_map = WeightMap(ignore=("model.layers.*.self_attn.rotary_emb.inv_freq",))

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config, LlamaModel(config))
