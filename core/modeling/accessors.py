"""A causal LM's embedding accessors, parameter count, device and dtype, as transformers names them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class AccessorsMixin:
    """Mixed into :class:`~lmport.modeling.PreTrainedCausalLM` (``self.model.embed_tokens``, ``self.lm_head``)."""

    model: Any
    lm_head: nn.Linear

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
        in_4bit = self.is_loaded_in_4bit
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
