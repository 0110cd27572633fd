"""Shared fixtures: tiny checkpoints saved by transformers itself (the oracle) or by lmport."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

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


def tree_digest(folder: Path) -> dict[str, str]:
    """Name → sha256 of every file under ``folder`` (to prove a load changed nothing)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def save_hf_llama_random(
    folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.2, **overrides: Any
) -> Path:
    """Like :func:`save_hf_llama`, but every parameter is random and large enough to matter.

    transformers initialises with std 0.02, unit norms and zero biases: attention is then
    nearly uniform and biases/norms contribute nothing, so a wrong RoPE, bias or norm
    would hardly move the logits. Here weights are normal(0, ``std``), norm weights
    normal(1, 0.1) and biases normal(0, 0.1), so parity checks have teeth.
    """
    import transformers

    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    model.to(dtype).save_pretrained(folder)
    return folder


def randomize_parameters(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fill every parameter of any transformers model with values large enough to matter, in place.

    Weights of norm modules (class name containing ``Norm``) get normal(1, 0.1), biases
    normal(0, 0.1), every other weight normal(0, ``std``). Architecture-agnostic
    companion of :func:`save_hf_llama_random`. Returns ``model``.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "Norm" in type(module).__name__
            for attr, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator)
                if is_norm and attr == "weight":
                    param.copy_(1.0 + 0.1 * noise)
                elif attr == "bias":
                    param.copy_(0.1 * noise)
                else:
                    param.copy_(std * noise)
    return model


def save_hf(
    folder: Path,
    config: Any,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float | None = 0.2,
) -> Path:
    """Save a transformers causal LM built from any transformers ``config`` to ``folder``; returns it.

    The model class comes from ``transformers.AutoModelForCausalLM.from_config``. With
    ``std`` set, parameters are randomised by :func:`randomize_parameters` (so parity
    checks have teeth); with ``std=None`` transformers' own initialisation is kept.
    """
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if std is not None:
        randomize_parameters(model, seed=seed, std=std)
    model.to(dtype).save_pretrained(folder)
    return folder
