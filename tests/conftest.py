"""Shared fixtures: tiny checkpoints saved by transformers itself (the oracle) or by lmport."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from lmport.testing import folder_digest as tree_digest  # noqa: F401 - re-exported for the test modules
from lmport.testing import randomize_parameters, save_reference_checkpoint  # noqa: F401

TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

TINY_GPT2: dict[str, Any] = dict(
    vocab_size=128,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=64,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)

WINDOW = 4  # the sliding window of the tiny Mistral


def tiny_configs(**tokens: Any) -> dict[str, Callable[[], Any]]:
    """Architecture -> factory of a tiny transformers config: Llama, GPT-2, and Mistral with a window of
    :data:`WINDOW`; ``tokens`` (bos/eos ids) are set in each."""
    import transformers

    return {
        "llama": lambda: transformers.LlamaConfig(**TINY_LLAMA, **tokens),
        "gpt2": lambda: transformers.GPT2Config(**TINY_GPT2, **tokens),
        "mistral": lambda: transformers.MistralConfig(**TINY_LLAMA, sliding_window=WINDOW, **tokens),
    }


def save_hf_llama(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Path:
    """Save a randomly initialised transformers LlamaForCausalLM to ``folder``; returns it."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def hf_llama(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``hf_llama(**config_overrides, seed=0, dtype=..., name="ckpt")`` → folder saved by transformers."""

    def make(name: str = "ckpt", **kwargs: Any) -> Path:
        return save_hf_llama(tmp_path / name, **kwargs)

    return make


def save_hf_llama_random(
    folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.2, **overrides: Any
) -> Path:
    """Like :func:`save_hf_llama`, but every parameter is random and large enough to matter
    (:func:`lmport.testing.randomize_parameters`), so parity checks have teeth."""
    return save_reference_checkpoint("llama", {**TINY_LLAMA, **overrides}, folder, seed=seed, dtype=dtype, std=std)


#: Tiny configs for the bitsandbytes tests: its CPU 4-bit kernel repacks weights for AVX512-BF16 and
#: needs in_features to be a multiple of the 64-weight block, so every projection is 64 or 128 wide.
QUANT_LLAMA: dict[str, Any] = dict(intermediate_size=128, num_hidden_layers=2)
QUANT_MISTRAL = transformers.MistralConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, sliding_window=4,
)  # fmt: skip
QUANT_GPT2 = transformers.GPT2Config(
    vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
)


def save_hf(
    folder: Path,
    config: Any,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float | None = 0.2,
) -> Path:
    """Save a transformers causal LM built from any transformers ``config`` to ``folder``; returns it.

    :func:`lmport.testing.save_reference_checkpoint`: with ``std`` set, parameters are randomised
    (so parity checks have teeth); with ``std=None`` transformers' own initialisation is kept.
    """
    return save_reference_checkpoint(config.model_type, config, folder, seed=seed, dtype=dtype, std=std)
