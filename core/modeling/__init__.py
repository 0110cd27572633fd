"""Shared model building blocks that architecture plugins compose."""

from .activations import ACTIVATIONS, KnownActivation, get_activation, register_activation
from .base import DecoderModel, PreTrainedCausalLM
from .decoder import RopeDecoderConfig, build_rope_decoder
from .embeddings import ScaledEmbedding
from .initialization import init_parameter, is_norm
from .layers import MLP, Attention, DecoderLayer, GatedMLP, RMSNorm
from .loss import causal_lm_loss
from .outputs import BaseModelOutput, CausalLMOutput, ModelOutput
from .rope import (
    ROPE_TYPES,
    RopeType,
    RotaryEmbedding,
    apply_rotary,
    get_rope_type,
    grow_with_length,
    register_rope,
    rotary_dim,
    standardize_rope_parameters,
    switch_at_original_length,
    validate_rope_parameters,
)

__all__ = [
    "ACTIVATIONS",
    "ROPE_TYPES",
    "Attention",
    "BaseModelOutput",
    "CausalLMOutput",
    "DecoderLayer",
    "DecoderModel",
    "GatedMLP",
    "KnownActivation",
    "MLP",
    "ModelOutput",
    "PreTrainedCausalLM",
    "RMSNorm",
    "RopeDecoderConfig",
    "RopeType",
    "RotaryEmbedding",
    "ScaledEmbedding",
    "apply_rotary",
    "build_rope_decoder",
    "causal_lm_loss",
    "get_activation",
    "get_rope_type",
    "grow_with_length",
    "init_parameter",
    "is_norm",
    "register_activation",
    "register_rope",
    "rotary_dim",
    "standardize_rope_parameters",
    "switch_at_original_length",
    "validate_rope_parameters",
]
