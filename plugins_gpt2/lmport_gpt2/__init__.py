"""GPT-2 for lmport: ``model_type = "gpt2"``, computing what transformers' GPT2LMHeadModel computes."""

from lmport import Architecture

from .config import GPT2Config
from .gguf import GPT2_GGUF
from .model import GPT2LMHeadModel

TINY_CONFIG = {
    "vocab_size": 256,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 128,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "bos_token_id": 255,  # GPT-2's default 50256 lies outside a tiny vocabulary
    "eos_token_id": 255,
}

plugin = Architecture("gpt2", GPT2Config, GPT2LMHeadModel, tiny_config=TINY_CONFIG, gguf=(GPT2_GGUF,))

__all__ = ["GPT2_GGUF", "TINY_CONFIG", "GPT2Config", "GPT2LMHeadModel", "plugin"]
