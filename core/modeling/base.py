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

from ..attention import AttentionKernel, AttentionMask, is_tracing, packed_segments
from ..cache import KVCache
from ..config import PretrainedConfig
from ..errors import ArgumentError, UnsupportedFeatureError
from ..generation import GenerationMixin
from ..weights import IDENTITY, WeightMap
from .compat import TransformersCompat
from .forward_args import check_forward_kwargs
from .initialization import init_parameter
from .layers import Attention
from .loss import causal_lm_loss
from .outputs import BaseModelOutput, CausalLMOutput
from .rope import RotaryEmbedding

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
        embed_token_types: ``token_type_ids`` given to forward are embedded by ``embed_tokens`` and added
            (GPT-2, as transformers does); otherwise they are ignored, as transformers' Llama ignores them.
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
        embed_token_types: bool = False,
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
        self.embed_token_types = embed_token_types
        self.gradient_checkpointing = False
        self._checkpoint_kwargs: dict[str, Any] = {"use_reentrant": False}
        self._checkpoint_every = 1  # checkpoint layers 0, n, 2n, ...
        self._checkpoint_offload = False  # keep the checkpointed inputs in CPU memory

    def _checkpointed(self, layer: nn.Module, hidden: torch.Tensor, *args: Any) -> torch.Tensor:
        """``layer(hidden, *args)`` with its activations recomputed in backward."""
        if not self._checkpoint_offload:
            return checkpoint(layer, hidden, *args, **self._checkpoint_kwargs)
        device = hidden.device.type
        with torch.autograd.graph.save_on_cpu(pin_memory=device != "cpu", device_type=device):
            return checkpoint(layer, hidden, *args, **self._checkpoint_kwargs)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput | tuple[Any, ...]:
        """Hidden states of the last layer (and of every layer with ``output_hidden_states``).

        ``kwargs``: the extra arguments transformers' models take (``return_dict``,
        ``output_attentions=False``, ``cache_position``, the varlen ``cu_seq_lens_*`` and
        ``max_length_*`` of packed rows...), checked by :func:`~lmport.modeling.forward_args.check_forward_kwargs`.
        """
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
            # An all-ones mask keeps sdpa's fast causal path in eager mode; traced code cannot ask.
            if is_tracing(attention_mask) or not bool(attention_mask.all()):
                padding = attention_mask
        mask = AttentionMask(
            q_len=seq, kv_len=past + seq, padding=padding, sliding_window=self.sliding_window, segments=segments
        )
        return_dict = check_forward_kwargs(
            type(self).__name__,
            kwargs,
            position_ids=position_ids,
            segments=segments,
            past_length=past,
            has_padding=padding is not None,
        )

        hidden = inputs_embeds
        if hasattr(self, "embed_positions"):
            hidden = hidden + self.embed_positions(position_ids)
        if token_type_ids is not None and self.embed_token_types:
            hidden = hidden + self.embed_tokens(token_type_ids)
        hidden = self.embed_dropout(hidden)
        position_embeddings = self.rotary_emb(hidden, position_ids) if self.rotary_emb is not None else None
        all_hidden: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden)
            if self.gradient_checkpointing and self.training and i % self._checkpoint_every == 0:
                hidden = self._checkpointed(layer, hidden, position_embeddings, mask, cache)
            else:
                hidden = layer(hidden, position_embeddings, mask, cache)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        out = BaseModelOutput(
            last_hidden_state=hidden,
            past_key_values=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )
        return out.to_tuple() if return_dict is False else out


class PreTrainedCausalLM(nn.Module, TransformersCompat, GenerationMixin):
    """Base of every lmport causal LM: ``self.model`` (a :class:`DecoderModel`) and ``self.lm_head``.

    Subclasses set :attr:`config_class` and build ``model`` from the config; the
    class attributes below are plain data the loader reads.
    """

    config_class: ClassVar[type[PretrainedConfig]] = PretrainedConfig
    #: Rules between checkpoint and module tensors (see :mod:`lmport.weights`); see :meth:`weight_map_for`.
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
    def weight_map_for(cls, config: PretrainedConfig) -> WeightMap:
        """The weight map of checkpoints of ``config``: :attr:`weight_map` unless overridden.

        Override it when the rules depend on the config (the split sizes of a fused q/k/v
        projection under grouped KV heads). Loading and saving ask the ``lmport_weight_mapping``
        hook, whose default answer is this; a plugin implementing the hook takes precedence.
        """
        return cls.weight_map

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
        """A freshly initialised model: each parameter filled by :meth:`init_parameter`, buffers computed."""
        from ..loading import select_attention
        from ..registry import get_registry

        get_registry().ensure(config.model_type, model_class=cls)  # its hooks answer (kernel, saving)
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

        The rules per parameter kind are :mod:`lmport.modeling.initialization`'s: a module's own
        ``init_values`` first, then biases zero, linear and embedding weights normal(0,
        ``initializer_range``), norm weights one. Override to add rules that depend on the model.
        """
        init_parameter(module, attr, tensor, self.config.initializer_range, generator)

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
        ignore_index: int = -100,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput | tuple[Any, ...]:
        """Logits for every kept position, and the next-token loss when ``labels`` are given.

        Args:
            input_ids: ``(batch, seq)`` token ids (or ``inputs_embeds``).
            attention_mask: ``(batch, seq)``, 1 for tokens and 0 for padding.
            position_ids: ``(batch, seq)`` positions; ``0..seq-1`` by default.
            labels: ``(batch, seq)`` targets, ``-100`` where no loss is taken.
            logits_to_keep: keep only the last N positions' logits (0 keeps all), or the positions given.
            num_items_in_batch: divide the summed loss by this (gradient accumulation).
            ignore_index: the label that takes no loss.
            shift_labels: (keyword) ``(batch, seq)`` targets already shifted, used in place of shifting
                ``labels`` (a loss is taken only when ``labels`` are given, as in transformers);
                read from ``**kwargs`` so that Trainer, which takes every forward parameter named
                like ``*label*`` for a label column, sees ``labels`` alone, as with transformers' models.
            past_key_values: a :class:`~lmport.cache.KVCache` of earlier positions (updated in place).
            use_cache: return a cache (a new one if none was given) as ``past_key_values``.
            return_dict: (keyword) ``False`` returns the output as a tuple of its set fields, as transformers
                does (default: ``config.return_dict``, else ``True``).
            token_type_ids: (keyword) embedded and added by models that have token types (GPT-2), ignored
                by the others, as in transformers.

        Position ids that restart at 0 inside a row (and no ``attention_mask``) mark
        packed documents: no token attends across a document boundary. The other keyword
        arguments transformers' models take (``output_attentions=False``, ``cache_position``,
        flash-style ``cu_seq_lens_q/k``, ``max_length_q/k``, ``seq_idx``) are checked against the
        batch by :func:`~lmport.modeling.forward_args.check_forward_kwargs`: a value lmport cannot
        honour, or that contradicts ``position_ids``, raises a typed error, as do unknown names.
        """
        shift_labels: torch.Tensor | None = kwargs.pop("shift_labels", None)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=bool(output_hidden_states),
            past_key_values=past_key_values,
            use_cache=bool(use_cache) or past_key_values is not None,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(
                logits, labels, self.config.vocab_size, num_items_in_batch, ignore_index, shift_labels
            )
        result = CausalLMOutput(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )
        return result if return_dict else result.to_tuple()

    # --- fine-tuning conveniences ----------------------------------------------------

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute decoder layers' activations in backward instead of storing them (while training).

        Args:
            activation_checkpointing_kwargs: keyword arguments of ``torch.utils.checkpoint.checkpoint``;
                ``use_reentrant`` is ``False`` unless given.
            every_n_layers: checkpoint layers 0, n, 2n, ... only; the others keep their activations.
            offload: keep the inputs saved for the recompute in CPU memory.

        As in transformers, the input embeddings' output is made to require grad, so frozen
        embeddings (peft) still let gradients reach the checkpointed layers.
        """
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ArgumentError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        decoders = [m for m in self.modules() if isinstance(m, DecoderModel)]
        if not self.supports_gradient_checkpointing or not decoders:
            raise UnsupportedFeatureError(f"{type(self).__name__} does not support activation checkpointing")
        for module in decoders:
            module.gradient_checkpointing = True
            module._checkpoint_kwargs = kwargs
            module._checkpoint_every = every_n_layers
            module._checkpoint_offload = bool(offload)
        if self.main_input_name == "input_ids":
            self.enable_input_require_grads()

    def gradient_checkpointing_enable(
        self,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """The older name of :meth:`activation_checkpointing_enable` (peft and TRL call it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        """Store activations again (undoes :meth:`activation_checkpointing_enable`)."""
        for module in self.modules():
            if isinstance(module, DecoderModel):
                module.gradient_checkpointing = False

    def gradient_checkpointing_disable(self) -> None:
        """The older name of :meth:`activation_checkpointing_disable`."""
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether activation checkpointing is on."""
        return any(isinstance(m, DecoderModel) and m.gradient_checkpointing for m in self.modules())

    @property
    def is_gradient_checkpointing(self) -> bool:
        """The older name of :attr:`is_activation_checkpointing`."""
        return self.is_activation_checkpointing

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

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count as transformers counts it: tied parameters once.

        Args:
            only_trainable: count only parameters that require grad.
            exclude_embeddings: leave out the weights of ``nn.Embedding`` modules (tokens and
                learned positions; a head tied to them goes too, as it is counted once).

        4-bit parameters count twice their stored bytes, as transformers reports them.
        """
        embeddings = (
            {f"{name}.weight" for name, m in self.named_modules() if isinstance(m, nn.Embedding)}
            if exclude_embeddings
            else set()
        )
        in_4bit = getattr(self, "is_loaded_in_4bit", False)
        total = 0
        for name, param in self.named_parameters():
            if name in embeddings or not (param.requires_grad or not only_trainable):
                continue
            if in_4bit and type(param).__name__ == "Params4bit":  # bitsandbytes packs two values a byte
                total += param.numel() * 2 * param.element_size()
            else:
                total += param.numel()
        return total

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

    # --- state dicts in checkpoint layout ---------------------------------------------------

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Let ``load_state_dict`` take checkpoint names and layouts as well as module names.

        Trainer resumes (and loads its best model) by ``load_state_dict`` of the safetensors
        file in a checkpoint, which :meth:`save_pretrained` wrote in the Hugging Face layout.
        Each name that is not one of this module's state keys goes through the weight map
        (renamed, split, transposed); names it cannot place stay as they are and are reported
        as unexpected, and a tied parameter is taken from the tensor it is tied to.
        """
        self._to_module_layout(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _to_module_layout(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Rewrite, in place, the checkpoint-named entries of ``state_dict`` under ``prefix`` as module tensors."""
        own = self.state_dict(keep_vars=True).keys()
        foreign = [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in own]
        if foreign:
            from ..registry import get_registry

            weight_map = get_registry().weight_map_for(self.config, type(self))
            for key in foreign:
                name = key[len(prefix) :]
                if weight_map.ignored(name):  # dropped as from_pretrained drops it
                    del state_dict[key]
                    continue
                parts = weight_map.to_module(name, state_dict[key])
                if all(part in own for part, _ in parts):
                    del state_dict[key]
                    state_dict.update((prefix + part, tensor) for part, tensor in parts)
        for target in self.tied_parameter_names():
            source = prefix + self.tied_weights[target]
            if prefix + target not in state_dict and source in state_dict:
                state_dict[prefix + target] = state_dict[source]

    # --- saving -----------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "50GB",
        variant: str | None = None,
        token: str | bool | None = None,
        save_peft_format: bool = True,
        save_original_format: bool = True,
        distributed_checkpoint: bool = False,
        *,
        safe_serialization: bool = True,
        save_function: Any = None,
        **kwargs: Any,
    ) -> Path:
        """Write ``config.json`` and weights in the Hugging Face layout; returns the folder.

        Takes transformers' arguments. Weights go through the weight map backwards, so
        transformers (and lmport) load the folder. Shards are ``model-0000i-of-0000n.safetensors``
        with an index when the weights exceed ``max_shard_size``; ``safe_serialization=False``
        writes ``pytorch_model.bin`` with ``save_function`` (``torch.save`` by default).
        ``push_to_hub=True`` then uploads what the save wrote (and a model card) to ``repo_id``
        (default: the folder's name), with ``commit_message``, ``commit_description``,
        ``revision``, ``create_pr``, ``token`` and ``create_repo``'s ``private``, ``visibility``,
        ``resource_group_id``, ``region`` from ``kwargs``. ``save_peft_format`` has no effect
        (peft saves its own adapters). Other arguments raise :class:`~lmport.errors.ArgumentError`.
        """
        from ..saving import save_model

        return save_model(
            self,
            Path(save_directory),
            is_main_process=is_main_process,
            state_dict=state_dict,
            push_to_hub=push_to_hub,
            max_shard_size=max_shard_size,
            variant=variant,
            token=token,
            safe_serialization=safe_serialization,
            save_function=save_function,
            save_peft_format=save_peft_format,
            save_original_format=save_original_format,
            distributed_checkpoint=distributed_checkpoint,
            **kwargs,
        )
