"""Shared model building blocks that architecture plugins compose."""

from .activations import ACTIVATIONS, KnownActivation, get_activation, register_activation
from .base import DecoderModel, PreTrainedCausalLM
from .decoder import RopeDecoderConfig, build_rope_decoder
from .layers import MLP, Attention, DecoderLayer, GatedMLP, RMSNorm
from .loss import causal_lm_loss
from .outputs import BaseModelOutput, CausalLMOutput, ModelOutput
from .rope import RotaryEmbedding, apply_rotary, standardize_rope_parameters, validate_rope_parameters

__all__ = [
    "ACTIVATIONS",
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
    "RotaryEmbedding",
    "apply_rotary",
    "build_rope_decoder",
    "causal_lm_loss",
    "get_activation",
    "register_activation",
    "standardize_rope_parameters",
    "validate_rope_parameters",
]
