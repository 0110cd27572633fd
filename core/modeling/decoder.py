"""The rotary pre-norm decoder family (Llama, Mistral and relatives): a shared config base and builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import (
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_INTERMEDIATE_SIZE,
    MAX_POSITIONS,
    Positive,
    PretrainedConfig,
    Probability,
    Real,
    Size,
    TokenId,
)
from .activations import KnownActivation
from .base import DecoderModel
from .layers import Attention, DecoderLayer, GatedMLP, RMSNorm
from .rope import RotaryEmbedding, standardize_rope_parameters, validate_rope_parameters


@dataclass
class RopeDecoderConfig(PretrainedConfig):
    """Fields shared by rotary, RMSNorm, gated-MLP decoders; both RoPE spellings are read.

    ``rope_scaling`` + ``rope_theta`` (legacy) and ``rope_parameters`` (current) in
    ``config.json`` both end up in :attr:`rope_parameters`, which is what is saved.
    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and
    ``num_key_value_heads`` to ``num_attention_heads``.
    """

    field_checks = {
        "intermediate_size": Size(MAX_INTERMEDIATE_SIZE),
        "num_attention_heads": Size(MAX_HEADS),
        "num_key_value_heads": Size(MAX_HEADS),
        "head_dim": Size(MAX_HEAD_DIM),
        "hidden_act": KnownActivation,
        "max_position_embeddings": Size(MAX_POSITIONS),
        "rms_norm_eps": Positive,
        "attention_dropout": Probability,
        "pad_token_id": TokenId(strict=True),  # the embedding's padding row
    }

    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: dict[str, Any] | None = None
    attention_dropout: float = 0.0

    @classmethod
    def _upgrade_legacy(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = super()._upgrade_legacy(raw)
        rope_scaling = raw.pop("rope_scaling", None)
        rope_theta = raw.pop("rope_theta", None)
        if rope_scaling is not None or rope_theta is not None or raw.get("rope_parameters") is not None:
            if rope_theta is not None and Real(1.0, min_open=True)(rope_theta, None):
                raise ValueError(f"key 'rope_theta' must be a finite number > 1, got {rope_theta!r:.60}")
            max_positions = raw.get("max_position_embeddings", cls.max_position_embeddings)
            params = standardize_rope_parameters(raw.get("rope_parameters"), rope_scaling, rope_theta, max_positions)
            if Size(MAX_POSITIONS)(max_positions, None) is None:  # else its own check names it
                key = "rope_scaling" if rope_scaling is not None else "rope_parameters"
                validate_rope_parameters(params, key=key, warn=False)
            raw["rope_parameters"] = params
        return raw

    def validate(self) -> None:
        super().validate()
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}) unless head_dim is given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: rotary embeddings rotate pairs of dimensions")
        self.rope_parameters = standardize_rope_parameters(
            self.rope_parameters, None, None, self.max_position_embeddings
        )
        validate_rope_parameters(self.rope_parameters, head_dim=self.head_dim)


def build_rope_decoder(
    config: RopeDecoderConfig,
    *,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    sliding_window: int | None = None,
) -> DecoderModel:
    """The decoder stack of a rotary pre-norm model, named as transformers names Llama's modules.

    Args:
        config: the parsed config.
        attention_bias: bias on q/k/v/o projections.
        mlp_bias: bias on the gated MLP's projections.
        sliding_window: attention window (Mistral), ``None`` for full causal attention.
    """
    assert config.head_dim is not None and config.num_key_value_heads is not None
    layers = [
        DecoderLayer(
            self_attn=Attention(
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim,
                bias=attention_bias,
                dropout=config.attention_dropout,
                layer_idx=i,
            ),
            mlp=GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=mlp_bias),
            input_layernorm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            post_attention_layernorm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        )
        for i in range(config.num_hidden_layers)
    ]
    return DecoderModel(
        embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id),
        layers=layers,
        norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        rotary_emb=RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_parameters or {}),
        sliding_window=sliding_window,
    )
