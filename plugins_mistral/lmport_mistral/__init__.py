"""Mistral for lmport: ``model_type = "mistral"``, computing what transformers' MistralForCausalLM computes."""

from lmport import Architecture

from .config import MistralConfig
from .gguf import MISTRAL_GGUF
from .model import MistralForCausalLM

TINY_CONFIG = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "sliding_window": 16,
}

plugin = Architecture("mistral", MistralConfig, MistralForCausalLM, tiny_config=TINY_CONFIG, gguf=(MISTRAL_GGUF,))

__all__ = ["MISTRAL_GGUF", "TINY_CONFIG", "MistralConfig", "MistralForCausalLM", "plugin"]
