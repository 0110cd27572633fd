"""Llama for lmport: ``model_type = "llama"``, computing what transformers' LlamaForCausalLM computes."""

from lmport import Architecture

from .config import LlamaConfig
from .gguf import LLAMA_GGUF
from .model import LlamaForCausalLM

TINY_CONFIG = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}

plugin = Architecture("llama", LlamaConfig, LlamaForCausalLM, tiny_config=TINY_CONFIG, gguf=(LLAMA_GGUF,))

__all__ = ["LLAMA_GGUF", "TINY_CONFIG", "LlamaConfig", "LlamaForCausalLM", "plugin"]
