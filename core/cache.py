"""The key/value cache used by incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every position seen so far, one pair of tensors per layer.

    Tensors are ``(batch, kv_heads, seen, head_dim)``; :meth:`update` appends the
    new positions and returns the whole history for attention.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """How many positions layer ``layer_idx`` has seen."""
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key``/``value`` for ``layer_idx``; return all keys and values it has seen."""
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        elif layer_idx < len(self.keys):
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        else:
            raise IndexError(f"cache has {len(self.keys)} layers; layer {layer_idx} cannot be updated first")
        return self.keys[layer_idx], self.values[layer_idx]

    def reset(self) -> None:
        """Forget every position: the next forward fills the cache again from the start of its input.

        An architecture whose cached keys/values become stale (Phi-3 at its LongRoPE switch)
        calls it from ``prepare_inputs_for_generation``; the whole sequence is then recomputed.
        """
        self.keys.clear()
        self.values.clear()

    def crop(self, max_length: int) -> None:
        """Keep only the first ``max_length`` positions of every layer (a negative value drops that many
        from the end), as transformers' ``DynamicCache.crop``."""
        if max_length < 0:
            max_length = max(0, self.get_seq_length() + max_length)
        if self.get_seq_length() <= max_length:
            return
        self.keys = [k[..., :max_length, :] for k in self.keys]
        self.values = [v[..., :max_length, :] for v in self.values]

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (beam reordering, finished rows)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
