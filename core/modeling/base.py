"""The causal-LM base class: embeddings + decoder stack + head, loss, tied weights, checkpointing, saving."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from ..attention import AttentionKernel, AttentionMask, packed_segments
from ..cache import KVCache
from ..config import PretrainedConfig
from ..generation import GenerationMixin
from ..weights import IDENTITY, WeightMap
from .compat import TransformersCompat
from .layers import Attention
from .loss import causal_lm_loss
from .outputs import BaseModelOutput, CausalLMOutput
from .rope import RotaryEmbedding

_FORWARD_IGNORED = {"output_attentions", "return_dict", "cache_position"}


class _SkipInit(TorchFunctionMode):
    """Make ``torch.nn.init`` functions no-ops: values of meta tensors are never used.

    Also spares a fresh process the import of ``torch._dynamo`` that ``nn.init`` on
    the meta device triggers (seconds, whatever the model size).
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def build_on_meta(model_class: type[nn.Module], config: Any) -> nn.Module:
    """Instantiate ``model_class(config)`` with every parameter on the meta device, nothing initialised."""
    with torch.device("meta"), _SkipInit():
        return model_class(config)


class DecoderModel(nn.Module):
    """Token embeddings, a stack of decoder layers, a final norm, and positions (rotary or learned).

    Args:
        embed_tokens: the token embedding.
        layers: the decoder layers, each called as ``layer(hidden, (cos, sin) or None, mask)``.
        norm: the final norm.
        rotary_emb: the rotary embedding shared by every layer, or ``None``.
        embed_positions: a learned absolute position embedding added to the tokens', or ``None``.
        embed_dropout: dropout on the summed embeddings while training.
        sliding_window: each query sees only this many most recent keys (itself included); ``None`` for all.
    """

    def __init__(
        self,
        embed_tokens: nn.Embedding,
        layers: list[nn.Module],
        norm: nn.Module,
        rotary_emb: RotaryEmbedding | None = None,
        *,
        embed_positions: nn.Embedding | None = None,
        embed_dropout: float = 0.0,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        if embed_positions is not None:
            self.embed_positions = embed_positions
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.rotary_emb = rotary_emb
        self.embed_dropout = nn.Dropout(embed_dropout)
        self.sliding_window = sliding_window
        self.gradient_checkpointing = False
        self._checkpoint_kwargs: dict[str, Any] = {"use_reentrant": False}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> BaseModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        cache = past_key_values
        if use_cache and cache is None:
            cache = KVCache()
        past = cache.get_seq_length() if cache is not None else 0
        segments = None
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=inputs_embeds.device).unsqueeze(0)
        elif attention_mask is None and past == 0:
            segments = packed_segments(position_ids)  # documents packed in one row
        padding = None
        if attention_mask is not None:
            if attention_mask.shape[-1] != past + seq:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} positions; expected {past + seq} "
                    f"({past} cached + {seq} new)"
                )
            if not bool(attention_mask.all()):
                padding = attention_mask
        mask = AttentionMask(
            q_len=seq, kv_len=past + seq, padding=padding, sliding_window=self.sliding_window, segments=segments
        )

        hidden = inputs_embeds
        if hasattr(self, "embed_positions"):
            hidden = hidden + self.embed_positions(position_ids)
        hidden = self.embed_dropout(hidden)
        position_embeddings = self.rotary_emb(hidden, position_ids) if self.rotary_emb is not None else None
        all_hidden: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden)
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(layer, hidden, position_embeddings, mask, cache, **self._checkpoint_kwargs)
            else:
                hidden = layer(hidden, position_embeddings, mask, cache)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        return BaseModelOutput(
            last_hidden_state=hidden,
            past_key_values=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )


class PreTrainedCausalLM(nn.Module, TransformersCompat, GenerationMixin):
    """Base of every lmport causal LM: ``self.model`` (a :class:`DecoderModel`) and ``self.lm_head``.

    Subclasses set :attr:`config_class` and build ``model`` from the config; the
    class attributes below are plain data the loader reads.
    """

    config_class: ClassVar[type[PretrainedConfig]] = PretrainedConfig
    #: Rules between checkpoint and module tensors (see :mod:`lmport.weights`).
    weight_map: ClassVar[WeightMap] = IDENTITY
    #: ``target: source`` parameter names shared when ``config.tie_word_embeddings``.
    tied_weights: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}
    #: Module class names a device map must not split (for accelerate).
    no_split_modules: ClassVar[tuple[str, ...]] = ()
    supports_gradient_checkpointing: ClassVar[bool] = True
    main_input_name: ClassVar[str] = "input_ids"

    def __init__(self, config: PretrainedConfig, model: DecoderModel) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vocab_size = config.vocab_size
        self.attention_kernel: AttentionKernel | None = None
        from lmport.plugins.attention import KERNELS

        self.set_attention_kernel(KERNELS["sdpa"])
        self.tie_weights()

    # --- construction ----------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        attn_implementation: str | None = None,
        seed: int | None = None,
    ) -> PreTrainedCausalLM:
        """A freshly initialised model (normal(0, ``initializer_range``) weights, unit norms)."""
        from ..loading import select_attention

        model = build_on_meta(cls, config)
        device = torch.device(device)
        model.to_empty(device=device)
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        for module in model.modules():
            model._init_module(module, generator)
        model.init_buffers(device)
        model.tie_weights()
        if dtype is not None:
            model.to(dtype)
        model.set_attention_kernel(select_attention(attn_implementation, config, device, dtype or torch.float32))
        return model

    def _init_module(self, module: nn.Module, generator: torch.Generator | None = None) -> None:
        """Initialise one module's own parameters (see :meth:`init_parameter`)."""
        for attr, param in module.named_parameters(recurse=False):
            self.init_parameter(module, attr, param.data, generator)

    def init_parameter(
        self, module: nn.Module, attr: str, tensor: torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Fill ``tensor`` (``module.<attr>``) as transformers initialises this family, in place.

        Biases are zero, norm weights one, other weights normal(0, ``initializer_range``).
        """
        with torch.no_grad():
            if attr == "bias":
                tensor.zero_()
            elif isinstance(module, (nn.Linear, nn.Embedding)) or "Norm" not in type(module).__name__:
                tensor.normal_(0.0, self.config.initializer_range, generator=generator)
                padding_idx = getattr(module, "padding_idx", None)
                if isinstance(module, nn.Embedding) and padding_idx is not None:
                    tensor[padding_idx].zero_()
            else:
                tensor.fill_(1.0)

    def init_buffers(self, device: torch.device) -> None:
        """Compute every non-persistent buffer on ``device`` (they are never in checkpoints)."""
        for module in self.modules():
            if module is not self and hasattr(module, "init_buffers"):
                module.init_buffers(device)

    def tie_weights(self) -> None:
        """Share the parameters named in :attr:`tied_weights` when the config asks for it."""
        if not getattr(self.config, "tie_word_embeddings", False):
            return
        for target, source in self.tied_weights.items():
            src = self.get_parameter(source)
            owner_name, _, attr = target.rpartition(".")
            setattr(self.get_submodule(owner_name), attr, src)

    def tied_parameter_names(self) -> set[str]:
        """Names that hold no weight of their own in checkpoints (they share another's)."""
        return set(self.tied_weights) if getattr(self.config, "tie_word_embeddings", False) else set()

    # --- attention ----------------------------------------------------------------------

    def set_attention_kernel(self, kernel: AttentionKernel) -> None:
        """Use ``kernel`` in every attention module."""
        self.attention_kernel = kernel
        for module in self.modules():
            if isinstance(module, Attention) or hasattr(module, "kernel"):
                module.kernel = kernel

    @property
    def attn_implementation(self) -> str | None:
        return self.attention_kernel.name if self.attention_kernel is not None else None

    # --- forward ------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.Tensor | None = None,
        ignore_index: int = -100,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        """Logits for every kept position, and the next-token loss when ``labels`` are given.

        Args:
            input_ids: ``(batch, seq)`` token ids (or ``inputs_embeds``).
            attention_mask: ``(batch, seq)``, 1 for tokens and 0 for padding.
            position_ids: ``(batch, seq)`` positions; ``0..seq-1`` by default.
            labels: ``(batch, seq)`` targets, ``-100`` where no loss is taken.
            logits_to_keep: keep only the last N positions' logits (0 keeps all), or the positions given.
            num_items_in_batch: divide the summed loss by this (gradient accumulation).
            past_key_values: a :class:`~lmport.cache.KVCache` of earlier positions (updated in place).
            use_cache: return a cache (a new one if none was given) as ``past_key_values``.

        Position ids that restart at 0 inside a row (and no ``attention_mask``) mark
        packed documents: no token attends across a document boundary.
        """
        unknown = set(kwargs) - _FORWARD_IGNORED
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward got unexpected arguments {sorted(unknown)}")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported; attention weights are never materialised")
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=bool(output_hidden_states),
            past_key_values=past_key_values,
            use_cache=bool(use_cache) or past_key_values is not None,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None or shift_labels is not None:
            loss = causal_lm_loss(
                logits, labels, self.config.vocab_size, num_items_in_batch, ignore_index, shift_labels
            )
        return CausalLMOutput(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    # --- fine-tuning conveniences ----------------------------------------------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each decoder layer's activations in backward instead of storing them."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():
            if isinstance(module, DecoderModel):
                module.gradient_checkpointing = True
                module._checkpoint_kwargs = kwargs
        if kwargs.get("use_reentrant"):
            self.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, DecoderModel):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(isinstance(m, DecoderModel) and m.gradient_checkpointing for m in self.modules())

    def enable_input_require_grads(self) -> None:
        """Make the embeddings' output require grad (needed by reentrant checkpointing over frozen weights)."""

        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(hook)

    def disable_input_require_grads(self) -> None:
        handle = getattr(self, "_require_grads_hook", None)
        if handle is not None:
            handle.remove()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def num_parameters(self, only_trainable: bool = False) -> int:
        """Parameter count (tied parameters once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def named_checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Module tensors that belong in a checkpoint (persistent, untied)."""
        tied = self.tied_parameter_names()
        for name, tensor in self.state_dict().items():
            if name not in tied:
                yield name, tensor

    # --- saving -----------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
        variant: str | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
    ) -> Path:
        """Write ``config.json`` and weights in the Hugging Face layout; returns the folder.

        Weights go through the weight map backwards, so transformers (and lmport)
        load the folder. Shards are ``model-0000i-of-0000n.safetensors`` with an
        index when the weights exceed ``max_shard_size``.
        """
        from ..saving import save_model

        return save_model(
            self,
            Path(save_directory),
            max_shard_size=max_shard_size,
            safe_serialization=safe_serialization,
            variant=variant,
            state_dict=state_dict,
            is_main_process=is_main_process,
        )
