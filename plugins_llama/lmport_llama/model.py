"""Llama: pre-norm RMSNorm decoder, rotary attention with grouped KV heads, SwiGLU MLP."""

from __future__ import annotations

from lmport.modeling import PreTrainedCausalLM, build_rope_decoder
from lmport.weights import WeightMap

from .config import LlamaConfig


class LlamaForCausalLM(PreTrainedCausalLM):
    """Llama with a language-model head; module names match transformers', so the weight map is nearly empty."""

    config_class = LlamaConfig
    no_split_modules = ("DecoderLayer",)
    # Old checkpoints carry the rotary tables; they are recomputed, never loaded.
    weight_map = WeightMap(ignore=("model.layers.*.self_attn.rotary_emb.inv_freq",))

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(
            config, build_rope_decoder(config, attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
        )
