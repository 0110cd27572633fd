"""The decoder stack every causal LM wraps: token (and position) embeddings, the layers, a final norm."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import AttentionMask, is_tracing, packed_segments
from ..cache import KVCache
from .forward_args import check_forward_kwargs
from .outputs import BaseModelOutput
from .rope import RotaryEmbedding


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
