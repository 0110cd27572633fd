"""The Llama config: transformers' ``LlamaConfig`` fields and defaults, legacy RoPE keys read too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lmport.config import PretrainedConfig
from lmport.modeling import standardize_rope_parameters, validate_rope_parameters


@dataclass
class LlamaConfig(PretrainedConfig):
    """Llama (1, 2, 3, 3.1+) hyper-parameters as ``config.json`` spells them."""

    model_type: ClassVar[str] = "llama"
    hf_architecture: ClassVar[str] = "LlamaForCausalLM"

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    pretraining_tp: int | None = 1
    rope_parameters: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False

    @classmethod
    def _upgrade_legacy(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = super()._upgrade_legacy(raw)
        rope_scaling = raw.pop("rope_scaling", None)
        rope_theta = raw.pop("rope_theta", None)
        if rope_scaling is not None or rope_theta is not None or raw.get("rope_parameters") is not None:
            raw["rope_parameters"] = standardize_rope_parameters(
                raw.get("rope_parameters"), rope_scaling, rope_theta, raw.get("max_position_embeddings", 2048)
            )
        return raw

    def validate(self) -> None:
        super().validate()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.rope_parameters = standardize_rope_parameters(
            self.rope_parameters, None, None, self.max_position_embeddings
        )
        validate_rope_parameters(self.rope_parameters)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
