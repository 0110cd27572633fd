"""Llama for lmport: ``model_type = "llama"``, computing what transformers' LlamaForCausalLM computes."""

from lmport import Architecture

from .config import LlamaConfig
from .model import LlamaForCausalLM, LlamaModel

plugin = Architecture("llama", LlamaConfig, LlamaForCausalLM)

__all__ = ["LlamaConfig", "LlamaForCausalLM", "LlamaModel", "plugin"]
