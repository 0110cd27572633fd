"""Mistral: the Llama-style decoder with grouped KV heads and a sliding attention window."""

from __future__ import annotations

from lmport.modeling import PreTrainedCausalLM, build_rope_decoder

from .config import MistralConfig


class MistralForCausalLM(PreTrainedCausalLM):
    """Mistral with a language-model head (module names match transformers': identity weight map)."""

    config_class = MistralConfig
    no_split_modules = ("DecoderLayer",)

    def __init__(self, config: MistralConfig) -> None:
        super().__init__(config, build_rope_decoder(config, sliding_window=config.sliding_window))
