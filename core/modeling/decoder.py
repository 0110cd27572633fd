"""The rotary pre-norm decoder family (Llama, Mistral and relatives): a shared config base and builder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

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
from .embeddings import ScaledEmbedding
from .layers import Attention, DecoderLayer, GatedMLP, RMSNorm
from .rope import RotaryEmbedding, rotary_dim, standardize_rope_parameters, validate_rope_parameters


@dataclass(kw_only=True)
class RopeDecoderConfig(PretrainedConfig):
    """Fields shared by rotary, RMSNorm, gated-MLP decoders; both RoPE spellings are read.

    ``rope_scaling`` + ``rope_theta`` (legacy) and ``rope_parameters`` (current) in
    ``config.json`` both end up in :attr:`rope_parameters`, which is what is saved.
    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and
    ``num_key_value_heads`` to ``num_attention_heads``. The sizes, ``hidden_act``,
    ``max_position_embeddings``, ``rms_norm_eps`` and :attr:`default_theta` have no default here:
    each architecture's subclass gives transformers' defaults for it.

    RoPE types are those registered with :func:`~lmport.modeling.register_rope`. A subclass
    with a field ``original_max_position_embeddings`` (Phi-3) has it replace the RoPE dict's, as
    transformers does.
    """

    #: The architecture rotates only the first ``int(head_dim * partial_rotary_factor)`` dimensions of
    #: each head: ``partial_rotary_factor`` < 1 is accepted (in ``rope_parameters``, or top-level in
    #: ``config.json``, folded into ``rope_parameters``). Otherwise it is refused.
    supports_partial_rotary: ClassVar[bool] = False
    #: ``rope_type`` spellings this architecture reads as another type (Phi-3: ``{"yarn": "longrope"}``).
    rope_type_aliases: ClassVar[dict[str, str]] = {}
    #: The ``rope_theta`` of a ``config.json`` that gives none (transformers' ``default_theta`` of the
    #: architecture, 10000.0 for Llama); ``None`` here: such a config fails naming the key.
    default_theta: ClassVar[float | None] = None

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

    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
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
            max_positions = raw.get("max_position_embeddings", cls.field_default("max_position_embeddings"))
            if max_positions is None:
                raise ValueError(f"key 'max_position_embeddings' required: {cls.__name__} has no default for it")
            params = standardize_rope_parameters(
                raw.get("rope_parameters"),
                rope_scaling,
                rope_theta,
                max_positions,
                **cls._rope_context(lambda name: raw[name] if name in raw else cls._default_or_none(name)),
            )
            if Size(MAX_POSITIONS)(max_positions, None) is None:  # else its own check names it
                key = "rope_scaling" if rope_scaling is not None else "rope_parameters"
                validate_rope_parameters(params, key=key, warn=False, partial_rotary=cls.supports_partial_rotary)
            raw["rope_parameters"] = params
        return raw

    @classmethod
    def _default_or_none(cls, name: str) -> Any:
        return cls.field_default(name) if cls.has_field(name) else None

    @classmethod
    def _rope_context(cls, get: Callable[[str], Any]) -> dict[str, Any]:
        """What besides the RoPE dict standardizes it: aliases, and the top-level keys this class folds in."""
        context: dict[str, Any] = {"aliases": cls.rope_type_aliases, "default_theta": cls.default_theta}
        if cls.supports_partial_rotary:
            context["partial_rotary_factor"] = get("partial_rotary_factor")
        if cls.has_field("original_max_position_embeddings"):
            context["original_max_position_embeddings"] = get("original_max_position_embeddings")
        return context

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
        self.rope_parameters = standardize_rope_parameters(
            self.rope_parameters,
            None,
            None,
            self.max_position_embeddings,
            **self._rope_context(lambda name: getattr(self, name, None)),
        )
        if self.head_dim % 2 and self.rope_parameters.get("partial_rotary_factor", 1.0) == 1.0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: rotary embeddings rotate pairs of dimensions")
        validate_rope_parameters(
            self.rope_parameters, head_dim=self.head_dim, partial_rotary=self.supports_partial_rotary
        )


def build_rope_decoder(
    config: RopeDecoderConfig,
    *,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    sliding_window: int | None = None,
    norm: Callable[[int, float], nn.Module] = RMSNorm,
    embedding: Callable[..., nn.Module] | None = None,
    embed_scale: float | None = None,
    attention: Callable[..., nn.Module] = Attention,
    mlp: Callable[..., nn.Module] = GatedMLP,
    layer: Callable[..., nn.Module] = DecoderLayer,
) -> DecoderModel:
    """The decoder stack of a rotary pre-norm model, named as transformers names Llama's modules.

    Every part is built by a class (or any callable taking the same arguments), so an
    architecture swaps one by passing its own; the defaults build Llama.

    Args:
        config: the parsed config.
        attention_bias: bias on q/k/v/o projections.
        mlp_bias: bias on the gated MLP's projections.
        sliding_window: attention window (Mistral), ``None`` for full causal attention.
        norm: every norm (two per layer and the final one), called ``norm(hidden_size, rms_norm_eps)``.
        embedding: the token embedding, called ``embedding(vocab_size, hidden_size, pad_token_id)``, with
            ``scale=embed_scale`` added when that is set; default ``nn.Embedding``, or
            :class:`~lmport.modeling.ScaledEmbedding` with ``embed_scale``.
        embed_scale: multiply the token embeddings by this, in the model's dtype (Gemma:
            ``hidden_size ** 0.5``); ``None`` for no scaling.
        attention: each layer's attention, called ``attention(hidden_size, num_attention_heads,
            num_key_value_heads, head_dim, bias=attention_bias, dropout=attention_dropout, layer_idx=i)``
            (:class:`~lmport.modeling.Attention`'s signature).
        mlp: each layer's MLP, called ``mlp(hidden_size, intermediate_size, hidden_act, bias=mlp_bias)``
            (:class:`~lmport.modeling.GatedMLP`'s signature).
        layer: each decoder layer, called ``layer(self_attn=, mlp=, input_layernorm=, post_attention_layernorm=)``
            and then as ``layer(hidden, (cos, sin), mask, cache)`` (:class:`~lmport.modeling.DecoderLayer`).

    A part that needs more of the config than its arguments closes over it
    (``mlp=lambda h, i, act, bias: MyMLP(config, h, i)``).
    """
    assert config.head_dim is not None and config.num_key_value_heads is not None
    eps = config.rms_norm_eps
    layers = [
        layer(
            self_attn=attention(
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim,
                bias=attention_bias,
                dropout=config.attention_dropout,
                layer_idx=i,
            ),
            mlp=mlp(config.hidden_size, config.intermediate_size, config.hidden_act, bias=mlp_bias),
            input_layernorm=norm(config.hidden_size, eps),
            post_attention_layernorm=norm(config.hidden_size, eps),
        )
        for i in range(config.num_hidden_layers)
    ]
    if embed_scale is None:
        embed_tokens = (embedding or nn.Embedding)(config.vocab_size, config.hidden_size, config.pad_token_id)
    else:
        embed_tokens = (embedding or ScaledEmbedding)(
            config.vocab_size, config.hidden_size, config.pad_token_id, scale=embed_scale
        )
    return DecoderModel(
        embed_tokens=embed_tokens,
        layers=layers,
        norm=norm(config.hidden_size, eps),
        rotary_emb=RotaryEmbedding(
            rotary_dim(config.head_dim, config.rope_parameters or {}),
            config.max_position_embeddings,
            config.rope_parameters or {},
        ),
        sliding_window=sliding_window,
    )
