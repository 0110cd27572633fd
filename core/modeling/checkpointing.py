"""Activation (gradient) checkpointing of a causal LM's decoder stacks, with transformers' method names."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ArgumentError, UnsupportedFeatureError
from .decoder_model import DecoderModel


class CheckpointingMixin:
    """Mixed into :class:`~lmport.modeling.PreTrainedCausalLM`: turns activation checkpointing of its
    :class:`~lmport.modeling.DecoderModel` stacks on and off, and the input-embedding grad hook."""

    supports_gradient_checkpointing: ClassVar[bool]
    main_input_name: ClassVar[str]

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
