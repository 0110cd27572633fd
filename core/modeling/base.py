"""The causal-LM base class: embeddings + decoder stack + head, loss, tied weights, attention kernel.

Activation checkpointing (:mod:`.checkpointing`), the embedding accessors (:mod:`.accessors`) and the
checkpoint layout of state dicts and saving (:mod:`.checkpoint_io`) are mixins in their own modules;
the decoder stack is :mod:`.decoder_model`'s (re-exported here).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..attention import AttentionKernel
from ..cache import KVCache
from ..config import PretrainedConfig
from ..generation import GenerationMixin
from ..weights import IDENTITY, WeightMap
from .accessors import AccessorsMixin
from .checkpoint_io import CheckpointIOMixin
from .checkpointing import CheckpointingMixin
from .compat import TransformersCompat
from .decoder_model import DecoderModel
from .initialization import init_parameter
from .layers import Attention
from .loss import head_and_loss, wants_chunked_loss
from .outputs import CausalLMOutput


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


class PreTrainedCausalLM(
    CheckpointingMixin, AccessorsMixin, CheckpointIOMixin, nn.Module, TransformersCompat, GenerationMixin
):
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
    #: Tensor-parallel plan: module-name pattern (``*`` = one segment) → style (see :mod:`lmport.distributed`).
    tp_plan: ClassVar[dict[str, str]] = {
        "model.embed_tokens": "embedding_rowwise",
        "model.layers.*.self_attn.q_proj": "colwise",
        "model.layers.*.self_attn.k_proj": "colwise",
        "model.layers.*.self_attn.v_proj": "colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "lm_head": "colwise_gather_output",
    }
    #: FSDP2 units: module-name pattern → ``"free_full_weight"`` (resharded after forward) or ``"keep_full_weight"``;
    #: each match gets its own ``fully_shard``, the rest goes to the root's.
    fsdp_plan: ClassVar[dict[str, str]] = {"model.layers.*": "free_full_weight"}
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
        from ..hooks import select_attention
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
            skip_logits: (keyword) ``True``: compute the loss chunk by chunk and return no logits;
                ``False``: return the logits. By default a training forward (``model.training``, gradients
                on) with ``labels`` and a ``ModelOutput`` result skips them, unless ``model.chunked_loss``
                is ``False`` (see :func:`~lmport.modeling.loss.wants_chunked_loss`); the output's
                ``logits_materialized`` says which. The loss is the same either way.

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
        chunked = wants_chunked_loss(self, labels, kwargs.pop("skip_logits", None), return_dict)
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
        logits, loss = head_and_loss(
            self.lm_head,
            hidden,
            labels,
            vocab_size=self.config.vocab_size,
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
            shift_labels=shift_labels,
            chunked=chunked,
            chunk_size=getattr(self, "loss_chunk_size", None),
        )
        result = CausalLMOutput(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )
        return result if return_dict else result.to_tuple()
